"""The structural JPEG check: accepts what OpenCV decodes, refuses what it refuses, and says why.

The fuzz test is the specification: thousands of deterministic mutations of real JPEGs (OpenCV,
Pillow, camera photos) go through both ``cv2.imdecode`` and ``check_jpeg``. No mutant that the
decoder refuses may pass the check. Where the check refuses a mutant that OpenCV decodes, Pillow
(the same libjpeg, but reading the file to its EOI and reporting every error) must refuse it
too, or the refusal must be one of the deliberate ones listed in ``jpeg_structure``'s docstring.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import os
import pickle
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from server.ingest.jpeg_structure import JpegStructureError, check_jpeg

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
COCO8 = sorted((SHARED / "data" / "coco8" / "images").glob("*/*.jpg"))
GRAY = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION


# --- images ----------------------------------------------------------------------------------


@functools.cache
def scene(seed: int, width: int = 640, height: int = 480) -> np.ndarray:
    """A BGR frame that compresses like a photo: gradients, shapes, edges and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    image += (x / width * 120)[..., None] + (y / height * 80)[..., None]
    for _ in range(25):
        color = rng.integers(0, 255, 3).tolist()
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(image, p1, int(rng.integers(10, 120)), color, -1)
        cv2.rectangle(image, p1, p2, [c * 0.7 for c in color], 3)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def cv_jpeg(image: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, list(params))
    assert ok
    return buf.tobytes()


def pil_jpeg(image: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image[..., ::-1] if image.ndim == 3 else image).save(out, "JPEG", **options)
    return out.getvalue()


