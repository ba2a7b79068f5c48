"""Read a YOLO / ultralytics data set: its class names and, per split, each image with its labels.

The demo's ``--data`` option and the active-learning benchmark take any data set in the layout
ultralytics trains from: a ``data.yaml`` with ``path`` (absolute, or relative to the yaml's
folder), ``train`` / ``val`` / ``test`` (a folder of images, or a list of folders), ``names``
(a list or an ``{id: name}`` mapping), and one ``.txt`` label file per image in the sibling
``labels`` folder (``.../images/x.jpg`` -> ``.../labels/x.txt``, one ``class cx cy w h`` line per
object, normalised to [0, 1]). Only PyYAML here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

#: Image suffixes ultralytics reads.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


class DatasetError(ValueError):
    """A data.yaml or its files that cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class YoloLabel:
    """One object: class id and its box, centre and size normalised to [0, 1]."""

    class_id: int
    cx: float
    cy: float
    w: float
    h: float

    def line(self) -> str:
        """The label as a line of a YOLO label file (without the newline)."""
        return f"{self.class_id} {self.cx:.6f} {self.cy:.6f} {self.w:.6f} {self.h:.6f}"

    def xyxy(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The box in pixels of an image of ``width`` x ``height``."""
        return (
            (self.cx - self.w / 2) * width,
            (self.cy - self.h / 2) * height,
            (self.cx + self.w / 2) * width,
            (self.cy + self.h / 2) * height,
        )


@dataclass(frozen=True, slots=True)
class YoloItem:
    """An image of a split and its label file (which may be missing: an image without objects)."""

    image: Path
    label_file: Path

    def labels(self) -> list[YoloLabel]:
        """The image's objects (none when the label file is missing or empty)."""
        return read_labels(self.label_file) if self.label_file.is_file() else []


def read_labels(path: Path) -> list[YoloLabel]:
    """The objects of one YOLO label file.

    Raises:
        DatasetError: the file cannot be read, or a line is not ``class cx cy w h``.
    """
    try:
        text = path.read_text()
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err}") from err
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cid, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:5])
        except (ValueError, TypeError) as err:
            raise DatasetError(f"{path}:{n}: expected 'class cx cy w h', got {line!r}") from err
        out.append(YoloLabel(cid, cx, cy, w, h))
    return out


@dataclass(frozen=True)
class YoloDataset:
    """A data set's class names and its splits (``train``, ``val``, ``test`` where present)."""

    root: Path
    names: list[str]
    splits: dict[str, list[YoloItem]]

    def split(self, name: str) -> list[YoloItem]:
        """The items of one split.

        Raises:
            DatasetError: the data set has no such split.
        """
        if name not in self.splits:
            raise DatasetError(f"{self.root} has no {name!r} split (it has {sorted(self.splits)})")
        return self.splits[name]


def label_path(image: Path) -> Path:
    """ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _names(raw: object, where: Path) -> list[str]:
    if isinstance(raw, dict) and raw and all(isinstance(k, int) for k in raw):
        return [str(raw[i]) for i in range(max(raw) + 1)]
    if isinstance(raw, list) and raw:
        return [str(n) for n in raw]
    raise DatasetError(f"{where}: 'names' must be a non-empty list or {{id: name}} mapping")


def _images(entries: str | Sequence[str], root: Path, where: Path) -> list[Path]:
    out: list[Path] = []
    for entry in [entries] if isinstance(entries, str) else entries:
        folder = (root / entry).resolve()
        if not folder.is_dir():
            raise DatasetError(f"{where}: split folder {folder} does not exist")
        out += sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return out


def load_yolo_dataset(data_yaml: Path) -> YoloDataset:
    """Read ``data_yaml`` and list every split's images with their label files.

    Raises:
        DatasetError: a missing or malformed yaml, unknown names, a split folder that does not exist.
    """
    try:
        doc = yaml.safe_load(data_yaml.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DatasetError(f"cannot read {data_yaml}: {err}") from err
    if not isinstance(doc, dict):
        raise DatasetError(f"{data_yaml} is not a YAML mapping")
    base = Path(doc.get("path") or ".")
    root = base if base.is_absolute() else (data_yaml.parent / base)
    names = _names(doc.get("names"), data_yaml)
    splits = {}
    for split in ("train", "val", "test"):
        if doc.get(split):
            splits[split] = [YoloItem(p, label_path(p)) for p in _images(doc[split], root, data_yaml)]
    if "train" not in splits:
        raise DatasetError(f"{data_yaml} names no train split")
    return YoloDataset(root.resolve(), names, splits)
