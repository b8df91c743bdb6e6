"""``--strategy exact`` in the service: one round step, the residual kept in SQLite, a whole run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from broker_server.aggregation import ClientUpdate, fedit
from broker_server.evaluation import Evaluator
from broker_server.exact import exact_fedavg
from broker_server.service import AggregationService, ServiceConfig
from broker_server.state import StateStore
from broker_server.strategies import check_strategy, get_strategy
from edge_runtime import wire
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import AdapterSpec, LoraSpec
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

PREFIX = "encoder.layer.0.attention.self.query"


def _state(rng: np.random.Generator, rank: int = 2) -> dict[str, np.ndarray]:
    return {
        f"{PREFIX}.lora_A": rng.standard_normal((rank, 6)).astype(np.float32),
        f"{PREFIX}.lora_B": rng.standard_normal((5, rank)).astype(np.float32),
        "head.weight": rng.standard_normal((3, 6)).astype(np.float32),
    }


def test_one_exact_round_keeps_the_identity_and_averages_the_head_like_fedit() -> None:
    rng = np.random.default_rng(0)
    glob = _state(rng)
    updates = [
        ClientUpdate(
            f"d{i}", n, {k: 0.3 * rng.standard_normal(v.shape).astype(np.float32) for k, v in glob.items()}
        )
        for i, n in enumerate((10, 30, 20))
    ]
    previous = {PREFIX: 0.01 * rng.standard_normal((5, 6))}
    new, residual = exact_fedavg(glob, updates, scale=2.0, residual=previous)
    p = np.array([10, 30, 20]) / 60
    a, b = f"{PREFIX}.lora_A", f"{PREFIX}.lora_B"

    def full(name: str, u: ClientUpdate) -> np.ndarray:
        return glob[name].astype(np.float64) + u.delta[name].astype(np.float64)

    mean = sum(w * 2.0 * full(b, u) @ full(a, u) for w, u in zip(p, updates, strict=True))
    published = 2.0 * new[b].astype(np.float64) @ new[a].astype(np.float64)
    np.testing.assert_allclose(published + residual[PREFIX], mean + previous[PREFIX], atol=1e-9)
    assert new[a].shape == glob[a].shape and new[b].shape == glob[b].shape  # back at the global rank
    assert np.linalg.norm(residual[PREFIX]) > 1e-3  # three rank-2 clients do not fit in rank 2
    head = {"head.weight": glob["head.weight"]}
    expected = fedit(
        head,
        [ClientUpdate(u.device_id, u.num_samples, {"head.weight": u.delta["head.weight"]}) for u in updates],
    )
    np.testing.assert_allclose(new["head.weight"], expected["head.weight"], rtol=1e-6)


def test_exact_is_a_known_strategy_that_the_service_runs_itself(tmp_path: Path) -> None:
    check_strategy("exact")
    with pytest.raises(ConfigError, match="keeps state"):
        get_strategy("exact")
    with pytest.raises(ConfigError, match=r"unknown strategy 'krum'.*exact"):
        check_strategy("krum")
    with pytest.raises(ConfigError, match="LoRA products"):
        ServiceConfig(fleet="f", rounds=1, train=TrainConfig(peft=AdapterSpec()), strategy="exact")


def test_the_residual_of_the_round_before_is_what_a_round_starts_from(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    assert store.residual_before(3) is None
    store.save_residual(1, b"one")
    store.save_residual(2, b"two")
    assert store.residual_before(2) == b"one"  # redoing round 2 after a crash starts from round 1's
    assert store.residual_before(3) == b"two"
    store.save_residual(2, b"two again")  # a redone round replaces its residual
    assert store.residual_before(9) == b"two again"


def test_a_federation_with_exact_aggregation_runs_and_stores_its_residuals(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    train, test = load_folder(write_text_folder(tmp_path / "data", per_class_train=8))
    cfg = TrainConfig(model=str(model), num_labels=3, seq_len=16, bits=32, peft=LoraSpec(rank=2, alpha=4.0))
    broker = InMemoryBroker()
    config = ServiceConfig(
        fleet="ex",
        rounds=2,
        train=cfg,
        min_clients=3,
        expected_clients=3,
        round_timeout_s=30,
        strategy="exact",
    )
    store = StateStore(tmp_path / "state.db")
    service = AggregationService(
        InMemoryTransport(broker, "server"), config, Evaluator(cfg, test, seed=0, threads=1), store=store
    )
    service.start()
    agents = []
    for i in range(3):
        part = train.subset(np.arange(i, len(train.labels), 3))
        agent = DeviceAgent(
            f"d{i}",
            "ex",
            InMemoryTransport(broker, f"d{i}"),
            part,
            lambda c: TorchEngine(c, seed=0, threads=1),
        )
        agent.on_ready = lambda a: a.run_pending()
        agents.append(agent)
    for a in agents:
        a.start()
    service.run()

    assert [r["participants"] for r in service.rounds] == [3, 3, 3]
    assert service.rounds[-1]["accuracy"] is not None
    saved = store.residual_before(99)
    assert saved is not None
    residual = wire.decode_global(saved, max_bytes=len(saved)).tensors
    assert set(residual) == {p.rsplit(".lora_A", 1)[0] for p in service.final_state() if p.endswith("lora_A")}
    assert all(np.isfinite(v).all() for v in residual.values())
    assert any(np.linalg.norm(v) > 0 for v in residual.values())  # three rank-2 clients, rank-2 global
    final = service.final_state()
    for agent in agents:  # every device ends on the published factors
        assert agent.final_state is not None
        for k, v in final.items():
            np.testing.assert_array_equal(agent.final_state[k], v)
