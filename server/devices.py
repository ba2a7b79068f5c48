"""Device identity: who may send frames, and the credentials that prove it.

``edgeloop server devices add NAME`` issues a device's credentials and ``devices revoke NAME``
takes them back. One :class:`DeviceRegistry` holds everything under ``DevicesConfig.root``:

- a private certificate authority (``ca.pem``, ``ca.key``; EC P-256, created on first use) that
  signs the server's TLS certificate (``server/``) and one client certificate per device whose
  common name is the device id: with gRPC mutual TLS the receiver reads the id from the
  certificate (``auth_context()['x509_common_name']``) and refuses frames of another device;
- MQTT credentials: a random password per device, stored only as a Mosquitto ``$7$`` hash
  (PBKDF2-SHA512), and the broker's ``password_file`` and ``acl_file`` regenerated from the
  registry after every change (``mosquitto/passwd``, ``mosquitto/acl``); the broker reloads them
  on SIGHUP (sent when ``mosquitto_pid_file`` is configured) and then drops revoked clients;
- a bundle per device (``bundles/<id>/``) to copy to the device: the CA, the device's
  certificate and key, and agent YAML snippets for the gRPC and MQTT transports (the MQTT one
  holds the password: the bundle is the only plaintext copy, delete it once copied);
- the state, ``devices.json``, written atomically under an ``fcntl`` lock so the CLI and a
  running server share it; readers re-read it when it changes, so a revoke from the CLI takes
  effect in a running server without a restart.

ACL written for device ``D`` (``P`` is ``topic_prefix``); Mosquitto denies what no line allows::

    user D
    topic write P/devices/D/frames
    topic write P/devices/D/status
    topic read P/devices/D/acks
    topic read P/releases/devices/D
    topic read P/releases/channels/+
    topic read P/releases/groups/G/+      (only for a device added with --group G)

Service users (the server's own MQTT clients, passwords generated into ``service/<name>.password``):
role ``bridge`` reads ``P/devices/+/frames`` and ``P/devices/+/status`` (through a shared
subscription ``$share/<group>/P/devices/+/frames``: Mosquitto 2.0 grants every subscription and
checks ``read`` against each delivered message's topic, without the ``$share/<group>/`` part),
writes ``P/devices/+/acks`` and ``P/releases/#``; role ``announcer`` reads and writes
``P/releases/#``; role ``admin`` reads and writes ``P/#``.

Per-client limits over MQTT: :meth:`MosquittoFiles.conf_lines` (what ``edgeloop server devices
mosquitto-files`` prints) also sets what one client may cost the broker (``BrokerLimits``): the
largest packet (a bigger publish disconnects its client before the bridge sees it), the
messages and bytes queued for one client, the longest keepalive (a dead connection goes within
1.5x of it) and how long an absent client's session lives. Mosquitto 2.0 applies each to every
client alike and has neither a per-user connection count nor a publish rate limit, so a device
that floods its own frames topic delays other devices' frames in the bridge's queue (it cannot
reach their topics: the ACL, nor get past validation): revoke it (``devices revoke``) and the
broker drops it at the reload. On gRPC the server itself caps streams per device
(``grpc.max_streams_per_device``).

Limits: gRPC in Python has no certificate revocation lists, so a revoked device's certificate
still completes the TLS handshake; the receiver refuses it by asking :meth:`DeviceRegistry.is_active`
(or :meth:`DeviceRegistry.verify_peer`, which also refuses an old certificate of a re-added id).
The ACL does not tie MQTT client ids to users: a device could take over another's session id
(its messages stay protected by the ACL, but the session is kicked); a device-only listener
with ``use_username_as_clientid true`` closes that.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import errno
import fcntl
import grp
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, field_validator

from edgeloop import topics
from edgeloop.config_base import StrictModel
from edgeloop.durable import write_atomic

if TYPE_CHECKING:
    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

logger = logging.getLogger(__name__)

STATE_VERSION = 1
#: Mosquitto's own default for ``mosquitto_passwd``. Every password here is 32 random bytes, far
#: beyond brute force, so more iterations would only slow each broker login.
PBKDF2_ITERATIONS = 101
PBKDF2_SALT_BYTES = 12  # what mosquitto_passwd uses
MQTT_PASSWORD_BYTES = 24  # token_urlsafe: 32 characters
CA_DAYS = 3650
#: A server certificate closer than this to its expiry is issued anew by ``server_credentials()``.
SERVER_CERT_RENEW_DAYS = 30
CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates start a little in the past for devices with slow clocks

ServiceRole = Literal["bridge", "announcer", "admin"]


@cache
def _device_id_re() -> re.Pattern[str]:
    # Imported on first use: edge_agent.config pulls in the agent's whole config tree (~1 s).
    from edge_agent.config import DEVICE_ID_PATTERN

    return re.compile(DEVICE_ID_PATTERN)


# -- errors ---------------------------------------------------------------------------------------


class DeviceError(Exception):
    """A device operation was refused; the message says why and what to do."""


class InvalidDeviceId(DeviceError):
    """The id cannot be a device id (it goes into MQTT topics, file names and certificates)."""


class DeviceExists(DeviceError):
    """An active device already has this id."""


class UnknownDevice(DeviceError):
    """No device has this id."""


class AlreadyRevoked(DeviceError):
    """The device was revoked before."""


class RegistryStateError(DeviceError):
    """``devices.json`` or the CA files are unreadable or inconsistent."""


def check_device_id(device_id: str, what: str = "device id") -> str:
    """Return ``device_id`` if it matches ``DEVICE_ID_PATTERN``, else raise :class:`InvalidDeviceId`."""
    if not isinstance(device_id, str) or not _device_id_re().fullmatch(device_id):
        raise InvalidDeviceId(
            f"invalid {what} {device_id!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return device_id


# -- configuration --------------------------------------------------------------------------------


class ServiceUser(StrictModel):
    """An MQTT user for one of the server's own clients; its password is generated on first use."""

    name: str = Field(description="MQTT user name (must not collide with a device id).")
    role: ServiceRole = Field(
        description=(
            "bridge: reads every device's frames and status, writes acks and releases; "
            "announcer: reads and writes releases; admin: reads and writes everything under the prefix."
        )
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        try:
            return check_device_id(value, "service user name")
        except InvalidDeviceId as err:
            raise ValueError(str(err)) from err


class BrokerLimits(StrictModel):
    """Per-client limits for the broker's config (Mosquitto applies each to every client)."""

    max_packet_bytes: int = Field(
        default=16 * 1024 * 1024 + 64 * 1024,
        ge=64 * 1024,
        description=(
            "max_packet_size: a larger packet disconnects its client. At least the server's largest frame "
            "(validation.max_frame_bytes) plus room for the topic and headers."
        ),
    )
    max_queued_messages: int = Field(
        default=10_000,
        ge=1,
        description=(
            "Messages queued for one client (an absent session, or beyond its in-flight window); more are dropped "
            "(frames: the agents resend them after their ack timeout). The bridge's clients need room for every "
            "device's batch in flight (deploy/README.md)."
        ),
    )
    max_queued_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=0,
        description="Bytes queued for one client (0: no byte limit): what one client may cost the broker's memory.",
    )
    max_keepalive_s: int = Field(
        default=300,
        ge=10,
        le=65535,
        description="Longest keepalive a client may ask for (agents and the bridge must not ask for longer).",
    )
    session_expiration: str = Field(
        default="7d",
        pattern=r"^[0-9]+[hdwmy]$",
        description="persistent_client_expiration: sessions of clients gone this long are removed with their queue.",
    )

    def conf_lines(self) -> str:
        return (
            "# Per-client limits (edgeloop: server/devices.py BrokerLimits); Mosquitto applies each to every client.\n"
            "# A larger packet disconnects its client (frames: validation.max_frame_bytes + 64 KiB).\n"
            f"max_packet_size {self.max_packet_bytes}\n"
            "# Queued for one client (an absent session, or beyond its in-flight window); more are dropped.\n"
            f"max_queued_messages {self.max_queued_messages}\n"
            f"max_queued_bytes {self.max_queued_bytes}\n"
            "# Longest keepalive a client may ask for: a dead connection is dropped within 1.5x of it.\n"
            f"max_keepalive {self.max_keepalive_s}\n"
            "# Sessions of clients gone this long are removed, with what was queued for them.\n"
            f"persistent_client_expiration {self.session_expiration}\n"
        )


