"""No network but loopback: the agent, the server and the demo, traced.

A whole deployment (``tests/offline_driver.py``: Mosquitto, ``edgeloop server run`` with the
bundled MongoDB and the FiftyOne App, two agents following a release channel over gRPC and MQTT)
runs inside a network namespace that has only a loopback interface (``edgeloop demo``, with the
Prefect server and the flows, is traced the same way in tests/test_demo.py), under
``strace -f``, which records every ``connect``/``sendto``/``sendmsg`` of every process and thread
it starts. The namespace makes sure nothing leaves even if something tried; the trace shows that
nothing tried: no address outside 127.0.0.0/8 and ::1, and no DNS query (port 53) to anyone.

The agents run long enough (40 s) for what was seen phoning home late (ONNX Runtime resolved a
telemetry host in processes older than ~15 s) to have had its chance.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
AGENT_SECONDS = 40

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "models").is_dir(), reason=f"{SHARED} (shared models) not found"),
]

_ADDRESS = re.compile(
    r"sa_family=(?P<family>AF_INET6?),\s*sin6?_port=htons\((?P<port>\d+)\),.*?"
    r"(?:inet_addr\(\"(?P<v4>[^\"]+)\"\)|inet_pton\(AF_INET6,\s*\"(?P<v6>[^\"]+)\")"
)


def _network_namespace_available() -> str | None:
    """None when an unprivileged-or-root network namespace with strace works here, else why not."""
    for tool in ("unshare", "strace", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    probe = subprocess.run(["unshare", "--net", "--map-root-user", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace here: {probe.stderr.strip()}"
    return None


def foreign_addresses(trace: str) -> list[str]:
    """Every socket address in the trace outside loopback, and every DNS destination, as strace wrote it."""
    bad = []
    for line in trace.splitlines():
        for m in _ADDRESS.finditer(line):
            addr = ipaddress.ip_address(m.group("v4") or m.group("v6"))
            mapped = getattr(addr, "ipv4_mapped", None)
            loopback = addr.is_loopback or (mapped is not None and mapped.is_loopback)
            if not loopback or int(m.group("port")) == 53:
                bad.append(line.strip())
    return bad


def test_the_address_parser_sees_what_it_must() -> None:
    """The checker itself: lines strace writes for real lookups and connections (taken from traces here)."""
    dns = '7682  connect(8, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = 0'
    local_dns = '12 sendto(3, "x", 1, 0, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.53")}, 16)'
    v6 = (
        "9 connect(5, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), "
        'inet_pton(AF_INET6, "2001:db8::1", &sin6_addr), sin6_scope_id=0}, 28) = -1 ENETUNREACH'
    )
    fine = [
        '5 connect(7, {sa_family=AF_INET, sin_port=htons(27017), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        "5 connect(7, {sa_family=AF_INET6, sin6_port=htons(50051), sin6_flowinfo=htonl(0), "
        'inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, 28) = 0',
        '5 connect(7, {sa_family=AF_UNIX, sun_path="/tmp/mongodb-27017.sock"}, 110) = 0',
        '5 sendto(7, "abc", 3, MSG_NOSIGNAL, NULL, 0) = 3',
    ]
    assert foreign_addresses("\n".join([dns, local_dns, v6, *fine])) == [dns, local_dns, v6]


def test_agent_and_server_contact_nothing_but_loopback(tmp_path: Path) -> None:
    why_not = _network_namespace_available()
    if why_not:
        pytest.skip(why_not)
    trace = tmp_path / "trace.txt"
    driver = f"{sys.executable} -m tests.offline_driver {tmp_path / 'work'} {AGENT_SECONDS}"
    script = (
        f"ip link set lo up && exec strace -f -qq --seccomp-bpf -e trace=connect,sendto,sendmsg -o {trace} -- {driver}"
    )
    out = tmp_path / "driver.log"
    with out.open("wb") as log:  # a file, not a pipe: nothing can hold the test up by keeping a pipe open
        run = subprocess.run(["unshare", "--net", "sh", "-c", script], cwd=ROOT, stdout=log, stderr=log, timeout=900)
    output = out.read_text(errors="replace")
    assert run.returncode == 0, f"the deployment failed:\n{output[-8000:]}"
    text = trace.read_text(errors="replace")
    # the trace did record the deployment's own traffic (MongoDB, gRPC, MQTT over loopback)
    assert len(re.findall(r'inet_addr\("127\.0\.0\.1"\)', text)) > 20
    assert foreign_addresses(text) == []
    # and the deployment did its work: both agents uploaded (the driver checks)
    assert "cam-grpc: {" in output and "cam-mqtt: {" in output


def _traced(tmp_path: Path, command: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``command`` in a loopback-only network namespace under strace: (exit status, its output, trace)."""
    trace = tmp_path / "trace.txt"
    out = tmp_path / "out.log"
    script = (
        f"ip link set lo up && exec strace -f -qq --seccomp-bpf -e trace=connect,sendto,sendmsg -o {trace} -- {command}"
    )
    with out.open("wb") as log:
        run = subprocess.run(
            ["unshare", "--net", "sh", "-c", script], cwd=ROOT, stdout=log, stderr=log, timeout=600, env=env
        )
    return run.returncode, out.read_text(errors="replace"), trace.read_text(errors="replace")


def test_the_ultralytics_backend_stays_offline_and_out_of_the_home_directory(tmp_path: Path) -> None:
    why_not = _network_namespace_available()
    if why_not:
        pytest.skip(why_not)
    import os
    import shutil as sh

    model = tmp_path / "model.pt"
    sh.copy(SHARED / "models" / "yolov8n_coco_dequant.pt", model)
    home = tmp_path / "home"
    home.mkdir()
    # A process environment as a user's shell gives it: none of ultralytics' offline switches set.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "MPLCONFIGDIR"))}
    env["HOME"] = str(home)
    cmd = f"{sys.executable} -m edgeloop.cli agent score {SHARED / 'data/coco8/images/val'} --model {model} --json"
    status, output, trace = _traced(tmp_path, cmd, env)
    assert status == 0, output[-4000:]
    assert output.count('"frame":') == 4  # it did detect, with ultralytics
    assert foreign_addresses(trace) == []
    assert not (home / ".config").exists(), sorted(str(p) for p in home.rglob("*"))
