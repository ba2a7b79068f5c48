"""Installing edgeloop's FiftyOne plugin (``server/fiftyone_plugin``) where the App finds it.

``edgeloop curate install-plugin --config server.yaml`` copies the plugin folder into FiftyOne's
plugins directory (the server's ``<data_dir>/fiftyone/plugins`` by default, which is
``FIFTYONE_PLUGINS_DIR`` for the App the server starts) and writes beside it a ``settings.json``
naming the server config, so the plugin's operators, running inside the App's process, find the
curation state and the inbox. Re-installing replaces the copy (an upgrade).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from edgeloop.durable import fsync_dir, write_atomic

#: The plugin's name in its fiftyone.yml: operator URIs are ``@edgeloop/curation/<operator>``.
PLUGIN_NAME = "@edgeloop/curation"
#: Folder of the installed copy under the plugins directory.
INSTALL_FOLDER = "edgeloop-curation"
#: Written beside the installed plugin: ``{"server_config": "/abs/server.yaml"}``.
SETTINGS_FILE = "settings.json"
SOURCE = Path(__file__).resolve().parents[1] / "fiftyone_plugin"


def operator_uri(name: str) -> str:
    """``@edgeloop/curation/<name>``, for ``fiftyone.operators.execute_operator``."""
    return f"{PLUGIN_NAME}/{name}"


def install_plugin(plugins_dir: Path, server_config: Path | None) -> Path:
    """Copy the plugin into ``plugins_dir`` and point it at ``server_config``; returns the installed folder.

    The new copy is assembled beside the old one and swapped in with two renames, so the App never
    sees half a plugin.
    """
    plugins_dir.mkdir(parents=True, exist_ok=True)
    target = plugins_dir / INSTALL_FOLDER
    tmp = plugins_dir / f".{INSTALL_FOLDER}.{uuid.uuid4().hex[:8]}"
    shutil.copytree(SOURCE, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", SETTINGS_FILE))
    settings = {"server_config": str(server_config.resolve()) if server_config is not None else None}
    write_atomic(tmp / SETTINGS_FILE, json.dumps(settings, indent=1) + "\n")
    old = plugins_dir / f".{INSTALL_FOLDER}.old-{uuid.uuid4().hex[:8]}"
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    fsync_dir(plugins_dir)
    shutil.rmtree(old, ignore_errors=True)
    return target
