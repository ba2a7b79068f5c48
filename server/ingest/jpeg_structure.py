"""Structural JPEG check: refuse what OpenCV's JPEG decoder refuses, without decoding the image.

Why: decoding a 640x480 frame with ``cv2.imdecode`` costs ~1 ms of CPU, the largest cost of
ingest, while checking only the header (signature, SOF size, EOI) lets through most corruptions
that the decoder refuses. The decoder (libjpeg-turbo inside OpenCV) refuses an image only for
errors in its *marker structure*; corrupt entropy-coded data (flipped bits inside a scan) only
raises warnings and still gives an image. So walking the markers the way libjpeg does, and
making the checks libjpeg makes before it decodes (``ERREXIT`` in jdmarker.c, jdinput.c,
jdhuff.c, jdphuff.c, jdcolor.c, jdsample.c of libjpeg-turbo 3.1), predicts the decoder's answer
without decoding a single block.

The walk follows libjpeg's marker reader: the first SOS sets the frame up (size limits, 8-bit
samples, 1/3/4 components, sampling factors the upsampler can handle); every scan must find its
components in the SOF, its quantization tables defined and its Huffman tables defined and
valid (``jpeg_make_d_derived_tbl``: no overflowing code space, DC symbols <= 15); progressive
scans must have legal Ss/Se/Ah/Al. Entropy-coded data is skipped with one regular-expression
search (C speed) up to the next marker that is not RSTn or a stuffed FF00, and that marker is
then processed like any other -- which is what libjpeg does with a DHT, SOS or SOI that appears
in the middle of a scan. Garbage between segments is skipped like libjpeg's ``next_marker``
does (it only warns). Sequential scans get libjpeg's standard Huffman tables for slots 0 and 1
when the file defines none (Motion-JPEG style); progressive scans get none. The caller still
has to compare the returned size with the size it expects.

Where this check is stricter than ``cv2.imdecode`` (all of these are corrupt or unusual files):

* the data must end with EOI, followed by at most ``max_trailing`` bytes. OpenCV refuses most
  truncated files but accepts one whose last MCU happens to need no more bytes, and it accepts
  an EOI written into the middle of a scan (the rest of the image is then grey);
* an error after the only scan of a single-scan (baseline) image -- e.g. a DHT, SOS, SOI or an
  unknown marker in its entropy-coded data -- is refused: libjpeg reports it too, but only in
  ``jpeg_finish_decompress``, after OpenCV has all its rows, and OpenCV ignores it (Pillow, which
  uses the same libjpeg, refuses these files);
* unknown markers (FF02-FFBF) inside scans that use restart intervals are refused; libjpeg
  skips them while it resynchronizes at restart markers;
* arithmetic-coded (SOF9-11) and lossless (SOF3) JPEGs are refused (no camera pipeline here
  produces them; libjpeg would decode them); a progressive file without Huffman tables does not
  get OpenCV's Motion-JPEG default tables;
* every component's sampling factors must divide the largest ones (libjpeg checks only the
  components it outputs: for a grayscale decode of a YCbCr image, only Y).

Not checked: the entropy-coded data itself (bit errors, wrong MCU counts, DC overflow in huge
images), EXIF contents (OpenCV ignores them with ``IMREAD_IGNORE_ORIENTATION``).

tests/server/test_jpeg_structure.py fuzzes this against ``cv2.imdecode``: no mutant that the
decoder refuses passes; the ones refused here only are listed above.

Speed (CPython 3.11, the 2-core CI machine, 640x480 frames from ``cv2.imencode`` quality 90):
~40 us per 100 KB of a baseline frame, up to ~55 us per 100 KB for camera photos (their
entropy-coded data holds more FF bytes for the search to look at), ~45-65 us per 100 KB for a
progressive one; the header walk itself is ~6 us. ``cv2.imdecode(..., IMREAD_GRAYSCALE)`` of
the same frames takes 0.7-1.2 ms (baseline) and 2-5 ms (progressive).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

__all__ = ["MAX_TRAILING_BYTES", "JpegStructureError", "check_jpeg"]

#: Bytes allowed after the EOI marker (some encoders pad); more looks like a second file or junk.
MAX_TRAILING_BYTES = 1024

# libjpeg's JPEG_MAX_DIMENSION, D_MAX_BLOCKS_IN_MCU and NUM_QUANT_TBLS (= NUM_HUFF_TBLS), and
# OpenCV's default CV_IO_MAX_IMAGE_PIXELS.
_MAX_DIMENSION = 65500
_MAX_PIXELS = 1 << 30
_MAX_BLOCKS_IN_MCU = 10
_NUM_TABLES = 4

# The next marker libjpeg acts on: FF (after any FF fill bytes) followed by a code other than 00
# (a stuffed FF data byte), RSTn or TEM. RSTn and TEM are parameterless and libjpeg only traces
# them, so skipping them here, together with any garbage or entropy-coded data in between, is
# what libjpeg's next_marker / read_markers loop does -- at C speed.
_MARKER = re.compile(rb"\xff[^\x00\x01\xd0-\xd7\xff]")
_SKIPPED = frozenset([0x00, 0x01, 0xFF, *range(0xD0, 0xD8)])

_FRAME_SOF = frozenset([0xC0, 0xC1, 0xC2])  # baseline, extended sequential, progressive (Huffman)
_UNSUPPORTED_SOF = frozenset([0xC5, 0xC6, 0xC7, 0xC8, 0xCD, 0xCE, 0xCF])
_ARITHMETIC_SOF = frozenset([0xC9, 0xCA, 0xCB])

_NAMES = {0xC4: "DHT", 0xC8: "JPG", 0xCC: "DAC", 0xD8: "SOI", 0xD9: "EOI", 0xDA: "SOS", 0xDB: "DQT"}
_NAMES |= {0xDC: "DNL", 0xDD: "DRI", 0xDE: "DHP", 0xDF: "EXP", 0xFE: "COM"}
_NAMES |= {code: f"SOF{code - 0xC0}" for code in range(0xC0, 0xD0) if code not in _NAMES}
_NAMES |= {code: f"APP{code - 0xE0}" for code in range(0xE0, 0xF0)}

# A Huffman table slot as a scan sees it: (what jpeg_make_d_derived_tbl refuses in it or None,
# offset of the DHT that defined it). Slots 0 and 1 of a sequential file that defines no table
# there get libjpeg's standard tables (jinit_huff_decoder), which are valid.
_Table = tuple[str | None, int]
_STANDARD_TABLE: _Table = (None, -1)


class JpegStructureError(ValueError):
    """The marker structure is broken in a way libjpeg refuses (or one of the stricter refusals in
    the module docstring). The message says what and where; ``offset`` is where, in bytes."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset

    def __reduce__(self):  # keep the offset when pickled (e.g. across a process pool)
        return type(self), (str(self), self.offset)


