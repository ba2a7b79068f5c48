"""The outbox: durable, prioritised, capped with lowest-score eviction, idempotent by id."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from edge_agent.outbox import WAL_CHECKPOINT_BYTES, Outbox, OutboxConfig, OutboxFull


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


# -- a full disk, the write-ahead log, evictions in the log (issue 9) --------------------------------


def test_a_full_database_raises_outbox_full_with_sqlites_own_error(tmp_path, caplog):
    """SQLite rolls a transaction back by itself when the disk is full; the outbox's ROLLBACK then
    failed with "cannot rollback - no transaction is active", which hid the real error and killed
    the agent. SQLite's page limit gives the same SQLITE_FULL as a full disk."""
    with Outbox(OutboxConfig(path=tmp_path / "ob.sqlite3", min_free_bytes=0)) as ob:
        ob.put("a", b"x" * 1000, 0.5)
        pages = ob._db.execute("PRAGMA page_count").fetchone()[0]
        ob._db.execute(f"PRAGMA max_page_count={pages + 5}")  # room for a few pages, not for 200 kB
        with pytest.raises(OutboxFull) as info:
            ob.put("b", b"y" * 200_000, 0.9)
        cause = info.value.__cause__
        assert isinstance(cause, sqlite3.OperationalError) and "database or disk is full" in str(cause)
        assert "cannot rollback" not in str(cause.__context__)
        assert ob.ids() == {"a"} and ob.depth == 1 and ob.size_bytes == 1000
        assert "not enqueueing new frames" in caplog.text and "disk is full" in ob.full_reason

        ob._db.execute("PRAGMA max_page_count=1073741823")
        assert ob.put("b", b"y" * 200_000, 0.9).stored
        assert ob.full_reason == "" and "enqueueing resumed" in caplog.text


def test_the_free_space_reserve_stops_puts_without_evicting_and_lifts_by_itself(tmp_path, caplog):
    cfg = OutboxConfig(path=tmp_path / "ob.sqlite3", min_free_bytes=0)
    with Outbox(cfg) as ob:
        ob.put("a", b"x" * 1000, 0.1)
        ob.config.min_free_bytes = ob.free_bytes() + 1  # more than the volume will ever have
        for i in range(20):
            with pytest.raises(OutboxFull, match="min_free_bytes"):
                ob.put(f"n{i}", b"y" * 1000, 0.9)  # a better frame, yet nothing is evicted for it
        assert ob.ids() == {"a"} and ob.counter("evicted") == 0
        warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
        assert sum("not enqueueing new frames" in m for m in warnings) == 1, warnings  # not one per frame

        ob.config.min_free_bytes = 0
        assert ob.put("n", b"y" * 1000, 0.9).stored
        assert "20 frame(s) were not enqueued" in caplog.text


def test_the_write_ahead_log_stays_bounded(tmp_path):
    """SQLite's default checkpoint (every 1,000 pages, about 4 MB) and a log never cut back let it
    take 4.1 MB of a 5 MB volume."""
    path = tmp_path / "ob.sqlite3"
    wal = tmp_path / "ob.sqlite3-wal"
    biggest = 0
    with Outbox(OutboxConfig(path=path, max_frames=20, min_free_bytes=0)) as ob:
        for i in range(120):
            ob.put(f"f{i}", os.urandom(100_000), (i % 7) / 7)
            biggest = max(biggest, wal.stat().st_size)
            if i % 10 == 9:
                ob.ack([p.frame_id for p in ob.peek(5)])
    assert biggest <= WAL_CHECKPOINT_BYTES + 2 * 100_000, biggest


def test_removing_a_frame_does_not_write_its_payload_again(tmp_path):
    """Builds with SECURE_DELETE (Debian's) zeroed every freed page, so an ack rewrote the frame
    through the log: a removal needed as much free disk as the frame had taken."""
    path = tmp_path / "ob.sqlite3"
    with Outbox(OutboxConfig(path=path, min_free_bytes=0)) as ob:
        for i in range(8):
            ob.put(f"f{i}", os.urandom(100_000), 0.5)
        ob._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # an empty log, to measure the ack alone
        assert ob.ack([f"f{i}" for i in range(8)]) == 8
        written = (tmp_path / "ob.sqlite3-wal").stat().st_size
    assert written < 100_000, f"removing 800 kB of frames wrote {written} bytes of log"


def test_every_eviction_is_logged_and_the_lines_add_up_to_the_counter(tmp_path, caplog):
    """Frames evicted on arrival used to leave no line naming them."""
    caplog.set_level(logging.INFO, logger="edge_agent.outbox")
    with Outbox(OutboxConfig(path=tmp_path / "ob.sqlite3", max_frames=3, min_free_bytes=0)) as ob:
        scores = [0.5, 0.6, 0.7, 0.1, 0.2, 0.9, 0.05, 0.8, 0.3]
        for i, score in enumerate(scores):
            ob.put(f"f{i}", b"x" * 100, score)
        evicted = ob.counter("evicted")
    lines = [r.getMessage() for r in caplog.records]
    per_frame = [m for m in lines if m.startswith("evicted frame ")]
    assert len(per_frame) == evicted == 6
    on_arrival = {m.split()[2] for m in per_frame if "on arrival" in m}
    assert on_arrival == {"f3", "f4", "f6", "f8"}  # each lower than every frame held when it came
    summaries = [re.search(r"evicted (\d+) lowest-scoring frame\(s\) since the last report, (\d+)", m) for m in lines]
    summaries = [m for m in summaries if m]
    assert len(summaries) == 2  # the first at once, the rest at close: not one per frame
    assert sum(int(m.group(1)) for m in summaries) == evicted
    assert sum(int(m.group(2)) for m in summaries) == len(on_arrival)
