"""The outbox: durable, prioritised, capped with lowest-score eviction, idempotent by id."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from edge_agent.outbox import Outbox, OutboxConfig


@pytest.fixture
def outbox(tmp_path):
    with Outbox(OutboxConfig(path=tmp_path / "ob.sqlite3")) as ob:
        yield ob


def test_put_peek_ack_roundtrip(outbox):
    outbox.put("a", b"A" * 10, 0.2)
    outbox.put("b", b"B" * 20, 0.9)
    outbox.put("c", b"C" * 30, 0.5)
    assert outbox.depth == 3 and outbox.size_bytes == 60
    assert [p.frame_id for p in outbox.peek(10)] == ["b", "c", "a"]  # highest score first
    assert outbox.peek(1)[0].payload == b"B" * 20
    assert outbox.ack(["b", "zzz"]) == 1
    assert outbox.depth == 2 and outbox.size_bytes == 40
    assert [p.frame_id for p in outbox.peek(10, exclude={"c"})] == ["a"]


def test_same_id_is_stored_once(outbox):
    assert outbox.put("x", b"1", 0.5).stored
    assert not outbox.put("x", b"2", 0.9).stored
    assert outbox.depth == 1
    assert outbox.peek(5)[0].payload == b"1"


def test_eviction_lowest_score_first_and_counted(tmp_path):
    cfg = OutboxConfig(path=tmp_path / "ob.sqlite3", max_frames=3, max_bytes=10_000)
    with Outbox(cfg) as ob:
        for fid, score in [("a", 0.5), ("b", 0.1), ("c", 0.9)]:
            ob.put(fid, b"x" * 100, score)
        res = ob.put("d", b"x" * 100, 0.6)
        assert res.stored and res.evicted == ("b",)
        res = ob.put("e", b"x" * 100, 0.05)  # the least valuable frame is the new one itself
        assert not res.stored and res.evicted == ("e",)
        assert ob.ids() == {"a", "c", "d"}
        assert ob.counter("evicted") == 2


def test_byte_cap_evicts_until_it_fits(tmp_path):
    cfg = OutboxConfig(path=tmp_path / "ob.sqlite3", max_bytes=250)
    with Outbox(cfg) as ob:
        ob.put("a", b"x" * 100, 0.3)
        ob.put("b", b"x" * 100, 0.2)
        res = ob.put("c", b"x" * 200, 0.9)
        assert set(res.evicted) == {"a", "b"}
        assert ob.size_bytes == 200 and ob.ids() == {"c"}


def test_reject_moves_to_dead_letter(outbox):
    outbox.put("bad", b"junk", 0.5)
    assert outbox.reject("bad", "image does not decode")
    assert outbox.depth == 0
    assert outbox.rejected_ids() == {"bad"}
    assert outbox.counter("rejected") == 1


def test_state_and_counters_survive_reopen(tmp_path):
    cfg = OutboxConfig(path=tmp_path / "ob.sqlite3", max_frames=1)
    with Outbox(cfg) as ob:
        ob.put("a", b"a", 0.1)
        ob.put("b", b"b", 0.2)
        first = ob.reserve_sequence(10)
    with Outbox(cfg) as ob:
        assert ob.ids() == {"b"} and ob.depth == 1 and ob.size_bytes == 1
        assert ob.counter("evicted") == 1
        assert ob.reserve_sequence(10) == first + 10  # numbering continues, never repeats


def test_put_survives_kill_9(tmp_path):
    """A child process puts frames and reports each id after put() returned; it is killed with
    SIGKILL mid-stream. Every reported id must be in the outbox when it is reopened."""
    db = tmp_path / "ob.sqlite3"
    code = textwrap.dedent(
        f"""
        import sys
        from edge_agent.outbox import Outbox, OutboxConfig
        ob = Outbox(OutboxConfig(path={str(db)!r}))
        i = 0
        while True:
            ob.put(f"f{{i}}", b"x" * 5000, 0.5)
            sys.stdout.write(f"f{{i}}\\n"); sys.stdout.flush()
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    reported = []
    assert proc.stdout is not None
    for line in proc.stdout:
        reported.append(line.strip())
        if len(reported) >= 200:
            os.kill(proc.pid, 9)
            break
    proc.wait(10)
    reported += [line.strip() for line in proc.stdout.read().splitlines() if line.strip()]
    with Outbox(OutboxConfig(path=db)) as ob:
        assert set(reported) <= ob.ids()
        assert len(reported) >= 200
