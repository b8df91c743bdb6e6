"""Properties of the aggregation rules (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.aggregation import (
    ClientUpdate,
    clip_update,
    coordinate_median,
    fedit,
    head_from_class_means,
    sample_weights,
    sum_class_statistics,
    trimmed_mean,
)
from broker_server.strategies import get_strategy
from edge_runtime.errors import ConfigError

SHAPES = {"l0.lora_A": (2, 5), "l0.lora_B": (5, 2), "head.weight": (3, 5), "head.bias": (3,)}


def _state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


@st.composite
def federations(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], list[ClientUpdate]]:
    seed = draw(st.integers(0, 2**31 - 1))
    n = draw(st.integers(1, 6))
    samples = draw(st.lists(st.integers(1, 500), min_size=n, max_size=n))
    rng = np.random.default_rng(seed)
    updates = [ClientUpdate(f"d{i}", s, _state(rng)) for i, s in enumerate(samples)]
    return _state(rng), updates


@settings(max_examples=60, deadline=None)
@given(federations(), st.randoms())
def test_fedit_does_not_depend_on_client_order(fed, rnd) -> None:
    global_state, updates = fed
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    a, b = fedit(global_state, updates), fedit(global_state, shuffled)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(federations())
def test_fedit_is_the_sample_weighted_mean_of_client_modules(fed) -> None:
    global_state, updates = fed
    new = fedit(global_state, updates)
    n = np.array([u.num_samples for u in updates], dtype=np.float64)
    for k in global_state:
        clients = np.stack([global_state[k] + u.delta[k] for u in updates]).astype(np.float64)
        expected = np.tensordot(n / n.sum(), clients, axes=1)
        np.testing.assert_allclose(new[k], expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(federations())
def test_one_client_returns_its_own_module(fed) -> None:
    global_state, updates = fed
    only = updates[0]
    new = fedit(global_state, [only])
    for k in global_state:
        np.testing.assert_allclose(new[k], global_state[k] + only.delta[k], rtol=1e-5, atol=1e-6)


def test_fedit_leaves_inputs_untouched() -> None:
    rng = np.random.default_rng(0)
    g = _state(rng)
    before = {k: v.copy() for k, v in g.items()}
    fedit(g, [ClientUpdate("a", 3, _state(rng))])
    for k in g:
        np.testing.assert_array_equal(g[k], before[k])


def test_zero_updates_and_unknown_strategy_are_errors() -> None:
    with pytest.raises(ConfigError):
        fedit({}, [])
    with pytest.raises(ConfigError, match="unknown strategy"):
        get_strategy("nope")


def test_the_registry_resolves_every_stateless_name_and_refuses_the_stateful_ones() -> None:
    from broker_server.heterogeneous import hetlora_mean
    from broker_server.strategies import STATEFUL_STRATEGIES, STRATEGIES, check_strategy

    assert get_strategy("hetlora") is hetlora_mean
    assert get_strategy("fedavg") is get_strategy("fedit") is fedit
    assert get_strategy("median") is coordinate_median and get_strategy("trimmed_mean") is trimmed_mean
    assert set(STRATEGIES) == {"fedit", "fedavg", "median", "trimmed_mean", "layerwise"}
    for name in STATEFUL_STRATEGIES:
        check_strategy(name)
        with pytest.raises(ConfigError, match="the service runs it"):
            get_strategy(name)


def test_sample_weights_fall_back_to_uniform() -> None:
    ups = [ClientUpdate("a", 0, {}), ClientUpdate("b", 0, {})]
    np.testing.assert_allclose(sample_weights(ups), [0.5, 0.5])


def test_class_mean_head_is_a_nearest_normalised_mean_classifier() -> None:
    rng = np.random.default_rng(1)
    means = rng.standard_normal((4, 8))
    counts = np.array([3.0, 5.0, 2.0, 0.0])
    sums = means * counts[:, None]
    head = head_from_class_means(sums, counts, scale=10.0)
    w = head["head.weight"]
    np.testing.assert_allclose(np.linalg.norm(w[:3], axis=1), 10.0, rtol=1e-5)
    np.testing.assert_array_equal(w[3], 0.0)  # a class nobody has seen gets no row
    x = means[1] / np.linalg.norm(means[1])
    assert int(np.argmax(w @ x + head["head.bias"])) == 1


def test_class_statistics_add_up_over_clients() -> None:
    a = ClientUpdate(
        "a", 2, {"stats.class_sums": np.ones((2, 3)), "stats.class_counts": np.array([1.0, 1.0])}
    )
    b = ClientUpdate(
        "b", 1, {"stats.class_sums": 2 * np.ones((2, 3)), "stats.class_counts": np.array([0.0, 1.0])}
    )
    sums, counts = sum_class_statistics([a, b])
    np.testing.assert_allclose(sums, 3.0)
    np.testing.assert_allclose(counts, [1.0, 2.0])


ROBUST = [coordinate_median, trimmed_mean]


@settings(max_examples=40, deadline=None)
@given(federations(), st.randoms())
def test_robust_rules_do_not_depend_on_client_order(fed, rnd) -> None:
    global_state, updates = fed
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    for rule in ROBUST:
        a, b = rule(global_state, updates), rule(global_state, shuffled)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(federations())
def test_robust_rules_with_one_client_return_its_module(fed) -> None:
    global_state, updates = fed
    for rule in ROBUST:
        new = rule(global_state, updates[:1])
        for k in global_state:
            np.testing.assert_allclose(new[k], global_state[k] + updates[0].delta[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attack", [1e4, -1.0])
def test_two_attackers_of_eight_stay_inside_the_honest_range(attack: float) -> None:
    rng = np.random.default_rng(7)
    g = _state(rng)
    honest = [
        ClientUpdate(
            f"h{i}", 100, {k: 0.01 * rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        )
        for i in range(6)
    ]
    attackers = [
        ClientUpdate(f"a{i}", 10_000, {k: attack * 10 * np.ones(s, np.float32) for k, s in SHAPES.items()})
        for i in range(2)
    ]
    for rule in ROBUST:
        new = rule(g, honest + attackers)
        for k in g:
            lo = g[k] + np.min([u.delta[k] for u in honest], axis=0)
            hi = g[k] + np.max([u.delta[k] for u in honest], axis=0)
            assert np.all(new[k] >= lo - 1e-5) and np.all(new[k] <= hi + 1e-5), rule.__name__
    plain = fedit(g, honest + attackers)
    assert max(float(np.abs(plain[k] - g[k]).max()) for k in g) > 1.0  # averaging is dragged away


def test_clipping_bounds_the_norm_and_keeps_direction() -> None:
    u = ClientUpdate("a", 1, {"x": np.array([3.0, 4.0], np.float32)})
    c = clip_update(u, 1.0)
    np.testing.assert_allclose(c.delta["x"], [0.6, 0.8], rtol=1e-6)
    assert clip_update(u, 10.0) is u
    with pytest.raises(ConfigError):
        trimmed_mean({}, [u], trim=0.5)


def test_robust_head_ignores_a_minority_of_flipped_statistics() -> None:
    from broker_server.aggregation import robust_head_from_statistics

    rng = np.random.default_rng(3)
    truth = rng.standard_normal((3, 16))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)

    def stats(sign: float) -> ClientUpdate:
        noisy = truth + 0.1 * rng.standard_normal(truth.shape)
        unit = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
        return ClientUpdate(
            "c", 30, {"stats.class_sums": sign * 10 * unit, "stats.class_counts": np.full(3, 10.0)}
        )

    updates = [stats(1.0) for _ in range(6)] + [stats(-1.0) for _ in range(2)]
    for rule in ("median", "trimmed_mean"):
        head = robust_head_from_statistics(updates, scale=1.0, rule=rule)["head.weight"]
        cos = np.sum(head * truth, axis=1) / np.linalg.norm(head, axis=1)
        assert np.all(cos > 0.95), (rule, cos)
    sums, counts = sum_class_statistics(updates)
    plain = head_from_class_means(sums, counts, scale=1.0)["head.weight"]
    assert np.all(
        np.sum(plain * truth, axis=1) < np.sum(head * truth, axis=1)
    )  # the plain sum is pulled away


def test_screening_keeps_flipped_statistics_out_when_few_clients_hold_a_class() -> None:
    """Label skew: a class held by one honest and one flipped client, where a median cannot help."""
    from broker_server.aggregation import robust_head_from_statistics

    rng = np.random.default_rng(5)
    common = rng.standard_normal(32)
    common /= np.linalg.norm(common)
    truth = common + 0.8 * rng.standard_normal((4, 32)) / np.sqrt(32)  # anisotropic, like an encoder's
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)

    def stats(held: list[int], sign: float) -> ClientUpdate:
        counts = np.zeros(4)
        counts[held] = 5.0
        return ClientUpdate(
            "c", 10, {"stats.class_sums": sign * counts[:, None] * truth, "stats.class_counts": counts}
        )

    # class 3 is held by one honest client and one attacker only
    updates = [stats([0, 1], 1.0), stats([1, 2], 1.0), stats([0, 2], 1.0), stats([3], 1.0)]
    updates += [stats([0, 3], -1.0)]
    for rule in ("median", "trimmed_mean"):
        head = robust_head_from_statistics(updates, scale=1.0, rule=rule)["head.weight"]
        cos = np.sum(head * truth, axis=1) / np.linalg.norm(head, axis=1)
        assert np.all(cos > 0.99), (rule, cos)
        unscreened = robust_head_from_statistics(updates, scale=1.0, rule=rule, min_cosine=-2.0)[
            "head.weight"
        ]
        assert np.linalg.norm(unscreened[3]) < 0.5  # without screening: the median of +v and -v is ~0


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.1, 4.0), st.floats(0.0, 0.95))
def test_server_momentum_is_the_rule_itself_at_lr_1_and_accumulates_a_steady_step(
    seed: int, lr: float, beta: float
) -> None:
    from broker_server.aggregation import server_momentum_step

    rng = np.random.default_rng(seed)
    old = {
        "a": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
    }
    step = {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in old.items()}
    agg = {k: old[k] + step[k] for k in old}
    plain, _ = server_momentum_step(old, agg, {}, lr=1.0, beta=0.0)
    for k in old:
        np.testing.assert_array_equal(plain[k], agg[k])
    # two rounds with the same pseudo-gradient g: old + lr g, then + lr (beta g + g)
    first, m = server_momentum_step(old, agg, {}, lr=lr, beta=beta)
    agg2 = {k: first[k] + step[k] for k in old}
    second, _ = server_momentum_step(first, agg2, m, lr=lr, beta=beta)
    for k in old:
        g = agg2[k].astype(np.float64) - first[k]
        np.testing.assert_allclose(second[k], first[k] + lr * (beta * m[k] + g), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(first[k], old[k] + lr * step[k].astype(np.float64), rtol=1e-5, atol=1e-5)
