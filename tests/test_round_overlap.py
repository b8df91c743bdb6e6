"""The service tests each round's module while the devices train the next (no state store), with
the same figures as testing in between; with a state store a round is reported before the next
goes out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker_server.evaluation import Evaluator
from broker_server.service import AggregationService, ServiceConfig
from broker_server.state import StateStore
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("overlap")
    return make_tiny_bert(root / "model"), write_text_folder(root / "data", per_class_train=8)


def _federate(
    setup: tuple[Path, Path], *, overlap: bool, store: StateStore | None = None
) -> tuple[list[dict[str, Any]], list[tuple[str, int]]]:
    """Three in-memory devices, two training rounds; the rounds' records, and the order in which
    the devices were sent each round's module and the service reported each round."""
    model, data = setup
    train, test = load_folder(data)
    cfg = TrainConfig(model=str(model), num_labels=3, seq_len=16)
    config = ServiceConfig(
        fleet="f", rounds=2, train=cfg, min_clients=3, expected_clients=3, evaluate_during_next_round=overlap
    )
    broker = InMemoryBroker()
    events: list[tuple[str, int]] = []
    service = AggregationService(
        InMemoryTransport(broker, "server"), config, Evaluator(cfg, test, seed=0, threads=1), store=store
    )
    service.on_round = lambda record: events.append(("reported", int(record["round"])))
    engine = TorchEngine(cfg, seed=0, threads=1)
    agents = [
        DeviceAgent(
            f"dev{i}",
            "f",
            InMemoryTransport(broker, f"dev{i}"),
            train.subset(range(i, len(train), 3)),
            lambda c: engine,
        )
        for i in range(3)
    ]

    def ready(agent: DeviceAgent) -> None:
        pending = agent._pending_global
        if agent.device_id == "dev0" and pending is not None:
            events.append(("sent", int(pending.module.round)))
        agent.run_pending()  # in-memory delivery is synchronous

    service.start()
    for agent in agents:
        agent.on_ready = ready
        agent.start()
    service.run()
    service.transport.close()
    return service.rounds, events


def test_each_round_is_tested_while_the_next_trains_with_the_same_figures(setup: tuple[Path, Path]) -> None:
    overlapped, events = _federate(setup, overlap=True)
    between, events_between = _federate(setup, overlap=False)
    assert [r["round"] for r in overlapped] == [0, 1, 2]
    for r in (0, 1):  # the next round went out before this one was reported
        assert events.index(("sent", r + 1)) < events.index(("reported", r))
        assert events_between.index(("reported", r)) < events_between.index(("sent", r + 1))
    for a, b in zip(overlapped, between, strict=True):
        assert a["accuracy"] is not None and "eval_pending" not in a
        # (bytes up carry each device's timings, whose digits vary from run to run)
        for key in ("accuracy", "loss", "macro_f1", "participants", "bytes_down", "train_loss"):
            assert a[key] == b[key], (a["round"], key)
        assert (a.get("tested_during_next_round", False), "eval_s" in a) == ((a["round"] < 2),) * 2
        assert not b.get("tested_during_next_round", False)
        # the round's own time ends when the next round goes out; the test's is its own
        if a["round"] < 2:
            assert a["eval_s"] > 0.0 and a["server_s"] < b["server_s"]


def test_with_a_state_store_a_round_is_reported_before_the_next_goes_out(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    records, events = _federate(setup, overlap=True, store=StateStore(tmp_path / "state.db"))
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in (0, 1):
        assert events.index(("reported", r)) < events.index(("sent", r + 1))
    assert not any(r.get("tested_during_next_round") for r in records)


def test_simulate_tests_during_the_next_round_unless_told_otherwise() -> None:
    from sdk.cli import build_parser, simulation_config

    base = ["simulate", "--data", "x"]
    assert simulation_config(build_parser().parse_args(base)).test_during_next_round
    between = simulation_config(build_parser().parse_args([*base, "--test-between-rounds"]))
    assert not between.test_during_next_round
