"""The server's config: sections assembled from their modules, paths under data_dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeloop.config_base import ConfigError
from server.config import ServerConfig, load_server_config

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_loads_with_paths_under_its_data_dir():
    cfg = load_server_config(ROOT / "server.example.yaml")
    assert cfg.data_dir == ROOT / ".edgeloop/server"
    assert cfg.media.root == cfg.data_dir / "media" and cfg.mongo.db_dir == cfg.data_dir / "mongodb"
    assert cfg.registry.root == cfg.data_dir / "registry" and cfg.devices.root == cfg.data_dir / "devices"
    assert cfg.app.host == "127.0.0.1" and cfg.grpc.host == "127.0.0.1"


def test_explicit_paths_win_and_env_overrides_apply(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("data_dir: state\nmedia: {root: /srv/media}\n")
    cfg = load_server_config(path, env={"EDGELOOP_SERVER__GRPC__PORT": "50099"})
    assert cfg.media.root == Path("/srv/media")
    assert cfg.registry.root == tmp_path / "state" / "registry"
    assert cfg.grpc.port == 50099
    cfg.data_dir = tmp_path / "elsewhere"  # assignment keeps the built sections intact
    assert cfg.media.root == Path("/srv/media") and cfg.registry.root == tmp_path / "state" / "registry"


def test_unknown_keys_are_refused_with_the_file_named(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("grpc: {prot: 1}\n")
    with pytest.raises(ConfigError, match=r"server\.yaml[\s\S]*prot"):
        load_server_config(path)


def test_every_field_is_described():
    schema = ServerConfig.model_json_schema()
    missing = [
        f"{model}.{name}"
        for model, definition in {"ServerConfig": schema, **schema.get("$defs", {})}.items()
        for name, prop in definition.get("properties", {}).items()
        if "description" not in prop
    ]
    assert not missing, missing
