"""Camera-like streams from labelled photos (edgeloop.synth.photo_stream), and the demo's oracle
that labels a frame from the truth of its recorded source (loop.oracle)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeloop.synth.photo_stream import jitter, write_photo_stream
from edgeloop.synth.scenarios import get_scenario
from edgeloop.synth.scenes import write_video
from edgeloop.yolo_dataset import YoloItem, YoloLabel, read_labels
from loop.oracle import CameraTruth, Oracle, OracleError


def _photo(tmp_path: Path, name: str, labels: list[YoloLabel]) -> YoloItem:
    images, label_dir = tmp_path / "images", tmp_path / "labels"
    images.mkdir(exist_ok=True)
    label_dir.mkdir(exist_ok=True)
    image = np.full((200, 300, 3), 60, np.uint8)
    for lab in labels:
        x1, y1, x2, y2 = (int(v) for v in lab.xyxy(300, 200))
        image[y1:y2, x1:x2] = (40 + 60 * lab.class_id, 200, 120)
    cv2.imwrite(str(images / f"{name}.png"), image)
    (label_dir / f"{name}.txt").write_text("".join(lab.line() + "\n" for lab in labels))
    return YoloItem(images / f"{name}.png", label_dir / f"{name}.txt")


def test_a_jittered_frame_moves_its_labels_with_the_image() -> None:
    image = np.zeros((200, 300, 3), np.uint8)
    image[80:120, 100:160] = 255
    label = YoloLabel(0, 130 / 300, 100 / 200, 60 / 300, 40 / 200)
    for seed in range(5):
        frame, text = jitter(image, [label], np.random.default_rng(seed))
        cls, cx, cy, w, h = (float(v) for v in text.split())
        ys, xs = np.nonzero(frame[:, :, 0] > 128)
        assert cls == 0
        assert cx * 300 == pytest.approx((xs.min() + xs.max() + 1) / 2, abs=2)
        assert cy * 200 == pytest.approx((ys.min() + ys.max() + 1) / 2, abs=2)
        assert w * 300 == pytest.approx(xs.max() - xs.min() + 1, abs=3)


def test_rare_photos_get_short_clips_so_the_stream_is_mostly_common(tmp_path: Path) -> None:
    common = [_photo(tmp_path, f"c{i}", [YoloLabel(0, 0.5, 0.5, 0.2, 0.2)]) for i in range(4)]
    rare = [_photo(tmp_path, "r", [YoloLabel(1, 0.3, 0.3, 0.2, 0.2)])]
    frames = write_photo_stream(common + rare, tmp_path / "stream", num_classes=2, seed=0)
    per_photo = {}
    for f in frames:
        per_photo[f.photo.stem] = per_photo.get(f.photo.stem, 0) + 1
    assert per_photo == {"c0": 8, "c1": 8, "c2": 8, "c3": 8, "r": 2}
    assert [f.image.name for f in frames] == sorted(f.image.name for f in frames)  # stream order by name
    assert read_labels(frames[0].labels) == common[0].labels()  # a clip starts with the photo as it is


def test_the_oracle_labels_video_frames_by_index_and_folder_frames_by_name(tmp_path: Path) -> None:
    video = write_video(tmp_path / "cam.mp4", get_scenario("shapes").updated(width=160, height=120), n=10, seed=1,
                        labels_dir=tmp_path / "truth")  # fmt: skip
    assert video.exists()
    stream = write_photo_stream([_photo(tmp_path, "p", [YoloLabel(0, 0.5, 0.5, 0.2, 0.2)])], tmp_path / "s",
                                num_classes=1, seed=0)  # fmt: skip
    oracle = Oracle(
        {"cam-1": CameraTruth(tmp_path / "truth", frames=10), "cam-2": CameraTruth(tmp_path / "s" / "labels", 8)}
    )
    assert oracle.labels("cam-1", "cam-1#3") == read_labels(tmp_path / "truth" / "000003.txt")
    assert oracle.labels("cam-1", "cam-1#13") == oracle.labels("cam-1", "cam-1#3")  # a looping video wraps
    assert oracle.labels("cam-2", stream[2].image.name) == read_labels(stream[2].labels)
    with pytest.raises(OracleError, match="not one of the demo's"):
        oracle.labels("cam-9", "cam-9#1")
    with pytest.raises(OracleError, match="no label file"):
        oracle.labels("cam-2", "missing.jpg")
