"""Announces the registry's releases to the fleet as retained MQTT messages.

One retained, serialized ``ModelRelease`` (QoS 1) per topic, so a device that connects at any time
gets the current release at once:

- ``{prefix}/releases/channels/{channel}``: each channel's own current release;
- ``{prefix}/releases/groups/{group}/{channel}``: a release promoted for one device group;
- ``{prefix}/releases/devices/{device_id}``: a pinned device's release (empty ``channel``).

A device follows the most specific one it has: device > group > channel, as
``ModelRegistry.resolve`` does for a gRPC look-up. An unpin clears the device's retained message
with an empty retained payload (MQTT's way to delete one); the registry remembers unpinned devices,
so the clear is repeated after a server restart in case the broker missed it.

:meth:`ReleaseAnnouncer.announce_all` publishes what changed since its last call (everything on the
first call, or with ``force=True``); :meth:`ReleaseAnnouncer.follow` does that whenever registry.json
changes, so a change made with ``edgeloop models ...`` reaches devices without a server restart.
After a reconnect the last announced state is published again, in case the broker lost its retained
messages (no persistence) while it was away.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Literal

import paho.mqtt.client as mqtt
from pydantic import Field, SecretStr

from edge_agent.transports.base import TLSConfig
from edgeloop import topics
from edgeloop.config_base import StrictModel
from edgeloop.mqtt_client import new_client
from edgeloop.pubacks import PubackWaiter
from edgeloop.tls import TLSError, client_ssl_context
from server.registry.store import ModelRegistry

logger = logging.getLogger(__name__)

#: Longest pause between attempts of follow() while announcing fails (broker down, registry.json corrupt).
MAX_RETRY_DELAY_S = 30.0


class AnnounceError(Exception):
    """The broker could not be reached, or it did not take (or refused) a release announcement."""


class ReleaseAnnouncerConfig(StrictModel):
    """The broker the registry announces releases on; field names as in the agent's MQTT transport."""

    host: str = Field(default="127.0.0.1", description="The broker's host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="The broker's port (8883 is usual with TLS).")
    username: str | None = Field(default=None, description="User name for the broker, if it requires one.")
    password: SecretStr | None = Field(default=None, description="Password for the broker (never logged).")
    tls: TLSConfig | None = Field(
        default=None,
        description="TLS settings (ca_file, and cert_file + key_file for mutual TLS); without them plaintext.",
    )
    client_id: str = Field(default="edgeloop-registry", min_length=1, description="MQTT client id of the announcer.")
    protocol: Literal["mqttv5", "mqttv311"] = Field(
        default="mqttv5", description="MQTT protocol version; only v5 reports a refused publish (not authorized)."
    )
    keepalive_s: int = Field(default=60, ge=5, description="MQTT keepalive: how fast a dead connection is noticed.")
    connect_timeout_s: float = Field(default=10.0, gt=0, description="How long to wait for the broker connection.")
    publish_timeout_s: float = Field(default=30.0, gt=0, description="How long to wait for the broker's PUBACKs.")
    topic_prefix: str = Field(default=topics.DEFAULT_PREFIX, min_length=1, description="Prefix of every topic.")
    poll_s: float = Field(default=1.0, gt=0, description="How often follow() checks registry.json for changes.")


def release_messages(registry: ModelRegistry, prefix: str) -> dict[str, bytes]:
    """Every retained message the registry's state calls for: ``topic -> serialized ModelRelease``."""
    out: dict[str, bytes] = {}
    for channel, release in registry.channel_releases().items():
        out[topics.channel_release(prefix, channel)] = release.SerializeToString(deterministic=True)
    for (group, channel), release in registry.group_releases().items():
        out[topics.group_release(prefix, group, channel)] = release.SerializeToString(deterministic=True)
    for device_id, release in registry.pinned_releases().items():
        out[topics.device_release(prefix, device_id)] = release.SerializeToString(deterministic=True)
    return out


class ReleaseAnnouncer:
    """Keeps the broker's retained release messages equal to the registry's state (see the module docstring).

    Usage::

        with ReleaseAnnouncer(config) as announcer:
            announcer.announce_all(registry)        # once, e.g. on server start
            announcer.follow(registry)              # and after every change, in a thread
    """

    def __init__(self, config: ReleaseAnnouncerConfig) -> None:
        self.config = config
        self.prefix = config.topic_prefix.rstrip("/")
        self._v5 = config.protocol == "mqttv5"
        self._cond = threading.Condition()  # guards the connection flags, signalled by paho's thread
        self._connected = False
        self._refused = ""
        self._ever_connected = False
        self._started = False
        self._pubacks = PubackWaiter()
        self._announce_lock = threading.Lock()  # one announce_all at a time: _published stays consistent
        self._published: dict[str, bytes] = {}  # topic -> payload the broker holds (b"" = cleared); under _cond
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None

        try:
            ssl_context = client_ssl_context(config.tls) if config.tls is not None else None
        except TLSError as err:
            raise AnnounceError(str(err)) from err
        client = new_client(
            config.client_id,
            mqttv5=self._v5,
            clean_session=True,
            username=config.username,
            password=config.password,
            ssl_context=ssl_context,
        )
        client.connect_timeout = config.connect_timeout_s
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._pubacks.on_publish
        self._client = client

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> ReleaseAnnouncer:
        """Connect to the broker (once); paho's thread reconnects on its own afterwards.

        Raises:
            AnnounceError: the broker is unreachable or refused the connection.
        """
        if not self._started:
            cfg = self.config
            try:
                self._client.connect(cfg.host, cfg.port, cfg.keepalive_s)
            except (OSError, ValueError) as err:
                raise AnnounceError(f"cannot connect to MQTT broker {cfg.host}:{cfg.port}: {err}") from err
            self._client.loop_start()
            self._started = True
        self._wait_connected()
        return self

    def close(self) -> None:
        """Stop following and disconnect; the retained messages stay on the broker."""
        self._stop.set()
        if self._follower is not None:
            self._follower.join(timeout=self.config.publish_timeout_s + self.config.poll_s + 5)
            self._follower = None
        if self._started:
            self._started = False
            self._client.disconnect()
            self._client.loop_stop()

    def __enter__(self) -> ReleaseAnnouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- announcing --------------------------------------------------------------------------------

    def announce_all(self, registry: ModelRegistry, *, force: bool = False) -> list[str]:
        """Publish every release the registry calls for and clear retained messages it no longer does.

        Only topics whose payload differs from what this announcer last published are sent, unless
        ``force``. Returns the topics published (cleared ones included).

        Raises:
            AnnounceError: not connected in time, or the broker did not take or refused a message.
        """
        with self._announce_lock:
            desired = release_messages(registry, self.prefix)
            with self._cond:
                published = dict(self._published)
            clears = {topics.device_release(self.prefix, device) for device in registry.unpinned_devices()}
            clears |= {topic for topic, payload in published.items() if payload}
            wanted = dict(desired)
            wanted.update({topic: b"" for topic in clears if topic not in desired})
            todo = {t: p for t, p in wanted.items() if force or published.get(t) != p}
            if not todo:
                return []
            self.start()
            infos = []
            for topic, payload in todo.items():
                info = self._client.publish(topic, payload, qos=1, retain=True)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise AnnounceError(f"MQTT publish to {topic} failed: {mqtt.error_string(info.rc)}")
                infos.append((topic, info))
            self._wait_pubacks(infos)
            with self._cond:
                self._published.update(todo)
            logger.info("announced %d release message(s): %s", len(todo), ", ".join(sorted(todo)))
            return sorted(todo)

    def follow(self, registry: ModelRegistry, poll_s: float | None = None) -> None:
        """Announce now and then whenever registry.json changes, in a daemon thread, until :meth:`close`."""
        if self._follower is not None:
            return
        interval = self.config.poll_s if poll_s is None else poll_s

        def loop() -> None:
            announced: object = object()  # never equal to a revision: the first pass always announces
            delay = interval
            while not self._stop.is_set():
                try:
                    revision = registry.revision()
                    if revision != announced:
                        self.announce_all(registry)
                        announced = revision
                    delay = interval
                except Exception:  # the loop's edge: log, retry later (backing off during an outage)
                    logger.exception("announcing releases failed; retrying in %g s", delay)
                    delay = min(delay * 2, MAX_RETRY_DELAY_S)
                self._stop.wait(delay)

        self._follower = threading.Thread(target=loop, name="release-announcer", daemon=True)
        self._follower.start()

    # -- connection (paho's thread) ----------------------------------------------------------------

    def _wait_connected(self) -> None:
        cfg = self.config
        deadline = time.monotonic() + cfg.connect_timeout_s
        with self._cond:
            while not self._connected:
                if self._refused:
                    raise AnnounceError(f"MQTT broker {cfg.host}:{cfg.port} refused the connection: {self._refused}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AnnounceError(
                        f"not connected to MQTT broker {cfg.host}:{cfg.port} within {cfg.connect_timeout_s:g} s"
                    )
                self._cond.wait(remaining)

    def _wait_pubacks(self, infos: list[tuple[str, mqtt.MQTTMessageInfo]]) -> None:
        self._pubacks.wait_or_raise(infos, self.config, AnnounceError, lambda t: f"the release announcement on {t}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            with self._cond:
                self._refused = str(reason_code)
                self._cond.notify_all()
            logger.warning("MQTT %s:%s refused the announcer: %s", self.config.host, self.config.port, reason_code)
            return
        with self._cond:
            reconnect = self._ever_connected
            self._connected, self._ever_connected, self._refused = True, True, ""
            self._cond.notify_all()
        if reconnect:
            # The broker may have lost its retained messages while we were away (no persistence):
            # publish the last announced state again. PUBACKs are not awaited on paho's thread.
            with self._cond:
                snapshot = dict(self._published)
            for topic, payload in snapshot.items():
                client.publish(topic, payload, qos=1, retain=True)
            logger.info("MQTT reconnected; re-announced %d release message(s)", len(snapshot))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            was = self._connected
            self._connected = False
            self._cond.notify_all()
        if was and self._started:
            logger.warning("MQTT connection of the announcer lost: %s", reason_code)
