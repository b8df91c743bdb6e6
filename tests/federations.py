"""A small federation in one process: a service and its devices on the in-memory broker, each
device training on its share of the rows (every ``devices``-th) with the torch engine as soon as it
is assigned (in-memory delivery is synchronous). The tests assert on what it returns."""

from __future__ import annotations

from typing import Any

import numpy as np

from broker_server.evaluation import Evaluator
from broker_server.service import AggregationService, ServiceConfig
from broker_server.state import StateStore
from edge_runtime.agent import DeviceAgent
from edge_runtime.transport import InMemoryBroker, InMemoryTransport


def federate_in_memory(
    config: ServiceConfig,
    train: Any,
    evaluator: Evaluator,
    *,
    devices: int = 2,
    store: StateStore | None = None,
) -> tuple[AggregationService, list[DeviceAgent]]:
    """Run ``config``'s rounds with ``devices`` devices named ``d0``, ``d1``, ...; the finished
    service and agents."""
    from edge_runtime.engines.torch_engine import TorchEngine

    broker = InMemoryBroker()
    service = AggregationService(InMemoryTransport(broker, "server"), config, evaluator, store=store)
    service.start()
    agents = []
    for i in range(devices):
        agent = DeviceAgent(
            f"d{i}",
            config.fleet,
            InMemoryTransport(broker, f"d{i}"),
            train.subset(np.arange(i, len(train), devices)),
            lambda c: TorchEngine(c, seed=0, threads=1),
        )
        agent.on_ready = lambda a: a.run_pending()
        agents.append(agent)
    for agent in agents:
        agent.start()
    service.run()
    return service, agents
