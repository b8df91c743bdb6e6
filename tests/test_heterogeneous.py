"""Mixed ranks and kinds: truncated views, zero-padded coverage averaging (properties)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.aggregation import ClientUpdate, fedit
from broker_server.heterogeneous import coverage_mean, fits, view
from edge_runtime.errors import ConfigError, ShapeMismatch

R_MAX, IN, OUT = 6, 5, 4


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "q.lora_A": rng.normal(size=(R_MAX, IN)).astype(np.float32),
        "q.lora_B": rng.normal(size=(OUT, R_MAX)).astype(np.float32),
        "prompt.embeddings": rng.normal(size=(R_MAX, IN)).astype(np.float32),
        "head.weight": rng.normal(size=(3, IN)).astype(np.float32),
    }


@st.composite
def mixed_fleets(draw: Any) -> tuple[dict[str, np.ndarray], list[ClientUpdate]]:
    state = _global(draw(st.integers(0, 5)))
    n = draw(st.integers(1, 6))
    updates = []
    for i in range(n):
        rank = draw(st.integers(1, R_MAX))
        kind = draw(st.sampled_from(["lora", "prompt"]))
        rng = np.random.default_rng(draw(st.integers(0, 1000)))
        shapes = (
            {"q.lora_A": (rank, IN), "q.lora_B": (OUT, rank)}
            if kind == "lora"
            else {"prompt.embeddings": (rank, IN)}
        )
        shapes["head.weight"] = (3, IN)
        delta = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        updates.append(ClientUpdate(f"c{i}", draw(st.integers(1, 50)), delta))
    return state, updates


@settings(max_examples=60, deadline=None)
@given(mixed_fleets(), st.randoms())
def test_client_order_does_not_matter(fleet: Any, rnd: Any) -> None:
    state, updates = fleet
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    a, b = coverage_mean(state, updates), coverage_mean(state, shuffled)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(mixed_fleets())
def test_each_element_is_the_weighted_mean_over_the_clients_that_cover_it(fleet: Any) -> None:
    state, updates = fleet
    new = coverage_mean(state, updates)
    for name, g in state.items():
        for index in np.ndindex(g.shape):
            covering = [
                u
                for u in updates
                if name in u.delta and all(i < s for i, s in zip(index, u.delta[name].shape, strict=True))
            ]
            if not covering:
                assert new[name][index] == g[index]  # nobody trained it: unchanged
                continue
            w = np.array([u.num_samples for u in covering], dtype=np.float64)
            d = np.array([u.delta[name][index] for u in covering], dtype=np.float64)
            assert new[name][index] == pytest.approx(g[index] + (w @ d) / w.sum(), rel=1e-4, abs=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, R_MAX), st.integers(0, 100))
def test_one_client_gets_back_exactly_its_module_on_its_view(rank: int, seed: int) -> None:
    state = _global(seed)
    shapes = {"q.lora_A": (rank, IN), "q.lora_B": (OUT, rank), "head.weight": (3, IN)}
    start = view(state, shapes)
    trained = {k: v + np.float32(0.5) for k, v in start.items()}
    delta = {k: trained[k] - start[k] for k in shapes}
    new = coverage_mean(state, [ClientUpdate("solo", 7, delta)])
    for k, v in view(new, shapes).items():
        np.testing.assert_allclose(v, trained[k], rtol=1e-6, atol=1e-6)
    # what it did not train is untouched
    np.testing.assert_array_equal(new["prompt.embeddings"], state["prompt.embeddings"])
    np.testing.assert_array_equal(new["q.lora_A"][rank:], state["q.lora_A"][rank:])


def test_identical_shapes_give_fedit() -> None:
    state = _global(1)
    rng = np.random.default_rng(3)
    updates = [
        ClientUpdate(f"c{i}", n, {k: rng.normal(size=v.shape).astype(np.float32) for k, v in state.items()})
        for i, n in enumerate([3, 10, 1])
    ]
    a, b = coverage_mean(state, updates), fedit(state, updates)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_views_are_leading_corners_and_misfits_are_refused() -> None:
    state = _global(2)
    small = view(state, {"q.lora_A": (2, IN), "q.lora_B": (OUT, 2)})
    np.testing.assert_array_equal(small["q.lora_A"], state["q.lora_A"][:2])
    np.testing.assert_array_equal(small["q.lora_B"], state["q.lora_B"][:, :2])
    small["q.lora_A"][0, 0] = 99.0
    assert state["q.lora_A"][0, 0] != 99.0  # a copy, not a window into the global state
    with pytest.raises(ShapeMismatch, match="does not fit"):
        view(state, {"q.lora_A": (R_MAX + 1, IN)})
    with pytest.raises(ShapeMismatch, match="not in the global state"):
        view(state, {"adapter.down": (2, 2)})
    assert fits(state, {"q.lora_A": np.zeros((2, IN))}) is None
    assert "does not fit" in str(fits(state, {"q.lora_A": np.zeros((2, IN + 1))}))
    assert "unexpected" in str(fits(state, {"nope": np.zeros(1)}))
    with pytest.raises(ConfigError):
        coverage_mean(state, [])
