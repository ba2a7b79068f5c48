"""TLS settings for edgeloop's clients, in one place for the agent's transports, the updater, the
server's MQTT bridge and its release announcer."""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import Field

from edgeloop.config_base import StrictModel


class TLSError(Exception):
    """TLS files are missing, unreadable or do not go together; the message names them."""


class TLSConfig(StrictModel):
    """TLS for a client connection. With only ``ca_file`` the server is verified; add ``cert_file``
    and ``key_file`` for mutual TLS (the server then knows the device by its certificate)."""

    ca_file: Path = Field(description="PEM bundle of the CA(s) that signed the server's certificate.")
    cert_file: Path | None = Field(default=None, description="This device's client certificate (PEM).")
    key_file: Path | None = Field(default=None, description="The private key of cert_file (PEM).")
    server_name: str | None = Field(
        default=None, description="Expected name in the server certificate when it differs from the host."
    )


class _ServerNameContext(ssl.SSLContext):
    """Verifies the peer's certificate against ``server_name`` instead of the host dialled.

    paho passes the host it connects to as ``server_hostname``; this override is the one place to
    verify against another name (what gRPC calls ``ssl_target_name_override``).
    """

    server_name: str

    def wrap_socket(self, sock, *args, server_hostname=None, **kwargs):  # type: ignore[override]
        return super().wrap_socket(sock, *args, server_hostname=self.server_name, **kwargs)


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """An ``SSLContext`` that verifies the server (chain and name) and, with a client certificate,
    presents it.

    Raises:
        TLSError: cert_file without key_file (or the reverse), or files that cannot be loaded.
    """
    if (tls.cert_file is None) != (tls.key_file is None):
        raise TLSError("TLS: cert_file and key_file go together (mutual TLS needs both)")
    if tls.server_name:
        ctx: ssl.SSLContext = _ServerNameContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.server_name = tls.server_name  # type: ignore[attr-defined]
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    try:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
        if tls.cert_file is not None:
            ctx.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    except (OSError, ssl.SSLError) as err:
        raise TLSError(f"cannot load TLS files ({tls.ca_file}, {tls.cert_file}): {err}") from err
    return ctx
