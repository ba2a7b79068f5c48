"""The registry's gRPC service: release look-up and a chunked, resumable artifact download.

- ``GetRelease(ReleaseQuery{device_id, channel})`` answers the release the device should run, resolved
  as the MQTT announcements are (pin > group > channel); NOT_FOUND when there is none.
- ``DownloadArtifact(ArtifactRequest{version, offset})`` streams the ONNX from ``offset`` in
  :data:`CHUNK_BYTES` chunks, each carrying its offset and the file's total size, so a download that
  broke off continues with ``offset`` = bytes already written. An offset equal to the size gives an
  empty stream; beyond it, OUT_OF_RANGE. The device checks the result against the signed release
  (``edgeloop.releases.verify_artifact``): the server is not trusted for the bytes.

Authorisation is the server wiring's business: it passes ``authorize(context, device_id)``, which
aborts the call (``context.abort``) when the caller may not act for ``device_id`` (e.g. its mTLS
certificate names another device).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import grpc

from edgeloop.v1 import models_pb2, models_pb2_grpc
from server.registry.store import ModelRegistry, RegistryError, UnknownChannelError, UnknownVersionError

logger = logging.getLogger(__name__)

#: Bytes per ArtifactChunk: well under gRPC's 4 MB default message limit, large enough to keep the stream efficient.
CHUNK_BYTES = 256 * 1024

Authorize = Callable[[grpc.ServicerContext, str], None]


class RegistryServicer(models_pb2_grpc.RegistryServicer):
    """Serves one :class:`ModelRegistry` (which re-reads its state when the CLI changes it)."""

    def __init__(
        self, registry: ModelRegistry, *, authorize: Authorize | None = None, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.registry = registry
        self.authorize = authorize
        self.chunk_bytes = chunk_bytes

    def GetRelease(self, request: models_pb2.ReleaseQuery, context: grpc.ServicerContext) -> models_pb2.ModelRelease:  # noqa: N802
        if self.authorize is not None:
            self.authorize(context, request.device_id)
        if not request.device_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "device_id is required")
        try:
            release = self.registry.resolve(request.device_id, request.channel)
        except UnknownChannelError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except RegistryError as err:
            logger.exception("release look-up for %s failed", request.device_id)
            context.abort(grpc.StatusCode.INTERNAL, f"registry error: {err}")
        if release is None:
            channel = request.channel or self.registry.channels[0]
            context.abort(grpc.StatusCode.NOT_FOUND, f"no release for device {request.device_id} on channel {channel}")
        return release

    def DownloadArtifact(  # noqa: N802
        self, request: models_pb2.ArtifactRequest, context: grpc.ServicerContext
    ) -> Iterator[models_pb2.ArtifactChunk]:
        if self.authorize is not None:
            self.authorize(context, request.device_id)
        try:
            path = self.registry.artifact_path(request.version)
            if self.registry.get(request.version).rejected:  # registered for the record, never for a device
                raise UnknownVersionError(f"version {request.version} was rejected and is not served")
        except UnknownVersionError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        except RegistryError as err:
            logger.exception("artifact look-up of %r failed", request.version)
            context.abort(grpc.StatusCode.INTERNAL, f"registry error: {err}")
        # The open file stays readable even if the version is pruned meanwhile.
        with path.open("rb") as f:
            total = os.fstat(f.fileno()).st_size
            if request.offset > total:
                context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"offset {request.offset} is beyond the {total}-byte artifact of {request.version}",
                )
            offset = request.offset
            f.seek(offset)
            while offset < total:
                if not context.is_active():  # the client went away: stop reading
                    return
                data = f.read(min(self.chunk_bytes, total - offset))
                if not data:  # cannot happen with an immutable artifact; never loop on it
                    context.abort(grpc.StatusCode.DATA_LOSS, f"artifact of {request.version} ended early")
                yield models_pb2.ArtifactChunk(offset=offset, data=data, total_size=total)
                offset += len(data)


def add_to_server(
    server: grpc.Server, registry: ModelRegistry, *, authorize: Authorize | None = None
) -> RegistryServicer:
    """Add the Registry service for ``registry`` to ``server`` (before it starts); return the servicer."""
    servicer = RegistryServicer(registry, authorize=authorize)
    models_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
    return servicer
