"""Mutation fuzzer for the server's ingest, over gRPC and MQTT, with a consistency check afterwards.

    .venv/bin/python bench/fuzz_ingest.py --frames 3000 [--seed 1] [--mqtt-share 0.25] [--write docs/reliability.md]
    .venv/bin/python bench/fuzz_ingest.py --make-corpus     # rewrite bench/fuzz_corpus/ (seed frames)

Starts a bundled MongoDB, a Mosquitto broker with the per-client limits of ``edgeloop server
devices mosquitto-files`` and the real ``edgeloop server run`` (gRPC over TLS, the MQTT bridge;
``tests/fixtures/hardened_server.py``), then sends ``--frames`` inputs, each a mutation of a
seed frame from ``bench/fuzz_corpus/``: structure-aware ones (a field over its limit, values out
of range, ids of other devices, resends with another media type, images that lie about their
size, decompression bombs, ...) and byte-level ones (bit flips, truncation, splices, garbage).
Each input goes to the server as a device would send it: on a raw gRPC stream with the
certificate of the device it names (or, when it names no registered device, of another one:
mutual TLS, as in production), or as a publish on that device's MQTT frames topic. Every answer
is recorded (ack status and reason, or how the stream ended).

Then it checks what must hold whatever came in:

* every ``STORED`` ack has its sample (of the device that sent it) and its file, holding the
  image bytes sent; every ``DUPLICATE`` ack names a frame id stored by that device;
* no file in the media store without a sample pointing at it, no sample without its file;
* nothing was answered ``RETRY`` (the database was up throughout);
* the server still answers a valid frame over both transports, with ``STORED``.

"Frames lost" counts ``STORED``/``DUPLICATE`` acks without their sample (or file): it must be 0.
The table of outcomes goes to stdout (and, with ``--write``, is appended to the file).
``tests/test_server_hardening.py`` runs the same fuzzer with a fixed budget in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from edgeloop.convert import frame_to_pb, parse_frame, serialize_frame  # noqa: E402
from edgeloop.domain import AckStatus, Detection, FrameRecord, Reason  # noqa: E402
from edgeloop.v1 import frames_pb2  # noqa: E402

CORPUS = ROOT / "bench" / "fuzz_corpus"
#: The devices the fuzzer plays (registered on the server); the first owns the "other device" ids.
DEVICES = ("fuzz-0", "fuzz-1", "fuzz-2", "fuzz-3")
CLASS_NAMES = ["person", "car", "dog"]
#: Inputs per gRPC stream (a stream-fatal input ends it; the inputs after it go into the next).
STREAM_BATCH = 8
#: Largest MQTT input: the broker disconnects a client over its max_packet_size (16 MiB + 64 KiB).
MQTT_MAX_BYTES = 15 * 1024 * 1024


# -- the corpus ---------------------------------------------------------------------------------


def _seed_frame(image: bytes, media_type: str, width: int, height: int, detections: int) -> FrameRecord:
    dets = [
        Detection(
            box=(5.0 + 40 * i, 5.0 + 30 * i, 40.0 + 40 * i, 45.0 + 30 * i),
            class_id=i % 3,
            class_name=CLASS_NAMES[i % 3],
            confidence=0.35 + 0.05 * i,
            class_scores=np.array([0.2, 0.3, 0.35], np.float32),
        )
        for i in range(detections)
    ]
    embedding = np.linspace(-1, 1, 64, dtype=np.float32)
    return FrameRecord(
        frame_id="seed" + "0" * 28,
        device_id=DEVICES[0],
        capture_time=1_763_800_000.5,
        sequence=7,
        model_version="yolov8n-fuzz",
        image=image,
        media_type=media_type,
        width=width,
        height=height,
        detections=dets,
        uncertainty=0.6,
        reasons=[Reason("margin", 0.7, "car vs dog 0.05"), Reason("entropy", 0.5, "")],
        source_id="front",
        class_names=list(CLASS_NAMES),
        embedding=embedding / np.linalg.norm(embedding),
    )


def make_corpus(out: Path = CORPUS) -> None:
    """Write the seed frames (serialized ``FrameUpload``, ``*.pb``) and the images they hold."""
    import cv2

    out.mkdir(parents=True, exist_ok=True)
    from tests.fakes.frames import photo

    jpeg = photo(1, 640, 480, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 85])
    progressive = photo(2, 320, 240, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 80, cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    png = photo(3, 320, 240, ".png")
    webp = photo(4, 320, 240, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 80])
    seeds = {
        "jpeg-640x480": _seed_frame(jpeg, "image/jpeg", 640, 480, 5),
        "jpeg-progressive-320x240": _seed_frame(progressive, "image/jpeg", 320, 240, 3),
        "png-320x240": _seed_frame(png, "image/png", 320, 240, 2),
        "webp-320x240": _seed_frame(webp, "image/webp", 320, 240, 0),
    }
    bomb = out / "bomb-16383x16383.webp"
    if not bomb.exists():
        # A lossless WebP of one colour: ~10 KB that decodes to 268 megapixels (~1 GB of memory).
        ok, buf = cv2.imencode(".webp", np.zeros((16383, 16383, 3), np.uint8), [cv2.IMWRITE_WEBP_QUALITY, 101])
        assert ok
        bomb.write_bytes(buf.tobytes())
    seeds["bomb-webp-declares-160x120"] = _seed_frame(bomb.read_bytes(), "image/webp", 160, 120, 0)
    for name, record in seeds.items():
        (out / f"{name}.pb").write_bytes(serialize_frame(record))
    print(f"wrote {len(seeds)} seed frames to {out}")


@functools.cache
def load_corpus(path: Path = CORPUS) -> dict[str, FrameRecord]:
    """The seed frames by name (read once)."""
    seeds = {p.stem: parse_frame(p.read_bytes()) for p in sorted(path.glob("*.pb"))}
    if not seeds:
        raise SystemExit(f"no seed frames in {path}: run bench/fuzz_ingest.py --make-corpus")
    return seeds


def bomb_image(path: Path = CORPUS) -> bytes:
    """The decompression bomb of the corpus: ~10 KB of lossless WebP holding 16383x16383 pixels."""
    return (path / "bomb-16383x16383.webp").read_bytes()


# -- inputs -------------------------------------------------------------------------------------


@dataclass
class Input:
    """One fuzz input: the bytes sent, and what the fuzzer knows about them."""

    kind: str  #: which mutation made it
    payload: bytes
    device: str  #: the device whose topic (MQTT) it is published on
    frame_id: str = ""  #: the id the payload carries, when it parses


@dataclass
class Outcome:
    input: Input
    transport: str
    result: str  #: "stored", "duplicate", "rejected:<code>", "retry", "ended:<gRPC code>", "dropped", "not read"


class Mutator:
    """Makes inputs from the seeds; remembers stored ids (for resends and other devices' ids)."""

    def __init__(self, seeds: dict[str, FrameRecord], rng: random.Random, *, huge: bool = True) -> None:
        self.seeds = seeds
        self.rng = rng
        self.huge = huge  # include multi-megabyte inputs (slow; the by-hand run)
        self.sent: list[FrameRecord] = []  # frames that may have been stored, for resends
        self.bomb = next((r.image for n, r in seeds.items() if n.startswith("bomb")), b"")
        self.structured: list[Callable[[FrameRecord], FrameRecord | bytes]] = [
            self.valid,
            self.valid,
            self.resend,
            self.resend_other_type,
            self.other_devices_id,
            self.long_string,
            self.many_reasons,
            self.score_mismatch,
            self.many_scores,
            self.many_detections,
            self.bad_number,
            self.bad_embedding,
            self.bad_image,
            self.lying_size,
            self.bad_ids,
            self.bad_class,
            self.bad_box,
        ]
        self.bytewise: list[Callable[[bytes], bytes]] = [
            self.flip_bits,
            self.truncate,
            self.insert_bytes,
            self.splice,
            self.garbage,
            self.append_field,
        ]

    def next(self) -> Input:
        seed = self.rng.choice([r for n, r in self.seeds.items() if not n.startswith("bomb")])
        device = self.rng.choice(DEVICES)
        sequence = self.rng.randrange(1 << 20)
        base = dataclasses.replace(seed, frame_id=uuid.uuid4().hex, device_id=device, sequence=sequence)
        if self.rng.random() < 0.75:
            mutate = self.rng.choice(self.structured)
            made = mutate(base)
            kind = mutate.__name__
            payload = made if isinstance(made, bytes) else serialize_frame(made)
        else:
            mutate_bytes = self.rng.choice(self.bytewise)
            kind = mutate_bytes.__name__
            payload = mutate_bytes(serialize_frame(base))
        parsed = _parsed(payload)
        if parsed is not None and parsed.device_id in DEVICES:
            device = parsed.device_id  # published on the topic of the device it names
            if kind in ("valid", "resend", "resend_other_type") or self.rng.random() < 0.1:
                self.sent.append(parsed)
        return Input(kind, payload, device, parsed.frame_id if parsed is not None else "")

    # -- structure-aware mutations (on the frame) --

    def valid(self, rec: FrameRecord) -> FrameRecord:
        return rec

    def resend(self, rec: FrameRecord) -> FrameRecord:
        return self.rng.choice(self.sent) if self.sent else rec

    def resend_other_type(self, rec: FrameRecord) -> FrameRecord:
        """A frame sent before, again with another seed's image and media type (same id)."""
        if not self.sent:
            return rec
        old = self.rng.choice(self.sent)
        other = self.rng.choice([r for n, r in self.seeds.items() if not n.startswith("bomb")])
        return dataclasses.replace(
            old, image=other.image, media_type=other.media_type, width=other.width, height=other.height, detections=[]
        )

    def other_devices_id(self, rec: FrameRecord) -> FrameRecord:
        """A frame id another device (may have) stored, sent by this one."""
        if not self.sent:
            return rec
        old = self.rng.choice(self.sent)
        others = [d for d in DEVICES if d != old.device_id]
        return dataclasses.replace(rec, frame_id=old.frame_id, device_id=self.rng.choice(others))

    def _size(self, small: int, large: int) -> int:
        top = large if self.huge and self.rng.random() < 0.3 else max(small * 4, 64_000)
        return self.rng.randint(small, top)

    def long_string(self, rec: FrameRecord) -> FrameRecord:
        n = self._size(100, 9_000_000)
        text = "x" * n
        where = self.rng.choice(["trigger", "detail", "source_id", "model_version", "class_name", "class_names"])
        if where == "trigger":
            return dataclasses.replace(rec, reasons=[Reason(text, 0.5, "")])
        if where == "detail":
            return dataclasses.replace(rec, reasons=[Reason("margin", 0.5, text)])
        if where == "class_name" and rec.detections:
            dets = [dataclasses.replace(rec.detections[0], class_name=text), *rec.detections[1:]]
            return dataclasses.replace(rec, detections=dets)
        if where == "class_names":
            return dataclasses.replace(rec, class_names=[text, *rec.class_names[1:]])
        return dataclasses.replace(rec, **{"source_id" if where == "source_id" else "model_version": text})

    def many_reasons(self, rec: FrameRecord) -> FrameRecord:
        n = self._size(20, 200_000)
        return dataclasses.replace(rec, reasons=[Reason("margin", 0.5, "") for _ in range(n)])

    def score_mismatch(self, rec: FrameRecord) -> FrameRecord:
        if not rec.detections:
            return rec
        n = self.rng.choice([1, 2, 4, 80])
        det = dataclasses.replace(rec.detections[0], class_scores=np.full(n, 0.1, np.float32))
        return dataclasses.replace(rec, detections=[det, *rec.detections[1:]])

    def many_scores(self, rec: FrameRecord) -> FrameRecord:
        n = self._size(1000, 1_300_000)
        det = Detection((1.0, 1.0, 20.0, 20.0), 0, "person", 0.5, np.full(n, 0.01, np.float32))
        names = [f"c{i}" for i in range(n)] if self.rng.random() < 0.3 and n < 300_000 else rec.class_names
        return dataclasses.replace(rec, detections=[det], class_names=names)

    def many_detections(self, rec: FrameRecord) -> FrameRecord:
        n = self._size(900, 60_000)
        det = Detection((1.0, 1.0, 20.0, 20.0), 1, "car", 0.4, np.array([0.3, 0.4, 0.3], np.float32))
        return dataclasses.replace(rec, detections=[det] * n)

    def bad_number(self, rec: FrameRecord) -> FrameRecord | bytes:
        value = self.rng.choice([math.nan, math.inf, -math.inf, -1.0, 1.5, 1e30])
        what = self.rng.choice(["uncertainty", "confidence", "score", "box", "capture_time", "reason"])
        if what == "uncertainty":
            return dataclasses.replace(rec, uncertainty=value)
        if what == "capture_time":  # as the wire holds it (a Timestamp): whole seconds and nanos
            msg = frame_to_pb(rec)
            msg.capture_time.seconds = self.rng.choice([-5, 10**13, 2**62, -(2**62)])
            msg.capture_time.nanos = self.rng.choice([0, 999_999_999, 2_000_000_000, -1])
            return msg.SerializeToString()
        if what == "reason":
            return dataclasses.replace(rec, reasons=[Reason("margin", value, "")])
        if not rec.detections:
            return dataclasses.replace(rec, sequence=2**64 - 1)
        det = rec.detections[0]
        if what == "confidence":
            det = dataclasses.replace(det, confidence=value)
        elif what == "score":
            det = dataclasses.replace(det, class_scores=np.array([0.1, value, 0.2], np.float32))
        else:
            det = dataclasses.replace(det, box=(value, 1.0, 10.0, 10.0))
        return dataclasses.replace(rec, detections=[det, *rec.detections[1:]])

    def bad_embedding(self, rec: FrameRecord) -> FrameRecord:
        if self.rng.random() < 0.5:
            return dataclasses.replace(rec, embedding=np.full(self._size(4097, 2_000_000), 0.01, np.float32))
        emb = np.ones(64, np.float32)
        emb[self.rng.randrange(64)] = self.rng.choice([math.nan, math.inf])
        return dataclasses.replace(rec, embedding=emb)

    def bad_image(self, rec: FrameRecord) -> FrameRecord:
        data = bytearray(rec.image)
        how = self.rng.choice(["truncate", "flip", "zero-tail", "garbage", "empty", "wrong-type", "long-type"])
        if how == "truncate":
            data = data[: self.rng.randrange(1, len(data))]
        elif how == "flip":
            for _ in range(self.rng.randint(1, 30)):
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        elif how == "zero-tail":
            cut = self.rng.randrange(len(data) // 2, len(data))
            data[cut:] = bytes(len(data) - cut)
        elif how == "garbage":
            data = bytearray(os.urandom(self.rng.randint(1, 5000)))
        elif how == "empty":
            data = bytearray()
        elif how == "wrong-type":
            types = ["image/jpeg", "image/png", "image/webp", "image/gif", ""]
            return dataclasses.replace(rec, media_type=self.rng.choice([t for t in types if t != rec.media_type]))
        else:
            return dataclasses.replace(rec, media_type="image/" + "x" * self._size(100, 1_000_000))
        return dataclasses.replace(rec, image=bytes(data))

    def lying_size(self, rec: FrameRecord) -> FrameRecord:
        if self.bomb and self.rng.random() < 0.4:
            bomb = {"image": self.bomb, "media_type": "image/webp", "width": 160, "height": 120}
            return dataclasses.replace(rec, detections=[], **bomb)
        w, h = self.rng.choice([(rec.width + 1, rec.height), (rec.width, rec.height // 2), (0, 0), (100_000, 100_000)])
        return dataclasses.replace(rec, width=w, height=h, detections=[])

    def bad_ids(self, rec: FrameRecord) -> FrameRecord:
        what = self.rng.choice(["empty-frame", "path", "short", "long-frame", "long-device", "unknown", "empty-device"])
        if what == "empty-frame":
            return dataclasses.replace(rec, frame_id="")
        if what == "path":
            return dataclasses.replace(rec, frame_id="../../etc/passwd")
        if what == "short":
            return dataclasses.replace(rec, frame_id="abc")
        if what == "long-frame":
            return dataclasses.replace(rec, frame_id="a" * self._size(65, 1_000_000))
        if what == "long-device":
            return dataclasses.replace(rec, device_id="d" * self._size(65, 1_000_000))
        if what == "unknown":
            return dataclasses.replace(rec, device_id="not-registered")
        return dataclasses.replace(rec, device_id="")

    def bad_class(self, rec: FrameRecord) -> FrameRecord:
        if not rec.detections:
            return dataclasses.replace(rec, class_names=[f"c{i}" for i in range(self._size(4097, 100_000))])
        det = rec.detections[0]
        change = self.rng.choice([{"class_id": 7}, {"class_id": -1}, {"class_name": "cat"}])
        det = dataclasses.replace(det, **change)
        return dataclasses.replace(rec, detections=[det, *rec.detections[1:]])

    def bad_box(self, rec: FrameRecord) -> FrameRecord:
        if not rec.detections:
            return rec
        box = self.rng.choice([(0.0, 0.0, rec.width + 50.0, 10.0), (10.0, 10.0, 5.0, 20.0), (-20.0, 0.0, 5.0, 5.0)])
        return dataclasses.replace(rec, detections=[dataclasses.replace(rec.detections[0], box=box)])

    # -- byte-level mutations (on the serialized message) --

    def flip_bits(self, data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 20)):
            out[self.rng.randrange(len(out))] ^= 1 << self.rng.randrange(8)
        return bytes(out)

    def truncate(self, data: bytes) -> bytes:
        return data[: self.rng.randrange(len(data))]

    def insert_bytes(self, data: bytes) -> bytes:
        at = self.rng.randrange(len(data))
        if self.rng.random() < 0.5:
            return data[:at] + os.urandom(self.rng.randint(1, 64)) + data[at:]
        return data[:at] + data[at + self.rng.randint(1, 64) :]

    def splice(self, data: bytes) -> bytes:
        other = serialize_frame(self.rng.choice(list(self.seeds.values())))
        return data[: self.rng.randrange(len(data))] + other[self.rng.randrange(len(other)) :]

    def garbage(self, data: bytes) -> bytes:
        return os.urandom(self.rng.randint(0, 2000))

    def append_field(self, data: bytes) -> bytes:
        """A second value for a field (protobuf keeps the last): device, frame id or image."""
        msg = frames_pb2.FrameUpload()
        choice = self.rng.randrange(3)
        if choice == 0:
            msg.device_id = self.rng.choice(DEVICES)
        elif choice == 1:
            msg.frame_id = uuid.uuid4().hex
        else:
            msg.image.media_type = "image/png"
        return data + msg.SerializeToString()


# -- sending ------------------------------------------------------------------------------------


def _result_of_ack(ack) -> str:
    if ack.status == AckStatus.REJECTED:
        return "rejected:" + ack.message.split(":", 1)[0]
    return str(ack.status)


class Fuzzer:
    """Sends inputs to a :class:`~tests.fixtures.hardened_server.ServerStack` and records outcomes."""

    def __init__(self, stack, mutator: Mutator, rng: random.Random, *, mqtt_share: float = 0.25) -> None:
        self.stack = stack
        self.mutator = mutator
        self.rng = rng
        self.mqtt_share = mqtt_share
        self.outcomes: list[Outcome] = []
        self._channels: dict[str, object] = {}

    def run(self, inputs: int, progress: bool = False) -> list[Outcome]:
        grpc_batch: list[Input] = []
        mqtt_batch: list[Input] = []
        for i in range(inputs):
            item = self.mutator.next()
            if self.rng.random() < self.mqtt_share and len(item.payload) <= MQTT_MAX_BYTES:
                mqtt_batch.append(item)
            else:
                grpc_batch.append(item)
            if len(grpc_batch) >= STREAM_BATCH:
                self._grpc_by_device(grpc_batch)
                grpc_batch = []
            if len(mqtt_batch) >= STREAM_BATCH:
                self._mqtt(mqtt_batch)
                mqtt_batch = []
            if progress and (i + 1) % 200 == 0:
                print(f"  {i + 1} inputs sent", file=sys.stderr, flush=True)
        if grpc_batch:
            self._grpc_by_device(grpc_batch)
        if mqtt_batch:
            self._mqtt(mqtt_batch)
        return self.outcomes

    def _grpc_by_device(self, batch: list[Input]) -> None:
        """One stream per device of the batch (each on that device's certificate)."""
        for device in dict.fromkeys(i.device for i in batch):
            self._grpc(device, [i for i in batch if i.device == device])

    def _grpc(self, device: str, batch: list[Input]) -> None:
        if device not in self._channels:
            self._channels[device] = self.stack.channel(device)
        while batch:
            result = self.stack.upload([i.payload for i in batch], channel=self._channels[device])
            answered = len(result.acks)
            for item, ack in zip(batch, result.acks, strict=False):
                self.outcomes.append(Outcome(item, "grpc", _result_of_ack(ack)))
            if result.error is None:
                for item in batch[answered:]:
                    self.outcomes.append(Outcome(item, "grpc", "not read"))
                return
            # The input after the acked ones ended the stream; the rest go into the next one.
            self.outcomes.append(Outcome(batch[answered], "grpc", f"ended:{result.code.name if result.code else '?'}"))
            batch = batch[answered + 1 :]

    def _mqtt(self, batch: list[Input]) -> None:
        probe = self.stack.mqtt
        for item in batch:
            probe.publish(item.device, item.payload)
        # A valid frame last: its ack comes after those of every message before it (the bridge
        # takes one topic in order and the core answers in order), so nothing is left in flight.
        sentinel, payload = valid_frame(DEVICES[0])
        probe.publish(DEVICES[0], payload)
        came = probe.acks_until(DEVICES[0], sentinel, timeout=60.0)
        if came is None:
            raise AssertionError("the server did not answer a valid frame over MQTT within 60 s")
        # Matched by topic and frame id, in order: copies of one id get their own acks.
        pending: dict[tuple[str, str], list] = {}
        for device, ack in came:
            pending.setdefault((device, ack.frame_id), []).append(ack)
        for item in batch:
            acks = pending.get((item.device, item.frame_id)) if item.frame_id else None
            result = _result_of_ack(acks.pop(0)) if acks else "dropped"
            self.outcomes.append(Outcome(item, "mqtt", result))


def valid_frame(device: str, seeds: dict[str, FrameRecord] | None = None) -> tuple[str, bytes]:
    """``(frame_id, payload)`` of a new valid frame of ``device`` (the corpus's JPEG seed)."""
    seed = (seeds or load_corpus())["jpeg-640x480"]
    rec = dataclasses.replace(seed, frame_id=uuid.uuid4().hex, device_id=device)
    return rec.frame_id, serialize_frame(rec)


# -- the check ----------------------------------------------------------------------------------


@dataclass
class Report:
    inputs: Counter = field(default_factory=Counter)  # by transport
    outcomes: Counter = field(default_factory=Counter)  # by (transport, result)
    kinds: Counter = field(default_factory=Counter)  # by mutation
    problems: list[str] = field(default_factory=list)
    frames_lost: int = 0
    stored: int = 0
    seconds: float = 0.0

    def table(self, title: str) -> str:
        lines = [f"### {title}", "", "| transport | outcome | inputs |", "|---|---|---:|"]
        for (transport, result), n in sorted(self.outcomes.items()):
            lines.append(f"| {transport} | {result} | {n} |")
        per_transport = ", ".join(f"{t} {n}" for t, n in sorted(self.inputs.items()))
        lines += [
            "",
            f"Inputs tried: {sum(self.inputs.values())} ({per_transport}) in {self.seconds:.0f} s; frames stored "
            f"{self.stored}; frames lost: {self.frames_lost}; consistency problems: {len(self.problems)}.",
            "",
        ]
        return "\n".join(lines)


def check(stack, outcomes: list[Outcome]) -> Report:
    """The invariants of the module docstring, after a run."""
    report = Report()
    for o in outcomes:
        report.inputs[o.transport] += 1
        report.outcomes[(o.transport, o.result)] += 1
        report.kinds[o.input.kind] += 1
    acked = [o for o in outcomes if o.result in (AckStatus.STORED, AckStatus.DUPLICATE)]
    samples = stack.samples(o.input.frame_id for o in acked)
    for o in acked:
        sample = samples.get(o.input.frame_id)
        sent = _parsed(o.input.payload)
        if sample is None or sent is None:
            report.frames_lost += 1
            report.problems.append(f"{o.result} ack for {o.input.frame_id} ({o.input.kind}) without a sample")
            continue
        if sample["device_id"] != sent.device_id:
            owner = sample["device_id"]
            report.problems.append(f"{o.input.frame_id}: {o.result} for {sent.device_id}, stored by {owner}")
        path = Path(sample["filepath"])
        if not path.is_file():
            report.frames_lost += 1
            report.problems.append(f"{o.input.frame_id}: sample without its file {path}")
        elif o.result == AckStatus.STORED and path.read_bytes() != sent.image:
            report.problems.append(f"{o.input.frame_id}: the stored file differs from the image sent")
    report.stored = sum(1 for o in outcomes if o.result == AckStatus.STORED)
    retries = sum(1 for o in outcomes if o.result == AckStatus.RETRY)
    if retries:
        report.problems.append(f"{retries} input(s) answered RETRY while the database was up")
    for what, items in stack.inconsistencies().items():
        report.problems += [f"{what}: {item}" for item in items[:20]]
    # The server still serves both transports.
    fid, payload = valid_frame(DEVICES[1])
    result = stack.upload([payload], device=DEVICES[1])
    if [a.status for a in result.acks] != [AckStatus.STORED]:
        report.problems.append(f"a valid frame over gRPC after the run got {result.acks} / {result.error}")
    fid, payload = valid_frame(DEVICES[2])
    stack.mqtt.publish(DEVICES[2], payload)
    ack = stack.mqtt.wait_acks([fid], timeout=30).get(fid)
    if ack is None or ack.status != AckStatus.STORED:
        report.problems.append(f"a valid frame over MQTT after the run got {ack}")
    return report


def _parsed(payload: bytes) -> FrameRecord | None:
    try:
        return parse_frame(payload)
    except Exception:
        return None


# -- the by-hand run ----------------------------------------------------------------------------


@contextlib.contextmanager
def _stack(tmp: Path) -> Iterator:
    from server.store.mongo import MongoConfig, MongoManager
    from tests.fixtures.hardened_server import ServerStack

    manager = MongoManager(MongoConfig(db_dir=tmp / "mongo", cache_size_gb=0.25))
    uri = manager.ensure_running()
    stack = ServerStack(tmp / "stack", uri, DEVICES)
    try:
        yield stack.start()
    finally:
        stack.stop()
        manager.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=3000, help="Inputs to send (all transports).")
    parser.add_argument("--seed", type=int, default=1, help="Random seed (the same seed makes the same inputs).")
    parser.add_argument("--mqtt-share", type=float, default=0.25, help="Share of inputs sent over MQTT.")
    parser.add_argument("--no-huge", action="store_true", help="Leave out multi-megabyte inputs (faster).")
    parser.add_argument("--write", type=Path, help="Append the result table to this markdown file.")
    parser.add_argument("--make-corpus", action="store_true", help="Rewrite bench/fuzz_corpus/ and exit.")
    args = parser.parse_args()
    if args.make_corpus:
        make_corpus()
        return
    from bench.report import emit

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="edgeloop-fuzz-") as tmp, _stack(Path(tmp)) as stack:
        started = time.monotonic()
        fuzzer = Fuzzer(stack, Mutator(load_corpus(), rng, huge=not args.no_huge), rng, mqtt_share=args.mqtt_share)
        outcomes = fuzzer.run(args.frames, progress=True)
        report = check(stack, outcomes)
        report.seconds = time.monotonic() - started
        alive = stack.server is not None and stack.server.proc is not None and stack.server.proc.poll() is None
        if not alive:
            report.problems.append("the server process died")
    day = time.strftime("%Y-%m-%d")
    title = f"Fuzz run: {args.frames} inputs, seed {args.seed}, MQTT share {args.mqtt_share:g} ({day})"
    emit(report.table(title), args.write)
    for problem in report.problems:
        print("PROBLEM:", problem)
    raise SystemExit(1 if report.problems or report.frames_lost else 0)


if __name__ == "__main__":
    main()
