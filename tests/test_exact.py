"""Properties of exact LoRA aggregation (broker_server.exact): pure functions over arrays."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.aggregation import ClientUpdate
from broker_server.exact import ExactAggregate, exact_aggregate, fedit_gap, ffa_aggregate, lora_pairs
from broker_server.heterogeneous import coverage_mean
from edge_runtime.errors import ConfigError, NonFinite, ShapeMismatch

SCALE = 2.0  # alpha = 2r in the allocation grid
Factors = dict[str, np.ndarray]
PROPERTY = settings(max_examples=40, deadline=None)


def _client(rng: np.random.Generator, shapes: Mapping[str, tuple[int, int]], rank: int) -> Factors:
    out: Factors = {}
    for prefix, (rows, cols) in shapes.items():
        r = min(rank, rows, cols)
        out[f"{prefix}.lora_A"] = rng.standard_normal((r, cols)).astype(np.float32)
        out[f"{prefix}.lora_B"] = rng.standard_normal((rows, r)).astype(np.float32)
    return out


@st.composite
def federations(draw: st.DrawFn) -> tuple[dict[str, tuple[int, int]], list[Factors], list[int]]:
    """One to five clients of ranks 1..4 over one or two pairs of small (out, in) shapes."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    n_pairs = draw(st.integers(1, 2))
    shapes = {f"layer.{i}.query": (draw(st.integers(2, 7)), draw(st.integers(2, 7))) for i in range(n_pairs)}
    n = draw(st.integers(1, 5))
    ranks = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    weights = draw(st.lists(st.integers(1, 500), min_size=n, max_size=n))
    return shapes, [_client(rng, shapes, r) for r in ranks], weights


def _exact_mean(clients: list[Factors], weights: list[int], scale: float = SCALE) -> dict[str, np.ndarray]:
    """The reference: sum p_c scale B_c A_c per pair, written out the long way."""
    p = np.asarray(weights, dtype=np.float64) / sum(weights)
    means: dict[str, np.ndarray] = {}
    for prefix, (a, b) in lora_pairs(clients[0]).items():
        means[prefix] = sum(
            pc * scale * c[b].astype(np.float64) @ c[a].astype(np.float64)
            for pc, c in zip(p, clients, strict=True)
        )
    return means


def _close(x: np.ndarray, y: np.ndarray, rel: float = 1e-5) -> None:
    """Equal up to float32 rounding of the factors, relative to the larger of the two."""
    scale = max(float(np.linalg.norm(x)), float(np.linalg.norm(y)), 1.0)
    assert float(np.linalg.norm(x - y)) <= rel * scale


def _top(shapes: Mapping[str, tuple[int, int]], want: int) -> int:
    return min(want, *(min(s) for s in shapes.values()))


# (a) the identity that makes error feedback lossless
@PROPERTY
@given(federations(), st.integers(1, 4), st.booleans())
def test_published_product_plus_residual_is_the_exact_mean(fed, want, carry) -> None:
    shapes, clients, weights = fed
    top = _top(shapes, want)
    rng = np.random.default_rng(top)
    previous = {k: rng.standard_normal(s) for k, s in shapes.items()} if carry else None
    result = exact_aggregate(clients, weights, [top], SCALE, previous)
    for prefix, mean in _exact_mean(clients, weights).items():
        target = mean + (previous[prefix] if previous else 0.0)
        np.testing.assert_allclose(
            result.product(prefix, top, SCALE) + result.residual[prefix], target, rtol=1e-10, atol=1e-10
        )
        assert result.residual[prefix].shape == shapes[prefix]
        assert result.residual[prefix].dtype == np.float64


# the rank-r factors are the best rank-r approximation, and smaller ranks are corners of larger ones
@PROPERTY
@given(federations())
def test_factors_are_nested_truncated_svds(fed) -> None:
    shapes, clients, weights = fed
    top = _top(shapes, 4)
    ranks = sorted({1, top})
    result = exact_aggregate(clients, weights, ranks, SCALE)
    for prefix, mean in _exact_mean(clients, weights).items():
        u, s, vt = np.linalg.svd(mean, full_matrices=False)
        for r in ranks:
            a_name, b_name = f"{prefix}.lora_A", f"{prefix}.lora_B"
            assert result.factors[r][a_name].shape == (r, shapes[prefix][1])
            assert result.factors[r][b_name].shape == (shapes[prefix][0], r)
            assert result.factors[r][a_name].dtype == np.float32
            np.testing.assert_array_equal(result.factors[r][a_name], result.factors[top][a_name][:r])
            np.testing.assert_array_equal(result.factors[r][b_name], result.factors[top][b_name][:, :r])
            _close(result.product(prefix, r, SCALE), (u[:, :r] * s[:r]) @ vt[:r])
        np.testing.assert_allclose(result.singular_values[prefix], s, rtol=1e-9, atol=1e-9)


