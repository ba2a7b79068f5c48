"""edgeloop.releases: what is signed, signature checks, artifact checks and release keys."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.timestamp_pb2 import Timestamp

from edgeloop.convert import parse_release, release_from_pb, release_to_pb, serialize_release
from edgeloop.domain import Release
from edgeloop.releases import (
    DIGEST_PREFIX,
    ReleaseKeyError,
    ReleaseVerificationError,
    file_sha256,
    generate_signing_key,
    key_fingerprint,
    load_private_key,
    load_public_key,
    public_key_pem,
    release_digest,
    sign_release,
    verify_artifact,
    verify_release,
)
from edgeloop.v1 import models_pb2

SHA = hashlib.sha256(b"model bytes").hexdigest()


def make_release(**overrides) -> models_pb2.ModelRelease:
    fields = dict(
        version="v3",
        channel="canary",
        created=Timestamp(seconds=1_763_000_000),
        artifact_size=11,
        artifact_sha256=SHA,
        class_names=["person", "car"],
        imgsz=640,
        parent_version="v2",
        dataset_version="ds-7",
        metrics={"mAP50": 0.61},
        artifact_uri="s3://bucket/v3/model.onnx",
    )
    fields.update(overrides)
    return models_pb2.ModelRelease(**fields)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signed(key: Ed25519PrivateKey, **overrides) -> models_pb2.ModelRelease:
    release = make_release(**overrides)
    release.signature = sign_release(release, key)
    return release


# -- what is signed ---------------------------------------------------------------------------------


def test_digest_is_prefixed_deterministic_and_length_prefixed():
    digest = release_digest(make_release())
    assert digest.startswith(len(DIGEST_PREFIX).to_bytes(4, "big") + b"edgeloop-release-v1")
    assert digest == release_digest(make_release())
    # Moving a character between adjacent fields gives a different string (no ambiguous concatenation).
    assert release_digest(make_release(class_names=["person", "car"])) != release_digest(
        make_release(class_names=["personc", "ar"])
    )
    assert release_digest(make_release(class_names=["a", "b"])) != release_digest(make_release(class_names=["a,b"]))


def test_channel_metrics_uri_and_signature_are_not_signed(key: Ed25519PrivateKey):
    base = release_digest(make_release())
    assert release_digest(make_release(channel="stable")) == base
    assert release_digest(make_release(metrics={"mAP50": 0.1, "recall": 0.2})) == base
    assert release_digest(make_release(artifact_uri="")) == base
    assert release_digest(make_release(signature=b"x" * 64)) == base
    # So a release promoted from canary to stable keeps a valid signature.
    release = signed(key, channel="canary")
    release.channel = "stable"
    verify_release(release, key.public_key())


@pytest.mark.parametrize(
    "field, value",
    [
        ("version", "v4"),
        ("artifact_sha256", hashlib.sha256(b"other").hexdigest()),
        ("artifact_size", 12),
        ("class_names", ["person", "truck"]),
        ("class_names", ["person"]),
        ("imgsz", 320),
        ("parent_version", "v1"),
        ("parent_version", ""),
        ("dataset_version", "ds-8"),
        ("created", Timestamp(seconds=1_763_000_001)),
        ("created", Timestamp(seconds=1_763_000_000, nanos=1)),
    ],
)
def test_tampering_with_any_signed_field_breaks_the_signature(key: Ed25519PrivateKey, field: str, value):
    release = signed(key)
    verify_release(release, key.public_key())
    tampered = models_pb2.ModelRelease()
    tampered.CopyFrom(release)
    if field == "class_names":
        del tampered.class_names[:]
        tampered.class_names.extend(value)
    elif field == "created":
        tampered.created.CopyFrom(value)
    else:
        setattr(tampered, field, value)
    with pytest.raises(ReleaseVerificationError, match="signature does not match"):
        verify_release(tampered, key.public_key())


def test_another_key_or_a_missing_or_malformed_signature_is_refused(key: Ed25519PrivateKey):
    release = signed(key)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(ReleaseVerificationError, match=key_fingerprint(other)):
        verify_release(release, other.public_key())
    unsigned = make_release()
    with pytest.raises(ReleaseVerificationError, match="not signed"):
        verify_release(unsigned, key.public_key())
    short = make_release(signature=release.signature[:63])
    with pytest.raises(ReleaseVerificationError, match="63 bytes"):
        verify_release(short, key.public_key())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"version": ""}, "no version"),
        ({"artifact_sha256": "ABC"}, "not 64 lowercase hex"),
        ({"artifact_sha256": SHA.upper()}, "not 64 lowercase hex"),
    ],
)
def test_malformed_releases_are_neither_signed_nor_accepted(key: Ed25519PrivateKey, overrides, message):
    with pytest.raises(ReleaseVerificationError, match=message):
        sign_release(make_release(**overrides), key)
    release = signed(key)
    for name, value in overrides.items():
        setattr(release, name, value)
    with pytest.raises(ReleaseVerificationError, match=message):
        verify_release(release, key.public_key())


def test_signature_survives_the_wire_and_the_domain_round_trip(key: Ed25519PrivateKey):
    release = signed(key)
    again = parse_release(release.SerializeToString())
    verify_release(again, key.public_key())
    domain = release_from_pb(again)
    assert isinstance(domain, Release)
    assert domain.created == 1_763_000_000.0 and domain.class_names == ["person", "car"]
    assert domain.metrics == {"mAP50": pytest.approx(0.61)}
    # Whole-second created times convert back exactly, so the signature still holds.
    verify_release(release_to_pb(domain), key.public_key())
    assert serialize_release(domain) == serialize_release(release_from_pb(parse_release(serialize_release(domain))))


# -- artifacts --------------------------------------------------------------------------------------


def test_verify_artifact_checks_size_then_sha256(tmp_path: Path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"model bytes")
    release = make_release()
    verify_artifact(path, release)
    assert file_sha256(path) == (SHA, 11)

    path.write_bytes(b"model bytes!")
    with pytest.raises(ReleaseVerificationError, match="12 bytes, the release says 11"):
        verify_artifact(path, release)
    path.write_bytes(b"model byteZ")
    with pytest.raises(ReleaseVerificationError, match="has sha256"):
        verify_artifact(path, release)
    with pytest.raises(ReleaseVerificationError, match="No such file"):
        verify_artifact(tmp_path / "missing.onnx", release)


def test_file_sha256_streams_large_files(tmp_path: Path):
    path = tmp_path / "big.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    path.write_bytes(data)
    assert file_sha256(path) == (hashlib.sha256(data).hexdigest(), len(data))


# -- keys -------------------------------------------------------------------------------------------


def test_generated_key_is_private_pem_0600_and_loads(tmp_path: Path):
    path = tmp_path / "keys" / "release_key.pem"
    key = generate_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["release_key.pem"]  # no temporary file left
    loaded = load_private_key(path)
    assert key_fingerprint(loaded) == key_fingerprint(key)
    release = signed(loaded)
    verify_release(release, key.public_key())

    pub = tmp_path / "release_key.pub.pem"
    pub.write_bytes(public_key_pem(key))
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert isinstance(load_public_key(pub), Ed25519PublicKey)
    verify_release(release, load_public_key(pub))
    verify_release(release, load_public_key(path))  # a private key file gives its public half
    assert public_key_pem(key) == public_key_pem(key.public_key())


def test_an_existing_key_is_never_overwritten(tmp_path: Path):
    path = tmp_path / "release_key.pem"
    generate_signing_key(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_signing_key(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["release_key.pem"]


def test_racing_key_generators_leave_exactly_one_key(tmp_path: Path):
    path = tmp_path / "release_key.pem"
    results: list[str] = []

    def make() -> None:
        try:
            generate_signing_key(path)
            results.append("made")
        except FileExistsError:
            results.append("exists")

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("made") == 1 and results.count("exists") == 7
    load_private_key(path)


def test_bad_key_files_give_clear_errors(tmp_path: Path):
    with pytest.raises(ReleaseKeyError, match="cannot read release key"):
        load_private_key(tmp_path / "missing.pem")
    with pytest.raises(ReleaseKeyError, match="cannot read release public key"):
        load_public_key(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    with pytest.raises(ReleaseKeyError, match="not an unencrypted PEM private key"):
        load_private_key(junk)
    with pytest.raises(ReleaseKeyError, match="not a PEM public key"):
        load_public_key(junk)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_path = tmp_path / "ec.pem"
    ec_path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ReleaseKeyError, match="release keys are Ed25519"):
        load_private_key(ec_path)
    ec_pub = tmp_path / "ec.pub.pem"
    ec_pub.write_bytes(
        ec_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ReleaseKeyError, match="release keys are Ed25519"):
        load_public_key(ec_pub)
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ReleaseKeyError, match="unencrypted"):
        load_private_key(encrypted)
