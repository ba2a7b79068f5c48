"""Run ultralytics with no network at all.

ultralytics reaches out on its own: DNS probes, ``pip install`` of missing packages, settings in
``~/.config/Ultralytics``, and a font (Arial) fetched from GitHub by every train/val, even with
``plots=False``. :func:`offline_environment` returns the environment that stops all of it and
prepares the settings directory with a font it already has (matplotlib's DejaVu Sans). Set the
variables before ``ultralytics`` is imported: it reads them once, at import.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

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
