"""Run a whole edgeloop deployment for a while, for tests/test_offline.py to trace.

    python -m tests.offline_driver WORKDIR SECONDS

In WORKDIR: registers two devices (mutual-TLS gRPC, MQTT with a password and ACL), starts a
Mosquitto broker, ``edgeloop server run`` (bundled MongoDB, FiftyOne App, gRPC ingest and
registry, MQTT bridge, release announcer), publishes and promotes a model, then runs two
``edgeloop agent run`` processes (one per transport, following the release channel) on a looping
synthetic video for SECONDS. (``edgeloop demo`` is traced the same way by tests/test_demo.py.)
Everything on loopback, addressed by
``127.0.0.1`` or ``localhost`` as a user's config would. It exits non-zero when a part fails, so
the trace belongs to a deployment that worked.

Not a test module: the test runs it inside a network namespace under strace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "yolov8n_int8.onnx"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeloop.cli", *args]


def _agent_config(work: Path, name: str, snippet: Path, video: Path, server: dict, extra: dict) -> Path:
    cfg = yaml.safe_load(snippet.read_text())
    device_tls = cfg["transport"]["tls"]  # the device's certificate, also for the registry
    cfg["transport"].update(extra)
    cfg.update(
        {
            "source": {"uri": str(video), "loop": True, "max_fps": 5},
            "detector": {"type": "onnxruntime", "model": str(MODEL), "intra_op_threads": 1},
            "triggers": {"random": {"rate": 0.2}},
            "outbox": {"path": str(work / name / "outbox.sqlite3")},
            "metrics": {"enabled": False},
            "update": {
                "enabled": True,
                "public_key": str(work / "release.pub.pem"),
                "target": f"localhost:{server['grpc']['port']}",
                "tls": device_tls,
                "models_dir": str(work / name / "models"),
                "poll_s": 5,
            },
        }
    )
    path = snippet.parent / f"{name}.yaml"  # beside the bundle: its TLS paths are relative to it
    path.write_text(yaml.safe_dump(cfg))
    return path


def main(work: Path, seconds: float) -> int:
    from edgeloop.releases import public_key_pem
    from edgeloop.synth.scenarios import get_scenario
    from edgeloop.synth.scenes import write_video
    from server.config import load_server_config
    from server.devices import DeviceRegistry, DevicesConfig
    from server.registry.store import ModelRegistry, RegistryConfig
    from server.store.mongo import MongoManager
    from tests.fixtures.mosquitto import MosquittoBroker, _free_port
    from tests.fixtures.server_process import ServerProcess

    work.mkdir(parents=True, exist_ok=True)
    data = work / "server"
    pid_file = work / "mosquitto.pid"
    devices = DeviceRegistry(DevicesConfig(root=data / "devices", mosquitto_pid_file=pid_file))
    creds = {name: devices.add(name) for name in ("cam-grpc", "cam-mqtt")}
    tls = devices.server_credentials()
    (work / "broker").mkdir(exist_ok=True)
    broker = MosquittoBroker(
        workdir=work / "broker",
        port=_free_port(),
        extra_conf=devices.write_mosquitto_files().conf_lines() + f"pid_file {pid_file}\n",
    ).start()
    registry = ModelRegistry(RegistryConfig(root=data / "registry"))
    version = registry.publish(MODEL, notes="offline test").version
    registry.promote(version, "stable")
    (work / "release.pub.pem").write_bytes(public_key_pem(registry.public_key()))
    server_cfg = {
        "data_dir": str(data),
        "grpc": {
            "port": _free_port(),
            "tls": {"cert_file": str(tls.cert_file), "key_file": str(tls.key_file), "client_ca_file": str(tls.ca_file)},
        },
        "mqtt": {
            "enabled": True,
            "host": "localhost",
            "port": broker.port,
            "username": "edgeloop-bridge",
            "password": devices.service_password("edgeloop-bridge"),
        },
        "announce": {
            "host": "localhost",
            "port": broker.port,
            "username": "edgeloop-announcer",
            "password": devices.service_password("edgeloop-announcer"),
        },
        "devices": {"mosquitto_pid_file": str(pid_file)},
        "app": {"enabled": True, "port": _free_port()},
        "metrics": {"enabled": True, "port": _free_port()},
    }
    video = write_video(work / "camera", get_scenario("shapes-shifted"), n=60, seed=1, fps=5.0)
    server = ServerProcess(work, server_cfg)
    agents: list[subprocess.Popen[bytes]] = []
    try:
        server.start()
        grpc_cfg = _agent_config(
            work, "cam-grpc", creds["cam-grpc"].grpc_config, video, server_cfg,
            {"target": f"localhost:{server_cfg['grpc']['port']}"},
        )  # fmt: skip
        mqtt_cfg = _agent_config(
            work, "cam-mqtt", creds["cam-mqtt"].mqtt_config, video, server_cfg,
            {"host": "127.0.0.1", "port": broker.port, "tls": None},
        )  # fmt: skip
        for cfg in (grpc_cfg, mqtt_cfg):
            log = (work / f"{cfg.stem}.log").open("wb")
            agents.append(subprocess.Popen(_cli("agent", "run", "--config", str(cfg)), stdout=log, stderr=log))
        time.sleep(seconds)
        for proc in agents:
            if proc.poll() is not None:
                print(f"agent {proc.args} exited early with {proc.returncode}", file=sys.stderr)
                return 1
    finally:
        for proc in agents:
            proc.terminate()
        for proc in agents:
            proc.wait(60)
        server.stop()
        broker.stop()
        # The bundled database outlives a server on purpose; strace would wait for it for ever.
        MongoManager(load_server_config(server.config_path).mongo).stop()
    for name in ("cam-grpc", "cam-mqtt"):
        finished = [ln for ln in (work / f"{name}.log").read_text().splitlines() if "agent finished:" in ln]
        counters = json.loads(finished[-1].split("agent finished:", 1)[1]) if finished else {}
        print(f"{name}: {counters}", file=sys.stderr)
        if not counters.get("frames_uploaded"):
            print(f"{name} uploaded nothing: the deployment did not work", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(Path(sys.argv[1]), float(sys.argv[2])))
