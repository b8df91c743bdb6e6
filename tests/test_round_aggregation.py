"""A synchronous round's aggregation (broker_server.rounds.sync) with plain arrays and a state
store: the carries it writes are the ones a restarted service takes back, and a round redone from
them gives the same module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from broker_server.aggregation import ClientUpdate
from broker_server.checkpoint import decode_carry
from broker_server.config import ServiceConfig
from broker_server.rounds.aggregation import RoundAggregation
from broker_server.state import StateStore
from edge_runtime.config import TrainConfig
from edge_runtime.peft_specs import LoraSpec


def fleet(seed: int) -> tuple[dict[str, np.ndarray], list[list[ClientUpdate]]]:
    rng = np.random.default_rng(seed)
    state = {
        "layer.0.query.lora_A": rng.normal(size=(2, 5)).astype(np.float32),
        "layer.0.query.lora_B": rng.normal(size=(4, 2)).astype(np.float32),
        "head.weight": rng.normal(size=(3, 4)).astype(np.float32),
    }
    rounds = [
        [
            ClientUpdate(
                f"d{c}",
                5 + c,
                {k: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in state.items()},
            )
            for c in range(3)
        ]
        for _ in range(3)
    ]
    return state, rounds


@pytest.mark.parametrize(
    ("kw", "stored"),
    [({"strategy": "exact"}, "residual"), ({"server_momentum": 0.5, "server_lr": 0.8}, "server_momentum")],
)
def test_a_round_redone_from_the_stored_carry_gives_the_same_module(
    tmp_path: Path, kw: dict[str, object], stored: str
) -> None:
    train = TrainConfig(model="tiny", num_labels=3, peft=LoraSpec(rank=2, alpha=4.0))
    config = ServiceConfig(fleet="f", rounds=3, train=train, **kw)  # type: ignore[arg-type]
    store = StateStore(tmp_path / "state.sqlite")
    first = RoundAggregation(config, store=store)
    state, rounds = fleet(0)
    states = [state]
    for r, updates in enumerate(rounds, start=1):
        states.append(first.train(states[-1], updates, r))
    # a service restarted in round 3 takes back what rounds 1 and 2 left, and redoes round 3
    payload = store.residual_before(3) if stored == "residual" else store.carry_before(3, stored)
    assert payload is not None
    again = RoundAggregation(config, store=store)
    again.restore({stored: decode_carry(payload)})
    redone = again.train(states[2], rounds[2], 3)
    for name, value in states[3].items():
        np.testing.assert_allclose(redone[name], value, rtol=1e-5, atol=1e-6)
    # ... and without its carry it would not: the carry matters
    fresh = RoundAggregation(config).train(states[2], rounds[2], 3)
    assert any(not np.allclose(fresh[n], states[3][n], atol=1e-6) for n in fresh)
    store.close()


def test_the_statistics_round_sets_the_class_mean_head_and_keeps_the_rest() -> None:
    train = TrainConfig(model="tiny", num_labels=2, peft=LoraSpec(rank=2, alpha=4.0))
    agg = RoundAggregation(ServiceConfig(fleet="f", rounds=1, train=train, head_scale=2.0))
    state = {"head.weight": np.zeros((2, 3), np.float32), "x": np.ones(2, np.float32)}
    sums = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], np.float32)
    stats = ClientUpdate(
        "d", 3, {"stats.class_sums": sums, "stats.class_counts": np.array([1, 2], np.float32)}
    )
    new = agg.statistics(state, [stats])
    assert new["x"] is state["x"]
    np.testing.assert_allclose(np.linalg.norm(new["head.weight"], axis=1), [2.0, 2.0], rtol=1e-5)
