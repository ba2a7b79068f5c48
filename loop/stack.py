"""The demo's stack on one machine, with embedded defaults: every part started here, on loopback.

* an MQTT broker (Mosquitto, :mod:`server.broker`) with the registry's device files, or gRPC only
  when Mosquitto is not installed (said so);
* ``edgeloop server run``: the bundled MongoDB, the FiftyOne inbox and App, gRPC ingest and model
  registry, the MQTT bridge and release announcer;
* a local Prefect server (:mod:`flows.prefect_server`) and ``edgeloop flows serve`` serving the
  retraining deployments, so every round is a real flow run, visible in the Prefect UI;
* the edge agents (``edgeloop agent run``), one per camera: the first over gRPC following the
  ``canary`` channel, the second over MQTT (when there is a broker) following ``stable``.

Each part's configuration is written under the work directory (``server.yaml``, ``flows.yaml``,
``agents/<camera>.yaml``) and each part logs to ``logs/``: the same commands a user would run.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loop.processes import ManagedProcess, edgeloop_command
from loop.world import World

logger = logging.getLogger(__name__)

#: Seconds the server may take to be ready (FiftyOne import, mongod, the App: ~30-60 s on 2 cores).
SERVER_READY_S = 240.0
#: Seconds the flows runner may take to register its deployments (imports prefect, ultralytics...).
FLOWS_READY_S = 240.0
DEMO_DEVICES_PREFIX = "cam-"
INBOX = "edgeloop-demo-inbox"
TRAINING = "edgeloop-demo-train"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class StackSettings:
    """What the stack is asked for."""

    batch_size: int
    epochs: int
    first_epochs: int
    healthy_for_s: float
    app: bool
    app_port: int | None = None
    fps: float = 5.0
    first_floor: float = 0.05
    base_checkpoint: Path = Path("../shared/models/yolov8n_coco_dequant.pt")


@dataclass
class Stack:
    """The running parts, their configs and where they log."""

    workdir: Path
    world: World
    settings: StackSettings
    server_config: Path = field(init=False)
    flows_config: Path = field(init=False)
    first_flows_config: Path = field(init=False)
    grpc_port: int = field(init=False)
    app_url: str | None = field(init=False, default=None)
    broker: Any = field(init=False, default=None)
    prefect: Any = field(init=False, default=None)
    processes: dict[str, ManagedProcess] = field(init=False, default_factory=dict)
    device_passwords: dict[str, str] = field(init=False, default_factory=dict)
    notes: list[str] = field(init=False, default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.workdir / "server"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def cameras(self) -> list[str]:
        return [c.source_id for c in self.world.cameras]

    # -- start -------------------------------------------------------------------------------

    def start_services(self) -> None:
        """Broker, server, Prefect server and flows runner (not the agents: they need a first model)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.grpc_port = free_port()
        self._start_broker()
        self.server_config = self._write_server_config()
        server = ManagedProcess(
            "edgeloop server", edgeloop_command("server", "run", "--config", str(self.server_config)),
            self.logs / "server.log",
        )  # fmt: skip
        self.processes["server"] = server.start()
        self._start_prefect()
        self.flows_config = self._write_flows_config("flows.yaml", straight_to_stable=False)
        self.first_flows_config = self._write_flows_config("flows-first-model.yaml", straight_to_stable=True)
        flows = ManagedProcess(
            "edgeloop flows serve", edgeloop_command("flows", "serve", "--config", str(self.flows_config)),
            self.logs / "flows.log", env=self.prefect.env,
        )  # fmt: skip
        self.processes["flows"] = flows.start()
        server.wait_until(lambda: "edgeloop server ready" in server.output(), SERVER_READY_S, "ready line")
        if self.settings.app:
            self.app_url = f"http://127.0.0.1:{self._app_port}"
        flows.wait_until(self._deployments_served, FLOWS_READY_S, "retrain deployment")

    def _start_broker(self) -> None:
        from server.broker import BrokerError, EmbeddedBroker, EmbeddedBrokerConfig, find_mosquitto
        from server.devices import DeviceRegistry, DevicesConfig

        # No pid file yet: the broker starts below, with these very files (nothing to reload).
        devices = DeviceRegistry(DevicesConfig(root=self.data_dir / "devices"))
        for camera in self.cameras:
            creds = devices.add(camera)
            self.device_passwords[camera] = creds.mqtt_password
        self._devices = devices
        if find_mosquitto() is None:
            self.notes.append("Mosquitto is not installed: both cameras upload over gRPC (apt-get install mosquitto)")
            return
        config = EmbeddedBrokerConfig(port=free_port(), workdir=self.workdir / "mosquitto")
        try:
            self.broker = EmbeddedBroker(config, devices.write_mosquitto_files().conf_lines()).start()
        except BrokerError as err:
            self.notes.append(f"the MQTT broker did not start ({err}): both cameras upload over gRPC")

    def _write_server_config(self) -> Path:
        s = self.settings
        self._app_port = s.app_port or free_port()
        doc: dict[str, Any] = {
            "data_dir": str(self.data_dir),
            "grpc": {"port": self.grpc_port},
            "inbox": {"dataset": INBOX},
            "app": {"enabled": s.app, "port": self._app_port},
            "metrics": {"enabled": False},
            "curation": {"batch_size": s.batch_size, "training_dataset": TRAINING},
        }
        if self.broker is not None:
            port = self.broker.config.port
            doc["mqtt"] = {
                "enabled": True,
                "host": "127.0.0.1",
                "port": port,
                "username": "edgeloop-bridge",
                "password": self._devices.service_password("edgeloop-bridge"),
            }
            doc["announce"] = {
                "host": "127.0.0.1",
                "port": port,
                "username": "edgeloop-announcer",
                "password": self._devices.service_password("edgeloop-announcer"),
            }
            doc["devices"] = {"mosquitto_pid_file": str(self.broker.pid_file)}
        path = self.workdir / "server.yaml"
        path.write_text("# the demo's server (written by edgeloop demo)\n" + yaml.safe_dump(doc, sort_keys=False))
        return path

    def _start_prefect(self) -> None:
        from flows.prefect_server import PrefectServer

        home = self.workdir / "prefect"
        self.prefect = PrefectServer(home=home, port=free_port(), log=self.logs / "prefect-server.log")
        self.prefect.start()
        # This process's own Prefect client (starting runs, reading their state) talks to it too;
        # Prefect reads these when it is first imported.
        os.environ.update(self.prefect.env)

    def _write_flows_config(self, name: str, *, straight_to_stable: bool) -> Path:
        s = self.settings
        doc = {
            "work_dir": str(self.workdir / "flows"),
            "server_data_dir": str(self.data_dir),
            "registry": {"root": str(self.data_dir / "registry")},
            "curation": {
                "provider": "server.curation.flows_provider:factory",
                "options": {"server_config": str(self.server_config)},
            },
            "training": {
                "init": "production",
                "base_checkpoint": str(s.base_checkpoint.resolve()),
                "epochs": s.first_epochs if straight_to_stable else s.epochs,
                "patience": 100,
                "imgsz": self.world.imgsz,
                "batch": 16,
                "optimizer": "AdamW",
                "lr0": 0.001,
                "warmup_epochs": 1.0,
                "device": "auto",
                "augmentation": {"preset": "fixed-camera"},
            },
            "evaluation": {"train_images": 40},
            # The demo's test split holds few of the new world's frames yet: a small margin decides.
            "gate": {"min_improvement": 0.0, "max_class_drop": 0.25, "first_model_floor": s.first_floor},
            "rollout": {
                "straight_to_stable": straight_to_stable,
                "healthy_for_s": s.healthy_for_s,
                "min_devices": 1,
                "max_heartbeat_age_s": 30,
                "poll_s": 2,
                "timeout_s": 600,
            },
        }
        path = self.workdir / name
        path.write_text("# the demo's flows (written by edgeloop demo)\n" + yaml.safe_dump(doc, sort_keys=False))
        return path

    def _deployments_served(self) -> bool:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            with get_client(sync_client=True) as client:
                client.read_deployment_by_name("retrain/retrain")
            return True
        except ObjectNotFound:
            return False
        except Exception:  # the server's API not answering yet
            return False

    def start_agents(self, model: Path, public_key: Path) -> None:
        """One agent per camera, running ``model`` until a release replaces it."""
        for i, camera in enumerate(self.world.cameras):
            over_mqtt = self.broker is not None and i == 1
            path = self._write_agent_config(i, camera, model, public_key, over_mqtt)
            agent = ManagedProcess(
                f"agent {camera.source_id}", edgeloop_command("agent", "run", "--config", str(path)),
                self.logs / f"agent-{camera.source_id}.log",
            )  # fmt: skip
            self.processes[f"agent-{camera.source_id}"] = agent.start()

    def _write_agent_config(self, i: int, camera, model: Path, public_key: Path, over_mqtt: bool) -> Path:
        home = self.workdir / "agents" / camera.source_id
        home.mkdir(parents=True, exist_ok=True)
        if over_mqtt:
            transport = {
                "type": "mqtt",
                "host": "127.0.0.1",
                "port": self.broker.config.port,
                "username": camera.source_id,
                "password": self.device_passwords[camera.source_id],
            }
        else:
            transport = {"type": "grpc", "target": f"127.0.0.1:{self.grpc_port}"}
        doc = {
            "device_id": camera.source_id,
            "source": {
                "uri": camera.uri,
                "source_id": camera.source_id,
                "loop": True,
                "max_fps": self.settings.fps,
                "sequence": camera.sequence,
            },
            "detector": {"type": "onnxruntime", "model": str(model), "intra_op_threads": 1},
            "triggers": {"random": {"rate": 0.02}},
            "budget": {"frames_per_minute": 600, "bytes_per_minute": 200_000_000},
            "outbox": {"path": str(home / "outbox.sqlite3"), "min_free_bytes": 64 * 1024 * 1024},
            "transport": transport,
            "upload": {"heartbeat_s": 2},
            "metrics": {"enabled": False},
            "update": {
                "enabled": True,
                # The first camera is the canary: a new version reaches it first.
                "channel": "canary" if i == 0 else "stable",
                "public_key": str(public_key),
                "target": f"127.0.0.1:{self.grpc_port}",
                "models_dir": str(home / "models"),
                "poll_s": 3,
            },
        }
        path = self.workdir / "agents" / f"{camera.source_id}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    # -- stop --------------------------------------------------------------------------------

    def stop(self, *, keep_ui: bool = False) -> None:
        """Stop the agents and the flows runner; the server, Prefect and the broker unless ``keep_ui``."""
        for name in [n for n in self.processes if n.startswith("agent-")] + ["flows"]:
            proc = self.processes.get(name)
            if proc is not None:
                proc.stop()
        if keep_ui:
            return
        self.stop_services()

    def stop_services(self) -> None:
        from server.config import load_server_config
        from server.store.mongo import MongoManager

        server = self.processes.get("server")
        if server is not None:
            server.stop()
        if self.prefect is not None:
            self.prefect.stop()
        if self.broker is not None:
            self.broker.stop()
        # The bundled database outlives a server on purpose; the demo owns its own.
        if getattr(self, "server_config", None) is not None and self.server_config.exists():
            MongoManager(load_server_config(self.server_config).mongo).stop()


def clear_workdir(workdir: Path) -> None:
    """Start fresh, keeping nothing of a previous run (its models, versions, inbox)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
