"""Transports: URL parsing, topic matching, in-memory delivery, and real brokers (mosquitto, amqtt)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from edge_runtime.errors import ConfigError, TransportError
from edge_runtime.transport import (
    BrokerUrl,
    InMemoryBroker,
    InMemoryTransport,
    MqttTransport,
    Transport,
    parse_broker_url,
    topic_matches,
)
from sdk.embedded_broker import EmbeddedBroker
from tests.brokers import Mosquitto, free_port

# -- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("mqtt://127.0.0.1:1884", BrokerUrl("mqtt", "127.0.0.1", 1884)),
        ("mqtt://broker.local", BrokerUrl("mqtt", "broker.local", 1883)),
        ("mqtts://broker.local", BrokerUrl("mqtts", "broker.local", 8883)),
        ("mqtts://dev:pw@h:9000", BrokerUrl("mqtts", "h", 9000, "dev", "pw")),
        (
            "mqtt://dev%401:s%3Acret@broker.local:1884/",
            BrokerUrl("mqtt", "broker.local", 1884, "dev@1", "s:cret"),
        ),
        ("mqtt://dev@h:1", BrokerUrl("mqtt", "h", 1, "dev", None)),
        ("mqtt://[::1]:1883", BrokerUrl("mqtt", "::1", 1883)),
    ],
)
def test_parse_broker_url_accepts(text: str, expected: BrokerUrl) -> None:
    assert parse_broker_url(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "http://h:1",
        "mqtt://",
        "h:1883",
        "mqtt://h:notaport",
        "mqtt://h:1/path",
        "mqtt://h:99999",
        "mqtt://h:0",
        "",
        "tcp://h",
    ],
)
def test_parse_broker_url_rejects_with_one_line(text: str) -> None:
    with pytest.raises(ConfigError, match="bad broker URL") as info:
        parse_broker_url(text)
    assert "\n" not in str(info.value) and "mqtt://[user:password@]host:port" in str(info.value)


def test_passwords_never_printed() -> None:
    url = parse_broker_url("mqtt://dev:s3cret@h:1")
    assert "s3cret" not in str(url) and "s3cret" not in repr(url) and str(url) == "mqtt://dev:***@h:1"
    with pytest.raises(ConfigError) as info:
        parse_broker_url("mqtt://dev:s3cret@h:bad")
    assert "s3cret" not in str(info.value)


# -- topic filters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic_filter, topic, expected",
    [
        ("fl/+/update/+", "fl/a/update/d1", True),
        ("fl/+/update/+", "fl/a/hello/d1", False),
        ("fl/#", "fl/a/b/c", True),
        ("fl/#", "fl", True),  # "#" also matches the parent level
        ("fl/a", "fl/a/b", False),
        ("fl/a/+", "fl/a", False),
        ("fl/a/+", "fl/a/", True),  # an empty level is a level
        ("#", "x", True),
        ("+", "x/y", False),
        ("#", "$SYS/broker", False),  # wildcards at the root do not match $ topics
        ("$SYS/#", "$SYS/broker", True),
        ("fl/#/x", "fl/a/x", False),  # "#" only last
    ],
)
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_topic_matching_agrees_with_paho() -> None:
    from paho.mqtt.client import topic_matches_sub

    filters = ["fl/+/update/+", "fl/#", "+/+", "#", "fl/a", "fl/+", "+"]
    topics = ["fl/a/update/d", "fl", "fl/a", "x/y", "fl/a/b", "a"]
    for f in filters:
        for t in topics:
            assert topic_matches(f, t) == topic_matches_sub(f, t), (f, t)


# -- in memory -----------------------------------------------------------------------------------


def test_in_memory_delivery_retained_and_failing_handlers(caplog: pytest.LogCaptureFixture) -> None:
    broker = InMemoryBroker()
    a, b = InMemoryTransport(broker, "a"), InMemoryTransport(broker, "b")
    got: list[tuple[str, bytes]] = []
    a.publish("fl/x/global/c", b"retained", retain=True)

    def boom(topic: str, payload: bytes) -> None:
        raise RuntimeError("handler bug")

    with caplog.at_level(logging.ERROR, logger="fedpeft.transport"):
        b.subscribe("fl/x/#", boom)
        b.subscribe("fl/x/#", lambda t, p: got.append((t, p)))
        a.publish("fl/x/update/d", b"123")
    assert "fl/x/update/d" in caplog.text  # the failure is logged with its topic
    # the retained message reaches each new subscription once, then live traffic follows
    assert got == [("fl/x/global/c", b"retained"), ("fl/x/update/d", b"123")]
    c = InMemoryTransport(broker, "c")
    late: list[bytes] = []
    c.subscribe("fl/x/global/+", lambda t, p: late.append(p))
    assert late == [b"retained"]
    a.publish("fl/x/global/c", b"", retain=True)  # an empty retained payload clears it
    assert broker.retained == {}
    assert a.bytes_published == len(b"retained") + 3
    assert c.bytes_received == len(b"retained")
    c.close()
    a.publish("fl/x/global/c", b"after close")
    assert late == [b"retained", b""]
    with pytest.raises(TransportError):
        c.publish("t", b"x")


def test_in_memory_is_a_transport() -> None:
    t: Transport = InMemoryTransport(InMemoryBroker(), "x")
    with pytest.raises(ConfigError, match="qos"):
        t.publish("t", b"", qos=3)
    for topic in ("", "fl/+/x", "fl/#"):
        with pytest.raises(ConfigError, match="cannot publish"):
            t.publish(topic, b"")
    for topic_filter in ("", "fl/#/x", "fl/a+", "fl/#a"):
        with pytest.raises(ConfigError, match="bad MQTT topic filter"):
            t.subscribe(topic_filter, lambda topic, payload: None)


# -- real brokers --------------------------------------------------------------------------------


class Inbox:
    """A handler that queues what it receives, so tests wait instead of sleeping."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[str, bytes]] = queue.Queue()

    def __call__(self, topic: str, payload: bytes) -> None:
        self.q.put((topic, payload))

    def get(self, timeout: float = 10.0) -> tuple[str, bytes]:
        return self.q.get(timeout=timeout)

    def empty_after(self, seconds: float) -> bool:
        time.sleep(seconds)
        return self.q.empty()


