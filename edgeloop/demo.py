"""``edgeloop demo``: the loop on one machine, with nothing to set up but the project itself.

It starts a server (bundled MongoDB, FiftyOne inbox and App, gRPC ingest and model registry),
registers a camera, publishes the detector as release v1 on the ``stable`` channel, and runs an
edge agent that fetches that release (signature and sha256 checked), watches a camera (a folder
of images, a video, or a synthetic scene whose world has shifted), keeps the frames its model is
unsure of and uploads them. At the end it prints where the uncertain frames are waiting for review.

Everything lives in ``--workdir``; nothing is downloaded. Heavy imports happen inside ``run_demo``.
Each run starts a fresh demo inbox (the previous run's samples are removed); the registry and its
release ``v1`` are kept. The server's config is written to ``WORKDIR/server.yaml`` so that the
commands the demo prints at the end (``edgeloop models list``, ``edgeloop server fleet``) inspect
exactly what it made.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
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
    server_config: Path
    registry: Path
    replaced_samples: int  # what the previous run had left in the demo inbox


class DemoInputError(ValueError):
    """The demo's model or camera cannot be used; the message says which and how to fix it."""


def check_inputs(model: Path, source: str) -> None:
    """Fail before anything starts: the model must load in ONNX Runtime, the camera must open.

    Raises:
        DemoInputError: with one line that names the problem and the option to fix.
    """
    from edge_agent.detectors import DetectorError
    from edge_agent.detectors.onnxruntime import OnnxRuntimeDetector, OnnxRuntimeDetectorConfig
    from edge_agent.sources import SourceConfig, SourceError, open_source

    if not model.is_file():
        raise DemoInputError(f"model {model} not found (pass --model PATH to an ultralytics ONNX export)")
    try:
        OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=model)).close()
    except DetectorError as err:
        raise DemoInputError(f"--model {model}: {err} (the demo needs an ultralytics ONNX detect export)") from err
    try:
        frames = open_source(SourceConfig(uri=source, limit=1))
        next(iter(frames), None)
    except SourceError as err:
        raise DemoInputError(f"--source: {err}") from err


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
    on_ready: Callable[[DemoResult], None] | None = None,
) -> DemoResult:
    """Run the demo; returns what happened. With ``serve`` it keeps the server (and App) up until
    interrupted (calling ``on_ready`` with the result first, so the user reads it while it serves),
    else it stops everything, the bundled database included."""
    import yaml

    from edge_agent.app import Agent
    from edge_agent.config import AgentConfig
    from edgeloop.releases import public_key_pem
    from server.app import Server
    from server.config import ServerConfig
    from server.store.inbox import review_url
    from server.store.mongo import MongoManager

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # SIGTERM (a service manager, `timeout`) must clean up like Ctrl-C: the App's process group and
    # the demo's mongod would outlive us otherwise.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    grpc_port = _free_port()
    server_doc = {
        "data_dir": str(workdir / "server"),
        "grpc": {"port": grpc_port},
        "inbox": {"dataset": "edgeloop-demo"},
        "app": {"enabled": app, "port": app_port},
        "metrics": {"enabled": False},
    }
    server_cfg = ServerConfig.model_validate(server_doc)
    config_path = workdir / "server.yaml"
    config_path.write_text("# the demo's server, for `edgeloop server ... --config` (written by edgeloop demo)\n")
    with config_path.open("a") as fh:
        yaml.safe_dump(server_doc, fh)
    server = Server(server_cfg)
    try:
        server.start()
        # A fresh inbox each run: a second run must not show the first run's frames as its own.
        replaced = server.inbox.count()
        if replaced:
            server.inbox.dataset.clear()
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
            app_url=review_url(f"http://127.0.0.1:{app_port}", server.inbox.name) if app else None,
            workdir=workdir,
            server_config=config_path,
            registry=server_cfg.registry.root,
            replaced_samples=replaced,
        )
        if serve:
            if on_ready is not None:
                on_ready(result)
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
