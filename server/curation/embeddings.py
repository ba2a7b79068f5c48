"""The one embedding space curation compares frames in: the curation model's.

An embedding only means something next to embeddings of the *same* model version (see
:mod:`edgeloop.embedding`), and a fleet runs several versions at once. Curation therefore picks one
model, by default the registry's current ``stable`` release (``CurationConfig.model``), and for
each sample uses:

1. the ``embedding`` the edge sent, when the sample's ``model_version`` is the curation model's
   (free: the common case once a release has rolled out);
2. otherwise ``curation_embedding``, when ``curation_model`` says it was computed with this model;
3. otherwise it computes the embedding on the server from the stored image with the edge agent's
   own ONNX Runtime detector and caches it on the sample (``curation_embedding`` +
   ``curation_model``), so the next batch finds it.

Each sample also gets its 64-bit dHash (``dhash``, 16 hex digits; model-independent), the
perceptual half of the near-duplicate rule. Vectors are standardised with the model's reference
statistics (:meth:`edgeloop.embedding.ReferenceStats.project`; distances in units of the training
images' q50) or, for a model without them, z-scored over the frames in play, with the median
nearest-neighbour distance among them as the unit.

Cost on the server, per frame that needs it (2-core CI machine, a 320-px shapes model, 640x480
JPEG, one ONNX Runtime thread): 1.5 ms to read the image and hash it, plus 13 ms for the
embedding, paid once (then cached); see ``docs/benchmarks.md`` ("Curation"). An embedding
computed from the uploaded JPEG lies a little off the one the edge computed from the raw frame
(median 0.09 q50), which the near-duplicate rule's margin absorbs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from edge_agent.budget import dhash
from edge_agent.detectors.base import DetectorError
from edge_agent.detectors.onnxruntime import OnnxRuntimeDetector, OnnxRuntimeDetectorConfig
from edgeloop.embedding import MIN_STD, ReferenceStats, leave_one_out_distances
from server.curation.config import CurationModelConfig
from server.curation.duplicates import FrameSet, hash_from_hex, hash_to_hex
from server.curation.store import CurationError

if TYPE_CHECKING:
    import fiftyone as fo

    from server.registry.store import ModelRegistry

logger = logging.getLogger(__name__)

#: Sample fields curation reads and caches.
EDGE_EMBEDDING = "embedding"
MODEL_VERSION = "model_version"
CURATION_EMBEDDING = "curation_embedding"
CURATION_MODEL = "curation_model"
DHASH = "dhash"
#: Frames used at most to estimate the distance unit of a model without reference statistics.
MAX_SCALE_SAMPLE = 2000
#: Samples whose computed values are written back per database round trip.
WRITE_BATCH = 256


class CurationModelError(CurationError):
    """No usable curation model: none configured or released, or it has no embedding output."""


@dataclass(frozen=True)
class RawVectors:
    """A collection's frames in the curation model's raw embedding space.

    Attributes:
        ids: Sample ids, in row order (samples whose image could not be read are left out).
        raw: (n, d) raw embeddings.
        hashes: (n,) dHashes as uint64.
        unreadable: Ids of samples whose image could not be read.
    """

    ids: list[str]
    raw: np.ndarray
    hashes: np.ndarray
    unreadable: list[str]

    def split(self, ids: set[str]) -> tuple[RawVectors, RawVectors]:
        """(the rows whose id is not in ``ids``, the rows whose id is), in row order."""
        inside = np.array([i in ids for i in self.ids], dtype=bool)
        rows_out, rows_in = np.flatnonzero(~inside), np.flatnonzero(inside)

        def take(rows: np.ndarray) -> RawVectors:
            return RawVectors([self.ids[r] for r in rows], self.raw[rows], self.hashes[rows], [])

        return take(rows_out), take(rows_in)


@dataclass(frozen=True)
class Standardiser:
    """Maps raw embeddings into the space distances are measured in, and that space's unit."""

    mean: np.ndarray
    std: np.ndarray
    scale: float

    def __call__(self, raw: RawVectors) -> FrameSet:
        return FrameSet(((raw.raw - self.mean) / self.std).astype(np.float32), raw.hashes)


