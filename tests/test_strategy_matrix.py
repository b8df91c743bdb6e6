"""Every registered strategy through the same properties (issue 12), as peft tests every method.

Each name of :func:`broker_server.strategies.registered_strategies` is built with
:func:`~broker_server.strategies.build_strategy` for one LoRA module and run on federations drawn
by Hypothesis: the result does not depend on the order of the clients; one client of weight 1 gets
its module back; inputs are not mutated; outputs are finite; and the carry (the exact strategy's
residual, empty for the others) survives the checkpoint's encoding, so a restarted service
aggregates the next round as the one before it would have. The registered wrappers
(:mod:`broker_server.strategy_wrappers`: clipping, DP-FedAvg's release) run through the same
properties around the strategies they take, with a clip norm that no update reaches and no noise, so
that the identities hold; what they add is tested on its own below.

Modules are compared as functions: a LoRA pair by its product B A (the exact strategy
re-factorizes, and SVD factors are unique only up to sign), every other tensor as is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.aggregation import ClientUpdate, server_momentum_step
from broker_server.checkpoint import decode_carry, encode_carry
from broker_server.exact import lora_pairs
from broker_server.privacy import DPFedAvg
from broker_server.strategies import StrategyRule, build_strategy, registered_strategies
from broker_server.strategy_wrappers import MOMENTUM_PREFIX, NO_MOMENTUM, WRAPPERS, split_carry, wrap
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import LoraSpec

RANK = 2
SPEC = LoraSpec(rank=RANK, alpha=4.0, train_a=False)
PROPERTY = settings(max_examples=25, deadline=None)
Arrays = dict[str, np.ndarray]


NO_CLIP = 1e6
"""A clip norm no update of these federations reaches."""
SILENT = DPFedAvg(clip_norm=NO_CLIP, noise_multiplier=0.0, sample_rate=1.0, fleet_size=1)
"""DP-FedAvg without noise over a fleet of one: the release is the state plus the sum of the deltas."""


def _clipped(name: str) -> Callable[[], StrategyRule]:
    return lambda: wrap("clip", build_strategy(name, SPEC), clip_norm=NO_CLIP)


def _momentum(name: str) -> Callable[[], StrategyRule]:
    # lr 1: the first round from an empty momentum is the inner rule's step itself
    return lambda: wrap("fedavgm", build_strategy(name, SPEC), lr=1.0, beta=0.5)


def _silent_dp() -> StrategyRule:
    return wrap("dp", build_strategy("fedit"), mechanism=SILENT, noise=lambda: np.random.default_rng(0))


WRAPPED: dict[str, Callable[[], StrategyRule]] = {
    **{f"clip({n})": _clipped(n) for n in registered_strategies()},
    **{f"fedavgm({n})": _momentum(n) for n in registered_strategies() if n not in NO_MOMENTUM},
    "dp(fedit)": _silent_dp,
}
"""Each registered wrapper around the strategies it takes, by the name of the rule it builds."""

MATRIX = [*registered_strategies(), *WRAPPED]


def _rule(name: str) -> StrategyRule:
    if name in WRAPPED:
        return WRAPPED[name]()
    return build_strategy(name, SPEC)


@st.composite
def federations(draw: Any, ffa: bool = False) -> tuple[Arrays, list[ClientUpdate]]:
    """A global LoRA module (one or two pairs and a head) and one to five clients' updates."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    state: Arrays = {}
    for i in range(draw(st.integers(1, 2))):
        rows, cols = draw(st.integers(2, 6)), draw(st.integers(2, 6))
        state[f"layer.{i}.query.lora_A"] = rng.normal(size=(RANK, cols)).astype(np.float32)
        state[f"layer.{i}.query.lora_B"] = rng.normal(size=(rows, RANK)).astype(np.float32)
    state["head.weight"] = rng.normal(size=(3, 4)).astype(np.float32)
    updates = []
    for c in range(draw(st.integers(1, 5))):
        delta = {k: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in state.items()}
        if ffa:  # FFA-LoRA devices never move A
            delta = {k: np.zeros_like(v) if k.endswith("lora_A") else v for k, v in delta.items()}
        updates.append(ClientUpdate(f"c{c}", draw(st.integers(1, 50)), delta))
    return state, updates


def _federation(name: str) -> Any:
    return federations(ffa=name.split("(")[-1].rstrip(")") == "ffa")


def function_of(state: Mapping[str, np.ndarray]) -> Arrays:
    """The module as a function: each LoRA pair's product, every other tensor as it is."""
    pairs = lora_pairs(state)
    lora = {n for pair in pairs.values() for n in pair}
    out = {k: np.asarray(v, np.float64) for k, v in state.items() if k not in lora}
    for prefix, (a, b) in pairs.items():
        out[prefix] = np.asarray(state[b], np.float64) @ np.asarray(state[a], np.float64)
    return out


