"""The shipped Mosquitto ACL: a device cannot publish under another id nor a global module."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from pathlib import Path

from edge_runtime import wire
from edge_runtime.transport import MqttTransport, parse_broker_url
from tests.brokers import Mosquitto

ACL = Path(__file__).resolve().parent.parent / "docs" / "mosquitto" / "acl"


def _acl_lines() -> list[str]:
    return [line for line in ACL.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_shipped_acl_refuses_impersonation_and_fake_globals(
    mosquitto_factory: Callable[..., Mosquitto],
) -> None:
    broker = mosquitto_factory(users={"fedpeft-server": "s", "dev1": "p1", "dev2": "p2"}, acl=_acl_lines())
    seen: queue.Queue[tuple[str, bytes]] = queue.Queue()
    server = MqttTransport(
        parse_broker_url(broker.url_for("fedpeft-server")), "srv", clean_start=True
    ).connect()
    dev1 = MqttTransport(parse_broker_url(broker.url_for("dev1")), "dev1", clean_start=True).connect()
    dev2 = MqttTransport(parse_broker_url(broker.url_for("dev2")), "dev2", clean_start=True).connect()
    try:
        server.subscribe("fl/shop/#", lambda t, p: seen.put((t, p)), wait=True)
        got2: queue.Queue[bytes] = queue.Queue()
        dev2.subscribe("fl/shop/global/+", lambda t, p: got2.put(p), wait=True)
        dev1.publish(wire.topic("shop", "update", "dev2"), b"pretending to be dev2", wait=True)
        dev1.publish(wire.topic("shop", "global", "cfg"), b"a poisoned global module", wait=True)
        dev1.publish(wire.topic("shop", "ack", "dev2"), b"a forged ack", wait=True)
        dev1.publish(wire.topic("shop", "update", "dev1"), b"my own update", wait=True)
        assert seen.get(timeout=5) == ("fl/shop/update/dev1", b"my own update")
        time.sleep(0.3)
        assert seen.empty(), "the broker let a forged message through"
        assert got2.empty()
        server.publish(wire.topic("shop", "global", "cfg"), b"the real global", retain=True, wait=True)
        assert got2.get(timeout=5) == b"the real global"  # devices may read globals
    finally:
        for t in (dev1, dev2, server):
            t.close()


def test_unauthenticated_clients_are_refused(mosquitto_factory: Callable[..., Mosquitto]) -> None:
    import pytest

    from edge_runtime.errors import TransportError

    broker = mosquitto_factory(users={"fedpeft-server": "s"}, acl=_acl_lines())
    with pytest.raises(TransportError, match="refused"):
        MqttTransport(parse_broker_url(broker.url), "anon", connect_timeout=5).connect()