# (b) a mean of rank <= r is reproduced exactly, with nothing left over
@PROPERTY
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 5), st.integers(0, 2))
def test_low_rank_mean_leaves_no_residual(seed, k, n, extra) -> None:
    rng = np.random.default_rng(seed)
    rows, cols = k + 2, k + 3
    shared_a = rng.standard_normal((k, cols))  # every product lies in the row space of shared_a
    clients = [
        {
            "q.lora_A": shared_a.astype(np.float32),
            "q.lora_B": rng.standard_normal((rows, k)).astype(np.float32),
        }
        for _ in range(n)
    ]
    weights = [int(w) for w in rng.integers(1, 100, size=n)]
    result = exact_aggregate(clients, weights, [k + extra], SCALE)
    mean = _exact_mean(clients, weights)["q"]
    assert float(np.linalg.norm(result.residual["q"])) <= 1e-5 * max(float(np.linalg.norm(mean)), 1.0)
    _close(result.product("q", k + extra, SCALE), mean)


# (c) client order does not matter (compare products: SVD signs are not unique in general)
@PROPERTY
@given(federations(), st.randoms(use_true_random=False))
def test_client_order_does_not_matter(fed, shuffler) -> None:
    shapes, clients, weights = fed
    order = list(range(len(clients)))
    shuffler.shuffle(order)
    ranks = sorted({1, _top(shapes, 3)})
    first = exact_aggregate(clients, weights, ranks, SCALE)
    second = exact_aggregate([clients[i] for i in order], [weights[i] for i in order], ranks, SCALE)
    for prefix in shapes:
        for r in ranks:
            _close(first.product(prefix, r, SCALE), second.product(prefix, r, SCALE))
        _close(first.residual[prefix], second.residual[prefix])


# (d) one client alone gets its own module back at its own rank
@PROPERTY
@given(st.integers(0, 2**31 - 1), st.integers(2, 7), st.integers(2, 7), st.integers(1, 4))
def test_single_client_returns_its_own_product(seed, rows, cols, rank) -> None:
    rank = min(rank, rows, cols)
    client = _client(np.random.default_rng(seed), {"q": (rows, cols)}, rank)
    result = exact_aggregate([client], [1], [rank], SCALE)
    own = SCALE * client["q.lora_B"].astype(np.float64) @ client["q.lora_A"].astype(np.float64)
    _close(result.product("q", rank, SCALE), own)
    assert float(np.linalg.norm(result.residual["q"])) <= 1e-5 * float(np.linalg.norm(own))


# (e) over rounds, what was applied plus what is still owed is everything that was averaged
@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 5), st.integers(1, 2))
def test_error_feedback_loses_nothing_over_rounds(seed, rounds, top) -> None:
    rng = np.random.default_rng(seed)
    shapes = {"q": (6, 5), "v": (4, 6)}
    residual: dict[str, np.ndarray] | None = None
    applied = {k: np.zeros(s) for k, s in shapes.items()}
    averaged = {k: np.zeros(s) for k, s in shapes.items()}
    for _ in range(rounds):
        # intermittent, heterogeneous: a different number of clients of different ranks each round
        clients = [_client(rng, shapes, int(r)) for r in rng.integers(1, 4, size=int(rng.integers(1, 5)))]
        weights = [int(w) for w in rng.integers(1, 200, size=len(clients))]
        result = exact_aggregate(clients, weights, [top], SCALE, residual)
        for prefix, mean in _exact_mean(clients, weights).items():
            averaged[prefix] += mean
            applied[prefix] += result.product(prefix, top, SCALE)
        residual = result.residual
    assert residual is not None
    for prefix in shapes:
        np.testing.assert_allclose(applied[prefix] + residual[prefix], averaged[prefix], rtol=1e-9, atol=1e-9)


def test_residual_of_an_unsent_pair_carries_over() -> None:
    rng = np.random.default_rng(0)
    client = _client(rng, {"q": (4, 4)}, 2)
    owed = {"q": rng.standard_normal((4, 4)), "v": rng.standard_normal((3, 5))}
    result = exact_aggregate([client], [3], [2], SCALE, owed)
    np.testing.assert_array_equal(result.residual["v"], owed["v"])
    assert "v.lora_A" not in result.factors[2]
    assert set(owed) == {"q", "v"} and owed["q"].shape == (4, 4)  # the input is not mutated