@pytest.fixture
def connect() -> Iterator[Callable[..., MqttTransport]]:
    """Connect MqttTransports; all are closed at teardown."""
    made: list[MqttTransport] = []

    def make(url: str, client_id: str, **kwargs: object) -> MqttTransport:
        kwargs.setdefault("clean_start", True)
        t = MqttTransport(parse_broker_url(url), client_id, **kwargs).connect()  # type: ignore[arg-type]
        made.append(t)
        return t

    yield make
    for t in made:
        t.close(flush_timeout=1.0)


def test_mosquitto_round_trip_of_2_mib_and_byte_counters(
    mosquitto: Mosquitto, connect: Callable[..., MqttTransport]
) -> None:
    sub = connect(mosquitto.url, "sub")
    pub = connect(mosquitto.url, "pub")
    inbox = Inbox()
    sub.subscribe("t/+", inbox, wait=True)
    big = bytes(range(256)) * 8192  # 2 MiB
    pub.publish("t/big", big, qos=1, wait=True)
    assert inbox.get() == ("t/big", big)
    pub.publish("t/small", b"abc", qos=1, wait=True)
    assert inbox.get() == ("t/small", b"abc")
    assert pub.bytes_published == len(big) + 3
    assert sub.bytes_received == len(big) + 3
    assert sub.bytes_published == 0 and pub.bytes_received == 0


def test_mosquitto_retained_reaches_a_late_subscriber(
    mosquitto: Mosquitto, connect: Callable[..., MqttTransport]
) -> None:
    pub = connect(mosquitto.url, "pub")
    pub.publish("fl/f/global/c", b"state", retain=True, wait=True)
    late = connect(mosquitto.url, "late")
    inbox = Inbox()
    late.subscribe("fl/f/global/+", inbox)
    assert inbox.get() == ("fl/f/global/c", b"state")


def test_a_raising_handler_does_not_stop_later_deliveries(
    mosquitto: Mosquitto, connect: Callable[..., MqttTransport], caplog: pytest.LogCaptureFixture
) -> None:
    sub = connect(mosquitto.url, "sub")
    pub = connect(mosquitto.url, "pub")
    inbox = Inbox()

    def flaky(topic: str, payload: bytes) -> None:
        if payload == b"bad":
            raise ValueError("cannot decode")
        inbox(topic, payload)

    sub.subscribe("t/#", flaky, wait=True)
    with caplog.at_level(logging.ERROR, logger="fedpeft.transport"):
        for payload in (b"bad", b"good", b"bad", b"also good"):
            pub.publish("t/x", payload, wait=True)
        assert inbox.get() == ("t/x", b"good")
        assert inbox.get() == ("t/x", b"also good")
    assert "t/x" in caplog.text and "cannot decode" in caplog.text
    assert sub.connected