def exif_jpeg(image: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the server decodes with IMREAD_IGNORE_ORIENTATION
    exif[0x010F] = "EdgeCam"
    return pil_jpeg(image, quality=85, exif=exif.tobytes())


def make_sources() -> dict[str, bytes]:
    a, b = scene(1), scene(2)
    sources = {
        "cv q90": cv_jpeg(a, cv2.IMWRITE_JPEG_QUALITY, 90),
        "cv q50": cv_jpeg(b, cv2.IMWRITE_JPEG_QUALITY, 50),
        "cv progressive": cv_jpeg(a, cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "cv restart": cv_jpeg(b, cv2.IMWRITE_JPEG_QUALITY, 80, cv2.IMWRITE_JPEG_RST_INTERVAL, 4),
        "cv gray": cv_jpeg(cv2.cvtColor(a, cv2.COLOR_BGR2GRAY), cv2.IMWRITE_JPEG_QUALITY, 90),
        "pil optimize": pil_jpeg(a, quality=85, optimize=True),
        "pil progressive": pil_jpeg(b, quality=75, progressive=True),
        "pil exif": exif_jpeg(b),
    }
    if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR_444"):
        factor = cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444
        sources["cv 444"] = cv_jpeg(b, cv2.IMWRITE_JPEG_QUALITY, 85, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, factor)
    for path in COCO8[::3]:
        sources[f"photo {path.stem}"] = path.read_bytes()
    return sources


def decodes_to(data: bytes, size: tuple[int, int]) -> bool:
    """What the ingest server asks of a frame: OpenCV decodes it, at the size the SOF declares."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), GRAY)
    return image is not None and (image.shape[1], image.shape[0]) == size


def pillow_decodes(data: bytes) -> bool:
    """Pillow with the whole file in one block, so that libjpeg reads on to EOI and any error in
    the markers after the last scan surfaces (OpenCV stops after the last row)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.decodermaxblock = len(data) + 1
            image.load()
        return True
    except Exception:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        return False


@contextlib.contextmanager
def libjpeg_warnings_silenced() -> Iterator[None]:
    """libjpeg prints a "Corrupt JPEG data" line per broken file straight to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@pytest.fixture(scope="module")
def sources() -> dict[str, bytes]:
    return make_sources()


# --- valid images ------------------------------------------------------------------------------


def _valid_cases() -> list:
    def color() -> np.ndarray:
        return scene(5)

    def gray() -> np.ndarray:
        return cv2.cvtColor(scene(6), cv2.COLOR_BGR2GRAY)

    cases = {
        "cv baseline q90": lambda: cv_jpeg(color(), cv2.IMWRITE_JPEG_QUALITY, 90),
        "cv baseline q50": lambda: cv_jpeg(color(), cv2.IMWRITE_JPEG_QUALITY, 50),
        "cv progressive": lambda: cv_jpeg(color(), cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "cv restart interval": lambda: cv_jpeg(color(), cv2.IMWRITE_JPEG_RST_INTERVAL, 4),
        "cv progressive restart": lambda: cv_jpeg(
            color(), cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_RST_INTERVAL, 1
        ),
        "cv gray": lambda: cv_jpeg(gray(), cv2.IMWRITE_JPEG_QUALITY, 90),
        "cv gray progressive": lambda: cv_jpeg(gray(), cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "cv optimize": lambda: cv_jpeg(color(), cv2.IMWRITE_JPEG_OPTIMIZE, 1),
        "cv odd size": lambda: cv_jpeg(color()[:37, :53]),
        "cv 1x1 progressive": lambda: cv_jpeg(color()[:1, :1], cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "pil optimize": lambda: pil_jpeg(color(), quality=85, optimize=True),
        "pil progressive optimize 422": lambda: pil_jpeg(color(), subsampling=1, progressive=True, optimize=True),
        "pil gray": lambda: pil_jpeg(gray()),
        "pil cmyk progressive": lambda: _pil_cmyk(color()),
        "pil restart comment icc": lambda: pil_jpeg(
            color(), restart_marker_blocks=3, comment=b"hi", icc_profile=bytes(70000)
        ),
        "pil 16-bit quant tables": lambda: pil_jpeg(color(), qtables=[[300] * 64, [2] * 64]),
        "pil exif": lambda: exif_jpeg(color()),
    }
    for name in ("411", "422", "440", "444"):
        factor = getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{name}", None)
        if factor is not None:
            cases[f"cv sampling {name}"] = lambda f=factor: cv_jpeg(color(), cv2.IMWRITE_JPEG_SAMPLING_FACTOR, f)
    params = [pytest.param(make, id=name) for name, make in cases.items()]
    params += [pytest.param(path.read_bytes, id=f"photo {path.stem}") for path in COCO8]
    return params


def _pil_cmyk(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image[..., ::-1]).convert("CMYK").save(out, "JPEG", progressive=True)
    return out.getvalue()


@pytest.mark.parametrize("make", _valid_cases())
def test_valid_jpeg_gives_its_size(make: Callable[[], bytes]):
    data = make()
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), GRAY)
    assert decoded is not None
    assert check_jpeg(data) == (decoded.shape[1], decoded.shape[0])
    # a little padding after EOI is fine, more is not
    assert check_jpeg(data + bytes(100)) == (decoded.shape[1], decoded.shape[0])
    with pytest.raises(JpegStructureError, match="bytes follow the end of the image"):
        check_jpeg(data + bytes(5000))


def test_accepts_bytes_like(sources: dict[str, bytes]):
    data = sources["cv q90"]
    assert check_jpeg(bytearray(data)) == check_jpeg(memoryview(data)) == (640, 480)


def test_error_survives_pickling(sources: dict[str, bytes]):
    with pytest.raises(JpegStructureError) as caught:
        check_jpeg(sources["cv q90"][:300])
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (str(copy), copy.offset) == (str(caught.value), caught.value.offset)


# --- fuzz equivalence ----------------------------------------------------------------------------

_NEXT_MARKER = re.compile(rb"\xff[^\x00\x01\xd0-\xd7\xff]")
_MARKER_CODES = [0x01, 0x02, 0x05, 0x80, 0xBF, 0xC0, 0xC2, 0xC3, 0xC4, 0xC8, 0xC9, 0xCC, 0xD0, 0xD3]
_MARKER_CODES += [0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xE0, 0xE1, 0xEE, 0xF0, 0xFE]


def segments(data: bytes) -> list[tuple[int, int, int, int]]:
    """(offset, marker code, length, end) of each segment; a scan's end is where its entropy-coded
    data ends. A plain walk, good enough to aim mutations."""
    out, i, n = [], 2, len(data)
    while i + 4 <= n:
        code = data[i + 1]
        if code == 0xD9:
            out.append((i, code, 0, i + 2))
            break
        length = data[i + 2] << 8 | data[i + 3]
        end = i + 2 + length
        if code == 0xDA:
            found = _NEXT_MARKER.search(data, end)
            end = found.start() if found else n
        out.append((i, code, length, end))
        i = end
    return out


def _random_bytes(rng: random.Random, count: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(count))


def mutate_once(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    segs = segments(data)
    b = bytearray(data)
    n = len(b)
    scans = [s for s in segs if s[1] == 0xDA]
    header_end = min(scans[0][0] + 14 if scans else n, n - 2)
    if n < 64 or header_end < 4:
        return data, "none"
    kind = rng.choice(
        ["header bytes", "any bytes", "truncate", "truncate+EOI", "insert run", "delete run", "segment length"]
        + ["scan marker", "zero run", "segment field", "segment shuffle"]
    )

    def anywhere_or_header() -> int:
        return rng.randrange(2, n - 1) if rng.random() < 0.5 else rng.randrange(2, header_end)

    if kind == "header bytes":
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(2, header_end)] = rng.randrange(256)
    elif kind == "any bytes":
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(2, n)] = rng.randrange(256)
    elif kind in ("truncate", "truncate+EOI"):
        cut = rng.randrange(4, n - 2) if rng.random() < 0.7 else rng.randrange(4, header_end + 50)
        b = b[:cut] + (b"\xff\xd9" if kind == "truncate+EOI" else b"")
    elif kind == "insert run":
        pos = anywhere_or_header()
        b[pos:pos] = _random_bytes(rng, rng.randint(1, 16))
    elif kind == "delete run":
        pos = anywhere_or_header()
        del b[pos : pos + rng.randint(1, 16)]
    elif kind == "zero run":
        pos = anywhere_or_header()
        b[pos : pos + rng.randint(1, 64)] = bytes(min(64, n - pos))
    elif kind == "segment length":
        offset, _, length, _ = rng.choice([s for s in segs if s[1] != 0xD9] or [(2, 0, 0, 0)])
        new = rng.choice([length + rng.randint(-3, 3), length ^ 1 << rng.randrange(16), rng.randrange(65536), 0, 1, 2])
        b[offset + 2 : offset + 4] = (new & 0xFFFF).to_bytes(2, "big")
    elif kind == "scan marker":  # a marker written into (or over) entropy-coded data
        if not scans:
            return data, kind
        offset, _, length, end = rng.choice(scans)
        if end - (offset + 2 + length) < 8:
            return data, kind
        pos = rng.randrange(offset + 2 + length, end - 2)
        code = rng.choice(_MARKER_CODES) if rng.random() < 0.8 else rng.randrange(1, 255)
        marker = bytes([0xFF, code]) + _random_bytes(rng, rng.choice([0, 0, 2, 4, 20]))
        b[pos : pos if rng.random() < 0.5 else pos + len(marker)] = marker
    elif kind == "segment field":  # a parameter of SOF/SOS/DHT/DQT/DRI nudged
        fields = [s for s in segs if s[1] in (0xC0, 0xC1, 0xC2, 0xC4, 0xDA, 0xDB, 0xDD)]
        if not fields:
            return data, kind
        offset, _, length, _ = rng.choice(fields)
        end = min(offset + 2 + length, offset + 28, n)
        if end <= offset + 4:
            return data, kind
        pos = rng.randrange(offset + 4, end)
        value = b[pos]
        b[pos] = rng.choice([value ^ 1 << rng.randrange(8), (value + rng.choice([-1, 1, 16, -16])) & 255])
    elif kind == "segment shuffle":  # a whole segment dropped, duplicated or moved, or a second SOI
        candidates = [s for s in segs if s[1] != 0xD9]
        if not candidates:
            return data, kind
        offset, _, length, _ = rng.choice(candidates)
        segment = bytes(b[offset : offset + 2 + length])
        target = rng.choice(segs)[0]
        op = rng.choice(["drop", "duplicate", "move", "SOI"])
        if op in ("drop", "move"):
            del b[offset : offset + 2 + length]
            target = min(target, len(b))
        if op != "drop":
            b[target:target] = segment if op != "SOI" else b"\xff\xd8"
        kind += " " + op
    return bytes(b), kind


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.3:  # several corruptions at once
        kinds = []
        for _ in range(rng.randint(2, 3)):
            data, kind = mutate_once(data, rng)
            kinds.append(kind)
        return data, " + ".join(kinds)
    return mutate_once(data, rng)


#: Refusals that are deliberately stricter than libjpeg (see the module docstring), by message.
DELIBERATE = {
    "no EOI reachable (truncated)": "truncated",
    "too much data after EOI": "bytes follow the end of the image",
    "unknown marker in a scan with restart intervals": "marker that libjpeg does not support",
    "arithmetic-coded or lossless": "is not accepted",
}


def test_fuzz_checker_refuses_everything_the_decoder_refuses(sources: dict[str, bytes]):
    rng = random.Random(20240517)
    originals = [(name, data, check_jpeg(data)) for name, data in sources.items()]
    for name, data, size in originals:
        assert decodes_to(data, size), name
    mutants = decoder_refused = 0
    slipped: list[tuple[str, str]] = []
    stricter: list[tuple[str, str, bytes, str]] = []  # (source, mutation, mutant, message)
    started = time.perf_counter()
    with libjpeg_warnings_silenced():
        for i in range(6000):
            name, data, size = originals[i % len(originals)]
            mutant, kind = mutate(data, rng)
            mutants += 1
            decoder_ok = decodes_to(mutant, size)
            try:
                checker_ok, message = check_jpeg(mutant) == size, "wrong size"
            except JpegStructureError as e:
                checker_ok, message = False, str(e)
            decoder_refused += not decoder_ok
            if checker_ok and not decoder_ok:
                slipped.append((name, kind))
            elif decoder_ok and not checker_ok:
                stricter.append((name, kind, mutant, message))
        pillow_refuses = [not pillow_decodes(mutant) for _, _, mutant, _ in stricter]
    elapsed = time.perf_counter() - started
    decoder_accepted = mutants - decoder_refused

    categories: collections.Counter[str] = collections.Counter()
    unexplained = []
    for (name, kind, _, message), refused_by_pillow in zip(stricter, pillow_refuses, strict=True):
        if refused_by_pillow:  # mostly a libjpeg error after the last scanline, which OpenCV ignores
            categories["Pillow (libjpeg reading to EOI) refuses it too"] += 1
            continue
        category = next((c for c, text in DELIBERATE.items() if text in message), None)
        if category == "unknown marker in a scan with restart intervals" and "restart" not in name:
            category = None
        if category is None:
            unexplained.append(f"{name} / {kind}: {message}")
        else:
            categories[category] += 1
    deliberate = sum(n for c, n in categories.items() if c in DELIBERATE)
    summary = (
        f"{mutants} mutants in {elapsed:.1f} s: decoder refused {decoder_refused}, accepted {decoder_accepted}; "
        f"slipped through the check: {len(slipped)}; refused by the check only: {len(stricter)} "
        f"({len(stricter) / decoder_accepted:.1%} of decoder-accepted): "
        + ", ".join(f"{c}: {n}" for c, n in categories.most_common())
    )
    print(summary)

    assert not slipped, f"{len(slipped)} mutants the decoder refuses pass the check: {slipped[:20]}\n{summary}"
    assert not unexplained, "refused by the check only, for no documented reason:\n" + "\n".join(unexplained[:20])
    # The deliberate refusals come from markers written into entropy-coded data; measured: ~2% of
    # the mutants OpenCV decodes (~12% with those that Pillow refuses too).
    assert deliberate < 0.05 * decoder_accepted, summary
    assert len(stricter) < 0.20 * decoder_accepted, summary
    assert decoder_refused > 0.3 * mutants, "the mutations should break many files"


# --- messages ----------------------------------------------------------------------------------


def _segment(data: bytes, code: int, nth: int = 0) -> int:
    return [s[0] for s in segments(data) if s[1] == code][nth]


def _overflowing_dht(data: bytes) -> tuple[bytes, int]:
    """The first DHT's table given codes that do not fit: three codes of 1 bit."""
    offset = _segment(data, 0xC4)
    counts = offset + 5
    total = sum(data[counts : counts + 16])
    new_counts = bytes([3, total - 3] + [0] * 14)
    return data[:counts] + new_counts + data[counts + 16 :], offset


def _sos_with_table(data: bytes, selector: int) -> tuple[bytes, int]:
    offset = _segment(data, 0xDA)
    return data[: offset + 6] + bytes([selector]) + data[offset + 7 :], offset


CORRUPTIONS: dict[str, Callable[[bytes], tuple[bytes, int, str]]] = {
    "truncated header": lambda d: (
        d[:300],
        210,
        r"segment DHT at offset 210: the data ends inside the segment \(truncated\)",
    ),
    "truncated image data": lambda d: (
        d[:-1000],
        len(d) - 1000,
        r"the data ends inside or after the image data without an EOI marker \(truncated\)",
    ),
    "DHT overflow": lambda d: (
        *_overflowing_dht(d),
        r"segment DHT at offset 177: Huffman table overflows the code space \(DC table 0, used by the scan",
    ),
    "SOS uses an undefined table": lambda d: (
        *_sos_with_table(d, 0x22),
        r"segment SOS at offset \d+: component id 1 uses DC Huffman table 2, not defined",
    ),
    "SOS uses a table index above 3": lambda d: (
        *_sos_with_table(d, 0x05),
        r"segment SOS at offset \d+: component id 1 uses AC Huffman table 5, not defined",
    ),
    "two SOI": lambda d: (d[:2] + b"\xff\xd8" + d[2:], 2, r"segment SOI at offset 2: a second start-of-image marker"),
    "SOS before SOF": lambda d: (
        d[:2] + d[_segment(d, 0xDA) :],
        2,
        r"segment SOS at offset 2: scan before the frame header \(SOS before SOF\)",
    ),
    "unknown marker in the header": lambda d: (
        d[:2] + b"\xff\x05\x00\x02" + d[2:],
        2,
        r"segment FF05 at offset 2: marker that libjpeg does not support",
    ),
    "bad DQT length": lambda d: (
        d[:22] + b"\x00\x42" + d[24:],
        20,
        r"segment DQT at offset 20: length 66 does not match the tables it holds",
    ),
    "12-bit samples": lambda d: (
        d[: _segment(d, 0xC0) + 4] + b"\x0c" + d[_segment(d, 0xC0) + 5 :],
        158,
        r"segment SOF0 at offset 158: 12-bit samples",
    ),
    "marker in a baseline scan": lambda d: (
        d[:50000] + b"\xff\xc4\x00\x03\x00" + d[50005:],
        50000,
        r"segment DHT at offset 50000: length 3 does not match the tables it holds",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_message_names_the_problem(sources: dict[str, bytes], corruption: str):
    data = sources["cv q90"]
    mutant, offset, pattern = CORRUPTIONS[corruption](data)
    with pytest.raises(JpegStructureError, match=pattern) as caught:
        check_jpeg(mutant)
    assert caught.value.offset == offset
    if corruption != "marker in a baseline scan":  # OpenCV ignores errors after the last scanline
        with libjpeg_warnings_silenced():
            assert cv2.imdecode(np.frombuffer(mutant, np.uint8), GRAY) is None, "the decoder should refuse it too"
    assert not pillow_decodes(mutant)


def test_progressive_scan_with_bad_parameters_is_refused(sources: dict[str, bytes]):
    data = sources["cv progressive"]
    offset = _segment(data, 0xDA, 1)  # an AC scan: Ss..Se are the last 3 bytes of its header
    end = offset + 2 + (data[offset + 2] << 8 | data[offset + 3])
    mutant = data[: end - 1] + b"\x0f" + data[end:]  # Al = 15
    with pytest.raises(JpegStructureError, match=r"invalid progression parameters .* Al=15"):
        check_jpeg(mutant)
    with libjpeg_warnings_silenced():
        assert cv2.imdecode(np.frombuffer(mutant, np.uint8), GRAY) is None