def test_per_client_scales_and_out_scale() -> None:
    rng = np.random.default_rng(1)
    clients = [_client(rng, {"q": (5, 5)}, r) for r in (1, 2)]
    result = exact_aggregate(clients, [1, 3], [2], [4.0, 1.0], out_scale=2.0)
    mean = 0.25 * 4.0 * clients[0]["q.lora_B"].astype(np.float64) @ clients[0]["q.lora_A"]
    mean += 0.75 * 1.0 * clients[1]["q.lora_B"].astype(np.float64) @ clients[1]["q.lora_A"]
    _close(result.product("q", 2, 2.0) + result.residual["q"], mean, rel=1e-10)
    with pytest.raises(ConfigError, match="out_scale"):
        exact_aggregate(clients, [1, 3], [2], [4.0, 1.0])


# (f) the inexactness of averaging factors
def test_fedit_gap_is_zero_for_identical_clients() -> None:
    client = _client(np.random.default_rng(2), {"q": (5, 4), "v": (3, 6)}, 3)
    gaps = fedit_gap([client, dict(client), dict(client)], [5, 1, 9], SCALE)
    assert set(gaps) == {"q", "v"}
    assert all(g <= 1e-9 for g in gaps.values())


def test_fedit_gap_in_a_constructed_case() -> None:
    e1, e2 = np.array([[1.0], [0.0]]), np.array([[0.0], [1.0]])
    clients = [{"q.lora_A": e1.T, "q.lora_B": e1}, {"q.lora_A": e2.T, "q.lora_B": e2}]
    # exact mean I/2; FedIT (e1+e2)/2 (e1+e2)^T/2 = J/4; || I/2 - J/4 ||_F = 1/2
    assert fedit_gap(clients, [1, 1], SCALE)["q"] == pytest.approx(0.5 * SCALE)
    assert fedit_gap(clients, [1, 1], SCALE, relative=True)["q"] == pytest.approx(0.5 / np.sqrt(0.5))


@settings(max_examples=25, deadline=None)
@given(federations())
def test_fedit_gap_measures_the_rule_the_service_runs(fed) -> None:
    shapes, clients, weights = fed
    zero = {}
    for prefix, (rows, cols) in shapes.items():
        zero[f"{prefix}.lora_A"] = np.zeros((4, cols), np.float32)
        zero[f"{prefix}.lora_B"] = np.zeros((rows, 4), np.float32)
    updates = [ClientUpdate(f"d{i}", w, c) for i, (w, c) in enumerate(zip(weights, clients, strict=True))]
    averaged = coverage_mean(zero, updates)
    gaps = fedit_gap(clients, weights, SCALE)
    for prefix, mean in _exact_mean(clients, weights).items():
        fedit_product = SCALE * averaged[f"{prefix}.lora_B"].astype(np.float64) @ averaged[f"{prefix}.lora_A"]
        assert gaps[prefix] == pytest.approx(float(np.linalg.norm(mean - fedit_product)), rel=1e-4, abs=1e-4)