def test_subscriptions_survive_a_broker_restart(
    mosquitto: Mosquitto, connect: Callable[..., MqttTransport]
) -> None:
    # persistent session, but the broker runs without persistence: only on_connect can restore it
    sub = connect(mosquitto.url, "sub", clean_start=False, max_backoff=0.5, base_backoff=0.1)
    pub = connect(mosquitto.url, "pub", max_backoff=0.5, base_backoff=0.1)
    inbox = Inbox()
    sub.subscribe("fl/f/update/+", inbox, wait=True)
    pub.publish("fl/f/update/d1", b"before", wait=True)
    assert inbox.get() == ("fl/f/update/d1", b"before")

    mosquitto.restart()
    assert sub.wait_connected(10) and pub.wait_connected(10)
    # the re-subscription is asynchronous: retry until one message comes through
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pub.publish("fl/f/update/d1", b"after", wait=True, timeout=5)
        try:
            assert inbox.get(timeout=0.5) == ("fl/f/update/d1", b"after")
            break
        except queue.Empty:
            continue
    else:
        pytest.fail("no delivery after the broker restart")


def test_qos1_published_while_the_broker_is_down_is_delivered_after_it_returns(
    mosquitto: Mosquitto, connect: Callable[..., MqttTransport]
) -> None:
    pub = connect(mosquitto.url, "pub", max_backoff=0.5, base_backoff=0.1)
    mosquitto.stop()
    deadline = time.monotonic() + 5
    while pub.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    pub.publish("fl/f/update/d1", b"queued", retain=True)  # paho keeps it until the reconnect
    mosquitto.start()
    assert pub.wait_connected(10)
    assert pub.flush(10)
    inbox = Inbox()
    connect(mosquitto.url, "late").subscribe("fl/f/update/+", inbox)
    assert inbox.get() == ("fl/f/update/d1", b"queued")


def test_connecting_to_a_closed_port_raises_within_the_timeout() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(TransportError, match=rf"127\.0\.0\.1:{port}.*refused"):
        MqttTransport(parse_broker_url(f"mqtt://127.0.0.1:{port}"), "x", connect_timeout=2).connect()
    assert time.monotonic() - start < 3


def test_a_silent_broker_times_out() -> None:
    import socket

    with socket.socket() as server:  # accepts TCP but never answers CONNECT
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(TransportError, match="no CONNACK within 1 s"):
            MqttTransport(parse_broker_url(f"mqtt://127.0.0.1:{port}"), "x", connect_timeout=1).connect()
        assert time.monotonic() - start < 2.5


def test_refused_credentials_are_named(mosquitto_factory: Callable[..., Mosquitto]) -> None:
    broker = mosquitto_factory(users={"dev1": "right"})
    start = time.monotonic()
    with pytest.raises(TransportError, match=r"refused.*(user name or password|authori)") as info:
        MqttTransport(
            parse_broker_url(f"mqtt://dev1:wrong@127.0.0.1:{broker.port}"), "d", connect_timeout=5
        ).connect()
    assert "wrong" not in str(info.value) and time.monotonic() - start < 3
    with pytest.raises(TransportError, match="refused"):
        MqttTransport(parse_broker_url(broker.url), "anon", connect_timeout=5).connect()
    ok = MqttTransport(parse_broker_url(broker.url_for("dev1")), "d", connect_timeout=5).connect()
    ok.close()


def test_broker_acl_limits_what_a_device_may_publish(mosquitto_factory: Callable[..., Mosquitto]) -> None:
    # mosquitto grants every SUBACK and applies its ACL per message; the helper's ACL file works
    broker = mosquitto_factory(
        users={"dev1": "pw1", "server": "pw0"},
        acl=["user dev1", "topic write fl/f/update/dev1", "user server", "topic readwrite fl/#"],
    )
    server = MqttTransport(parse_broker_url(broker.url_for("server")), "server", clean_start=True).connect()
    dev = MqttTransport(parse_broker_url(broker.url_for("dev1")), "dev1", clean_start=True).connect()
    try:
        inbox = Inbox()
        server.subscribe("fl/f/update/+", inbox, wait=True)
        dev.publish("fl/f/update/dev2", b"impersonation", wait=True)  # acknowledged, then dropped
        dev.publish("fl/f/update/dev1", b"mine", wait=True)
        assert inbox.get() == ("fl/f/update/dev1", b"mine")
        assert inbox.empty_after(0.2)
    finally:
        dev.close()
        server.close()


