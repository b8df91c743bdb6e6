"""A round that gets too few updates by its deadline publishes nothing new and never hangs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from broker_server.evaluation import Evaluator
from broker_server.service import AggregationService, ServiceConfig
from edge_runtime import wire
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import FedPeftError
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert


def test_too_few_updates_keep_the_retained_global_and_stop_in_time(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    train, test = load_folder(write_text_folder(tmp_path / "data"))
    cfg = TrainConfig(model=str(model), num_labels=3, seq_len=16)
    broker = InMemoryBroker()
    config = ServiceConfig(
        fleet="f",
        rounds=2,
        train=cfg,
        min_clients=2,
        expected_clients=2,
        round_timeout_s=0.5,
        max_round_retries=1,
    )
    service = AggregationService(InMemoryTransport(broker, "server"), config, Evaluator(cfg, test, seed=0))
    service.start()
    engine = TorchEngine(cfg, seed=0, threads=1)
    # two devices say hello, but only one of them ever trains
    active = DeviceAgent("a", "f", InMemoryTransport(broker, "a"), train, lambda c: engine)
    silent = DeviceAgent("b", "f", InMemoryTransport(broker, "b"), train, lambda c: engine)
    active.start()
    silent.start()
    active.on_ready = lambda agent: agent.run_pending()  # in-memory delivery is synchronous
    start = time.monotonic()
    with pytest.raises(FedPeftError, match="too few updates"):
        service.run()
    assert time.monotonic() - start < 10  # 2 attempts of 0.5 s, plus evaluation set-up
    retained = wire.decode_global(broker.retained[service.global_topic])
    assert retained.round == 0 and retained.meta["phase"] == "stats"  # nothing new was published
    assert service.rounds == []
    # the statistics round needs no module (class sums come from the frozen base): none is sent
    assert retained.tensors == {}
