"""A full disk under the outbox and under the running agent, on a real small volume: a tmpfs of a
few MB in a mount namespace of its own (tests/fixtures/small_volume.py).

SQLite must run inside that namespace (it would resolve the /proc path the test sees into the
host's disk), so the outbox's code runs in a child process there and reports back in JSON.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from edge_agent.outbox import WAL_CHECKPOINT_BYTES
from tests.fakes.receivers import GrpcTestReceiver
from tests.fixtures.mosquitto import _free_port
from tests.fixtures.small_volume import SmallVolume

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "yolov8n_int8.onnx"
COCO_TRAIN = SHARED / "data" / "coco8" / "images" / "train"

MiB = 1024 * 1024


def _run_inside(volume: SmallVolume, code: str, *args: str, timeout: float = 120):
    """Run ``code`` with Python inside the volume's namespace; returns the JSON it prints last."""
    proc = volume.popen(
        [sys.executable, "-c", textwrap.dedent(code), str(volume.mountpoint), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed (rc={proc.returncode}):\n{err[-4000:]}"
    return json.loads(out.strip().splitlines()[-1])


# What "another program fills the disk" means inside the child: write a filler until ENOSPC, at
# most the volume's size (statvfs checked first, so it can never fill the host's disk).
_FILL = """
def fill(vol, size):
    st = os.statvfs(vol)
    assert st.f_blocks * st.f_frsize < 2 * size, "not the small volume"
    written = 0
    with open(vol / "filler", "ab", buffering=0) as f:
        while written < size:
            try:
                f.write(b"\\0" * 4096)
            except OSError:
                break
            written += 4096
"""


def test_outbox_on_a_full_disk_fails_clearly_keeps_its_frames_and_still_removes_acked_ones(small_volume) -> None:
    """Finding 8, the outbox's part, on a disk another program filled to the last byte after a
    restart (which cut the write-ahead log back to nothing, so every write needs new space). A write
    raises OutboxFull caused by SQLite's own "database or disk is full", not by the "cannot rollback -
    no transaction is active" that used to hide it; nothing held is harmed; acks still take their
    frames out of the queue (never offered again), and the removal itself, which needs a few pages
    of log, happens by itself once space is freed."""
    volume = small_volume(4 * MiB)
    result = _run_inside(
        volume,
        _FILL
        + """
import json, os, sys, time
from pathlib import Path
from edge_agent.outbox import Outbox, OutboxConfig, OutboxFull, RETRY_REMOVALS_S

vol = Path(sys.argv[1])
out = {}
path = vol / "outbox.sqlite3"
stored = []
with Outbox(OutboxConfig(path=path, min_free_bytes=1024 * 1024)) as ob:
    for i in range(20):
        ob.put(f"f{i:03d}", os.urandom(50_000), 0.5)
        stored.append(f"f{i:03d}")

ob = Outbox(OutboxConfig(path=path, min_free_bytes=0))
out["wal_at_open"] = (vol / "outbox.sqlite3-wal").stat().st_size
fill(vol, 4 * 1024 * 1024)
out["free_after_fill"] = os.statvfs(vol).f_bavail
for name, write in [
    ("sequence", lambda: ob.reserve_sequence(10)),
    ("put", lambda: ob.put("while-full", os.urandom(50_000), 0.9)),
]:
    try:
        write()
        out[name] = "written"
    except OutboxFull as err:
        out[name] = {"cause": repr(err.__cause__), "context": repr(err.__cause__ and err.__cause__.__context__)}
out["full_reason"] = ob.full_reason
out["held_intact"] = ob.ids() == set(stored) and ob.depth == len(stored)

acked = stored[:5]
out["acked"] = ob.ack(acked)
out["unremoved"] = ob.unremoved
out["depth_after_ack"] = ob.depth
out["offered_again"] = sorted(p.frame_id for p in ob.peek(1000) if p.frame_id in acked)

(vol / "filler").unlink()
time.sleep(RETRY_REMOVALS_S)
out["retry"] = ob.retry_removals()
out["unremoved_after_free"] = ob.unremoved
out["put_after_free"] = ob.put("after-free", os.urandom(50_000), 0.9).stored
out["full_reason_after"] = ob.full_reason
ob.close()
with Outbox(OutboxConfig(path=path, min_free_bytes=0)) as again:
    out["reopened"] = sorted(again.ids()) == sorted(stored[5:] + ["after-free"])
print(json.dumps(out))
""",
    )
    assert result["wal_at_open"] == 0  # opening folds a leftover log into the database
    assert result["free_after_fill"] == 0
    # SQLite itself ran out of space (a put is refused before it gets that far: see the reason).
    assert "database or disk is full" in result["sequence"]["cause"], result
    assert "cannot rollback" not in result["sequence"]["cause"] + result["sequence"]["context"], result
    assert isinstance(result["put"], dict), "a frame was stored on a full disk?"
    assert "0.0 MB free on the outbox's volume" in result["full_reason"]
    assert result["held_intact"]

    assert result["acked"] == 5 and result["depth_after_ack"] == 15
    assert result["unremoved"] == 5, "the removal was expected to wait for space on a completely full disk"
    assert result["offered_again"] == []  # acknowledged frames are not uploaded again

    assert result["retry"] is True and result["unremoved_after_free"] == 0
    assert result["put_after_free"] is True and result["full_reason_after"] == ""
    assert result["reopened"]


def test_outbox_keeps_its_reserve_and_a_bounded_wal_and_refills_after_draining(small_volume) -> None:
    """The reserve (outbox.min_free_bytes) stops puts before the volume is full, the write-ahead log
    stays near its bound (it grew to 4 MB before: SQLite's default checkpoints every 1,000 pages),
    and once the uploads have drained the outbox it takes frames again, although the database file
    (which keeps its free pages) left the volume's free space where it was."""
    volume = small_volume(10 * MiB)
    reserve = 3 * MiB
    result = _run_inside(
        volume,
        """
import json, os, sys
from pathlib import Path
from edge_agent.outbox import Outbox, OutboxConfig, OutboxFull

vol = Path(sys.argv[1])
reserve = int(sys.argv[2])
wal = vol / "outbox.sqlite3-wal"
out = {"wal_max": 0}
ob = Outbox(OutboxConfig(path=vol / "outbox.sqlite3", min_free_bytes=reserve))
free = lambda: os.statvfs(vol).f_bavail * os.statvfs(vol).f_frsize
stored, err = [], None
for i in range(500):
    try:
        ob.put(f"f{i:03d}", os.urandom(100_000), 0.5)
        stored.append(f"f{i:03d}")
    except OutboxFull as e:
        err = e
        break
    out["wal_max"] = max(out["wal_max"], wal.stat().st_size if wal.exists() else 0)
out["stored"] = len(stored)
out["error"] = str(err)
out["cause"] = repr(err.__cause__)
out["free_when_refused"] = free()
out["acked"] = ob.ack(stored)
out["free_after_ack"] = free()
out["refill"] = 0
for i in range(len(stored)):
    try:
        ob.put(f"g{i:03d}", os.urandom(100_000), 0.5)
    except OutboxFull:
        break
    out["refill"] += 1
    out["wal_max"] = max(out["wal_max"], wal.stat().st_size if wal.exists() else 0)
out["free_at_end"] = free()
ob.close()
print(json.dumps(out))
""",
        str(reserve),
    )
    assert result["stored"] >= 20, result
    assert "min_free_bytes" in result["error"] and result["cause"] == "None"  # the reserve, not SQLite, said no
    assert result["free_when_refused"] >= reserve
    assert result["free_at_end"] >= reserve
    assert result["acked"] == result["stored"]
    # The volume's free space barely moved, yet the outbox takes as many frames again.
    assert result["free_after_ack"] < result["free_when_refused"] + MiB
    # Less what the reserve holds back for the database's growth out of a full log.
    assert result["refill"] >= result["stored"] - WAL_CHECKPOINT_BYTES // 100_000 - 3, result
    assert result["wal_max"] <= WAL_CHECKPOINT_BYTES + 3 * 100_000, result


# -- the running agent ---------------------------------------------------------------------------

ENQUEUED = re.compile(r"enqueued frame ([0-9a-f]{32})")
STOPPED = "outbox: not enqueueing new frames"
RESUMED = "enqueueing resumed"


class _Log:
    """Collects an agent process's stderr lines in a thread, so the test can wait for them."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line)

    def join(self) -> None:
        self._thread.join(10)

    def enqueued(self, start: int = 0) -> list[str]:
        return [m.group(1) for line in self.lines[start:] if (m := ENQUEUED.search(line))]

    def index(self, text: str, start: int = 0) -> int | None:
        return next((i for i in range(start, len(self.lines)) if text in self.lines[i]), None)

    def text(self) -> str:
        return "".join(self.lines[-150:])


def _wait(cond, timeout: float, what: str, log: _Log, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        assert proc.poll() is None, f"the agent exited (rc={proc.returncode}) waiting for {what}:\n{log.text()}"
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}:\n{log.text()}")


def _metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^edgeloop_agent_{name} (\S+)$", body, re.M)
    assert m, f"no {name} in the agent's metrics"
    return float(m.group(1))


@pytest.mark.slow
@pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} missing (../shared beside the checkout)")
def test_agent_on_a_disk_that_fills_stays_up_uploads_what_it_holds_and_resumes(small_volume, tmp_path) -> None:
    """Acceptance (4) and finding 8: the agent's outbox lives on an 8 MB volume. While frames flow,
    another program fills the volume completely. The agent used to exit at once (rc=1); now it keeps
    reading and scoring, says once why it stopped enqueueing and counts the frames it could not keep,
    uploads every frame it holds when the receiver comes up, and enqueues again by itself once the
    space is freed. Then, with frames waiting for the receiver, the disk fills again and the agent is
    killed with SIGKILL; restarted on the still-full disk (a restart used to die on "ack: COMMIT"),
    the agent comes up, uploads what it holds and resumes once the space is freed. Every frame
    logged as enqueued reaches the receiver or is still in the outbox."""
    volume = small_volume(8 * MiB)
    port, metrics_port = _free_port(), _free_port()
    cfg = {
        "device_id": "cam-full",
        "source": {"uri": str(COCO_TRAIN), "loop": True, "max_fps": 8},
        "detector": {"type": "onnxruntime", "model": str(MODEL), "intra_op_threads": 1},
        "triggers": {"random": {"enabled": True, "rate": 1.0}},
        "budget": {"dedup": {"enabled": False}, "frames_per_minute": 1e6, "bytes_per_minute": 1e12},
        "outbox": {"path": str(volume.mountpoint / "outbox.sqlite3"), "min_free_bytes": MiB},
        "transport": {"type": "grpc", "target": f"127.0.0.1:{port}", "deadline_s": 5, "connect_timeout_s": 0.5},
        "upload": {"batch_size": 4, "backoff_initial_s": 0.1, "backoff_max_s": 0.5, "idle_poll_s": 0.05},
        "metrics": {"enabled": True, "port": metrics_port},
    }
    cfg_path = tmp_path / "edge.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, "-m", "edgeloop.cli", "agent", "run", "--config", str(cfg_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    wal = volume.outside / "outbox.sqlite3-wal"  # stat() only: never open the database from here
    receiver = GrpcTestReceiver(port=port)  # down at first: frames pile up in the outbox

    agent = volume.popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    log = _Log(agent)
    wal_max = 0
    try:
        _wait(lambda: len(log.enqueued()) >= 8, 120, "8 frames enqueued", log, agent)

        volume.fill()  # another program takes every byte left
        assert volume.free_bytes() == 0
        stopped = _wait(lambda: log.index(STOPPED), 30, "the agent to say it stopped enqueueing", log, agent)
        assert "min_free_bytes" in log.lines[stopped] or "disk is full" in log.lines[stopped]
        held = set(log.enqueued())

        receiver.start()
        _wait(lambda: held <= set(receiver.frames), 60, "the frames held to be uploaded", log, agent)
        scored = _metric(metrics_port, "frames_scored_total")
        _wait(lambda: _metric(metrics_port, "frames_scored_total") > scored + 5, 30, "scoring to go on", log, agent)
        dropped = _metric(metrics_port, "frames_dropped_disk_full_total")
        assert dropped >= 5
        assert sum(STOPPED in line for line in log.lines) == 1, "the warning is not repeated per frame"
        wal_max = max(wal_max, wal.stat().st_size)

        volume.free()
        resumed = _wait(lambda: log.index(RESUMED, stopped), 30, "enqueueing to resume", log, agent)
        _wait(lambda: len(log.enqueued(resumed)) >= 5, 60, "frames enqueued after the space was freed", log, agent)
        wal_max = max(wal_max, wal.stat().st_size)

        # Full again, with frames waiting for the receiver; the agent is killed and restarted on
        # the still-full disk: it comes up, uploads what it holds, and resumes once space is freed.
        receiver.stop()
        mark = len(log.lines)
        _wait(lambda: len(log.enqueued(mark)) >= 3, 60, "frames to wait for the receiver", log, agent)
        volume.fill()
        _wait(lambda: log.index(STOPPED, mark), 30, "the second full disk", log, agent)
        agent.send_signal(signal.SIGKILL)
        agent.wait(30)
        log.join()
        assert "Traceback" not in "".join(log.lines), log.text()
        enqueued = set(log.enqueued())

        assert volume.free_bytes() == 0
        agent = volume.popen(argv, stderr=subprocess.PIPE, text=True, env=env)
        log = _Log(agent)
        _wait(lambda: log.index(STOPPED), 120, "the restarted agent to find the disk full", log, agent)
        receiver.start()
        _wait(lambda: enqueued <= set(receiver.frames), 60, "the frames held to be uploaded", log, agent)
        volume.free()
        resumed = _wait(lambda: log.index(RESUMED), 30, "enqueueing to resume after the restart", log, agent)
        _wait(lambda: len(log.enqueued(resumed)) >= 3, 60, "frames enqueued after the restart", log, agent)
        later = set(log.enqueued())
        _wait(lambda: later <= set(receiver.frames), 60, "every enqueued frame to arrive", log, agent)
        wal_max = max(wal_max, wal.stat().st_size)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0, log.text()
        log.join()
        assert "Traceback" not in "".join(log.lines), log.text()
        enqueued |= set(log.enqueued())
    finally:
        if agent.poll() is None:
            agent.kill()
        receiver.stop()

    # Nothing committed is lost: each enqueued frame reached the receiver or is still in the outbox.
    held_now = _run_inside(
        volume,
        """
import json, sys
from pathlib import Path
from edge_agent.outbox import Outbox, OutboxConfig
with Outbox(OutboxConfig(path=Path(sys.argv[1]) / "outbox.sqlite3", min_free_bytes=0)) as ob:
    print(json.dumps(sorted(ob.ids())))
""",
    )
    missing = enqueued - set(receiver.frames) - set(held_now)
    assert not missing, f"{len(missing)} frame(s) that entered the outbox were lost"
    assert wal_max <= WAL_CHECKPOINT_BYTES + 2 * MiB, f"write-ahead log grew to {wal_max} bytes"
