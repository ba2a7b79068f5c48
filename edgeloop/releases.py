"""Signed model releases: exactly what the registry signs, and how a device checks it.

Shared by the server (which signs when a version is published) and the edge agent (which verifies
before it builds and swaps a model), so it depends on ``cryptography`` and the generated protobuf
code only.

What is signed (:func:`release_digest`): a domain-separated, length-prefixed concatenation of the
fields that decide *what a device runs and how it reads the output*:

    "edgeloop-release-v1"
    version, artifact_sha256, artifact_size, class_names (count, then each), imgsz,
    parent_version, dataset_version, created (seconds, nanos)

Not signed, on purpose:

- ``channel``: a release promoted from canary to stable is the same release; its signature must
  stay valid without the signing key being on hand at promotion time. A device takes the channel
  from the topic or query it used, never from the message.
- ``metrics`` and ``artifact_uri``: informational facts and a fetch location. The artifact's bytes
  are bound by ``artifact_sha256`` + ``artifact_size`` whatever URI they come from; metrics are
  shown, never acted upon.
- ``signature`` itself.

A signature proves the release came from the holder of the release key; it does not stop a replay
of an *older* signed release (a rollback is a legitimate one). A device that wants to refuse
downgrades compares ``created`` with what it runs and allows an older one only when told to.

The canonical form is a hand-written byte string rather than ``SerializeToString(deterministic=True)``
of a trimmed copy: protobuf's deterministic mode is documented as stable only within one build of
one library, while this must match across protobuf versions and languages for as long as devices
run. The ``-v1`` prefix names the format, so a future format cannot be confused with this one.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeloop.durable import fsync_dir
from edgeloop.v1 import models_pb2

#: Domain-separation prefix: a signature over a release can never be mistaken for one over anything else.
DIGEST_PREFIX = b"edgeloop-release-v1"
#: Ed25519 signatures are always this long.
SIGNATURE_BYTES = 64
#: Read size when hashing an artifact: bounded memory whatever the model's size.
HASH_CHUNK_BYTES = 1 << 20

_HEX = frozenset("0123456789abcdef")


class ReleaseVerificationError(Exception):
    """A release's signature or an artifact's bytes do not check out; the message says which and why."""


class ReleaseKeyError(Exception):
    """A release key file is missing, unreadable or not an Ed25519 key."""


def _bytes(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _text(value: str) -> bytes:
    return _bytes(value.encode("utf-8"))


def release_digest(release: models_pb2.ModelRelease) -> bytes:
    """The canonical byte string that a release's signature covers (see the module docstring).

    Every variable-length field is prefixed with its length (4 bytes, big-endian) and integers have
    fixed widths, so no two different releases give the same string.

    Raises:
        ReleaseVerificationError: ``version`` is empty or ``artifact_sha256`` is not 64 lowercase hex
            digits: such a release must be neither signed nor accepted.
    """
    if not release.version:
        raise ReleaseVerificationError("release has no version")
    sha = release.artifact_sha256
    if len(sha) != 64 or not set(sha) <= _HEX:
        raise ReleaseVerificationError(f"release {release.version}: artifact_sha256 {sha!r} is not 64 lowercase hex")
    parts = [
        _bytes(DIGEST_PREFIX),
        _text(release.version),
        _text(sha),
        struct.pack(">Q", release.artifact_size),
        struct.pack(">I", len(release.class_names)),
        *(_text(name) for name in release.class_names),
        struct.pack(">I", release.imgsz),
        _text(release.parent_version),
        _text(release.dataset_version),
        struct.pack(">qi", release.created.seconds, release.created.nanos),
    ]
    return b"".join(parts)


def sign_release(release: models_pb2.ModelRelease, private_key: Ed25519PrivateKey) -> bytes:
    """Ed25519 signature over :func:`release_digest`; the caller stores it in ``release.signature``."""
    return private_key.sign(release_digest(release))


def verify_release(release: models_pb2.ModelRelease, public_key: Ed25519PublicKey) -> None:
    """Check ``release.signature`` against ``public_key``.

    Raises:
        ReleaseVerificationError: no signature, a malformed one, or one that does not match (a
            signed field was altered, or another key signed it).
    """
    name = release.version or "(no version)"
    if not release.signature:
        raise ReleaseVerificationError(f"release {name} is not signed")
    if len(release.signature) != SIGNATURE_BYTES:
        raise ReleaseVerificationError(
            f"release {name}: signature is {len(release.signature)} bytes, an Ed25519 signature is {SIGNATURE_BYTES}"
        )
    try:
        public_key.verify(release.signature, release_digest(release))
    except InvalidSignature as err:
        raise ReleaseVerificationError(
            f"release {name}: signature does not match (a signed field was altered, or it was signed with "
            f"another key than {key_fingerprint(public_key)})"
        ) from err


def file_sha256(path: Path) -> tuple[str, int]:
    """Hex sha256 and size of a file, read in :data:`HASH_CHUNK_BYTES` chunks."""
    digest = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def verify_artifact(path: Path, release: models_pb2.ModelRelease) -> None:
    """Check that the file at ``path`` is the release's artifact: size first (cheap), then sha256 (streamed).

    Raises:
        ReleaseVerificationError: the file is missing, has the wrong size or the wrong hash.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ReleaseVerificationError(f"artifact of release {release.version} at {path}: {err}") from err
    if size != release.artifact_size:
        raise ReleaseVerificationError(
            f"artifact of release {release.version} at {path} is {size} bytes, the release says {release.artifact_size}"
        )
    sha, hashed = file_sha256(path)
    if hashed != release.artifact_size or sha != release.artifact_sha256:
        raise ReleaseVerificationError(
            f"artifact of release {release.version} at {path} has sha256 {sha}, the release says "
            f"{release.artifact_sha256}"
        )


# -- keys ---------------------------------------------------------------------------------------


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create a new Ed25519 release key at ``path`` (PKCS#8 PEM, mode 0600) and return it.

    The key is written to a temporary file in the same directory, fsync-ed, then hard-linked into
    place: the link fails if ``path`` exists, so a key is never overwritten, not even by a second
    process racing this one (replacing the key would orphan every device that trusts the old one).

    Raises:
        FileExistsError: ``path`` already exists.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an unencrypted Ed25519 private key (PEM).

    Raises:
        ReleaseKeyError: missing, unreadable, encrypted or not Ed25519.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ReleaseKeyError(f"cannot read release key {path}: {err}") from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise ReleaseKeyError(f"{path} is not an unencrypted PEM private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseKeyError(f"{path} holds a {type(key).__name__}, release keys are Ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key (PEM ``PUBLIC KEY``); a private key file is accepted and its public half used.

    Raises:
        ReleaseKeyError: missing, unreadable or not Ed25519.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ReleaseKeyError(f"cannot read release public key {path}: {err}") from err
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise ReleaseKeyError(f"{path} is not a PEM public key: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseKeyError(f"{path} holds a {type(key).__name__}, release keys are Ed25519")
    return key


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The public half as PEM (``SubjectPublicKeyInfo``): what devices are configured to trust."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """A short, stable name for a key in logs and listings: ``ed25519:`` + 16 hex digits of sha256(raw public key)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