def _default_service_users() -> list[ServiceUser]:
    return [
        ServiceUser(name="edgeloop-bridge", role="bridge"),
        ServiceUser(name="edgeloop-announcer", role="announcer"),
    ]


class DevicesConfig(StrictModel):
    """Where device credentials live and what goes into them."""

    root: Path = Field(
        default=Path(".edgeloop/server/devices"),
        description="Folder of the registry: state, CA, server certificate, Mosquitto files and device bundles.",
    )
    topic_prefix: str = Field(default=topics.DEFAULT_PREFIX, min_length=1, description="Prefix of every MQTT topic.")
    server_names: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1"],
        min_length=1,
        description="DNS names and IP addresses the server certificate is valid for (the first is its common name).",
    )
    cert_days: int = Field(default=825, ge=1, le=CA_DAYS, description="Validity of device and server certificates.")
    require_registered: bool = Field(
        default=True,
        description="Refuse frames from device ids that were never added (revoked ids are refused either way).",
    )
    service_users: list[ServiceUser] = Field(
        default_factory=_default_service_users, description="MQTT users of the server's own clients."
    )
    mosquitto_pid_file: Path | None = Field(
        default=None,
        description="Mosquitto's pid_file: the broker gets SIGHUP after each change to reload passwords and ACL.",
    )
    mosquitto_group: str | None = Field(
        default=None,
        description=(
            "Group given read access to the password and ACL files (mode 0640), e.g. 'mosquitto'; "
            "without one they are world-readable (0644) so a broker running as another user can read them."
        ),
    )
    password_file: Path | None = Field(
        default=None, description="Mosquitto password_file (default root/mosquitto/passwd)."
    )
    acl_file: Path | None = Field(default=None, description="Mosquitto acl_file (default root/mosquitto/acl).")
    grpc_target: str = Field(
        default="localhost:50051", description="The receiver's gRPC address, written into bundles."
    )
    mqtt_host: str = Field(default="localhost", description="The broker's host, written into bundles.")
    mqtt_port: int = Field(default=8883, ge=1, le=65535, description="The broker's port, written into bundles.")
    mqtt_tls: bool = Field(default=True, description="Whether bundles connect to the broker with TLS.")
    broker_limits: BrokerLimits = Field(
        default_factory=BrokerLimits, description="Per-client limits in the broker config lines mosquitto-files prints."
    )

    @field_validator("server_names")
    @classmethod
    def _no_empty_names(cls, value: list[str]) -> list[str]:
        if any(not n.strip() for n in value):
            raise ValueError("server_names must not contain empty names")
        return value


