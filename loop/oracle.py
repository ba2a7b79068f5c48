"""The demo's curator: labels a frame from the truth its camera was recorded with.

In the demo the cameras play recorded sources whose every frame has a label file (a synthetic
video with its ``video_labels/``, or a folder of frames made from labelled photos). A frame that
reaches the inbox says where it was at its source (``source_id``, and ``source_name``:
``"<source_id>#<index>"`` in a video, the file name in a folder), which is all the oracle needs to
find its labels. The report says plainly that an oracle, not a person, labelled the batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeloop.yolo_dataset import YoloLabel, read_labels


class OracleError(LookupError):
    """A frame the oracle has no truth for (unknown camera, or a name it cannot place)."""


@dataclass(frozen=True)
class CameraTruth:
    """Where one camera's labels are: one ``.txt`` per frame, named by frame index or by file stem."""

    labels_dir: Path
    frames: int  # frames in the recording: a looping video's index wraps around

    def labels_for(self, source_name: str) -> list[YoloLabel]:
        if "#" in source_name:  # a stream position: "<source_id>#<index>"
            index = int(source_name.rsplit("#", 1)[1]) % self.frames
            path = self.labels_dir / f"{index:06d}.txt"
        else:  # a file of a folder
            path = self.labels_dir / (Path(source_name).stem + ".txt")
        if not path.is_file():
            raise OracleError(f"no label file {path} for frame {source_name!r}")
        return read_labels(path)


class Oracle:
    """Truth for every camera of the demo, by ``source_id``."""

    def __init__(self, cameras: dict[str, CameraTruth]) -> None:
        self.cameras = dict(cameras)

    def labels(self, source_id: str, source_name: str) -> list[YoloLabel]:
        """The objects in one uploaded frame, boxes normalised to the frame (so any resize keeps them).

        Raises:
            OracleError: the camera is not one of the demo's, or the frame cannot be placed.
        """
        camera = self.cameras.get(source_id)
        if camera is None:
            raise OracleError(f"camera {source_id!r} is not one of the demo's ({sorted(self.cameras)})")
        return camera.labels_for(source_name)
