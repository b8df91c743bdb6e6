"""Shared fixtures: real brokers on free ports.

- ``mosquitto``: a fresh anonymous mosquitto (``.url``, ``.port``, ``.stop()``, ``.restart()``).
- ``mosquitto_factory``: ``mosquitto_factory(extra_config=..., users=..., acl=...)`` for brokers
  with password files, ACLs or TLS; every broker it made is stopped afterwards.
- ``embedded_broker``: the in-process amqtt broker (``sdk.embedded_broker.EmbeddedBroker``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sdk.embedded_broker import EmbeddedBroker
from tests.brokers import Mosquitto

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start mosquitto brokers with extra configuration; all are stopped at teardown."""
    started: list[Mosquitto] = []

    def make(extra_config: tuple[str, ...] | list[str] = (), **kwargs: Any) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto-{len(started)}", extra_config, **kwargs)
        started.append(broker)
        return broker.start()

    try:
        yield make
    finally:
        for broker in started:
            broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A fresh anonymous mosquitto on a free port, stopped afterwards."""
    return mosquitto_factory()


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """The in-process amqtt broker (``.url``), stopped afterwards."""
    with EmbeddedBroker() as broker:
        yield broker