# -- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """One device as the registry knows it (no secrets)."""

    device_id: str
    group: str | None
    created: dt.datetime
    revoked: dt.datetime | None
    cert_serial: int
    cert_expires: dt.datetime

    @property
    def active(self) -> bool:
        return self.revoked is None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.device_id,
            "group": self.group,
            "created": self.created.isoformat(),
            "revoked": self.revoked.isoformat() if self.revoked else None,
            "active": self.active,
            "cert_serial": f"{self.cert_serial:x}",
            "cert_expires": self.cert_expires.isoformat(),
        }


@dataclass(frozen=True)
class DeviceCredentials:
    """What ``add`` issued. ``mqtt_password`` exists only here and in the bundle's MQTT snippet."""

    device: DeviceInfo
    bundle_dir: Path
    ca_file: Path
    cert_file: Path
    key_file: Path
    grpc_config: Path
    mqtt_config: Path
    mqtt_username: str
    mqtt_password: str = field(repr=False)
    broker_reloaded: bool = False


@dataclass(frozen=True)
class Revocation:
    device: DeviceInfo
    broker_reloaded: bool


@dataclass(frozen=True)
class ServerCredentials:
    """PEM files for the server's TLS listeners (gRPC, and Mosquitto if it uses them)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class MosquittoFiles:
    password_file: Path
    acl_file: Path
    limits: BrokerLimits | None = None

    def conf_lines(self) -> str:
        """The lines a mosquitto.conf needs to use these files, and the per-client limits."""
        lines = f"allow_anonymous false\npassword_file {self.password_file}\nacl_file {self.acl_file}\n"
        return lines + (self.limits.conf_lines() if self.limits is not None else "")


# -- Mosquitto password hashes ----------------------------------------------------------------------


def mosquitto_hash(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """Hash ``password`` the way ``mosquitto_passwd`` 2.0 does: ``$7$<iterations>$<salt>$<pbkdf2-sha512>``."""
    salt = secrets.token_bytes(PBKDF2_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_mosquitto_hash(encoded: str, password: str) -> bool:
    """True if ``password`` matches a Mosquitto ``$7$`` (PBKDF2-SHA512) or ``$6$`` (salted SHA-512) hash."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(expected))
        elif len(parts) == 4 and parts[1] == "6":
            salt, expected = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            got = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


