"""Layer-wise importance weighting: devices measure each layer's effect, the service weighs by it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.aggregation import ClientUpdate, fedit, layer_weights, layerwise
from broker_server.evaluation import Evaluator
from broker_server.service import AggregationService, ServiceConfig
from broker_server.strategies import get_strategy
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.peft_specs import LoraSpec, layer_group
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

NAMES = {
    "encoder.layer.0.attention.self.query.lora_A": (2, 4),
    "encoder.layer.1.attention.self.query.lora_A": (2, 4),
    "head.weight": (3, 4),
}
GROUPS = ("layer0", "layer1", "head")


def test_layer_groups_follow_the_tensor_names() -> None:
    assert layer_group("encoder.encoder.layer.11.output.adapter.up.weight") == "layer11"
    assert layer_group("model.layers.3.self_attn.q_proj.lora_B") == "layer3"
    assert layer_group("head.bias") == "head"
    assert layer_group("prompt.embeddings") == "other"
    assert layer_group("encoder.player.2.x") == "other"  # "player" is not "layer"


@st.composite
def fleets(draw: Any) -> list[ClientUpdate]:
    rng = np.random.default_rng(draw(st.integers(0, 10_000)))
    updates = []
    for i in range(draw(st.integers(1, 5))):
        metrics = {f"importance.{g}": draw(st.floats(0, 5)) for g in GROUPS if draw(st.booleans())}
        delta = {n: rng.normal(size=s).astype(np.float32) for n, s in NAMES.items()}
        updates.append(ClientUpdate(f"c{i}", draw(st.integers(1, 60)), delta, metrics))
    return updates


def _start() -> dict[str, np.ndarray]:
    return {n: np.ones(s, np.float32) for n, s in NAMES.items()}


@settings(max_examples=60, deadline=None)
@given(fleets(), st.randoms())
def test_layerwise_properties(updates: list[ClientUpdate], rnd: Any) -> None:
    start = _start()
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    a, b = layerwise(start, updates), layerwise(start, shuffled)
    for n in NAMES:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-5, atol=1e-6)
    for g in GROUPS:  # weights are a distribution
        w = layer_weights(updates, g)
        assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    if len(updates) == 1:  # one client gets its own module whatever it claims
        for n in NAMES:
            np.testing.assert_allclose(a[n], start[n] + updates[0].delta[n], rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(fleets(), st.floats(0.1, 3))
def test_equal_or_missing_importances_give_fedit(updates: list[ClientUpdate], level: float) -> None:
    start = _start()
    equal = [
        ClientUpdate(u.device_id, u.num_samples, u.delta, {f"importance.{g}": level for g in GROUPS})
        for u in updates
    ]
    bare = [ClientUpdate(u.device_id, u.num_samples, u.delta) for u in updates]
    expected = fedit(start, updates)
    for variant in (equal, bare):
        got = layerwise(start, variant)
        for n in NAMES:
            np.testing.assert_allclose(got[n], expected[n], rtol=1e-5, atol=1e-6)


def test_a_layer_takes_the_updates_of_the_clients_it_helped() -> None:
    start = _start()
    ones = {n: np.full(s, 1.0, np.float32) for n, s in NAMES.items()}
    a = ClientUpdate(
        "a", 10, ones, {"importance.layer0": 0.3, "importance.layer1": 0.0, "importance.head": 1.0}
    )
    b = ClientUpdate(
        "b", 30, {n: -v for n, v in ones.items()}, {"importance.layer0": 0.1, "importance.layer1": 0.2}
    )
    new = layerwise(start, [a, b])
    # layer0: weights 10*0.3 : 30*0.1 = 1:1; layer1: b only; head: a only (b sent no figure for
    # the head and counts with the mean of the given ones, 1.0: weights 10 : 30)
    np.testing.assert_allclose(new["encoder.layer.0.attention.self.query.lora_A"], 1.0)
    np.testing.assert_allclose(new["encoder.layer.1.attention.self.query.lora_A"], 0.0)
    np.testing.assert_allclose(new["head.weight"], 0.5)
    # all-zero importance in a layer falls back to sample weights
    zero = [ClientUpdate(u.device_id, u.num_samples, u.delta, {"importance.layer1": 0.0}) for u in (a, b)]
    np.testing.assert_allclose(layer_weights(zero, "layer1"), [0.25, 0.75])
    assert get_strategy("layerwise") is layerwise


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("layerwise")
    return make_tiny_bert(root / "model"), write_text_folder(root / "data", per_class_train=24)


def test_devices_measure_every_layer_on_held_out_samples(tiny: tuple[Path, Path]) -> None:
    train, test = load_folder(tiny[1])
    cfg = TrainConfig(
        model=str(tiny[0]), num_labels=3, seq_len=16, bits=32, batch_size=8, lr=5e-3, head_lr=1e-2,
        peft=LoraSpec(rank=2, alpha=4.0),
    )  # fmt: skip
    broker = InMemoryBroker()
    config = ServiceConfig(
        fleet="lw", rounds=2, train=cfg, min_clients=3, expected_clients=3, round_timeout_s=30,
        strategy="layerwise", head_init="random",
    )  # fmt: skip
    service = AggregationService(InMemoryTransport(broker, "server"), config, Evaluator(cfg, test, seed=0))
    service.start()
    seen: list[dict[str, float]] = []
    original = service.aggregation.train

    def spy(state: dict[str, np.ndarray], updates: list[ClientUpdate], round_: int) -> dict[str, np.ndarray]:
        seen.extend(dict(u.metrics) for u in updates)  # what each training round aggregates
        return original(state, updates, round_)

    service.aggregation.train = spy  # type: ignore[method-assign,assignment]
    agents = []
    for i in range(3):
        part = np.arange(i, len(train), 3)
        agent = DeviceAgent(
            f"d{i}",
            "lw",
            InMemoryTransport(broker, f"d{i}"),
            train.subset(part[:18]),
            lambda c: TorchEngine(c, seed=0, threads=1),
            holdout=train.subset(part[18:]) if i < 2 else None,  # d2 has nothing held out
        )
        agent.on_ready = lambda a: a.run_pending()
        agents.append(agent)
    for a in agents:
        a.start()
    service.run()

    train_metrics = [m for m in seen if "steps" in m]
    assert len(train_metrics) == 6  # (no statistics round: the head starts at random)
    measured = [m for m in train_metrics if "importance.loss" in m]
    assert len(measured) == 4  # d0 and d1, both rounds
    for m in measured:
        assert {f"importance.{g}" for g in ("layer0", "layer1", "head")} <= set(m)
        assert all(m[k] >= 0 for k in m if k.startswith("importance."))
    assert [r["participants"] for r in service.rounds] == [3, 3]


def test_importance_is_the_loss_a_layer_update_saves_on_held_out_samples(tiny: tuple[Path, Path]) -> None:
    train, test = load_folder(tiny[1])
    cfg = TrainConfig(
        model=str(tiny[0]), num_labels=3, seq_len=16, batch_size=8, lr=5e-3, peft=LoraSpec(rank=2, alpha=4.0)
    )
    engine = TorchEngine(cfg, seed=0, threads=1)
    start = engine.trainable_state()
    engine.train(train, epochs=2, seed=0)
    trained = engine.trainable_state()
    agent = DeviceAgent("d", "f", InMemoryTransport(InMemoryBroker(), "d"), train, holdout=test)
    got = agent._layer_importance(engine, start, trained)
    full = engine.evaluate(test.subset(np.arange(len(test)))).loss
    assert got["importance.loss"] == pytest.approx(full, rel=1e-5)  # the trained module is back
    head_reverted = dict(trained, **{k: start[k] for k in ("head.weight", "head.bias")})
    engine.load_trainable_state(head_reverted)
    assert got["importance.head"] == pytest.approx(engine.evaluate(test).loss - full, rel=1e-4)
    assert got["importance.head"] > 0
    assert set(got) == {"importance.loss", "importance.head", "importance.layer0", "importance.layer1"}
