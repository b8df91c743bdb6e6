"""The one transport interface (publish, subscribe, close), over MQTT or in memory.

``MqttTransport`` wraps paho-mqtt 2.x:

- subscriptions are remembered and re-issued in ``on_connect``, so they survive reconnects, and
  a broker that was restarted without persistence gets them back;
- every handler call is wrapped: a handler that raises is logged with the topic, and the network
  loop and the other handlers go on;
- reconnects use capped exponential backoff with random jitter (paho's own has none), so a fleet
  that lost its broker does not come back in lockstep;
- ``connect()`` blocks until the broker's CONNACK and raises :class:`TransportError` naming the
  broker and the reason (unreachable, bad credentials, not authorized, no answer).

Handlers run on paho's network thread: they must be quick, or hand the message to a queue. While
a handler runs, no other message is read, no acknowledgement is sent and keep-alives wait.

``InMemoryBroker`` and ``InMemoryTransport`` implement the same interface synchronously, for unit
tests.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import unquote, urlsplit

from edge_runtime.errors import ConfigError, TransportError

log = logging.getLogger("fedpeft.transport")

Handler = Callable[[str, bytes], None]
"""Called with (topic, payload) for every message that matches a subscription."""

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

PERSISTENT_SESSION_EXPIRY_S = 7 * 24 * 3600
"""MQTT 5 only: how long the broker keeps a persistent session of a device that went away."""

# Advice for refusals an operator can fix (MQTT 5 reason codes; paho maps 3.1.1 CONNACK codes onto them).
_REFUSAL_HINTS = {
    133: "the broker rejected the client id",
    134: "check the user name and password in the broker URL",
    135: "the broker's authentication or ACL refused this client",
}


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed ``mqtt://`` or ``mqtts://`` URL; ``str()`` hides the password."""

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        """True for ``mqtts://``."""
        return self.scheme == "mqtts"

    def __str__(self) -> str:
        auth = f"{self.username}:***@" if self.username and self.password else ""
        auth = auth or (f"{self.username}@" if self.username else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{auth}{host}:{self.port}"

    def __repr__(self) -> str:
        # the dataclass repr would print the password into logs and tracebacks
        return f"BrokerUrl({str(self)!r})"


def parse_broker_url(text: str) -> BrokerUrl:
    """Parse ``mqtt://[user:password@]host[:port]`` or ``mqtts://...`` (ports 1883/8883 by default)."""
    expected = "expected mqtt://[user:password@]host:port or mqtts://[user:password@]host:port"
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"bad broker URL {text!r}: {expected}")
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad broker URL {_redact(text)!r}: {exc}; {expected}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ConfigError(f"bad broker URL {_redact(text)!r}: unknown scheme {parts.scheme!r}; {expected}")
    if not parts.hostname:
        raise ConfigError(f"bad broker URL {_redact(text)!r}: no host; {expected}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"bad broker URL {_redact(text)!r}: unexpected path or query; {expected}")
    if port == 0:
        raise ConfigError(f"bad broker URL {_redact(text)!r}: port 0; {expected}")
    return BrokerUrl(
        scheme=parts.scheme,
        host=parts.hostname,
        port=port or DEFAULT_PORTS[parts.scheme],
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def _redact(text: str) -> str:
    # error messages end up in logs and CI output: never echo a password
    head, sep, tail = text.rpartition("@")
    if not sep or "://" not in head:
        return text
    scheme, _, auth = head.partition("://")
    user = auth.split(":", 1)[0]
    return f"{scheme}://{user}:***@{tail}" if ":" in auth else text


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching: ``+`` matches one level, a final ``#`` this level and all below."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # MQTT 4.7.2: wildcards at the first level do not match $SYS-style topics
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return i == len(f_parts) - 1  # "#" is only valid last; "a/#" also matches "a"
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


class Transport(Protocol):
    """Publish, subscribe, close; counters of payload bytes (headers excluded)."""

    @property
    def bytes_published(self) -> int:
        """Payload bytes published so far."""
        ...

    @property
    def bytes_received(self) -> int:
        """Payload bytes received so far."""
        ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish one message."""
        ...

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        """Deliver messages matching ``topic_filter`` to ``handler``."""
        ...

    def close(self) -> None:
        """Disconnect and release resources."""
        ...


class _Dispatch:
    """Subscriptions, handler calls that cannot kill the caller, and thread-safe byte counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: list[tuple[str, Handler, int]] = []
        self.bytes_published = 0
        self.bytes_received = 0

    def add(self, topic_filter: str, handler: Handler, qos: int) -> None:
        with self._lock:
            self._subs.append((topic_filter, handler, qos))

    def filters(self) -> list[tuple[str, int]]:
        """Distinct (filter, highest qos) pairs, in subscription order."""
        with self._lock:
            out: dict[str, int] = {}
            for f, _, q in self._subs:
                out[f] = max(q, out.get(f, 0))
            return list(out.items())

    def matches(self, topic: str) -> bool:
        with self._lock:
            return any(topic_matches(f, topic) for f, _, _ in self._subs)

    def deliver(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.bytes_received += len(payload)
            targets = [h for f, h, _ in self._subs if topic_matches(f, topic)]
        for handler in targets:
            call_handler(handler, topic, payload)

    def count_published(self, n: int) -> None:
        with self._lock:
            self.bytes_published += n


def call_handler(handler: Handler, topic: str, payload: bytes) -> None:
    """Call ``handler``; an exception is logged with the topic and goes no further."""
    try:
        handler(topic, payload)
    except Exception:  # one bad message or handler bug must not stop the network loop
        log.exception("handler %s for %s failed", getattr(handler, "__qualname__", handler), topic)


def _validate_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ConfigError(f"MQTT qos must be 0, 1 or 2, got {qos!r}")


def _validate_topic(topic: str) -> None:
    # checked here so both transports refuse the same topics, with our exception type
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise ConfigError(f"cannot publish to {topic!r}: a topic is non-empty and has no wildcards")


def _validate_filter(topic_filter: str) -> None:
    levels = topic_filter.split("/") if isinstance(topic_filter, str) and topic_filter else []
    ok = bool(levels) and "\0" not in topic_filter
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            ok = False
    if not ok:
        raise ConfigError(f"bad MQTT topic filter {topic_filter!r}: '+' is a whole level, '#' the last one")


class MqttTransport:
    """A paho-mqtt 2.x client with remembered subscriptions, safe handlers and jittered reconnects.

    ``clean_start=False`` (the default) asks for a persistent session, so QoS 1 messages sent while
    a device was away are delivered when it comes back. ``will`` is (topic, payload, retain),
    published by the broker with QoS 1 if the connection drops without a clean ``close()``.
    ``protocol`` is ``"3.1.1"`` (default) or ``"5"``. After an unexpected disconnect, attempt n
    waits ``min(max_backoff, base_backoff * 2**n) * uniform(0.5, 1.5)`` seconds.
    """

    def __init__(
        self,
        url: BrokerUrl,
        client_id: str,
        *,
        clean_start: bool = False,
        will: tuple[str, bytes, bool] | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        keepalive: int = 30,
        connect_timeout: float = 15.0,
        max_backoff: float = 30.0,
        base_backoff: float = 0.5,
        protocol: Literal["3.1.1", "5"] = "3.1.1",
    ) -> None:
        import paho.mqtt.client as mqtt

        if protocol not in ("3.1.1", "5"):
            raise ConfigError(f"MQTT protocol must be '3.1.1' or '5', got {protocol!r}")
        if (ca_file or cert_file or key_file) and not url.tls:
            raise ConfigError(f"--ca-file/--cert-file/--key-file need an mqtts:// broker URL, got {url}")
        if key_file and not cert_file:
            raise ConfigError("--key-file needs --cert-file (the client certificate)")
        if connect_timeout <= 0 or max_backoff <= 0 or base_backoff <= 0 or keepalive < 0:
            raise ConfigError("connect_timeout, max_backoff and base_backoff must be positive")
        self.url = url
        self.client_id = client_id
        self.clean_start = clean_start
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self.base_backoff = base_backoff
        self.protocol = protocol
        self._mqtt = mqtt
        self._dispatch = _Dispatch()
        self._connected = threading.Event()
        self._connack = threading.Event()  # any CONNACK, accepted or refused
        self._started = False
        self._closing = False
        self._refusal: str | None = None
        self._attempt = 0  # failed (re)connection attempts since the last CONNACK accepted
        self._ever_connected = False
        # Guards the subscription list against on_connect: a subscribe() racing a reconnect
        # is then either re-issued by on_connect or sent by subscribe() itself, never neither.
        self._sub_lock = threading.Lock()
        self._suback_mids: dict[int, str] = {}
        self._suback_waiters: dict[int, tuple[threading.Event, list[str]]] = {}
        self._unacked: list[Any] = []
        self._unacked_lock = threading.Lock()

        v5 = protocol == "5"
        if v5:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2,
                client_id=client_id,
                clean_session=clean_start,
                protocol=mqtt.MQTTv311,
            )
        client.max_queued_messages_set(0)  # unlimited: a device's outbox relies on paho queueing
        client.max_inflight_messages_set(100)
        client.connect_timeout = connect_timeout
        if url.username:
            client.username_pw_set(url.username, url.password)
        if url.tls:
            try:
                client.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"TLS setup for {url} failed: {exc}") from None
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=will[2])
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client

    # -- state and counters -------------------------------------------------------------------

    @property
    def bytes_published(self) -> int:
        """Payload bytes handed to publish() so far."""
        return self._dispatch.bytes_published

    @property
    def bytes_received(self) -> int:
        """Payload bytes received from the broker so far."""
        return self._dispatch.bytes_received

    @property
    def connected(self) -> bool:
        """True while the broker session is up."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until the session is up (after a reconnect, say); False on timeout."""
        return self._connected.wait(timeout)

    # -- connecting ---------------------------------------------------------------------------

    def connect(self) -> MqttTransport:
        """Connect and wait for the CONNACK; TransportError names the broker and the reason."""
        if self._closing:
            raise TransportError(f"{self.client_id}: transport to {self.url} is closed")
        if self._started:
            return self
        deadline = time.monotonic() + self.connect_timeout
        kwargs: dict[str, Any] = {}
        if self.protocol == "5":
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            # without a session expiry an MQTT 5 broker drops the session at disconnect
            props.SessionExpiryInterval = 0 if self.clean_start else PERSISTENT_SESSION_EXPIRY_S
            kwargs = {"clean_start": self.clean_start, "properties": props}
        try:
            self._client.connect(self.url.host, self.url.port, keepalive=self.keepalive, **kwargs)
        except OSError as exc:  # refused, unreachable, DNS, TLS handshake, socket timeout
            raise TransportError(f"cannot reach MQTT broker {self.url}: {_os_reason(exc)}") from None
        self._started = True
        self._client.loop_start()
        self._connack.wait(max(0.0, deadline - time.monotonic()))
        if self._connected.is_set():
            return self
        reason = self._refusal or f"no CONNACK within {self.connect_timeout:g} s"
        self._stop_loop()
        raise TransportError(f"MQTT broker {self.url} did not accept {self.client_id!r}: {reason}")

    def __enter__(self) -> MqttTransport:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_delay(self) -> float:
        delay = min(self.max_backoff, self.base_backoff * 2**self._attempt) * random.uniform(0.5, 1.5)
        self._attempt = min(self._attempt + 1, 30)  # 2**30 already exceeds any sane cap
        return delay

    def _schedule_retry(self) -> float:
        # paho waits its reconnect delay before every attempt of its own loop; setting min = max
        # before each wait makes it wait exactly our jittered delay (the setter resets its doubling)
        delay = self._next_delay()
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]  # floats work
        return delay

    # -- paho callbacks (network thread) ------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            hint = _REFUSAL_HINTS.get(int(reason_code.value))
            self._refusal = f"refused: {reason_code}" + (f" ({hint})" if hint else "")
            level = logging.ERROR if self._ever_connected else logging.DEBUG  # connect() raises
            log.log(level, "broker %s refused %s: %s", self.url, self.client_id, reason_code)
            self._connack.set()
            return
        self._attempt = 0
        self._refusal = None
        with self._sub_lock:
            self._suback_mids = {}
            for topic_filter, qos in self._dispatch.filters():
                _, mid = client.subscribe(topic_filter, qos=qos)
                if mid is not None:
                    self._suback_mids[mid] = topic_filter
            self._connected.set()
        if self._ever_connected:
            log.info("%s reconnected to %s", self.client_id, self.url)
        self._ever_connected = True
        self._connack.set()

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        delay = self._schedule_retry()
        log.debug("%s: reconnect to %s failed; next try in %.1f s", self.client_id, self.url, delay)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if self._closing:
            return
        delay = self._schedule_retry()
        if was:
            log.warning(
                "%s lost the broker %s (%s); reconnecting in %.1f s",
                self.client_id,
                self.url,
                reason_code,
                delay,
            )

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._dispatch.deliver(message.topic, bytes(message.payload))

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reason_codes: list[Any], properties: Any
    ) -> None:
        failures = [str(rc) for rc in reason_codes if rc.is_failure]
        with self._sub_lock:
            topic_filter = self._suback_mids.pop(mid, "?")
            waiter = self._suback_waiters.pop(mid, None)
        if failures:
            log.error("broker %s refused the subscription to %s: %s", self.url, topic_filter, failures[0])
        if waiter is not None:
            waiter[1].extend(failures)
            waiter[0].set()

    # -- the Transport interface --------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Publish; with ``wait`` block until the broker acknowledged it (QoS 1 and 2).

        While disconnected, QoS 1 and 2 messages are queued and sent after the reconnect;
        QoS 0 messages are dropped.
        """
        _validate_qos(qos)
        _validate_topic(topic)
        if self._closing:
            raise TransportError(f"{self.client_id}: cannot publish to {topic}: the transport is closed")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        self._dispatch.count_published(len(payload))
        if qos == 0:
            if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
                log.debug("%s: QoS 0 message to %s dropped: not connected", self.client_id, topic)
            return
        with self._unacked_lock:
            self._unacked = [i for i in self._unacked if not _acknowledged(i)]
            self._unacked.append(info)
        if wait and not _wait_acknowledged(info, timeout):
            state = "" if self._connected.is_set() else " (not connected; it stays queued)"
            raise TransportError(
                f"{self.client_id}: publish to {topic} on {self.url} "
                f"not acknowledged within {timeout:g} s{state}"
            )

    def subscribe(
        self, topic_filter: str, handler: Handler, *, qos: int = 1, wait: bool = False, timeout: float = 10.0
    ) -> None:
        """Subscribe now (if connected) and again after every reconnect.

        With ``wait``, block until the broker's SUBACK; TransportError if it refuses (an ACL, say)
        or does not answer within ``timeout``.
        """
        _validate_qos(qos)
        if self._closing:
            raise TransportError(
                f"{self.client_id}: cannot subscribe to {topic_filter}: the transport is closed"
            )
        done = threading.Event()
        failures: list[str] = []
        with self._sub_lock:
            self._dispatch.add(topic_filter, handler, qos)
            if not self._connected.is_set():
                if wait:
                    raise TransportError(f"{self.client_id}: not connected to {self.url}")
                return  # on_connect subscribes
            _, mid = self._client.subscribe(topic_filter, qos=qos)
            if mid is not None:  # None: the connection dropped just now; on_connect re-subscribes
                self._suback_mids[mid] = topic_filter
                if wait:
                    self._suback_waiters[mid] = (done, failures)
        if not wait:
            return
        if mid is None:
            raise TransportError(f"{self.client_id}: lost the connection to {self.url} while subscribing")
        if not done.wait(timeout):
            with self._sub_lock:
                self._suback_waiters.pop(mid, None)
            raise TransportError(
                f"{self.client_id}: no SUBACK for {topic_filter} from {self.url} within {timeout:g} s"
            )
        if failures:
            raise TransportError(
                f"broker {self.url} refused the subscription to {topic_filter}: {failures[0]}"
            )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the broker acknowledged every QoS 1 and 2 publish so far; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._unacked_lock:
            pending = list(self._unacked)
        for info in pending:
            if not _wait_acknowledged(info, max(0.0, deadline - time.monotonic())):
                return False
        with self._unacked_lock:
            self._unacked = [i for i in self._unacked if not _acknowledged(i)]
        return True

    def close(self, flush_timeout: float = 10.0) -> None:
        """Flush QoS 1 publishes, disconnect cleanly (the broker drops the will), stop the thread."""
        if self._closing:
            return
        # while disconnected there is nobody to acknowledge: do not wait, but say what is lost
        flushed = self.flush(flush_timeout if self._connected.is_set() else 0.0)
        if not flushed:
            with self._unacked_lock:
                lost = sum(1 for i in self._unacked if not _acknowledged(i))
            log.warning("%s: closing with %d unacknowledged publishes to %s", self.client_id, lost, self.url)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._closing = True
        self._client.disconnect()  # also ends paho's reconnect wait within a second
        self._client.loop_stop()
        self._connected.clear()


def _acknowledged(info: Any) -> bool:
    """True once the broker acknowledged the message behind a paho ``MQTTMessageInfo``."""
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        # paho keeps rc=NO_CONN on a message queued while offline even after it is resent and
        # acknowledged, and is_published() then raises; its flag is the only truth (paho pinned)
        return bool(getattr(info, "_published", False))


def _wait_acknowledged(info: Any, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the acknowledgement of one message."""
    deadline = time.monotonic() + timeout
    while not _acknowledged(info):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(0.005, remaining))
    return True


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running and is the port right?)"
    if isinstance(exc, TimeoutError):
        return "timed out (host unreachable or port filtered)"
    return str(exc) or type(exc).__name__


