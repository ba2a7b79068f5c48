"""Image embeddings: what the model's own features say about a whole frame.

An edgeloop model release is an ultralytics detect export with one extra output, ``embedding``:
the detection head's input feature maps (one per scale: P3, P4, P5), each average-pooled over
space and L2-normalised, then concatenated (448 values for a YOLOv8n). It costs the detector
next to nothing (three pooling ops) and gives every frame a learned descriptor of what the model
"sees": two frames the model sees alike are close, a frame from a world the model was not trained
on is far from every training image. :mod:`server.registry.prepare` adds the output to any
ultralytics ONNX export.

Two uses:

* on the edge, the ``image_novelty`` trigger compares each frame's embedding with the camera's
  recent frames and with :class:`ReferenceStats`, a sample of the training images' embeddings that
  travels inside the model file (ONNX metadata ``edgeloop.reference``, so the release's signature
  and sha256 cover it): a frame unlike anything the model was trained on is kept even when the
  model detects nothing in it;
* on the server, curation spreads a review batch over the embedding space (diversity) and skips
  near-duplicates. The embedding travels with the frame (``FrameUpload.embedding``).

Distances are Euclidean, in the standardised space of :class:`ReferenceStats` (each value centred
on the training images' mean and divided by their standard deviation). Normalising away the
features' magnitude (cosine distance) would hide exactly what changes when the lights go down or
the contrast fades; on synthetic domain shifts the standardised distance told shifted frames from
training-world frames with ROC-AUC 1.00 where the cosine one managed 0.26-0.97 (see
``docs/benchmarks.md``). Only numpy here: this module runs on devices.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

#: Name of the extra ONNX output that holds the embedding.
EMBEDDING_OUTPUT = "embedding"
#: ONNX metadata key of the reference statistics (JSON, see :meth:`ReferenceStats.to_json`).
REFERENCE_METADATA_KEY = "edgeloop.reference"
#: Reference embeddings kept in a model file at most: 256 x 448 float16 values are ~230 KB of
#: metadata, and one nearest-neighbour look-up over them costs ~50 us on a device CPU.
MAX_REFERENCE_VECTORS = 256
#: Standard deviations below this are raised to it: a value constant over the training images must
#: not turn a tiny difference into a huge distance.
MIN_STD = 1e-3
_FORMAT = 1


class ReferenceError(ValueError):
    """Reference statistics that cannot be read (wrong format, shape or values)."""


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance between every row of ``a`` (n, d) and every row of ``b`` (m, d)."""
    sq = (a * a).sum(axis=-1)[..., None] + (b * b).sum(axis=-1)[None, :] - 2.0 * (a @ b.T)
    return np.clip(sq, 0.0, None)  # rounding can dip a tiny bit below zero


def nearest_distance(vector: np.ndarray, others: np.ndarray) -> float:
    """Euclidean distance from ``vector`` to the nearest row of ``others`` (inf when there is none)."""
    if len(others) == 0:
        return float("inf")
    return float(np.sqrt(squared_distances(vector[None], others).min()))


def leave_one_out_distances(vectors: np.ndarray) -> np.ndarray:
    """For each row, the Euclidean distance to its nearest *other* row."""
    sq = squared_distances(vectors, vectors)
    np.fill_diagonal(sq, np.inf)
    return np.sqrt(sq.min(axis=1))


