"""A training round's rule as wrappers around a strategy (broker_server.rounds.aggregation): the
order they compose in (strategy -> per cluster -> clip -> FedAvgM -> distillation; DP replaces
all), that each layer does what it says in that order, and that the carry they keep (the exact
residual, FedAvgM's momentum, with clusters too) survives the state store."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server.aggregation import ClientUpdate, State, clip_update, fedit, server_momentum_step
from broker_server.checkpoint import decode_carry
from broker_server.cluster_groups import ClusterGroups
from broker_server.clustering import clustered_step, join_states, split_state
from broker_server.config import ServiceConfig
from broker_server.distillation import KindDistillation
from broker_server.rounds.aggregation import RoundAggregation, train_rule
from broker_server.state import StateStore
from broker_server.strategy_wrappers import MOMENTUM_PREFIX
from edge_runtime import wire
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import LoraSpec
from tests.cli_processes import cli
from tests.helpers import write_text_folder

ROOT = Path(__file__).resolve().parent.parent
LORA = LoraSpec(rank=2, alpha=4.0)
FFA = LoraSpec(rank=2, alpha=4.0, train_a=False)


def _config(peft: Any = LORA, **kw: Any) -> ServiceConfig:
    return ServiceConfig(fleet="f", rounds=3, train=TrainConfig(model="tiny", num_labels=3, peft=peft), **kw)


def _state(seed: int = 0) -> State:
    rng = np.random.default_rng(seed)
    return {
        "layer.0.query.lora_A": rng.normal(size=(2, 5)).astype(np.float32),
        "layer.0.query.lora_B": rng.normal(size=(4, 2)).astype(np.float32),
        "head.weight": rng.normal(size=(3, 4)).astype(np.float32),
    }


def _rounds(
    state: Mapping[str, np.ndarray], devices: Sequence[str], seed: int, n: int = 3
) -> list[list[ClientUpdate]]:
    """``n`` rounds of updates, large enough for a clip norm of 1 to bite."""
    rng = np.random.default_rng(seed)
    return [
        [
            ClientUpdate(d, 3 + i, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in state.items()})
            for i, d in enumerate(devices)
        ]
        for _ in range(n)
    ]


def _clusters(k: int = 2) -> ClusterGroups:
    """Two clusters of two devices each, formed from label histograms as the service forms them."""
    groups = ClusterGroups(k, seed=0, share=0.5, store=None)
    hellos = {
        d: wire.Hello(device_id=d, profile={}, num_samples=9, label_histogram=hist)
        for d, hist in (("a", (9, 0, 0)), ("b", (8, 1, 0)), ("c", (0, 0, 9)), ("d", (0, 1, 8)))
    }
    groups.form(_state(), hellos)
    return groups


class RecordingDistillation(KindDistillation):
    """Distillation whose fusion is a known shift of every tensor, and which records its input."""

    def __init__(self) -> None:
        super().__init__(None, list, TextDataset((), np.zeros(0, np.int64), ()), alpha=0.5, epochs=1, seed=3)  # type: ignore[arg-type]
        self.seen: list[tuple[int, State]] = []

    def fuse(self, state: Mapping[str, np.ndarray]) -> State:
        self.seen.append((self.round, {k: np.array(v) for k, v in state.items()}))
        self.agreement = {"before": {"lora": 0.5}, "after": {"lora": 0.75}}
        return {k: np.asarray(v, np.float32) + 1.0 for k, v in state.items()}


def test_the_rule_composes_strategy_cluster_clip_fedavgm_distillation_in_that_order() -> None:
    assert train_rule(_config()).name == "fedit"
    assert train_rule(_config(clip_norm=1.0)).name == "clip(fedit)"
    assert train_rule(_config(clip_norm=1.0, server_momentum=0.5)).name == "fedavgm(clip(fedit))"
    assert train_rule(_config(server_lr=2.0)).name == "fedavgm(fedit)"
    assert train_rule(_config(strategy="exact", clip_norm=1.0)).name == "clip(exact)"
    assert train_rule(_config(FFA, strategy="ffa", server_momentum=0.9)).name == "fedavgm(ffa)"
    clustered = _config(clusters="2", strategy="median", clip_norm=1.0, server_momentum=0.5)
    assert train_rule(clustered, clusters=_clusters()).name == "fedavgm(clip(clusters(median)))"
    distilled = _config(clip_norm=1.0, server_lr=1.5)
    rule = train_rule(distilled, mixed=True, distillation=RecordingDistillation())
    assert rule.name == "distill(fedavgm(clip(fedit)))"
    # a mixed fleet's hetlora pads and weighs ranks itself: no coverage mean
    assert train_rule(_config(strategy="hetlora"), mixed=True).name == "hetlora"


def test_each_layer_acts_in_that_order_on_one_round() -> None:
    """Clip sees the raw updates, FedAvgM the clipped mean, distillation FedAvgM's result."""
    state = _state()
    updates = _rounds(state, ["a", "b", "c"], seed=1)
    distill = RecordingDistillation()
    agg = RoundAggregation(_config(clip_norm=1.0, server_lr=1.5, server_momentum=0.5), distillation=distill)
    momentum: dict[str, np.ndarray] = {}
    expected = state
    for r, round_updates in enumerate(updates, start=1):
        got = agg.train(expected, round_updates, r)
        clipped = fedit(expected, [clip_update(u, 1.0) for u in round_updates])
        stepped, momentum = server_momentum_step(expected, clipped, momentum, lr=1.5, beta=0.5)
        assert distill.seen[-1][0] == r  # seeded by the round it distills
        for name in state:
            np.testing.assert_allclose(distill.seen[-1][1][name], stepped[name], rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got[name], stepped[name] + 1.0, rtol=1e-6, atol=1e-6)
        expected = got
    # distillation keeps no carry of its own: the carry is FedAvgM's momentum, by tensor name
    assert set(agg.carry) == {MOMENTUM_PREFIX + n for n in state}
    for name in state:
        np.testing.assert_allclose(agg.momentum[name], momentum[name], rtol=1e-6, atol=1e-6)