class InMemoryBroker:
    """A broker in memory for unit tests: synchronous delivery, retained messages, wildcards."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.clients: list[InMemoryTransport] = []
        self.retained: dict[str, bytes] = {}

    def route(self, topic: str, payload: bytes, retain: bool) -> None:
        """Deliver to every matching subscriber, and keep it if retained (empty payload clears)."""
        _validate_topic(topic)
        with self._lock:
            if retain:
                if payload:
                    self.retained[topic] = payload
                else:
                    self.retained.pop(topic, None)
            clients = list(self.clients)
        for client in clients:
            client._receive(topic, payload)

    def retained_for(self, topic_filter: str) -> list[tuple[str, bytes]]:
        """Retained messages matching ``topic_filter``."""
        with self._lock:
            return [(t, p) for t, p in self.retained.items() if topic_matches(topic_filter, t)]


class InMemoryTransport:
    """A :class:`Transport` on an :class:`InMemoryBroker`; handlers run in the publisher's call."""

    def __init__(self, broker: InMemoryBroker, client_id: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self._dispatch = _Dispatch()
        self._closed = False
        with broker._lock:
            broker.clients.append(self)

    @property
    def bytes_published(self) -> int:
        """Payload bytes published so far."""
        return self._dispatch.bytes_published

    @property
    def bytes_received(self) -> int:
        """Payload bytes received so far."""
        return self._dispatch.bytes_received

    def _receive(self, topic: str, payload: bytes) -> None:
        # like a broker: one copy per client, however many of its filters match
        if not self._closed and self._dispatch.matches(topic):
            self._dispatch.deliver(topic, payload)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish through the in-memory broker."""
        _validate_qos(qos)
        if self._closed:
            raise TransportError(f"{self.client_id}: the transport is closed")
        self._dispatch.count_published(len(payload))
        self.broker.route(topic, bytes(payload), retain)

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        """Subscribe; matching retained messages are delivered to this handler at once."""
        _validate_qos(qos)
        _validate_filter(topic_filter)
        if self._closed:
            raise TransportError(f"{self.client_id}: the transport is closed")
        self._dispatch.add(topic_filter, handler, qos)
        for topic, payload in self.broker.retained_for(topic_filter):
            with self._dispatch._lock:
                self._dispatch.bytes_received += len(payload)
            call_handler(handler, topic, payload)

    def close(self) -> None:
        """Stop receiving and leave the broker."""
        self._closed = True
        with self.broker._lock:
            if self in self.broker.clients:
                self.broker.clients.remove(self)