@dataclass(frozen=True)
class ReferenceStats:
    """What the model's training images look like to the model, in its embedding space.

    Raw embeddings of one model all point roughly the same way (pooled activations after SiLU are
    mostly positive) and their values live on very different scales. :meth:`project` therefore
    standardises each value with the training images' mean and standard deviation; in that space
    distances are in units of the training set's own spread, and a float16 copy of the vectors is
    precise enough.

    Attributes:
        vectors: ``(n, d)`` projected embeddings of (a sample of) the training images.
        mean: ``(d,)`` mean of the training images' embeddings.
        std: ``(d,)`` their standard deviation (floored, so a constant value divides by no zero).
        q50: Median distance from a training image to its nearest other training image.
        q99: 99th percentile of that distance: beyond it a frame is unlike the training images.
        source: Where the vectors came from, for people ("240 images of shapes300/images/train").
    """

    vectors: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    q50: float
    q99: float
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def from_embeddings(
        cls, embeddings: np.ndarray, *, source: str = "", max_vectors: int = MAX_REFERENCE_VECTORS, seed: int = 0
    ) -> ReferenceStats:
        """Build the statistics from the raw embeddings of the training images (at least 3 rows).

        The quantiles are taken over all rows, before a random sample of ``max_vectors`` is kept.
        """
        raw = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if len(raw) < 3:
            raise ReferenceError(f"reference statistics need at least 3 images, got {len(raw)}")
        mean = raw.mean(axis=0)
        std = np.maximum(raw.std(axis=0), MIN_STD).astype(np.float32)
        vectors = (raw - mean) / std
        loo = leave_one_out_distances(vectors)
        if len(vectors) > max_vectors:
            keep = np.sort(np.random.default_rng(seed).choice(len(vectors), max_vectors, replace=False))
            vectors = vectors[keep]
        # float16 is what the model file stores: round now so a fresh object equals a parsed one.
        vectors = vectors.astype(np.float16).astype(np.float32)
        return cls(vectors, mean, std, float(np.quantile(loo, 0.5)), float(np.quantile(loo, 0.99)), source)

    def project(self, embedding: np.ndarray) -> np.ndarray:
        """A model's raw embedding in the standardised space the reference vectors live in."""
        return ((np.asarray(embedding, dtype=np.float32) - self.mean) / self.std).astype(np.float32)

    def distance(self, projected: np.ndarray) -> float:
        """Euclidean distance from a projected embedding to the nearest reference image."""
        return nearest_distance(projected, self.vectors)

    def to_json(self) -> str:
        data = self.vectors.astype("<f2").tobytes()
        return json.dumps(
            {
                "format": _FORMAT,
                "count": len(self.vectors),
                "dim": self.dim,
                "dtype": "float16",
                "vectors": base64.b64encode(data).decode("ascii"),
                "mean": base64.b64encode(self.mean.astype("<f4").tobytes()).decode("ascii"),
                "std": base64.b64encode(self.std.astype("<f4").tobytes()).decode("ascii"),
                "nn_distance": {"q50": self.q50, "q99": self.q99},
                "source": self.source,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ReferenceStats:
        """Parse :meth:`to_json`'s output.

        Raises:
            ReferenceError: malformed JSON, unknown format, or vectors of the wrong size.
        """
        try:
            doc = json.loads(text)
            if doc.get("format") != _FORMAT or doc.get("dtype") != "float16":
                raise ReferenceError(f"unsupported reference format {doc.get('format')!r} / {doc.get('dtype')!r}")
            count, dim = int(doc["count"]), int(doc["dim"])
            raw = base64.b64decode(doc["vectors"], validate=True)
            raw_mean = base64.b64decode(doc["mean"], validate=True)
            raw_std = base64.b64decode(doc["std"], validate=True)
            q50, q99 = float(doc["nn_distance"]["q50"]), float(doc["nn_distance"]["q99"])
            source = str(doc.get("source", ""))
        except (ValueError, KeyError, TypeError) as err:
            raise ReferenceError(f"unreadable reference statistics: {err}") from err
        if count < 1 or dim < 1 or len(raw) != count * dim * 2 or len(raw_mean) != dim * 4 or len(raw_std) != dim * 4:
            raise ReferenceError(
                f"reference vectors hold {len(raw)} + {len(raw_mean)} + {len(raw_std)} bytes, expected "
                f"{count} x {dim} float16 and twice {dim} float32"
            )
        vectors = np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(count, dim)
        mean = np.frombuffer(raw_mean, dtype="<f4").astype(np.float32)
        std = np.frombuffer(raw_std, dtype="<f4").astype(np.float32)
        finite = all(np.isfinite(a).all() for a in (vectors, mean, std, [q50, q99]))
        if not (finite and (std > 0).all() and 0 <= q50 <= q99):
            raise ReferenceError("reference statistics hold non-finite, non-positive or unordered values")
        return cls(vectors, mean, std, q50, q99, source)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ReferenceStats | None:
        """The statistics in a model's metadata, ``None`` when it has none.

        Raises:
            ReferenceError: the metadata has the key but its value is unreadable.
        """
        text = metadata.get(REFERENCE_METADATA_KEY)
        return None if text is None else cls.from_json(text)