class _Frame(NamedTuple):
    width: int
    height: int
    progressive: bool
    ids: tuple[int, ...]
    samplings: tuple[tuple[int, int], ...]
    quant_tables: tuple[int, ...]


class _Scan(NamedTuple):
    components: tuple[int, ...]  # indices into the frame's components
    dc_tables: tuple[tuple[int, int], ...]  # (component index, table slot) that need a DC table
    ac_tables: tuple[tuple[int, int], ...]


def _name(code: int) -> str:
    return _NAMES.get(code) or f"FF{code:02X}"


def _fail(code: int, offset: int, problem: str) -> JpegStructureError:
    return JpegStructureError(f"segment {_name(code)} at offset {offset}: {problem}", offset)


def _truncated(code: int, offset: int) -> JpegStructureError:
    return _fail(code, offset, "the data ends inside the segment (truncated)")


# The three parsers below are cached because every frame from one encoder repeats the same
# tables and headers; the caches are keyed by the segments' bytes, so they cannot go stale.


@lru_cache(maxsize=256)
def _huffman_problem(table: bytes) -> str | None:
    """What ``jpeg_make_d_derived_tbl`` refuses in one DHT table (class/index byte, 16 counts,
    symbols). libjpeg checks it only when a scan uses the table, so it is reported then."""
    code = 0
    for length, count in enumerate(table[1:17], 1):
        # Codes are assigned in order; the last one of each length must fit in `length` bits
        # without being all ones.
        code += count
        if count and code >= 1 << length:
            return "Huffman table overflows the code space"
        code <<= 1
    if not table[0] & 0x10 and max(table[17:], default=0) > 15:
        return "DC Huffman table has a symbol above 15"
    return None


