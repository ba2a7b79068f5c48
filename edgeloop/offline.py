"""No network but loopback: the environment that keeps edgeloop's libraries from phoning home.

edgeloop never looks up or contacts a host but loopback (and the ones its config names); some of
the libraries it runs reach out on their own:

* ONNX Runtime (1.32 on Linux) starts a telemetry client that resolves
  ``mobile.events.data.microsoft.com`` in processes that live more than ~15 s, unless
  ``ORT_DISABLE_TELEMETRY`` is set before ``onnxruntime`` is imported (``disable_telemetry_events()``
  afterwards is too late). :func:`disable_library_telemetry` sets it; importing :mod:`edgeloop`
  calls it, so every edgeloop process has it before any backend loads ONNX Runtime.
* ultralytics makes DNS probes, runs ``pip install`` for missing packages, keeps settings in
  ``~/.config/Ultralytics``, and fetches a font (Arial) from GitHub in every train/val, even with
  ``plots=False``. :func:`offline_environment` returns the environment that stops all of it and
  prepares the settings directory with a font it already has (matplotlib's DejaVu Sans). Set the
  variables before ``ultralytics`` is imported: it reads them once, at import.

FiftyOne's own switches (``FIFTYONE_DO_NOT_TRACK``) live with its configuration in
``server.store.mongo``. ``tests/test_offline.py`` proves the whole: it traces every socket call of
the agent, the server and the demo in a network namespace that has only loopback.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

#: Set in the environment of every edgeloop process (unless the operator set them otherwise).
LIBRARY_TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1"}


def disable_library_telemetry() -> None:
    """Turn off the telemetry of libraries edgeloop imports; a value the operator already set wins."""
    for key, value in LIBRARY_TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def offline_environment(state_dir: Path) -> dict[str, str]:
    """Environment variables for an offline ultralytics whose state lives in ``state_dir``."""
    config_dir = state_dir / "ultralytics"
    fonts = config_dir / "Ultralytics"
    fonts.mkdir(parents=True, exist_ok=True)
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        font = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        for name in FONT_NAMES:
            if font.is_file() and not (fonts / name).exists():
                shutil.copy(font, fonts / name)  # any TTF satisfies ultralytics' font check
    return {
        "YOLO_OFFLINE": "1",  # no DNS probes, no downloads
        "YOLO_AUTOINSTALL": "0",  # never runs pip
        "YOLO_CONFIG_DIR": str(config_dir),
        "MPLCONFIGDIR": str(state_dir / "matplotlib"),
    }
