"""Frame validation: every refusal has its RejectCode and a message that says what to fix.

Also home of the frame builders the other server tests import (real JPEGs from OpenCV, wire
bytes from ``edgeloop.convert.serialize_frame``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import uuid

import cv2
import numpy as np
import pytest

from edgeloop.convert import frame_to_pb, serialize_frame
from edgeloop.domain import Detection, FrameRecord, Reason
from server.ingest.base import AllowAllDevices, FrameRejected, Identity, RejectCode
from server.ingest.validation import ValidationConfig, validate
from tests.fakes.frames import photo

CLASS_NAMES = ["person", "car", "dog"]
ANON = Identity(transport="grpc", device_id=None)


@functools.lru_cache(maxsize=64)
def jpeg_bytes(seed: int = 0, width: int = 640, height: int = 480, ext: str = ".jpg") -> bytes:
    """A real image (~50 KB as a 640x480 JPEG): coloured rectangles plus noise, so it compresses like a photo."""
    return photo(seed, width, height, ext, [cv2.IMWRITE_JPEG_QUALITY, 85] if ext == ".jpg" else [])


def make_record(frame_id: str | None = None, *, seed: int = 0, detections: int = 5, **overrides) -> FrameRecord:
    """A valid frame: 640x480 JPEG, ``detections`` boxes with class scores, two reasons."""
    dets = [
        Detection(
            box=(10.0 + 100 * i, 20.0 + 50 * i, 90.0 + 100 * i, 120.0 + 50 * i),
            class_id=i % 3,
            class_name=CLASS_NAMES[i % 3],
            confidence=0.3 + 0.1 * i,
            class_scores=np.array([0.1, 0.2, 0.3], dtype=np.float32),
        )
        for i in range(detections)
    ]
    record = FrameRecord(
        frame_id=frame_id or uuid.uuid4().hex,
        device_id="cam-01",
        capture_time=1_763_800_000.25,
        sequence=42,
        model_version="yolov8n-3",
        image=jpeg_bytes(seed),
        media_type="image/jpeg",
        width=640,
        height=480,
        detections=dets,
        uncertainty=0.7,
        reasons=[Reason("margin", 0.8, "car vs dog 0.05"), Reason("confidence_band", 0.5, "dog 0.41")],
        source_id="front",
        class_names=list(CLASS_NAMES),
        source_name="front#1041",
    )
    return dataclasses.replace(record, **overrides)


def payload_of(record: FrameRecord) -> bytes:
    return serialize_frame(record)


def with_detection(record: FrameRecord, index: int = 0, **changes) -> FrameRecord:
    dets = list(record.detections)
    dets[index] = dataclasses.replace(dets[index], **changes)
    return dataclasses.replace(record, detections=dets)


class Devices:
    """A directory with a fixed set of active devices."""

    def __init__(self, *active: str) -> None:
        self.active = set(active)

    def is_active(self, device_id: str) -> bool:
        return device_id in self.active


def rejected(payload: bytes, *, identity=ANON, devices=None, config=None) -> FrameRejected:
    with pytest.raises(FrameRejected) as info:
        validate(payload, identity, devices or AllowAllDevices(), config or ValidationConfig())
    return info.value


def test_valid_frame_round_trips() -> None:
    record = make_record()
    got = validate(payload_of(record), ANON, AllowAllDevices(), ValidationConfig())
    assert got.frame_id == record.frame_id
    assert got.image == record.image
    assert [d.box for d in got.detections] == [d.box for d in record.detections]
    assert [(r.trigger, r.detail) for r in got.reasons] == [(r.trigger, r.detail) for r in record.reasons]
    assert [r.score for r in got.reasons] == pytest.approx([r.score for r in record.reasons])


def test_png_frame_is_valid_and_empty_media_type_means_jpeg() -> None:
    png = make_record(
        image=jpeg_bytes(1, 320, 240, ".png"), media_type="image/png", width=320, height=240, detections=2
    )
    assert validate(payload_of(png), ANON, AllowAllDevices(), ValidationConfig()).media_type == "image/png"
    unnamed = make_record(media_type="")
    assert validate(payload_of(unnamed), ANON, AllowAllDevices(), ValidationConfig()).media_type == "image/jpeg"


def test_frame_without_detections_or_class_names_is_valid() -> None:
    record = make_record(detections=0, class_names=[])
    cfg = ValidationConfig(require_class_names=True)
    assert validate(payload_of(record), ANON, AllowAllDevices(), cfg).detections == []


def test_too_large() -> None:
    err = rejected(payload_of(make_record()), config=ValidationConfig(max_frame_bytes=10_000))
    assert err.code is RejectCode.TOO_LARGE
    assert "limit of 10000" in str(err) and "device" in str(err)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x78\x01", id="only-unknown-fields"),
        pytest.param(b"\xff\xff\xff\xff\x0f\x01\x02", id="garbage"),
        pytest.param(serialize_frame(make_record())[:1000], id="truncated"),
        pytest.param(b"\x0a\x03\xff\xfe\xfd", id="bad-utf8"),
    ],
)
def test_malformed(payload: bytes) -> None:
    err = rejected(payload)
    assert err.code is RejectCode.MALFORMED
    assert err.code.fatal_for_stream


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("frame_id", "", "no frame_id"),
        ("frame_id", "../../etc/passwd", "not a valid id"),
        ("frame_id", "short", "not a valid id"),
        ("frame_id", "a" * 65, "not a valid id"),
        ("device_id", "", "no device_id"),
    ],
)
def test_missing_or_invalid_ids(field: str, value: str, expected: str) -> None:
    msg = frame_to_pb(make_record())
    setattr(msg, field, value)
    err = rejected(msg.SerializeToString())
    assert err.code is RejectCode.MISSING_ID
    assert expected in str(err)


def test_unknown_and_revoked_device() -> None:
    err = rejected(payload_of(make_record(device_id="cam-99")), devices=Devices("cam-01"))
    assert err.code is RejectCode.UNKNOWN_DEVICE
    assert "cam-99" in str(err) and "register" in str(err)
    assert validate(payload_of(make_record()), ANON, Devices("cam-01"), ValidationConfig()).device_id == "cam-01"


def test_device_mismatch() -> None:
    identity = Identity(transport="grpc", device_id="cam-02", peer="ipv4:127.0.0.1:5555")
    err = rejected(payload_of(make_record()), identity=identity)
    assert err.code is RejectCode.DEVICE_MISMATCH
    assert "cam-01" in str(err) and "cam-02" in str(err)
    ok = Identity(transport="mqtt", device_id="cam-01")
    assert validate(payload_of(make_record()), ok, AllowAllDevices(), ValidationConfig()).device_id == "cam-01"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({"image": b"\xff\xd8\xff" + b"not a jpeg at all" * 10 + b"\xff\xd9"}, "", id="garbage-jpeg"),
        pytest.param({"image": jpeg_bytes(0)[: len(jpeg_bytes(0)) // 2]}, "truncated", id="truncated-jpeg"),
        pytest.param({"image": b"hello world"}, "not a JPEG, PNG or WebP", id="not-an-image"),
        pytest.param({"image": b""}, "no image bytes", id="empty-image"),
        pytest.param({"width": 320}, "header says 640x480", id="declared-size-mismatch"),
        pytest.param({"width": 0, "height": 0}, "empty", id="no-size"),
        pytest.param({"media_type": "image/gif"}, "not accepted", id="unsupported-type"),
        pytest.param({"media_type": "image/png"}, "look like image/jpeg", id="type-mismatch"),
        pytest.param({"width": 10_000, "height": 10_000}, "above the server's limit", id="too-many-pixels"),
    ],
)
def test_bad_image(changes: dict, expected: str) -> None:
    err = rejected(payload_of(make_record(detections=0, **changes)))
    assert err.code is RejectCode.BAD_IMAGE
    assert expected in str(err)
    assert not err.code.fatal_for_stream


def test_corrupt_jpeg_body_that_does_not_decode() -> None:
    data = bytearray(jpeg_bytes(0))
    sof = data.index(b"\xff\xc0")
    data[sof + 9] = 0  # zero colour components: libjpeg refuses the image
    err = rejected(payload_of(make_record(image=bytes(data), detections=0)))
    assert err.code is RejectCode.BAD_IMAGE


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"box": (600.0, 10.0, 700.0, 50.0)}, "outside the 640x480 image"),
        ({"box": (-10.0, 10.0, 50.0, 50.0)}, "outside"),
        ({"box": (10.0, 10.0, 50.0, 490.0)}, "outside"),
        ({"box": (50.0, 10.0, 50.0, 40.0)}, "empty"),
        ({"box": (50.0, 40.0, 60.0, 30.0)}, "empty"),
    ],
)
def test_box_outside_or_degenerate(changes: dict, expected: str) -> None:
    err = rejected(payload_of(with_detection(make_record(), 1, **changes)))
    assert err.code is RejectCode.BOX_OUTSIDE
    assert expected in str(err) and "detection 1" in str(err)


def test_box_within_tolerance_is_accepted() -> None:
    record = with_detection(make_record(), 0, box=(-1.5, -1.0, 641.5, 481.0))
    assert validate(payload_of(record), ANON, AllowAllDevices(), ValidationConfig()).detections[0].box[2] == 641.5


@pytest.mark.parametrize(
    ("changes", "config", "expected"),
    [
        ({"class_id": 7}, {}, "class_id 7 is not one of the model's 3 classes"),
        ({"class_id": -1}, {}, "class_id -1"),
        ({"class_name": "cat"}, {}, "does not match class_names[0] = 'person'"),
    ],
)
def test_unknown_class(changes: dict, config: dict, expected: str) -> None:
    err = rejected(payload_of(with_detection(make_record(), 0, **changes)), config=ValidationConfig(**config))
    assert err.code is RejectCode.UNKNOWN_CLASS
    assert expected in str(err)


def test_class_names_required_or_class_checked_without_them() -> None:
    no_names = make_record(class_names=[])
    assert validate(payload_of(no_names), ANON, AllowAllDevices(), ValidationConfig()).class_names == []
    err = rejected(payload_of(no_names), config=ValidationConfig(require_class_names=True))
    assert err.code is RejectCode.UNKNOWN_CLASS and "class_names" in str(err)
    err = rejected(payload_of(with_detection(no_names, 0, class_name="")))
    assert err.code is RejectCode.UNKNOWN_CLASS


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(with_detection(make_record(), 0, confidence=1.5), id="confidence>1"),
        pytest.param(with_detection(make_record(), 0, confidence=math.nan), id="confidence-nan"),
        pytest.param(
            with_detection(make_record(), 0, class_scores=np.array([0.1, math.nan, 0.2], np.float32)), id="score-nan"
        ),
        pytest.param(with_detection(make_record(), 0, box=(math.nan, 1.0, 5.0, 5.0)), id="box-nan"),
        pytest.param(make_record(uncertainty=math.nan), id="uncertainty-nan"),
        pytest.param(make_record(uncertainty=-0.1), id="uncertainty<0"),
        pytest.param(make_record(reasons=[Reason("margin", 2.0, "")]), id="reason-score"),
        pytest.param(make_record(capture_time=1e13), id="capture-time"),
        pytest.param(make_record(sequence=2**63), id="sequence-overflow"),
    ],
)
def test_bad_values(record: FrameRecord) -> None:
    err = rejected(payload_of(record))
    assert err.code is RejectCode.BAD_VALUE
    assert err.frame_id == record.frame_id


def test_too_many_detections() -> None:
    err = rejected(payload_of(make_record(detections=5)), config=ValidationConfig(max_detections=4))
    assert err.code is RejectCode.FIELD_LIMIT and "limit of 4" in str(err) and "detections" in str(err)


def test_structure_mode_refuses_what_the_decoder_refuses_without_decoding(monkeypatch: pytest.MonkeyPatch):
    """decode_images='structure' (the default) never calls the decoder for a JPEG, and still
    refuses random bytes, truncation, wrong sizes and broken tables (which only a decode caught
    before); corrupt entropy-coded data passes, as it does through the decoder itself."""
    from tests.fakes.frames import jpeg, make_frame

    structure = ValidationConfig()
    assert structure.decode_images == "structure"
    decoded: list[int] = []
    real_imdecode = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: decoded.append(1) or real_imdecode(buf, flags))
    good_id, good = make_frame(device="cam")
    assert validate(good, ANON, AllowAllDevices(), structure).frame_id == good_id
    real = jpeg(64, 48)
    dht = real.index(b"\xff\xc4")
    broken_table = bytearray(real)
    broken_table[dht + 5 : dht + 21] = bytes([255] * 16)  # code counts that overflow the code space
    bad = {
        "not an image": b"\x00" * 500,
        "truncated": real[:-60],
        "broken Huffman table": bytes(broken_table),
    }
    assert real_imdecode(np.frombuffer(bad["broken Huffman table"], np.uint8), cv2.IMREAD_GRAYSCALE) is None
    for name, image in bad.items():
        with pytest.raises(FrameRejected) as err:
            validate(make_frame(device="cam", image=image)[1], ANON, AllowAllDevices(), structure)
        assert err.value.code == RejectCode.BAD_IMAGE, name
    with pytest.raises(FrameRejected):  # header size differs from the declared one
        validate(make_frame(device="cam", image=real, width=65)[1], ANON, AllowAllDevices(), structure)
    sos = real.index(b"\xff\xda")
    scrambled = real[: sos + 12] + bytes(len(real) - sos - 14) + b"\xff\xd9"  # markers intact, zeroed scan data
    validate(make_frame(device="cam", image=scrambled)[1], ANON, AllowAllDevices(), structure)
    assert decoded == []  # no JPEG was decoded
    assert real_imdecode(np.frombuffer(scrambled, np.uint8), cv2.IMREAD_GRAYSCALE) is not None  # nor would it fail
    # decode_images='full' decodes every image.
    validate(make_frame(device="cam", image=real)[1], ANON, AllowAllDevices(), ValidationConfig(decode_images="full"))
    assert decoded == [1]


# -- image headers before any decode (WebP, PNG, JPEG) ---------------------------------------------


def _webp(width: int, height: int, params: list[int], channels: int = 3) -> bytes:
    ok, buf = cv2.imencode(".webp", np.zeros((height, width, channels), np.uint8) + 90, params)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize(
    ("image", "chunk"),
    [
        pytest.param(_webp(321, 243, [cv2.IMWRITE_WEBP_QUALITY, 80]), b"VP8 ", id="lossy"),
        pytest.param(_webp(321, 243, [cv2.IMWRITE_WEBP_QUALITY, 101]), b"VP8L", id="lossless"),
        pytest.param(_webp(321, 243, [cv2.IMWRITE_WEBP_QUALITY, 80], 4), b"VP8X", id="extended-with-alpha"),
    ],
)
def test_webp_size_is_read_from_its_header_and_checked_before_decoding(
    image: bytes, chunk: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert image[12:16] == chunk
    record = make_record(image=image, media_type="image/webp", width=321, height=243, detections=0)
    assert validate(payload_of(record), ANON, AllowAllDevices(), ValidationConfig()).width == 321
    decoded: list[int] = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(1))
    err = rejected(payload_of(dataclasses.replace(record, width=160, height=120)))
    assert err.code is RejectCode.BAD_IMAGE and "header says 321x243 but the frame declares 160x120" in str(err)
    assert decoded == []  # refused from the header: nothing was decoded


def test_the_decompression_bomb_is_refused_from_its_header() -> None:
    """~10 KB of lossless WebP that decodes to 16383x16383 (the issue's bomb, from the fuzz corpus)."""
    from bench.fuzz_ingest import bomb_image

    bomb = bomb_image()
    err = rejected(payload_of(make_record(image=bomb, media_type="image/webp", width=160, height=120, detections=0)))
    assert "header says 16383x16383" in str(err)
    honest = make_record(image=bomb, media_type="image/webp", width=16383, height=16383, detections=0)
    assert "above the server's limit" in str(rejected(payload_of(honest)))


def _webp_record(image: bytes) -> FrameRecord:
    return make_record(image=image, media_type="image/webp", width=64, height=48, detections=0)


def test_unreadable_or_animated_headers_are_refused() -> None:
    png = jpeg_bytes(0, 64, 48, ".png")
    no_ihdr = png[:12] + b"XXXX" + png[16:]
    err = rejected(payload_of(make_record(image=no_ihdr, media_type="image/png", width=64, height=48, detections=0)))
    assert "header is missing or unreadable" in str(err)
    webp = bytearray(_webp(64, 48, [cv2.IMWRITE_WEBP_QUALITY, 80], 4))
    assert webp[12:16] == b"VP8X"
    webp[20] |= 0x02  # the animation flag
    err = rejected(payload_of(_webp_record(bytes(webp))))
    assert "animated" in str(err)
    odd = bytearray(_webp(64, 48, [cv2.IMWRITE_WEBP_QUALITY, 80]))
    odd[12:16] = b"JUNK"
    err = rejected(payload_of(_webp_record(bytes(odd))))
    assert "header is missing or unreadable" in str(err)


def test_decodes_wait_for_the_pixel_budget_in_order() -> None:
    import threading
    import time

    from server.ingest.validation import DecodeBudget

    budget = DecodeBudget(100)
    order: list[str] = []
    with budget.reserve(60):

        def take(name: str, pixels: int) -> None:
            with budget.reserve(pixels):
                order.append(name)

        threads = [threading.Thread(target=take, args=("big", 80))]
        threads[0].start()
        time.sleep(0.05)
        threads.append(threading.Thread(target=take, args=("small", 10)))  # would fit, but waits its turn
        threads[1].start()
        time.sleep(0.05)
        assert order == []
    for t in threads:
        t.join(5)
    assert order == ["big", "small"] and budget.peak <= 100
    with pytest.raises(ValueError, match="exceed the decode budget"), budget.reserve(101):
        pass


# -- field limits --------------------------------------------------------------------------------------


def _scores(n: int) -> np.ndarray:
    return np.full(n, 0.1, np.float32)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        pytest.param(make_record(source_id="s" * 129), "source_id is 129 characters", id="source_id"),
        pytest.param(make_record(source_name="n" * 129), "source_name is 129 characters", id="source_name"),
        pytest.param(make_record(model_version="m" * 200), "model_version is 200 characters", id="model_version"),
        pytest.param(make_record(reasons=[Reason("t" * 8_500_000, 0.5)]), "reasons[0].trigger", id="trigger"),
        pytest.param(make_record(reasons=[Reason("margin", 0.5, "d" * 1025)]), "reasons[0].detail", id="detail"),
        pytest.param(make_record(reasons=[Reason("margin", 0.5)] * 33), "reasons holds 33 entries", id="reasons"),
        pytest.param(make_record(class_names=["c"] * 4097, detections=0), "class_names holds 4,097", id="names"),
        pytest.param(make_record(class_names=["person", "c" * 129, "dog"]), "class_names[1]", id="name-length"),
        pytest.param(with_detection(make_record(), 0, class_scores=_scores(4)), "holds 4 scores but class_names 3"),
        pytest.param(
            with_detection(make_record(class_names=[]), 0, class_scores=_scores(1_300_000)),
            "detections[0].class_scores holds 1,300,000 entries",
            id="scores-without-names",
        ),
        pytest.param(
            make_record(
                class_names=[f"c{i}" for i in range(3000)],
                detections=0,
            ),
            None,
            id="3000-names-are-fine",
        ),
        pytest.param(make_record(embedding=np.zeros(4097, np.float32)), "embedding holds 4,097", id="embedding"),
        pytest.param(make_record(detections=1001), "detections holds 1,001 entries", id="detections"),
    ],
)
def test_a_field_over_its_limit_is_refused_naming_the_field(record: FrameRecord, field: str | None) -> None:
    if field is None:
        assert validate(payload_of(record), ANON, AllowAllDevices(), ValidationConfig())
        return
    err = rejected(payload_of(record))
    assert err.code is RejectCode.FIELD_LIMIT and field in str(err)
    assert not err.code.fatal_for_stream and err.frame_id == record.frame_id
    assert len(str(err)) < 1000