def test_clip_around_the_clusters_is_clipping_per_cluster_and_fedavgm_now_applies_to_clusters() -> None:
    groups = _clusters()
    assert groups.clustering is not None and groups.clustering.k == 2
    joined = join_states({0: _state(0), 1: _state(0)})
    updates = _rounds(_state(0), ["a", "b", "c", "d"], seed=2, n=2)
    plain = RoundAggregation(_config(clusters="2", clip_norm=1.0), clusters=groups)
    got = plain.train(joined, updates[0], 1)
    # by hand: each cluster's own devices, each update clipped, then the shared-tensor step
    members = groups.clustering.members
    by_cluster: dict[int, list[ClientUpdate]] = {}
    for u in updates[0]:
        by_cluster.setdefault(members[u.device_id], []).append(clip_update(u, 1.0))
    by_hand, shared = clustered_step(split_state(joined, 2), by_cluster, fedit, 0.5)
    for name, value in join_states(by_hand).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7)
    assert groups.shared == shared
    # --server-momentum with clusters used to be ignored; now FedAvgM steps over the clusters' step
    moving = RoundAggregation(_config(clusters="2", clip_norm=1.0, server_momentum=0.9), clusters=groups)
    first = moving.train(joined, updates[0], 1)
    for name in got:  # round 1 from no momentum: the same step
        np.testing.assert_allclose(first[name], got[name], rtol=1e-5, atol=1e-6)
    second = moving.train(first, updates[1], 2)
    without = plain.train(first, updates[1], 2)
    assert any(not np.allclose(second[n], without[n], atol=1e-4) for n in second)
    assert set(moving.momentum) == set(joined)  # every cluster's tensors, by their joined names


@pytest.mark.parametrize(
    ("kw", "clustered"),
    [
        ({"strategy": "ffa", "server_momentum": 0.8}, False),
        ({"clusters": "2", "server_momentum": 0.8, "server_lr": 1.2}, True),
        ({"strategy": "exact", "clip_norm": 5.0}, False),
    ],
)
def test_the_carry_of_the_composed_rule_survives_the_store(
    tmp_path: Path, kw: dict[str, Any], clustered: bool
) -> None:
    peft = FFA if kw.get("strategy") == "ffa" else LORA
    config = _config(peft, **kw)
    devices = ["a", "b", "c", "d"]
    state = join_states({0: _state(0), 1: _state(0)}) if clustered else _state(0)
    updates = _rounds(_state(0), devices, seed=3)
    if kw.get("strategy") == "ffa":  # FFA-LoRA devices never move A
        updates = [
            [
                ClientUpdate(
                    u.device_id,
                    u.num_samples,
                    {k: v * 0 if "lora_A" in k else 0.1 * v for k, v in u.delta.items()},
                )
                for u in us
            ]
            for us in updates
        ]
    store = StateStore(tmp_path / "state.sqlite")
    first = RoundAggregation(config, clusters=_clusters() if clustered else None, store=store)
    states = [state]
    for r, us in enumerate(updates, start=1):
        states.append(first.train(states[-1], us, r))
    assert first.carry  # something is carried: the residual or the momentum
    # restarted in round 3: the carries stored by rounds 1 and 2, then round 3 again
    carries = {}
    if config.strategy == "exact":
        payload = store.residual_before(3)
        assert payload is not None
        carries["residual"] = decode_carry(payload)
    if config.server_momentum > 0:
        payload = store.carry_before(3, "server_momentum")
        assert payload is not None
        carries["server_momentum"] = decode_carry(payload)
    again = RoundAggregation(config, clusters=_clusters() if clustered else None, store=store)
    again.restore(carries)
    redone = again.train(states[2], updates[2], 3)
    for name, value in states[3].items():
        np.testing.assert_allclose(redone[name], value, rtol=1e-5, atol=1e-5)
    fresh = RoundAggregation(config, clusters=_clusters() if clustered else None)
    cold = fresh.train(states[2], updates[2], 3)
    assert any(not np.allclose(cold[n], states[3][n], atol=1e-5) for n in cold)  # the carry mattered
    store.close()


