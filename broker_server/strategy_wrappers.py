"""Strategies around a strategy: clipping, the server's momentum (FedAvgM) and DP-FedAvg's release,
as Flower wraps its strategies (``dp_fixed_clipping.py``) instead of adding branches to the server.

A wrapper takes a built :class:`~broker_server.strategies.StrategyRule` (the inner strategy) and
returns another, with the same ``aggregate(state, updates, carry) -> (state, carry)`` and the inner
rule's carry passed through, so the round controller and the checkpoint treat a wrapped rule as
any other. Wrappers are registered by name (:data:`WRAPPERS`, :func:`wrap`):

- ``clip``: every update is scaled to L2 norm at most ``clip_norm`` before the inner rule sees it.
- ``fedavgm``: a server optimizer over the inner rule's step (FedAvgM,
  :func:`~broker_server.aggregation.server_momentum_step`): ``m = beta m + (inner - state)``, the
  new state ``state + lr m``. Its momentum travels in the carry under ``server_momentum/`` names,
  beside the inner rule's carry. It refuses ``exact``, whose re-factorized LoRA factors are not a
  step of the previous ones (an SVD's factors are unique only up to sign and rotation).
- ``dp``: DP-FedAvg's release (:class:`~broker_server.privacy.DPFedAvg`): clipped updates summed
  with uniform weights, Gaussian noise, the fixed denominator q N. The fixed-denominator sum *is*
  the mean, so only an inner rule whose mean it replaces is accepted (``fedit``/``fedavg``); any
  other inner rule is refused with a :class:`ConfigError` naming the combination. The noise comes
  from ``noise()``, a generator drawn afresh for each call (the service keys it by round).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from broker_server.aggregation import ClientUpdate, State, clip_update, server_momentum_step
from broker_server.privacy import DPFedAvg
from broker_server.strategies import Carry, StrategyRule
from edge_runtime.errors import ConfigError

DP_INNER = ("fedit", "fedavg")
"""Inner strategies DP-FedAvg's fixed-denominator sum may stand in for."""


def clipped(inner: StrategyRule, *, clip_norm: float) -> StrategyRule:
    """``inner`` on the updates, each scaled to L2 norm at most ``clip_norm`` first."""
    if not clip_norm > 0:
        raise ConfigError(f"clip: clip_norm must be positive, got {clip_norm}")

    def step(
        state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], carry: Carry
    ) -> tuple[State, Carry]:
        return inner.aggregate(state, [clip_update(u, clip_norm) for u in updates], carry)

    return StrategyRule(f"clip({inner.name})", step, keeps_carry=inner.keeps_carry)


MOMENTUM_PREFIX = "server_momentum/"
"""Where FedAvgM's momentum sits in a carry: ``server_momentum/<tensor>``."""

NO_MOMENTUM = ("exact",)
"""Inner rules FedAvgM refuses: their new state is not a step of the old one."""


def split_carry(carry: Carry) -> tuple[Carry, Carry]:
    """A carry as (the inner rule's part, FedAvgM's momentum by tensor name)."""
    inner = {k: v for k, v in carry.items() if not k.startswith(MOMENTUM_PREFIX)}
    momentum = {k[len(MOMENTUM_PREFIX) :]: v for k, v in carry.items() if k.startswith(MOMENTUM_PREFIX)}
    return inner, momentum


def join_carry(inner: Carry, momentum: Mapping[str, np.ndarray]) -> Carry:
    """The carry :func:`split_carry` takes apart."""
    return {**inner, **{MOMENTUM_PREFIX + k: v for k, v in momentum.items()}}


def with_momentum(inner: StrategyRule, *, lr: float, beta: float) -> StrategyRule:
    """FedAvgM over ``inner``'s step (see the module docstring)."""
    if inner.name.split("(")[-1].rstrip(")") in NO_MOMENTUM:
        raise ConfigError(
            f"--server-lr/--server-momentum around --strategy {inner.name} is not supported: it "
            "re-factorizes the LoRA pairs each round, so the change of the factors is no step to "
            "take with momentum"
        )
    if not lr > 0 or not 0 <= beta < 1:
        raise ConfigError(f"fedavgm: lr must be positive and beta in [0, 1), got {lr}, {beta}")

    def step(
        state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], carry: Carry
    ) -> tuple[State, Carry]:
        own, momentum = split_carry(carry)
        after, own = inner.aggregate(state, updates, own)
        new, momentum = server_momentum_step(state, after, momentum, lr=lr, beta=beta)
        return new, join_carry(own, momentum)

    return StrategyRule(f"fedavgm({inner.name})", step, keeps_carry=True)


def private(
    inner: StrategyRule, *, mechanism: DPFedAvg, noise: Callable[[], np.random.Generator]
) -> StrategyRule:
    """DP-FedAvg's release in place of ``inner``'s mean (see the module docstring)."""
    if inner.name not in DP_INNER:
        raise ConfigError(
            f"dp around --strategy {inner.name} is not supported: DP-FedAvg releases a "
            f"fixed-denominator sum, which stands in for {' or '.join(DP_INNER)} only"
        )

    def step(
        state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], carry: Carry
    ) -> tuple[State, Carry]:
        return mechanism.aggregate(state, updates, noise()), dict(carry)

    return StrategyRule(f"dp({inner.name})", step, keeps_carry=inner.keeps_carry)


Wrapper = Callable[..., StrategyRule]

WRAPPERS: dict[str, Wrapper] = {"clip": clipped, "fedavgm": with_momentum, "dp": private}
"""Every registered wrapper, by name; each takes the inner rule and its keyword parameters."""


def wrap(name: str, inner: StrategyRule, **params: Any) -> StrategyRule:
    """The wrapper registered under ``name`` around ``inner``."""
    if name not in WRAPPERS:
        raise ConfigError(f"unknown strategy wrapper {name!r}; known: {', '.join(sorted(WRAPPERS))}")
    return WRAPPERS[name](inner, **params)