# -- files ----------------------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _parse_time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


# -- certificates ---------------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    days: int,
    *,
    client: bool,
    sans: Sequence[str] = (),
) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if sans:
        names: list[x509.GeneralName] = []
        for name in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                names.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _server_cert_matches(cert: x509.Certificate, names: Sequence[str]) -> bool:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    want = set()
    for n in names:
        try:
            want.add(str(ipaddress.ip_address(n)))
        except ValueError:
            want.add(n)
    renew_at = cert.not_valid_after_utc - dt.timedelta(days=SERVER_CERT_RENEW_DAYS)
    return have == want and dt.datetime.now(dt.UTC) < renew_at


# -- the registry ---------------------------------------------------------------------------------


class DeviceRegistry:
    """Devices, their certificates and MQTT credentials; implements ``server.ingest.base.DeviceDirectory``.

    Safe to share between threads; several processes (the CLI and the server) may use the same
    ``root`` at once: changes are serialized by an ``fcntl`` lock on ``root/devices.lock`` and
    every reader picks up the latest ``devices.json`` (checked on each call by ``stat``).
    """

    def __init__(self, config: DevicesConfig | None = None) -> None:
        self.config = config or DevicesConfig()
        self.root = self.config.root
        self.state_path = self.root / "devices.json"
        self.lock_path = self.root / "devices.lock"
        self.ca_file = self.root / "ca.pem"
        self.ca_key_file = self.root / "ca.key"
        self.bundles_dir = self.root / "bundles"
        self.service_dir = self.root / "service"
        self.password_file = self.config.password_file or self.root / "mosquitto" / "passwd"
        self.acl_file = self.config.acl_file or self.root / "mosquitto" / "acl"
        self._mutex = threading.RLock()
        self._state: dict[str, Any] = self._empty_state()
        self._state_sig: tuple[int, int, int] | None = None
        self._service_names = {u.name for u in self.config.service_users}

    # -- state --------------------------------------------------------------------------------

    @staticmethod
    def _empty_state() -> dict[str, Any]:
        return {"version": STATE_VERSION, "devices": {}, "revoked_serials": {}, "service_hashes": {}}

    def _ensure_root(self) -> None:
        # The root stays traversable (0755) so a broker running as another user reaches the
        # Mosquitto files; secrets sit in 0600 files and 0700 folders below it.
        self.root.mkdir(parents=True, exist_ok=True)

    def _refresh(self) -> dict[str, Any]:
        """The current state, re-read if devices.json changed since the last read."""
        with self._mutex:
            try:
                st = os.stat(self.state_path)
            except FileNotFoundError:
                self._state, self._state_sig = self._empty_state(), None
                return self._state
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            if sig != self._state_sig:
                try:
                    data = json.loads(self.state_path.read_text())
                except (OSError, ValueError) as err:
                    raise RegistryStateError(f"cannot read {self.state_path}: {err}") from err
                if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                    raise RegistryStateError(f"{self.state_path} is not a version {STATE_VERSION} device registry")
                for key, value in self._empty_state().items():
                    data.setdefault(key, value)
                self._state, self._state_sig = data, sig
            return self._state

    def _save(self, state: dict[str, Any]) -> None:
        write_atomic(self.state_path, json.dumps(state, indent=2, sort_keys=True) + "\n", mode=0o600)
        self._state_sig = None  # force a re-read (and a fresh signature) next time

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Exclusive access across threads and processes; yields a fresh copy of the state."""
        with self._mutex:
            self._ensure_root()
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._state_sig = None
                yield json.loads(json.dumps(self._refresh()))  # a deep copy: a failed change leaves no trace
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    # -- certificate authority ----------------------------------------------------------------

    def _load_or_create_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """Must be called under ``_locked()``."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        if self.ca_file.exists() or self.ca_key_file.exists():
            try:
                cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
                key = serialization.load_pem_private_key(self.ca_key_file.read_bytes(), password=None)
            except (OSError, ValueError) as err:
                raise RegistryStateError(
                    f"cannot load the device CA ({self.ca_file}, {self.ca_key_file}): {err}"
                ) from err
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
                raise RegistryStateError(f"{self.ca_key_file} is not the key of {self.ca_file}")
            return cert, key

        key = _new_key()
        # A random suffix tells the CAs of different installations apart in error messages.
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeloop"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"edgeloop device CA {secrets.token_hex(4)}"),
            ]
        )
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first: a CA certificate without its key would block every later issue.
        write_atomic(self.ca_key_file, _key_pem(key), mode=0o600)
        write_atomic(self.ca_file, _cert_pem(cert), mode=0o644)
        logger.info("created the device CA %s", self.ca_file)
        return cert, key

    def ca(self) -> Path:
        """Path of the CA certificate (PEM), creating the CA on first use."""
        with self._locked():
            self._load_or_create_ca()
        return self.ca_file

    def server_credentials(self) -> ServerCredentials:
        """The server's certificate and key, signed by the CA for ``server_names``.

        Issued once and reused; issued anew only when ``server_names`` changed or the
        certificate is within ``SERVER_CERT_RENEW_DAYS`` of its expiry.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        server_dir = self.root / "server"
        cert_file, key_file = server_dir / "server.pem", server_dir / "server.key"
        names = self.config.server_names
        with self._locked():
            ca_cert, ca_key = self._load_or_create_ca()
            if cert_file.exists() and key_file.exists():
                try:
                    current = x509.load_pem_x509_certificate(cert_file.read_bytes())
                    # A crash between writing the key and the certificate leaves a pair that does not match.
                    paired = serialization.load_pem_private_key(key_file.read_bytes(), None).public_key()
                    usable = paired == current.public_key() and _server_cert_matches(current, names)
                except ValueError:
                    usable = False
                if usable:
                    return ServerCredentials(self.ca_file, cert_file, key_file)
                logger.info("issuing a new server certificate for %s", names)
            server_dir.mkdir(mode=0o700, exist_ok=True)
            key = _new_key()
            cert = _issue(ca_cert, ca_key, key, names[0], self.config.cert_days, client=False, sans=names)
            write_atomic(key_file, _key_pem(key), mode=0o600)
            write_atomic(cert_file, _cert_pem(cert), mode=0o644)
        return ServerCredentials(self.ca_file, cert_file, key_file)

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        """gRPC mutual-TLS server credentials: the server certificate, and client certificates of this CA only."""
        import grpc

        creds = self.server_credentials()
        return grpc.ssl_server_credentials(
            [(creds.key_file.read_bytes(), creds.cert_file.read_bytes())],
            root_certificates=creds.ca_file.read_bytes(),
            require_client_auth=True,
        )

    # -- devices ------------------------------------------------------------------------------

    def add(self, device_id: str, group: str | None = None) -> DeviceCredentials:
        """Register ``device_id`` and issue its certificate, MQTT password and bundle.

        A revoked id may be added again: it gets a new certificate and password; the old
        certificate stays revoked.

        Raises:
            InvalidDeviceId: the id (or the group) is not a valid id.
            DeviceExists: an active device has this id, or it is a service user's name.
        """
        check_device_id(device_id)
        if group is not None:
            check_device_id(group, "group")
        if device_id in self._service_names:
            raise DeviceExists(f"{device_id!r} is the name of a service user; choose another device id")
        password = secrets.token_urlsafe(MQTT_PASSWORD_BYTES)
        with self._locked() as state:
            existing = state["devices"].get(device_id)
            if existing is not None and existing.get("revoked") is None:
                raise DeviceExists(
                    f"device {device_id!r} already exists (added {existing['created']}); "
                    f"revoke it first to issue new credentials"
                )
            ca_cert, ca_key = self._load_or_create_ca()
            key = _new_key()
            cert = _issue(ca_cert, ca_key, key, device_id, self.config.cert_days, client=True)
            now = _utcnow()
            state["devices"][device_id] = {
                "group": group,
                "created": now.isoformat(),
                "revoked": None,
                "cert_serial": f"{cert.serial_number:x}",
                "cert_not_after": cert.not_valid_after_utc.isoformat(),
                "password_hash": mosquitto_hash(password),
            }
            bundle = self._write_bundle(device_id, ca_cert, cert, key, password)
            # State before broker files: if writing them fails, a retry of write_mosquitto_files()
            # (or the next change) regenerates them from a state that already has the device.
            self._save(state)
            self._write_mosquitto_files(state)
        logger.info("added device %s (certificate serial %x)", device_id, cert.serial_number)
        reloaded = self.reload_broker()
        return DeviceCredentials(
            device=self._info(device_id, state["devices"][device_id]),
            bundle_dir=bundle,
            ca_file=bundle / "ca.pem",
            cert_file=bundle / "device.pem",
            key_file=bundle / "device.key",
            grpc_config=bundle / "transport-grpc.yaml",
            mqtt_config=bundle / "transport-mqtt.yaml",
            mqtt_username=device_id,
            mqtt_password=password,
            broker_reloaded=reloaded,
        )

    def revoke(self, device_id: str) -> Revocation:
        """Take back a device's credentials: refused by the receiver at once, by the broker after its reload.

        The device's bundle (with its now useless key and password) is deleted.

        Raises:
            UnknownDevice: no device has this id.
            AlreadyRevoked: it was revoked before.
        """
        with self._locked() as state:
            record = state["devices"].get(device_id)
            if record is None:
                raise UnknownDevice(f"no device {device_id!r}; `devices list` shows the registered ones")
            if record.get("revoked"):
                raise AlreadyRevoked(f"device {device_id!r} was already revoked at {record['revoked']}")
            now = _utcnow().isoformat()
            record["revoked"] = now
            record["password_hash"] = None
            state["revoked_serials"][record["cert_serial"]] = now
            self._save(state)
            self._write_mosquitto_files(state)
            shutil.rmtree(self.bundles_dir / device_id, ignore_errors=True)
        logger.info("revoked device %s (certificate serial %s)", device_id, record["cert_serial"])
        return Revocation(device=self._info(device_id, record), broker_reloaded=self.reload_broker())

    def list(self) -> list[DeviceInfo]:
        """Every device ever added (revoked ones too), sorted by id."""
        state = self._refresh()
        return [self._info(k, v) for k, v in sorted(state["devices"].items())]

    def get(self, device_id: str) -> DeviceInfo:
        record = self._refresh()["devices"].get(device_id)
        if record is None:
            raise UnknownDevice(f"no device {device_id!r}")
        return self._info(device_id, record)

    def is_active(self, device_id: str) -> bool:
        """True for a registered, unrevoked device (or any never-revoked id when ``require_registered`` is off)."""
        record = self._refresh()["devices"].get(device_id)
        if record is None:
            return not self.config.require_registered
        return record.get("revoked") is None

    def is_certificate_revoked(self, serial: int) -> bool:
        """True if a certificate with this serial number was revoked."""
        return f"{serial:x}" in self._refresh()["revoked_serials"]

    def verify_peer(self, auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
        """The device id of a gRPC mutual-TLS peer, or None if it may not send.

        ``auth_context`` is ``grpc.ServicerContext.auth_context()``. The peer is accepted only if
        its certificate is the current certificate of an active device: the common name names the
        device and the serial must be the one issued last (so a certificate from before a
        revoke-and-add is refused too).
        """
        from cryptography import x509

        pems = auth_context.get("x509_pem_cert") or []
        if not pems:
            return None
        try:
            cert = x509.load_pem_x509_certificate(pems[0])
        except ValueError:
            return None
        names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        if len(names) != 1:
            return None
        device_id = str(names[0].value)
        record = self._refresh()["devices"].get(device_id)
        if record is None or record.get("revoked") is not None:
            return None
        if record["cert_serial"] != f"{cert.serial_number:x}" or self.is_certificate_revoked(cert.serial_number):
            return None
        return device_id

    @staticmethod
    def _info(device_id: str, record: Mapping[str, Any]) -> DeviceInfo:
        return DeviceInfo(
            device_id=device_id,
            group=record.get("group"),
            created=_parse_time(record["created"]),  # type: ignore[arg-type]
            revoked=_parse_time(record.get("revoked")),
            cert_serial=int(record["cert_serial"], 16),
            cert_expires=_parse_time(record["cert_not_after"]),  # type: ignore[arg-type]
        )

    # -- bundles ------------------------------------------------------------------------------

    def _write_bundle(
        self,
        device_id: str,
        ca_cert: x509.Certificate,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        password: str,
    ) -> Path:
        self.bundles_dir.mkdir(mode=0o700, exist_ok=True)
        bundle = self.bundles_dir / device_id
        if bundle.exists():  # left from a revoked device of the same id
            shutil.rmtree(bundle)
        bundle.mkdir(mode=0o700)
        write_atomic(bundle / "ca.pem", _cert_pem(ca_cert), mode=0o644)
        write_atomic(bundle / "device.pem", _cert_pem(cert), mode=0o644)
        write_atomic(bundle / "device.key", _key_pem(key), mode=0o600)

        tls = {"ca_file": "ca.pem", "cert_file": "device.pem", "key_file": "device.key"}
        grpc_host = self.config.grpc_target.rpartition(":")[0] or self.config.grpc_target
        grpc_tls = dict(tls)
        if grpc_host.strip("[]") not in self.config.server_names and "/" not in grpc_host:
            grpc_tls["server_name"] = self.config.server_names[0]
        header = (
            f"# edgeloop agent settings for device {device_id}, issued {_utcnow().isoformat()}.\n"
            "# Merge into the agent's YAML. TLS paths are relative to the folder of that YAML file:\n"
            "# keep ca.pem, device.pem and device.key beside it (or make the paths absolute).\n"
        )
        grpc_doc = {"device_id": device_id, "transport": {"type": "grpc", "target": self.config.grpc_target}}
        grpc_doc["transport"]["tls"] = grpc_tls
        write_atomic(bundle / "transport-grpc.yaml", header + yaml.safe_dump(grpc_doc, sort_keys=False), mode=0o600)

        mqtt_transport: dict[str, Any] = {
            "type": "mqtt",
            "host": self.config.mqtt_host,
            "port": self.config.mqtt_port,
            "username": device_id,
            "password": password,
            "topic_prefix": self.config.topic_prefix,
        }
        if self.config.mqtt_tls:
            mqtt_tls = dict(tls)
            if self.config.mqtt_host not in self.config.server_names:
                mqtt_tls["server_name"] = self.config.server_names[0]
            mqtt_transport["tls"] = mqtt_tls
        mqtt_doc = {"device_id": device_id, "transport": mqtt_transport}
        write_atomic(
            bundle / "transport-mqtt.yaml",
            header
            + "# It holds the MQTT password in plain text: delete this bundle once it is on the device.\n"
            + yaml.safe_dump(mqtt_doc, sort_keys=False),
            mode=0o600,
        )
        return bundle

    # -- Mosquitto ----------------------------------------------------------------------------

    def service_password(self, name: str) -> str:
        """The MQTT password of service user ``name``, generated (into ``service/<name>.password``) on first use."""
        if name not in self._service_names:
            raise UnknownDevice(f"no service user {name!r} (configured: {sorted(self._service_names)})")
        path = self.service_dir / f"{name}.password"
        with self._mutex:
            if not path.exists():
                self._ensure_root()
                self.service_dir.mkdir(mode=0o700, exist_ok=True)
                # Written aside and linked into place: the password file appears complete or not at
                # all, and if another process linked its own first, that one wins.
                tmp = self.service_dir / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
                write_atomic(tmp, secrets.token_urlsafe(MQTT_PASSWORD_BYTES) + "\n", mode=0o600)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass
                finally:
                    tmp.unlink()
            password = path.read_text().strip()
        if not password:
            raise RegistryStateError(f"{path} is empty: delete it to generate a new password for {name!r}")
        return password

    def acl_text(self, state: Mapping[str, Any] | None = None) -> str:
        """The Mosquitto ACL for the current (or given) state; see the module docstring."""
        state = self._refresh() if state is None else state
        p = self.config.topic_prefix.rstrip("/")
        lines = [
            "# Generated by edgeloop (server/devices.py) from devices.json: edits here are overwritten.",
            "# Mosquitto denies every topic no line allows.",
            "",
        ]
        for user in sorted(self.config.service_users, key=lambda u: u.name):
            lines.append(f"# service user ({user.role})")
            lines.append(f"user {user.name}")
            if user.role == "bridge":
                lines += [
                    f"topic read {topics.all_frames(p)}",
                    f"topic read {topics.all_status(p)}",
                    f"topic write {topics.acks(p, '+')}",
                    f"topic write {p}/releases/#",
                ]
            elif user.role == "announcer":
                lines.append(f"topic readwrite {p}/releases/#")
            else:
                lines.append(f"topic readwrite {p}/#")
            lines.append("")
        for device_id, record in sorted(state["devices"].items()):
            if record.get("revoked") is not None:
                continue
            lines += [
                f"user {device_id}",
                f"topic write {topics.frames(p, device_id)}",
                f"topic write {topics.status(p, device_id)}",
                f"topic read {topics.acks(p, device_id)}",
                f"topic read {topics.device_release(p, device_id)}",
                f"topic read {topics.channel_release(p, '+')}",
            ]
            if record.get("group"):
                lines.append(f"topic read {topics.group_release(p, record['group'], '+')}")
            lines.append("")
        return "\n".join(lines)

    def _password_text(self, state: dict[str, Any]) -> str:
        lines = []
        hashes = state["service_hashes"]
        for user in sorted(self.config.service_users, key=lambda u: u.name):
            password = self.service_password(user.name)
            # Keep a hash that still matches so the file only changes when something did.
            if not (user.name in hashes and verify_mosquitto_hash(hashes[user.name], password)):
                hashes[user.name] = mosquitto_hash(password)
            lines.append(f"{user.name}:{hashes[user.name]}")
        for device_id, record in sorted(state["devices"].items()):
            if record.get("revoked") is None and record.get("password_hash"):
                lines.append(f"{device_id}:{record['password_hash']}")
        return "\n".join(lines) + "\n"

    def _write_mosquitto_files(self, state: dict[str, Any]) -> MosquittoFiles:
        """Must be called under ``_locked()``; may add service hashes to ``state`` (and saves it then)."""
        gid = None
        if self.config.mosquitto_group is not None:
            try:
                gid = grp.getgrnam(self.config.mosquitto_group).gr_gid
            except KeyError as err:
                raise DeviceError(f"mosquitto_group {self.config.mosquitto_group!r} does not exist") from err
        mode = 0o640 if gid is not None else 0o644
        before = json.dumps(state["service_hashes"], sort_keys=True)
        password_text = self._password_text(state)
        if json.dumps(state["service_hashes"], sort_keys=True) != before:
            self._save(state)
        for path in (self.password_file, self.acl_file):
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_atomic(self.password_file, password_text, mode=mode, gid=gid)
            write_atomic(self.acl_file, self.acl_text(state), mode=mode, gid=gid)
        except PermissionError as err:
            raise DeviceError(f"cannot write the Mosquitto files ({err}); is mosquitto_group one of yours?") from err
        return MosquittoFiles(self.password_file, self.acl_file, self.config.broker_limits)

    def write_mosquitto_files(self) -> MosquittoFiles:
        """Regenerate the broker's password_file and acl_file from the registry (atomically)."""
        with self._locked() as state:
            return self._write_mosquitto_files(state)

    def reload_broker(self) -> bool:
        """Send SIGHUP to the broker in ``mosquitto_pid_file`` so it re-reads passwords and ACL.

        Returns False (with a warning) when no pid file is configured or the broker is not
        running; the files are written either way and a starting broker reads them.
        """
        pid_file = self.config.mosquitto_pid_file
        if pid_file is None:
            return False
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as err:
            reason = "not running" if getattr(err, "errno", None) == errno.ESRCH else str(err)
            logger.warning("could not make the broker reload its files (pid file %s): %s", pid_file, reason)
            return False
        logger.info("sent SIGHUP to mosquitto (pid %d)", pid)
        return True