def sample_fields() -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, field type, kwargs) of the fields this module reads and writes on samples."""
    import fiftyone as fo

    return [
        (EDGE_EMBEDDING, fo.ListField, {"subfield": fo.FloatField}),
        (MODEL_VERSION, fo.StringField, {}),
        (CURATION_EMBEDDING, fo.ListField, {"subfield": fo.FloatField}),
        (CURATION_MODEL, fo.StringField, {}),
        (DHASH, fo.StringField, {}),
    ]


class CurationSpace:
    """The curation model, loaded, and the embeddings it gives samples.

    Attributes:
        model_version: The model's version string, as the edge reports it on samples.
        class_names: The model's classes.
        reference: Its reference statistics, if it has them.
        dim: Length of its embedding.
    """

    def __init__(self, model_path: Path, *, threads: int = 1) -> None:
        try:
            self.detector = OnnxRuntimeDetector(OnnxRuntimeDetectorConfig(model=model_path, intra_op_threads=threads))
        except DetectorError as err:
            raise CurationModelError(f"the curation model {model_path} does not load: {err}") from err
        probe = self._embed(np.zeros((64, 64, 3), np.uint8))
        if probe is None:
            raise CurationModelError(
                f"the curation model {model_path} has no `embedding` output; add it with "
                f"`edgeloop models prepare {model_path} OUT.onnx --reference-images TRAIN_IMAGES`"
            )
        self.path = model_path
        self.dim = int(probe.size)
        self.model_version = self.detector.model_version
        self.class_names = list(self.detector.class_names)
        self.reference: ReferenceStats | None = self.detector.reference

    @classmethod
    def from_config(cls, config: CurationModelConfig, registry: ModelRegistry | None) -> CurationSpace:
        """The configured model, or the registry's current release on ``config.channel``.

        Raises:
            CurationModelError: nothing configured and nothing released on the channel.
        """
        if config.path is not None:
            return cls(config.path, threads=config.intra_op_threads)
        if registry is None:
            raise CurationModelError("no curation model: set curation.model.path")
        from server.registry.store import RegistryError

        try:
            version = registry.current(config.channel)
            if version is None:
                raise CurationModelError(
                    f"no curation model: nothing is released on channel {config.channel!r} yet "
                    f"(edgeloop models publish / promote), or set curation.model.path"
                )
            path = registry.artifact_path(version)
        except RegistryError as err:
            raise CurationModelError(f"no curation model from the registry: {err}") from err
        logger.info("curation model: %s (release %s on %s)", path, version, config.channel)
        return cls(path, threads=config.intra_op_threads)

    def _embed(self, image: np.ndarray) -> np.ndarray | None:
        tensor, _ = self.detector.preprocess(image)
        _, embedding = self.detector.infer_all(tensor)
        return None if embedding is None else np.asarray(embedding, dtype=np.float32).ravel()

    def embed_file(self, path: str) -> tuple[np.ndarray, int] | None:
        """The raw embedding and dHash of an image file, or None when it cannot be read."""
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            return None
        embedding = self._embed(image)
        assert embedding is not None  # checked at load
        return embedding, dhash(image)

    def vectors(self, collection: fo.SampleCollection) -> RawVectors:
        """Every sample's raw embedding in this space and its dHash, computing and caching what is missing.

        The collection's dataset must have the fields of :func:`sample_fields`.
        """
        fields = ["id", "filepath", EDGE_EMBEDDING, MODEL_VERSION, CURATION_EMBEDDING, CURATION_MODEL, DHASH]
        columns = collection.values(fields)
        ids: list[str] = []
        rows: list[np.ndarray] = []
        hashes: list[int] = []
        unreadable: list[str] = []
        computed: dict[str, tuple[list[float] | None, str]] = {}
        for sid, path, edge, version, cached, cached_version, hashed in zip(*columns, strict=True):
            vector: np.ndarray | None = None
            if version == self.model_version and edge is not None and len(edge) == self.dim:
                vector = np.asarray(edge, dtype=np.float32)
            elif cached_version == self.model_version and cached is not None and len(cached) == self.dim:
                vector = np.asarray(cached, dtype=np.float32)
            if vector is not None and hashed:
                rows.append(vector)
                hashes.append(hash_from_hex(hashed))
                ids.append(sid)
                continue
            image = cv2.imread(path, cv2.IMREAD_COLOR)
            if image is None:
                unreadable.append(sid)
                continue
            new_vector = None
            if vector is None:
                vector = new_vector = self._embed(image)
            h = dhash(image)
            computed[sid] = (None if new_vector is None else new_vector.tolist(), hash_to_hex(h))
            rows.append(vector)
            hashes.append(h)
            ids.append(sid)
        if unreadable:
            logger.warning("%d sample(s) have no readable image, e.g. %s: left out", len(unreadable), unreadable[:3])
        if computed:
            self._cache(collection, computed)
        raw = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)
        return RawVectors(ids, raw, np.array(hashes, dtype=np.uint64), unreadable)

    def _cache(self, collection: fo.SampleCollection, computed: dict[str, tuple[list[float] | None, str]]) -> None:
        dataset = collection._dataset
        items = list(computed.items())
        for start in range(0, len(items), WRITE_BATCH):
            chunk = dict(items[start : start + WRITE_BATCH])
            embedded = {sid: emb for sid, (emb, _) in chunk.items() if emb is not None}
            if embedded:
                dataset.set_values(CURATION_EMBEDDING, embedded, key_field="id")
                dataset.set_values(CURATION_MODEL, dict.fromkeys(embedded, self.model_version), key_field="id")
            dataset.set_values(DHASH, {sid: h for sid, (_, h) in chunk.items()}, key_field="id")
        logger.info(
            "curation space %s: computed %d embedding(s), %d hash(es) on the server",
            self.model_version,
            sum(1 for emb, _ in computed.values() if emb is not None),
            len(computed),
        )

    def standardiser(self, *raw_sets: RawVectors) -> Standardiser:
        """How to standardise: the model's reference statistics, else z-scores over ``raw_sets``."""
        if self.reference is not None:
            return Standardiser(self.reference.mean, self.reference.std, self.reference.q50)
        raw = np.concatenate([r.raw for r in raw_sets]) if raw_sets else np.zeros((0, self.dim), np.float32)
        if len(raw) < 3:
            return Standardiser(np.zeros(self.dim, np.float32), np.ones(self.dim, np.float32), 1.0)
        mean = raw.mean(axis=0)
        std = np.maximum(raw.std(axis=0), MIN_STD)
        sample = raw[np.random.default_rng(0).permutation(len(raw))[:MAX_SCALE_SAMPLE]]
        scale = float(np.median(leave_one_out_distances((sample - mean) / std)))
        logger.info("curation model %s has no reference statistics: z-scores over %d frames", self.path, len(raw))
        return Standardiser(mean, std, scale if scale > 0 else 1.0)