# (g) FFA-LoRA: A frozen, B averaged, and then the product average is exact
@PROPERTY
@given(st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_ffa_keeps_a_and_is_exact(seed, n) -> None:
    rng = np.random.default_rng(seed)
    glob = _client(rng, {"q": (5, 6)}, 3) | {"head.weight": np.ones((2, 6), np.float32)}
    clients: list[Factors] = [
        {
            "q.lora_A": glob["q.lora_A"] + np.float32(1e-3),
            "q.lora_B": rng.standard_normal((5, 3)).astype(np.float32),
        }
        for _ in range(n)
    ]
    weights = [int(w) for w in rng.integers(1, 50, size=n)]
    new = ffa_aggregate(glob, clients, weights)
    assert set(new) == {"q.lora_A", "q.lora_B"}
    np.testing.assert_array_equal(new["q.lora_A"], glob["q.lora_A"])
    exact = np.zeros((5, 6))
    for w, c in zip(weights, clients, strict=True):
        exact += (w / sum(weights)) * c["q.lora_B"].astype(np.float64) @ glob["q.lora_A"].astype(np.float64)
    _close(new["q.lora_B"].astype(np.float64) @ new["q.lora_A"], exact)


def test_ffa_averages_b_columns_over_the_clients_that_cover_them() -> None:
    glob = {"q.lora_A": np.ones((3, 4), np.float32), "q.lora_B": np.full((2, 3), 7.0, np.float32)}
    small = {"q.lora_B": np.full((2, 1), 1.0, np.float32)}
    large = {"q.lora_B": np.full((2, 2), 4.0, np.float32)}
    new = ffa_aggregate(glob, [small, large], [1, 3])
    np.testing.assert_allclose(new["q.lora_B"][:, 0], 0.25 * 1.0 + 0.75 * 4.0)
    np.testing.assert_allclose(new["q.lora_B"][:, 1], 4.0)
    np.testing.assert_allclose(new["q.lora_B"][:, 2], 7.0)  # nobody covered it: the global value stays


def test_lora_pairs_by_name() -> None:
    names = ["a.q.lora_A", "a.q.lora_B", "p.lora_A.weight", "p.lora_B.weight", "head.weight", "x.lora_Aux"]
    assert lora_pairs(names) == {
        "a.q": ("a.q.lora_A", "a.q.lora_B"),
        "p": ("p.lora_A.weight", "p.lora_B.weight"),
    }
    assert lora_pairs(["head.weight"]) == {}
    with pytest.raises(ShapeMismatch, match="no matching lora_B"):
        lora_pairs(["q.lora_A"])
    with pytest.raises(ShapeMismatch, match="no matching lora_A"):
        lora_pairs(["q.lora_B"])
    with pytest.raises(ShapeMismatch, match="different name styles"):
        lora_pairs(["q.lora_A", "q.lora_B.weight"])


def _good() -> Factors:
    return _client(np.random.default_rng(3), {"q": (4, 5)}, 2)


@pytest.mark.parametrize(
    ("clients", "weights", "ranks", "residual", "error", "match"),
    [
        ([], [], [1], None, ConfigError, "zero clients"),
        ([_good()], [1, 2], [1], None, ConfigError, "2 weights for 1 clients"),
        ([_good()], [0], [1], None, ConfigError, "weight of client 0 must be positive"),
        ([_good()], [-3], [1], None, ConfigError, "must be positive"),
        ([_good()], [float("nan")], [1], None, ConfigError, "must be positive and finite"),
        ([_good()], [1], [5], None, ConfigError, r"rank 5 exceeds min\(out, in\) = 4"),
        ([_good()], [1], [0], None, ConfigError, "positive integers"),
        ([_good()], [1], [], None, ConfigError, "at least one rank"),
        ([{"head.weight": np.ones((2, 2))}], [1], [1], None, ConfigError, "no LoRA pairs"),
        ([{"q.lora_A": np.ones((2, 5))}], [1], [1], None, ShapeMismatch, "no matching lora_B"),
        (
            [{"q.lora_A": np.ones((2, 5)), "q.lora_B": np.ones((4, 3))}],
            [1],
            [1],
            None,
            ShapeMismatch,
            "A has rank 2",
        ),
        (
            [_good(), _client(np.random.default_rng(4), {"q": (4, 6)}, 2)],
            [1, 1],
            [1],
            None,
            ShapeMismatch,
            "maps",
        ),
        ([_good() | {"q.lora_A": np.full((2, 5), np.nan)}], [1], [1], None, NonFinite, "NaN"),
        ([_good()], [1], [1], {"q": np.ones((5, 4))}, ShapeMismatch, "residual of 'q'"),
        ([_good()], [1], [1], {"q": np.full((4, 5), np.inf)}, NonFinite, "residual"),
    ],
)
def test_bad_inputs_raise(clients, weights, ranks, residual, error, match) -> None:
    with pytest.raises(error, match=match):
        exact_aggregate(clients, weights, ranks, SCALE, residual)


def test_bad_inputs_raise_in_the_baselines() -> None:
    with pytest.raises(ConfigError, match="scale must be positive"):
        exact_aggregate([_good()], [1], [1], 0.0)
    with pytest.raises(ConfigError, match="scale must be positive"):
        fedit_gap([_good()], [1], -1.0)
    with pytest.raises(NonFinite):
        fedit_gap([_good() | {"q.lora_B": np.full((4, 2), np.nan)}], [1], SCALE)
    with pytest.raises(ConfigError, match="must be positive"):
        ffa_aggregate(_good(), [_good()], [0])
    with pytest.raises(ShapeMismatch, match="the global is"):
        ffa_aggregate(_good(), [{"q.lora_B": np.ones((4, 3))}], [1])
    with pytest.raises(ConfigError, match="no LoRA pairs"):
        ffa_aggregate({"head.weight": np.ones((2, 2))}, [_good()], [1])


def test_result_is_a_frozen_value() -> None:
    result = exact_aggregate([_good()], [1], [1, 2], SCALE)
    assert isinstance(result, ExactAggregate)
    with pytest.raises(AttributeError):
        result.residual = {}  # type: ignore[misc]
    with pytest.raises(ConfigError, match="no LoRA pair 'v'"):
        result.product("v", 1, SCALE)