def test_dp_replaces_the_whole_rule() -> None:
    config = _config(clip_norm=1.0, dp_noise_multiplier=0.0, expected_clients=3)
    agg = RoundAggregation(config, noise=lambda r: np.random.default_rng(r))
    state = _state()
    updates = _rounds(state, ["a", "b", "c"], seed=4, n=1)[0]
    got = agg.train(state, updates, 1)
    assert agg.dp is not None and agg.releases == 1 and agg.carry == {}
    want = agg.dp.aggregate(state, updates, np.random.default_rng(1))
    for name in state:
        np.testing.assert_array_equal(got[name], want[name])


def test_server_momentum_with_exact_is_refused_clearly(tmp_path: Path) -> None:
    for kw in ({"server_momentum": 0.5}, {"server_lr": 2.0}):
        with pytest.raises(ConfigError, match=r"--strategy exact.*re-factorizes"):
            _config(strategy="exact", **kw)
    _config(FFA, strategy="ffa", server_momentum=0.5)  # FFA's A is frozen: B's step is a step
    _config(clusters="auto", server_momentum=0.5)
    data = write_text_folder(tmp_path / "data", per_class_train=4)
    run = subprocess.run(
        cli(
            "serve",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--fleet",
            "f",
            "--state",
            str(tmp_path / "s"),
            "--data",
            str(data),
            "--strategy",
            "exact",
            "--server-momentum",
            "0.9",
        ),
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--server-momentum" in lines[0] and "exact" in lines[0], run.stderr


def test_a_registered_strategy_is_a_strategy_name_the_wrappers_compose_around() -> None:
    from broker_server import strategies

    calls: list[int] = []

    def largest_sample(state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> State:
        """The module of the device with the most samples (a deliberately odd rule)."""
        calls.append(len(updates))
        best = max(updates, key=lambda u: u.num_samples)
        return {k: state[k] + best.delta[k] for k in state}

    strategies.register_strategy("largest_sample", largest_sample)
    try:
        assert "largest_sample" in strategies.registered_strategies()
        with pytest.raises(ConfigError, match="already registered"):
            strategies.register_strategy("largest_sample", largest_sample)
        with pytest.raises(ConfigError, match="already registered"):
            strategies.register_strategy("fedit", fedit)  # the built-in ones cannot be replaced
        with pytest.raises(ConfigError, match="plain identifier"):
            strategies.register_strategy("bad name", largest_sample)
        config = _config(strategy="largest_sample", clip_norm=1.0, server_momentum=0.5)
        rule = train_rule(config)
        assert rule.name == "fedavgm(clip(largest_sample))"
        state = _state()
        updates = _rounds(state, ["a", "b", "c"], seed=3, n=1)[0]
        new, carry = rule.aggregate(state, updates, {})
        assert calls == [3]
        # clip then the rule then FedAvgM: the step is the clipped largest device's, times lr 1
        best = max(updates, key=lambda u: u.num_samples)
        clipped = clip_update(best, 1.0)
        expected = {k: state[k] + clipped.delta[k] for k in state}
        for k in state:
            np.testing.assert_allclose(new[k], expected[k], rtol=1e-5, atol=1e-6)
        assert any(k.startswith(MOMENTUM_PREFIX) for k in carry)
    finally:
        strategies.STRATEGIES.pop("largest_sample", None)
    with pytest.raises(ConfigError, match="unknown strategy"):
        _config(strategy="largest_sample")