@lru_cache(maxsize=64)
def _parse_frame(segment: bytes) -> _Frame | str:
    """A SOF segment whose length matches its component count, or what libjpeg refuses in it
    when the first scan starts (jdinput.c initial_setup, then the colour converter and the
    upsampler that jpeg_start_decompress sets up)."""
    precision = segment[4]
    height = segment[5] << 8 | segment[6]
    width = segment[7] << 8 | segment[8]
    body = segment[10:]
    ids = tuple(body[0::3])
    samplings = tuple((b >> 4, b & 15) for b in body[1::3])
    if precision != 8:
        return f"{precision}-bit samples (OpenCV decodes 8-bit JPEG only)"
    if width > _MAX_DIMENSION or height > _MAX_DIMENSION:
        return f"image of {width}x{height} pixels is larger than JPEG's limit of {_MAX_DIMENSION}"
    if width * height > _MAX_PIXELS:
        return f"image of {width}x{height} pixels is larger than OpenCV's limit of {_MAX_PIXELS} pixels"
    if len(ids) not in (1, 3, 4):
        return f"{len(ids)} components (OpenCV decodes 1: gray, 3: YCbCr or RGB, 4: CMYK)"
    for h, v in samplings:
        if not (1 <= h <= 4 and 1 <= v <= 4):
            return f"sampling factors {h}x{v} (each must be 1-4)"
    max_h = max(h for h, _ in samplings)
    max_v = max(v for _, v in samplings)
    for h, v in samplings:
        if max_h % h or max_v % v:
            return f"sampling factors {h}x{v} do not divide the largest ones, {max_h}x{max_v}"
    return _Frame(width, height, segment[1] == 0xC2, ids, samplings, tuple(body[2::3]))


@lru_cache(maxsize=256)
def _parse_scan(segment: bytes, frame_segment: bytes) -> _Scan | str:
    """An SOS segment whose length matches its component count (1-4), checked against the frame
    as far as no table state is involved: get_sos, per_scan_setup, the progression checks of
    start_pass_phuff_decoder; or what libjpeg refuses."""
    frame = _parse_frame(frame_segment)
    assert isinstance(frame, _Frame)  # the caller refuses a bad frame first
    count = segment[4]
    components: list[int] = []
    dc: list[tuple[int, int]] = []
    ac: list[tuple[int, int]] = []
    searched = min(len(frame.ids), 4)
    ss, se, ah, al = segment[-3], segment[-2], segment[-1] >> 4, segment[-1] & 15
    for i in range(count):
        cid, tables = segment[5 + 2 * i], segment[6 + 2 * i]
        # libjpeg-turbo's get_sos lets the i-th selector match only a frame component with
        # index >= i (among the first four), each at most once.
        for ci in range(i, searched):
            if frame.ids[ci] == cid:
                break
        else:
            return f"component id {cid} is not in the frame (or out of order)"
        if ci in components:
            return f"component id {cid} appears twice in the scan"
        components.append(ci)
        if not frame.progressive or (ss == 0 and ah == 0):  # a DC refinement scan needs no table
            dc.append((ci, tables >> 4))
        if not frame.progressive or ss != 0:
            ac.append((ci, tables & 15))
    if count > 1:
        blocks = sum(frame.samplings[ci][0] * frame.samplings[ci][1] for ci in components)
        if blocks > _MAX_BLOCKS_IN_MCU:
            return f"an MCU of {blocks} blocks (libjpeg's limit is {_MAX_BLOCKS_IN_MCU})"
    if frame.progressive:
        # Sequential scans with other values only make libjpeg warn.
        bad = se != 0 if ss == 0 else ss > se or se > 63 or count != 1
        if bad or (ah != 0 and al != ah - 1) or al > 13:
            return f"invalid progression parameters Ss={ss} Se={se} Ah={ah} Al={al}"
    return _Scan(tuple(components), tuple(dc), tuple(ac))


