"""Mixed ranks and kinds: truncated views, zero-padded coverage averaging (properties)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.aggregation import ClientUpdate, fedit
from broker_server.heterogeneous import coverage_mean, fits, hetlora_mean, view
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


# --- hetlora: zero-padded factors, sparsity-weighted clients ---------------------------------


@settings(max_examples=60, deadline=None)
@given(mixed_fleets(), st.randoms())
def test_hetlora_does_not_depend_on_client_order(fleet: Any, rnd: Any) -> None:
    state, updates = fleet
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    a, b = hetlora_mean(state, updates), hetlora_mean(state, shuffled)
    for name in state:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, R_MAX), st.integers(0, 100))
def test_hetlora_gives_one_client_its_factors_zero_beyond_its_rank(rank: int, seed: int) -> None:
    state = _global(seed)
    rng = np.random.default_rng(seed + 1)
    delta = {
        "q.lora_A": rng.normal(size=(rank, IN)).astype(np.float32),
        "q.lora_B": rng.normal(size=(OUT, rank)).astype(np.float32),
        "head.weight": rng.normal(size=(3, IN)).astype(np.float32),
    }
    new = hetlora_mean(state, [ClientUpdate("solo", 7, delta)])
    np.testing.assert_allclose(
        new["q.lora_A"][:rank], state["q.lora_A"][:rank] + delta["q.lora_A"], rtol=1e-5
    )
    np.testing.assert_allclose(
        new["q.lora_B"][:, :rank], state["q.lora_B"][:, :rank] + delta["q.lora_B"], rtol=1e-5
    )
    assert not new["q.lora_A"][rank:].any() and not new["q.lora_B"][:, rank:].any()
    np.testing.assert_allclose(new["head.weight"], state["head.weight"] + delta["head.weight"], rtol=1e-5)
    np.testing.assert_array_equal(new["prompt.embeddings"], state["prompt.embeddings"])  # nobody trained it


def test_hetlora_weights_clients_by_the_norm_of_their_lora_update() -> None:
    state = {
        "q.lora_A": np.zeros((2, 3), np.float32),
        "q.lora_B": np.zeros((2, 2), np.float32),
    }
    eye_a = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    small = {"q.lora_A": eye_a, "q.lora_B": np.eye(2, dtype=np.float32)}  # ||BA|| / r = sqrt(2) / 2
    large = {"q.lora_A": eye_a, "q.lora_B": 3 * np.eye(2, dtype=np.float32)}  # three times that
    new = hetlora_mean(state, [ClientUpdate("s", 10, small), ClientUpdate("l", 10, large)])
    # weights 1/4 and 3/4: B = 1/4 * I + 3/4 * 3I
    np.testing.assert_allclose(new["q.lora_B"], 2.5 * np.eye(2), rtol=1e-6)
    fed = fedit(state, [ClientUpdate("s", 10, small), ClientUpdate("l", 10, large)])
    np.testing.assert_allclose(fed["q.lora_B"], 2.0 * np.eye(2), rtol=1e-6)  # plain averaging differs


def test_hetlora_shrinks_rank_components_few_clients_train() -> None:
    state = {"q.lora_A": np.zeros((4, 3), np.float32), "q.lora_B": np.zeros((2, 4), np.float32)}
    rng = np.random.default_rng(0)
    low = {
        "q.lora_A": rng.normal(size=(2, 3)).astype(np.float32),
        "q.lora_B": rng.normal(size=(2, 2)).astype(np.float32),
    }
    high = {
        "q.lora_A": rng.normal(size=(4, 3)).astype(np.float32),
        "q.lora_B": rng.normal(size=(2, 4)).astype(np.float32),
    }
    ups = [ClientUpdate("low", 10, low), ClientUpdate("high", 10, high)]
    het, cov = hetlora_mean(state, ups), coverage_mean(state, ups)
    # rows 2-3 of A: only "high" trains them; coverage keeps its values, hetlora scales them by its weight
    np.testing.assert_allclose(cov["q.lora_A"][2:], high["q.lora_A"][2:], rtol=1e-6)
    ratio = het["q.lora_A"][2:] / high["q.lora_A"][2:]
    assert np.allclose(ratio, ratio.flat[0]) and 0 < ratio.flat[0] < 1


def test_identical_ranks_and_norms_make_hetlora_fedit() -> None:
    state = _global(3)
    rng = np.random.default_rng(4)
    base = {
        k: rng.normal(size=state[k].shape).astype(np.float32) for k in ("q.lora_A", "q.lora_B", "head.weight")
    }
    # two clients whose factors are sign flips of each other's deltas around zero have equal norms
    a = {k: v for k, v in base.items()}
    b = {
        "q.lora_A": -state["q.lora_A"] * 2 - base["q.lora_A"],
        "q.lora_B": -state["q.lora_B"] * 2 - base["q.lora_B"],
        "head.weight": base["head.weight"],
    }
    ups = [ClientUpdate("a", 5, a), ClientUpdate("b", 5, b)]
    het, fed = (
        hetlora_mean(state, ups),
        fedit({k: state[k] for k in ("q.lora_A", "q.lora_B", "head.weight")}, ups),
    )
    for k in fed:
        np.testing.assert_allclose(het[k], fed[k], rtol=1e-4, atol=1e-5)
