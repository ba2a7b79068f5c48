"""Frame sources: an image folder, a video file, or a live camera / RTSP stream (OpenCV).

Every source yields :class:`edgeloop.domain.Frame` objects. ``max_fps`` caps the rate at which
frames are *produced* (a live camera is sampled, a file is paced); ``loop`` replays files for
soak tests and demos. A source never raises on a single bad file: it logs and skips it, since a
corrupt JPEG in a folder must not stop a camera agent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from pydantic import Field

from edgeloop.config_base import StrictModel
from edgeloop.domain import Frame

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg"})
#: A live stream that fails this many reads in a row is reopened (cameras drop out and come back).
MAX_CONSECUTIVE_READ_FAILURES = 25


class SourceError(Exception):
    """A source cannot be opened (no such folder/file, camera unavailable, unreadable URL)."""


class SourceConfig(StrictModel):
    """Where frames come from."""

    uri: str = Field(
        description="An image folder, a video file, a camera index ('0') or a stream URL (rtsp://, http://)."
    )
    source_id: str | None = Field(
        default=None, description="Name of this camera in uploads and metrics; defaults to the uri's last part."
    )
    max_fps: float | None = Field(
        default=None, gt=0, description="Produce at most this many frames per second (None: as fast as possible)."
    )
    loop: bool = Field(default=False, description="Replay a folder or video file forever.")
    sequence: bool = Field(
        default=False,
        description="The folder's images are consecutive frames of one camera (in name order), so the triggers "
        "that compare a frame with the previous ones (novelty, flicker, count_jump, recent image novelty) apply. "
        "Off for a folder of unrelated photos. Video files and cameras are always streams.",
    )
    limit: int | None = Field(default=None, gt=0, description="Stop after this many frames (None: no limit).")

    def resolved_source_id(self) -> str:
        if self.source_id:
            return self.source_id
        stripped = self.uri.rstrip("/")
        return Path(stripped).name or stripped


class _Pacer:
    """Sleeps so that successive ``wait()`` calls are at least ``1/max_fps`` apart."""

    def __init__(self, max_fps: float | None) -> None:
        self._period = 1.0 / max_fps if max_fps else 0.0
        self._next = 0.0

    def wait(self) -> None:
        if not self._period:
            return
        now = time.monotonic()
        if now < self._next:
            time.sleep(self._next - now)
            now = self._next
        self._next = max(self._next + self._period, now)


def _is_stream(uri: str) -> bool:
    return uri.isdigit() or "://" in uri


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _iter_folder(folder: Path, source_id: str, loop: bool, sequence: bool) -> Iterator[Frame]:
    files = list_images(folder)
    if not files:
        raise SourceError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {folder}")
    index = 0
    while True:
        for path in files:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                logger.warning("skipping %s: not a readable image", path)
                continue
            yield Frame(
                image=image,
                source_id=source_id,
                index=index,
                capture_time=time.time(),
                name=path.name,
                stream=sequence,
            )
            index += 1
        if not loop:
            return


def _open_capture(uri: str) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(int(uri)) if uri.isdigit() else cv2.VideoCapture(uri)
    if not cap.isOpened():
        cap.release()
        raise SourceError(f"cannot open video source {uri!r} (check the path, camera index or stream URL)")
    return cap


def _iter_capture(uri: str, source_id: str, loop: bool) -> Iterator[Frame]:
    live = _is_stream(uri)
    cap = _open_capture(uri)
    index = 0
    failures = 0
    try:
        while True:
            ok, image = cap.read()
            if ok and image is not None:
                failures = 0
                yield Frame(
                    image=np.ascontiguousarray(image),
                    source_id=source_id,
                    index=index,
                    capture_time=time.time(),
                    name=f"{source_id}#{index}",
                )
                index += 1
                continue
            if not live:
                if not loop:
                    return
                cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                if index == 0:  # a file that yields nothing would spin forever
                    raise SourceError(f"video {uri} has no readable frames")
                continue
            failures += 1
            if failures >= MAX_CONSECUTIVE_READ_FAILURES:
                logger.warning("stream %s stopped delivering frames; reopening", uri)
                cap.release()
                time.sleep(1.0)
                cap = _open_capture(uri)
                failures = 0
    finally:
        cap.release()


def open_source(config: SourceConfig) -> Iterator[Frame]:
    """Open the source ``config`` describes and return an iterator of frames.

    Raises:
        SourceError: the folder, file or stream cannot be opened (raised here, not mid-iteration).
    """
    source_id = config.resolved_source_id()
    uri = config.uri
    if _is_stream(uri):
        frames = _iter_capture(uri, source_id, loop=False)
    else:
        path = Path(uri).expanduser()
        if path.is_dir():
            frames = _iter_folder(path, source_id, config.loop, config.sequence)
        elif path.is_file():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                frames = _iter_folder_single(path, source_id, config.loop)
            else:
                _open_capture(str(path)).release()  # fail now, with a clear message
                frames = _iter_capture(str(path), source_id, config.loop)
        else:
            raise SourceError(f"source {uri!r} is neither a folder, a file, a camera index nor a stream URL")
    return _paced(frames, config.max_fps, config.limit)


def _iter_folder_single(path: Path, source_id: str, loop: bool) -> Iterator[Frame]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise SourceError(f"{path} is not a readable image")
    index = 0
    while True:
        # One photo again and again is no stream: nothing moves between "frames".
        yield Frame(
            image=image, source_id=source_id, index=index, capture_time=time.time(), name=path.name, stream=False
        )
        index += 1
        if not loop:
            return


def _paced(frames: Iterator[Frame], max_fps: float | None, limit: int | None) -> Iterator[Frame]:
    # Validate eagerly: generators would otherwise defer SourceError to the first next().
    pacer = _Pacer(max_fps)
    count = 0
    first = next(frames, None)
    if first is None:
        return iter(())

    def gen() -> Iterator[Frame]:
        nonlocal count
        for frame in _chain_first(first, frames):
            if limit is not None and count >= limit:
                return
            pacer.wait()
            frame.capture_time = time.time()
            count += 1
            yield frame

    return gen()


def _chain_first(first: Frame, rest: Iterator[Frame]) -> Iterator[Frame]:
    yield first
    yield from rest