def check_jpeg(data: bytes, *, max_trailing: int = MAX_TRAILING_BYTES) -> tuple[int, int]:
    """``(width, height)`` from the SOF of a JPEG whose marker structure libjpeg accepts.

    Raises :class:`JpegStructureError` (a ValueError) saying what is wrong and where otherwise.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    n = len(data)
    # OpenCV picks its JPEG decoder by these three bytes; libjpeg then wants SOI at offset 0.
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8 or data[2] != 0xFF:
        raise JpegStructureError("not a JPEG: the data does not start with FF D8 FF (SOI and a marker)", 0)

    frame: _Frame | None = None
    frame_segment = b""
    latched: list[bool] = []  # per component: quantization table checked (at its first scan)
    quant_defined = [False] * _NUM_TABLES
    dc_tables: list[_Table | None] = [None] * _NUM_TABLES
    ac_tables: list[_Table | None] = [None] * _NUM_TABLES
    scans = 0
    multi_scan = False

    pos = 2
    while True:
        if pos + 1 < n and data[pos] == 0xFF and data[pos + 1] not in _SKIPPED:
            start = pos
        else:  # garbage between segments (libjpeg warns), or the entropy-coded data of a scan
            found = _MARKER.search(data, pos)
            if found is None:
                where = "inside or after the image data" if scans else "before the first scan"
                raise JpegStructureError(f"the data ends {where} without an EOI marker (truncated)", n)
            start = found.start()
        code = data[start + 1]
        if code == 0xD9:  # EOI
            if not scans:
                what = "the frame header has no scan" if frame else "there is no frame header (SOF)"
                raise _fail(code, start, f"end of image before any image data: {what}")
            trailing = n - start - 2
            if trailing > max_trailing:
                raise _fail(code, start, f"{trailing} bytes follow the end of the image (at most {max_trailing})")
            assert frame is not None  # a scan needs a frame
            return frame.width, frame.height
        if start + 4 > n:
            raise _truncated(code, start)
        length = data[start + 2] << 8 | data[start + 3]
        p = start + 4

        if code == 0xDA:  # SOS
            if frame is None:
                raise _fail(code, start, "scan before the frame header (SOS before SOF)")
            if p >= n:
                raise _truncated(code, start)
            count = data[p]
            if length != count * 2 + 6 or not 1 <= count <= 4:
                raise _fail(code, start, f"length {length} does not fit a scan of {count} components (1-4)")
            pos = start + 2 + length
            if pos > n:
                raise _truncated(code, start)
            scan = _parse_scan(data[start:pos], frame_segment)
            if isinstance(scan, str):
                raise _fail(code, start, scan)
            if not scans:
                multi_scan = frame.progressive or len(scan.components) < len(frame.ids)
                if not frame.progressive:
                    for tables in (dc_tables, ac_tables):
                        tables[0] = tables[0] or _STANDARD_TABLE
                        tables[1] = tables[1] or _STANDARD_TABLE
            elif not multi_scan:
                raise _fail(code, start, "a second scan in a single-scan image (libjpeg expects EOI)")
            scans += 1
            for ci in scan.components:
                if not latched[ci]:
                    slot = frame.quant_tables[ci]
                    if slot >= _NUM_TABLES or not quant_defined[slot]:
                        raise _fail(
                            code, start, f"component id {frame.ids[ci]} uses quantization table {slot}, not defined"
                        )
                    latched[ci] = True
            for kind, tables, needs in (("DC", dc_tables, scan.dc_tables), ("AC", ac_tables, scan.ac_tables)):
                for ci, slot in needs:
                    table = tables[slot] if slot < _NUM_TABLES else None
                    if table is None:
                        raise _fail(
                            code, start, f"component id {frame.ids[ci]} uses {kind} Huffman table {slot}, not defined"
                        )
                    if table[0]:
                        raise _fail(
                            0xC4, table[1], f"{table[0]} ({kind} table {slot}, used by the scan at offset {start})"
                        )
            # The entropy-coded data that follows is skipped by the search at the top of the loop.

        elif code == 0xC4:  # DHT
            remaining = length - 2
            while remaining > 16:
                if p + 17 > n:
                    raise _truncated(code, start)
                index = data[p]
                symbols = sum(data[p + 1 : p + 17])
                remaining -= 17
                if symbols > 256 or symbols > remaining:
                    raise _fail(code, start, f"Huffman table counts add up to {symbols} symbols, more than it holds")
                if p + 17 + symbols > n:
                    raise _truncated(code, start)
                slot = index & 0x0F if index & 0xF0 in (0x00, 0x10) else _NUM_TABLES
                if slot >= _NUM_TABLES:
                    raise _fail(code, start, f"Huffman table class/index 0x{index:02X} (want 0x00-0x03 or 0x10-0x13)")
                tables = ac_tables if index & 0x10 else dc_tables
                tables[slot] = (_huffman_problem(data[p : p + 17 + symbols]), start)
                remaining -= symbols
                p += 17 + symbols
            if remaining:
                raise _fail(code, start, f"length {length} does not match the tables it holds")
            pos = p

        elif code == 0xDB:  # DQT
            remaining = length - 2
            while remaining > 0:
                if p >= n:
                    raise _truncated(code, start)
                slot = data[p] & 0x0F
                if slot >= _NUM_TABLES:
                    raise _fail(code, start, f"quantization table index {slot} (want 0-3)")
                size = 129 if data[p] >> 4 else 65  # any nonzero precision means 16-bit values
                quant_defined[slot] = True
                p += size
                remaining -= size
            if p > n:
                raise _truncated(code, start)
            if remaining:
                raise _fail(code, start, f"length {length} does not match the tables it holds")
            pos = p

        elif code in _FRAME_SOF:
            if start + 10 > n:
                raise _truncated(code, start)
            if frame is not None:
                raise _fail(code, start, "a second frame header (SOF)")
            height = data[p + 1] << 8 | data[p + 2]
            width = data[p + 3] << 8 | data[p + 4]
            count = data[p + 5]
            if not height or not width or not count:
                raise _fail(code, start, f"empty image: {width}x{height} pixels, {count} components")
            if length != 8 + 3 * count:
                raise _fail(code, start, f"length {length} does not match {count} components (want {8 + 3 * count})")
            pos = start + 2 + length
            if pos > n:
                raise _truncated(code, start)
            frame_segment = data[start:pos]
            parsed = _parse_frame(frame_segment)
            if isinstance(parsed, str):
                raise _fail(code, start, parsed)
            frame = parsed
            latched = [False] * count

        elif 0xE0 <= code <= 0xEF or code == 0xFE or code == 0xDC:  # APPn, COM, DNL
            # libjpeg skips length - 2 bytes; a bogus length below 2 skips nothing.
            pos = p + max(length - 2, 0)
            if pos > n:
                raise _fail(code, start, f"length {length} runs past the end of the data (truncated)")

        elif code == 0xDD:  # DRI: the interval itself needs no check
            if length != 4:
                raise _fail(code, start, f"length {length} (want 4)")
            pos = start + 6
            if pos > n:
                raise _truncated(code, start)

        elif code == 0xD8:
            raise _fail(code, start, "a second start-of-image marker (SOI)")

        elif code == 0xCC:  # DAC: libjpeg parses it even in a Huffman-coded file
            remaining = length - 2
            while remaining > 0:
                if p + 2 > n:
                    raise _truncated(code, start)
                index, value = data[p], data[p + 1]
                if index >= 32 or (index < 16 and value & 0x0F > value >> 4):
                    raise _fail(code, start, f"arithmetic coding table {index}: invalid value 0x{value:02X}")
                p += 2
                remaining -= 2
            if remaining:
                raise _fail(code, start, f"length {length} is odd")
            pos = p

        elif code in _ARITHMETIC_SOF or code == 0xC3:  # processes libjpeg-turbo 3 decodes, refused here
            if frame is not None:
                raise _fail(code, start, "a second frame header (SOF)")
            what = "lossless" if code == 0xC3 else "arithmetic-coded"
            raise _fail(code, start, f"{what} JPEG is not accepted")
        elif code in _UNSUPPORTED_SOF:
            raise _fail(code, start, "hierarchical or reserved JPEG process that libjpeg does not support")
        else:  # FF02-FFBF, DHP, EXP, JPGn
            raise _fail(code, start, "marker that libjpeg does not support")
