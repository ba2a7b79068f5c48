"""``edgeloop demo``: the loop on one machine, with nothing to set up but the project itself.

It starts a server (bundled MongoDB, FiftyOne inbox and App, gRPC ingest and model registry),
registers a camera, publishes the detector as release v1 on the ``stable`` channel, and runs an
edge agent that fetches that release (signature and sha256 checked), watches a camera (a folder
of images, a video, or a synthetic scene whose world has shifted), keeps the frames its model is
unsure of and uploads them. At the end it prints where the uncertain frames are waiting for review.

Everything lives in ``--workdir``; nothing is downloaded. Heavy imports happen inside ``run_demo``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEVICE_ID = "demo-cam"


@dataclass
class DemoResult:
    counters: dict[str, int]
    dataset: str
    samples: int
    model_version: str
    app_url: str | None
    workdir: Path


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(
    workdir: Path,
    model: Path,
    source: str,
    *,
    limit: int | None = None,
    app: bool = True,
    app_port: int = 5151,
    serve: bool = False,
) -> DemoResult:
    """Run the demo; returns what happened. With ``serve`` it keeps the server (and App) up until
    interrupted, else it stops everything, the bundled database included."""
    from edge_agent.app import Agent
    from edge_agent.config import AgentConfig
    from edgeloop.releases import public_key_pem
    from server.app import Server
    from server.config import ServerConfig
    from server.store.mongo import MongoManager

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # SIGTERM (a service manager, `timeout`) must clean up like Ctrl-C: the App's process group and
    # the demo's mongod would outlive us otherwise.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    grpc_port = _free_port()
    server_cfg = ServerConfig.model_validate(
        {
            "data_dir": str(workdir / "server"),
            "grpc": {"port": grpc_port},
            "inbox": {"dataset": "edgeloop-demo"},
            "app": {"enabled": app, "port": app_port},
            "metrics": {"enabled": False},
        }
    )
    server = Server(server_cfg)
    try:
        server.start()
        if not server.devices.is_active(DEVICE_ID):
            server.devices.add(DEVICE_ID)
        registry = server.registry
        current = registry.current("stable")
        if current is None:
            version = registry.publish(model, notes="published by edgeloop demo").version
            registry.promote(version, "stable")
        key_file = workdir / "release_key.pub.pem"
        key_file.write_bytes(public_key_pem(registry.public_key()))

        agent_cfg = AgentConfig.model_validate(
            {
                "device_id": DEVICE_ID,
                "source": {"uri": source, "limit": limit},
                "detector": {"type": "onnxruntime", "model": str(model)},
                "outbox": {"path": str(workdir / "agent" / "outbox.sqlite3")},
                "transport": {"type": "grpc", "target": f"127.0.0.1:{grpc_port}"},
                "update": {
                    "enabled": True,
                    "public_key": str(key_file),
                    "target": f"127.0.0.1:{grpc_port}",
                    "models_dir": str(workdir / "agent" / "models"),
                },
                "metrics": {"enabled": False},
                "drain_on_exit_s": 60,
            }
        )
        agent = Agent(agent_cfg)
        try:
            assert agent.updater is not None
            agent.updater.check_once()  # run the released model from the first frame on
            counters = agent.run()
            model_version = agent.model_version
        finally:
            agent.close()
        samples = server.inbox.count()
        result = DemoResult(
            counters=counters,
            dataset=server.inbox.name,
            samples=samples,
            model_version=model_version,
            app_url=f"http://127.0.0.1:{app_port}/datasets/{server.inbox.name}" if app else None,
            workdir=workdir,
        )
        if serve:
            print(json.dumps({"review": result.app_url, "samples": samples}), flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return result
    finally:
        server.stop()
        # The bundled database outlives a server on purpose; the demo owns its own, so it stops it.
        MongoManager(server_cfg.mongo).stop()