def test_tls_options_need_mqtts() -> None:
    with pytest.raises(ConfigError, match="mqtts://"):
        MqttTransport(parse_broker_url("mqtt://h:1"), "x", ca_file="/nonexistent/ca.pem")
    with pytest.raises(ConfigError, match="TLS setup"):
        MqttTransport(parse_broker_url("mqtts://h:1"), "x", ca_file="/nonexistent/ca.pem")


def test_mqtt5_round_trip(mosquitto: Mosquitto, connect: Callable[..., MqttTransport]) -> None:
    sub = connect(mosquitto.url, "sub5", protocol="5", clean_start=False)
    inbox = Inbox()
    sub.subscribe("t/5", inbox, wait=True)
    connect(mosquitto.url, "pub5", protocol="5").publish("t/5", b"v5", wait=True)
    assert inbox.get() == ("t/5", b"v5")


def test_reconnect_delays_are_capped_and_jittered() -> None:
    t = MqttTransport(parse_broker_url("mqtt://h:1"), "x", base_backoff=0.5, max_backoff=4.0)
    delays = [t._next_delay() for _ in range(40)]
    assert all(0.25 <= d <= 6.0 for d in delays)
    assert 0.25 <= delays[0] <= 0.75
    assert len({round(d, 6) for d in delays[10:]}) > 20  # jittered, not a fixed cap


def test_embedded_broker_round_trip_and_retained(
    embedded_broker: EmbeddedBroker, connect: Callable[..., MqttTransport]
) -> None:
    pub = connect(embedded_broker.url, "pub")
    sub = connect(embedded_broker.url, "sub")
    inbox = Inbox()
    sub.subscribe("fl/f/update/+", inbox, wait=True)
    payload = bytes(range(256)) * 4096  # 1 MiB
    pub.publish("fl/f/update/d1", payload, wait=True)
    assert inbox.get() == ("fl/f/update/d1", payload)

    pub.publish("fl/f/global/c", b"g" * 1_000_000, retain=True, wait=True)
    late = connect(embedded_broker.url, "late")
    late_inbox = Inbox()
    late.subscribe("fl/f/global/+", late_inbox)
    assert late_inbox.get() == ("fl/f/global/c", b"g" * 1_000_000)
    assert sub.bytes_received == len(payload)


def test_embedded_broker_starts_fast_takes_16_mib_and_stops_cleanly() -> None:
    before = {t.ident for t in threading.enumerate()}
    start = time.monotonic()
    with EmbeddedBroker() as broker:
        assert time.monotonic() - start < 5
        url = parse_broker_url(broker.url)
        with (
            MqttTransport(url, "pub", clean_start=True) as pub,
            MqttTransport(url, "sub", clean_start=True) as sub,
        ):
            inbox = Inbox()
            sub.subscribe("big", inbox, wait=True)
            payload = b"\x01" * (16 * 2**20)
            pub.publish("big", payload, wait=True)
            assert inbox.get(timeout=20)[1] == payload
    assert not broker.running
    time.sleep(0.1)  # paho threads end right after close()
    assert {t.ident for t in threading.enumerate() if t.is_alive()} <= before
    with pytest.raises(TransportError, match="did not start"):
        with EmbeddedBroker(port=broker.port) as first, EmbeddedBroker(port=first.port):
            pass


@pytest.mark.parametrize("prefer", ["mosquitto", "amqtt"])
def test_the_simulators_broker_runs_in_a_process_of_its_own_and_stops(prefer: str) -> None:
    from sdk.embedded_broker import BrokerProcess

    with BrokerProcess(prefer=prefer) as broker:
        assert broker.kind == prefer and broker._proc is not None
        pid = broker._proc.pid
        url = parse_broker_url(broker.url)
        with (
            MqttTransport(url, "pub", clean_start=True) as pub,
            MqttTransport(url, "sub", clean_start=True) as sub,
        ):
            inbox = Inbox()
            sub.subscribe("t", inbox, wait=True)
            pub.publish("t", b"x" * 100_000, wait=True)
            assert inbox.get(timeout=20)[1] == b"x" * 100_000
        port = broker.port
    assert pid != os.getpid()
    with pytest.raises(TransportError):  # it is gone, and the port with it
        MqttTransport(parse_broker_url(f"mqtt://127.0.0.1:{port}"), "late", connect_timeout=2).connect()
