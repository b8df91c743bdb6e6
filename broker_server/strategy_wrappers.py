"""Strategies around a strategy: clipping and DP-FedAvg's release, as Flower wraps its strategies
(``dp_fixed_clipping.py``) instead of adding branches to the server.

A wrapper takes a built :class:`~broker_server.strategies.StrategyRule` (the inner strategy) and
returns another, with the same ``aggregate(state, updates, carry) -> (state, carry)`` and the inner
rule's carry passed through, so the round controller and the checkpoint treat a wrapped rule as
any other. Wrappers are registered by name (:data:`WRAPPERS`, :func:`wrap`):

- ``clip``: every update is scaled to L2 norm at most ``clip_norm`` before the inner rule sees it.
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

from broker_server.aggregation import ClientUpdate, State, clip_update
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

WRAPPERS: dict[str, Wrapper] = {"clip": clipped, "dp": private}
"""Every registered wrapper, by name; each takes the inner rule and its keyword parameters."""


def wrap(name: str, inner: StrategyRule, **params: Any) -> StrategyRule:
    """The wrapper registered under ``name`` around ``inner``."""
    if name not in WRAPPERS:
        raise ConfigError(f"unknown strategy wrapper {name!r}; known: {', '.join(sorted(WRAPPERS))}")
    return WRAPPERS[name](inner, **params)