def test_class_scores_of_all_detections_together_are_limited() -> None:
    det = Detection((1.0, 1.0, 20.0, 20.0), 0, "c0", 0.5, _scores(3000))
    record = make_record(class_names=[f"c{i}" for i in range(3000)], detections=0)
    ok = dataclasses.replace(record, detections=[det] * 66)  # 198,000 scores
    assert validate(payload_of(ok), ANON, AllowAllDevices(), ValidationConfig())
    err = rejected(payload_of(dataclasses.replace(record, detections=[det] * 67)))
    assert err.code is RejectCode.FIELD_LIMIT and "class_scores (all detections) holds 201,000" in str(err)


def test_an_embedding_must_be_finite() -> None:
    emb = np.ones(16, np.float32)
    emb[3] = np.nan
    err = rejected(payload_of(make_record(embedding=emb)))
    assert err.code is RejectCode.BAD_VALUE and "embedding" in str(err)
    longest = make_record(embedding=np.ones(4096, np.float32))
    assert validate(payload_of(longest), ANON, AllowAllDevices(), ValidationConfig()).embedding is not None


def test_the_limits_keep_a_sample_below_mongodbs_document_limit() -> None:
    from pydantic import ValidationError

    from server.ingest.validation import MONGO_MAX_DOCUMENT_BYTES

    assert ValidationConfig().max_document_bytes() < MONGO_MAX_DOCUMENT_BYTES // 3
    with pytest.raises(ValidationError, match="document limit"):
        ValidationConfig(max_class_scores=2_000_000)
    with pytest.raises(ValidationError, match="max_decode_pixels"):
        ValidationConfig(max_decode_pixels=1_000_000)


def test_an_id_or_media_type_of_a_megabyte_is_clipped_in_the_message() -> None:
    err = rejected(payload_of(make_record(device_id="d" * 1_000_000)), devices=Devices("cam-01"))
    assert err.code is RejectCode.UNKNOWN_DEVICE and "1,000,000 characters" in str(err) and len(str(err)) < 400
    err = rejected(payload_of(make_record(media_type="image/" + "x" * 1_000_000, detections=0)))
    assert err.code is RejectCode.BAD_IMAGE and len(str(err)) < 400