def assert_close(x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray], tol: float = 1e-4) -> None:
    assert set(x) == set(y)
    for k in x:
        np.testing.assert_allclose(x[k], y[k], rtol=tol, atol=tol, err_msg=k)


def test_the_matrix_covers_every_registered_name() -> None:
    names = registered_strategies()
    assert {"fedit", "fedavg", "median", "trimmed_mean", "layerwise", "hetlora", "exact", "ffa"} <= set(names)
    assert [_rule(n).name for n in names] == names
    with pytest.raises(ConfigError, match="unknown strategy"):
        build_strategy("nope", SPEC)
    with pytest.raises(ConfigError, match="LoraSpec"):
        build_strategy("exact", None)
    # every wrapper is in the matrix, and each wrapped rule says what it wraps
    assert {name.split("(")[0] for name in WRAPPED} == set(WRAPPERS)
    assert all(_rule(name).name == name for name in WRAPPED)


def test_the_clip_wrapper_gives_its_inner_rule_the_clipped_updates() -> None:
    rng = np.random.default_rng(0)
    state = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
    updates = [
        ClientUpdate(f"c{i}", 1 + i, {"w": (10.0 * rng.normal(size=(3, 4))).astype(np.float32)})
        for i in range(3)
    ]
    small = [
        ClientUpdate(u.device_id, u.num_samples, {"w": u.delta["w"] / np.linalg.norm(u.delta["w"])})
        for u in updates
    ]
    wrapped, _ = wrap("clip", build_strategy("fedit"), clip_norm=1.0).aggregate(state, updates)
    by_hand, _ = build_strategy("fedit").aggregate(state, small)
    np.testing.assert_allclose(wrapped["w"], by_hand["w"], rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(wrapped["w"] - state["w"]) <= 1.0 + 1e-5  # a mean of clipped steps
    unclipped, _ = build_strategy("fedit").aggregate(state, updates)
    assert np.linalg.norm(unclipped["w"] - state["w"]) > 2.0  # so the wrapper did clip
    # the inner rule's carry passes through (exact keeps its residual)
    assert wrap("clip", build_strategy("exact", SPEC), clip_norm=1.0).keeps_carry


def test_the_dp_wrapper_is_dp_fedavg_s_release_and_refuses_a_rule_it_cannot_stand_in_for() -> None:
    rng = np.random.default_rng(1)
    state = {"w": rng.normal(size=(5,)).astype(np.float32)}
    updates = [ClientUpdate(f"c{i}", 7, {"w": rng.normal(size=(5,)).astype(np.float32)}) for i in range(3)]
    mechanism = DPFedAvg(clip_norm=0.5, noise_multiplier=1.0, sample_rate=0.5, fleet_size=8)
    rule = wrap("dp", build_strategy("fedit"), mechanism=mechanism, noise=lambda: np.random.default_rng(3))
    released, carry = rule.aggregate(state, updates)
    np.testing.assert_array_equal(
        released["w"], mechanism.aggregate(state, updates, np.random.default_rng(3))["w"]
    )
    again, _ = rule.aggregate(state, list(reversed(updates)))
    np.testing.assert_allclose(again["w"], released["w"], rtol=1e-6)  # fresh noise of the same key
    assert carry == {}
    with pytest.raises(ConfigError, match="dp around --strategy median"):
        wrap("dp", build_strategy("median"), mechanism=mechanism, noise=lambda: np.random.default_rng(3))
    with pytest.raises(ConfigError, match="unknown strategy wrapper"):
        wrap("distill", build_strategy("fedit"))


def test_the_fedavgm_wrapper_is_a_server_momentum_step_over_its_inner_rule_and_keeps_the_inner_carry() -> (
    None
):
    rng = np.random.default_rng(2)
    state = {"w": rng.normal(size=(4,)).astype(np.float32)}
    rounds = [
        [ClientUpdate(f"c{i}", 1 + i, {"w": rng.normal(size=(4,)).astype(np.float32)}) for i in range(3)]
    ]
    rounds.append([ClientUpdate(u.device_id, u.num_samples, {"w": 2 * u.delta["w"]}) for u in rounds[0]])
    rule = wrap("fedavgm", build_strategy("median"), lr=0.5, beta=0.9)
    assert rule.name == "fedavgm(median)" and rule.keeps_carry
    carry: dict[str, np.ndarray] = {}
    momentum: dict[str, np.ndarray] = {}
    here, by_hand = state, state
    for updates in rounds:
        here, carry = rule.aggregate(here, updates, carry)
        inner, _ = build_strategy("median").aggregate(by_hand, updates)
        by_hand, momentum = server_momentum_step(by_hand, inner, momentum, lr=0.5, beta=0.9)
        np.testing.assert_allclose(here["w"], by_hand["w"], rtol=1e-6)
    assert set(carry) == {MOMENTUM_PREFIX + "w"}
    np.testing.assert_allclose(carry[MOMENTUM_PREFIX + "w"], momentum["w"])
    # the second round's momentum made it differ from the plain rule's step
    plain, _ = build_strategy("median").aggregate(state, rounds[0])
    plain, _ = build_strategy("median").aggregate(plain, rounds[1])
    assert not np.allclose(plain["w"], here["w"], atol=1e-4)
    # the name says what it wraps; exact (bare or clipped) is refused
    wrapped_clip = wrap("fedavgm", wrap("clip", build_strategy("ffa", SPEC), clip_norm=1.0), lr=1.0, beta=0.5)
    assert wrapped_clip.name == "fedavgm(clip(ffa))"
    for refused in (
        build_strategy("exact", SPEC),
        wrap("clip", build_strategy("exact", SPEC), clip_norm=1.0),
    ):
        with pytest.raises(ConfigError, match="re-factorizes"):
            wrap("fedavgm", refused, lr=1.0, beta=0.5)
    with pytest.raises(ConfigError, match="beta"):
        wrap("fedavgm", build_strategy("fedit"), lr=1.0, beta=1.0)


@pytest.mark.parametrize("name", MATRIX)
def test_client_order_does_not_matter(name: str) -> None:
    @PROPERTY
    @given(_federation(name), st.randoms(use_true_random=False))
    def check(fed: tuple[Arrays, list[ClientUpdate]], rnd: Any) -> None:
        state, updates = fed
        shuffled = list(updates)
        rnd.shuffle(shuffled)
        first, carry1 = _rule(name).aggregate(state, updates)
        second, carry2 = _rule(name).aggregate(state, shuffled)
        assert_close(function_of(first), function_of(second))
        assert_close(carry1, carry2)

    check()


@pytest.mark.parametrize("name", MATRIX)
def test_one_client_of_weight_one_gets_its_module_back(name: str) -> None:
    @PROPERTY
    @given(_federation(name))
    def check(fed: tuple[Arrays, list[ClientUpdate]]) -> None:
        state, updates = fed
        alone = ClientUpdate("solo", 1, updates[0].delta)
        own = {
            k: np.asarray(v, np.float64) + np.asarray(alone.delta[k], np.float64) for k, v in state.items()
        }
        new, carry = _rule(name).aggregate(state, [alone])
        assert_close(function_of(new), function_of(own))
        owed, _ = split_carry(carry)  # FedAvgM's momentum is a step taken, not a debt
        for value in owed.values():  # nothing is owed when one module of the global rank is sent
            assert float(np.abs(value).max(initial=0.0)) < 1e-4

    check()


@pytest.mark.parametrize("name", MATRIX)
def test_inputs_are_not_mutated_and_outputs_are_finite(name: str) -> None:
    @PROPERTY
    @given(_federation(name))
    def check(fed: tuple[Arrays, list[ClientUpdate]]) -> None:
        state, updates = fed
        state_before, updates_before = copy.deepcopy(state), copy.deepcopy(updates)
        rule = _rule(name)
        new, carry = rule.aggregate(state, updates)
        again, _ = rule.aggregate(new, updates, carry)
        carry_before = copy.deepcopy(carry)
        rule.aggregate(new, updates, carry)
        for k in state:
            assert np.array_equal(state[k], state_before[k])
        for u, v in zip(updates, updates_before, strict=True):
            assert u.num_samples == v.num_samples and set(u.delta) == set(v.delta)
            assert all(np.array_equal(u.delta[k], v.delta[k]) for k in u.delta)
        assert_close(carry, carry_before, tol=0.0)
        assert set(new) == set(state) and all(new[k].shape == state[k].shape for k in state)
        for out in (new, again, carry):
            assert all(np.all(np.isfinite(v)) for v in out.values())
        assert rule.keeps_carry or not carry

    check()


@pytest.mark.parametrize("name", MATRIX)
def test_the_carry_survives_a_checkpoint_round_trip(name: str) -> None:
    @PROPERTY
    @given(_federation(name), st.integers(0, 10))
    def check(fed: tuple[Arrays, list[ClientUpdate]], round_: int) -> None:
        state, updates = fed
        rule = _rule(name)
        new, carry = rule.aggregate(state, updates)
        restored = decode_carry(encode_carry(round_, name, carry))
        assert set(restored) == set(carry)
        assert_close(restored, carry, tol=1e-5)  # the store keeps carries at 32 bits
        # the next round from the restored carry is the next round the service would have run
        kept, kept_carry = rule.aggregate(new, updates, carry)
        back, back_carry = rule.aggregate(new, updates, restored)
        assert_close(function_of(kept), function_of(back))
        assert_close(kept_carry, back_carry)

    check()
