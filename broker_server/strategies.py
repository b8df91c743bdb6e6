"""The strategy registry: every ``--strategy`` name, and the rule behind it.

It sits above the modules that define the rules (:mod:`broker_server.aggregation`,
:mod:`broker_server.heterogeneous`, :mod:`broker_server.exact`), so that those import only the
types and rules below them and nothing imports in a circle (``tests/test_import_graph.py``).

Every registered name builds one :class:`StrategyRule` with :func:`build_strategy`:
``aggregate(state, updates, carry) -> (state, carry)``, pure, where the carry is what the rule keeps
between rounds (the exact strategy's residual; empty for the stateless rules), an array map the
checkpoint stores the same way for every rule (:mod:`broker_server.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from broker_server.aggregation import (
    ClientUpdate,
    State,
    Strategy,
    coordinate_median,
    fedit,
    layerwise,
    trimmed_mean,
)
from broker_server.exact import exact_fedavg, ffa_fedavg
from broker_server.heterogeneous import hetlora_mean
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import LoraSpec, PeftSpec

Carry = dict[str, np.ndarray]
"""What a rule keeps between rounds (its name -> array); empty for the stateless rules."""

STRATEGIES: dict[str, Strategy] = {
    "fedit": fedit,
    "fedavg": fedit,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "layerwise": layerwise,
}
"""Strategies for modules of one shape, by ``--strategy`` name; ``fedavg`` is an alias of ``fedit``
for LoRA."""

HETEROGENEOUS_STRATEGIES: dict[str, Strategy] = {"hetlora": hetlora_mean}
"""Stateless strategies for modules of different ranks (:mod:`broker_server.heterogeneous`)."""

STATEFUL_STRATEGIES = ("exact", "ffa")
"""Strategies the service runs itself, since they need to know the module's LoRA pairs
(``exact``: :func:`broker_server.exact.exact_fedavg`, with its residual in the state store;
``ffa``: :func:`broker_server.exact.ffa_fedavg`, stateless but for a fleet whose A is frozen)."""

ROBUST_STRATEGIES = ("median", "trimmed_mean")
"""Strategies that a minority of lying clients cannot steer; the service combines the class-mean
head robustly for them too (:func:`broker_server.aggregation.robust_head_from_statistics`)."""


def check_strategy(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a known strategy, stateless or stateful."""
    if name not in STRATEGIES and name not in STATEFUL_STRATEGIES and name not in HETEROGENEOUS_STRATEGIES:
        known = ", ".join(sorted([*STRATEGIES, *STATEFUL_STRATEGIES, *HETEROGENEOUS_STRATEGIES]))
        raise ConfigError(f"unknown strategy {name!r}; known: {known}")


def get_strategy(name: str) -> Strategy:
    """The stateless strategy registered under ``name``."""
    check_strategy(name)
    if name in HETEROGENEOUS_STRATEGIES:
        return HETEROGENEOUS_STRATEGIES[name]
    if name not in STRATEGIES:
        raise ConfigError(
            f"strategy {name!r} keeps state between rounds or needs the LoRA pairs: the service runs it"
        )
    return STRATEGIES[name]


def register_strategy(name: str, rule: Strategy, *, heterogeneous: bool = False) -> None:
    """Add a stateless aggregation rule under ``--strategy name``.

    ``rule(state, updates) -> state`` must be pure: the new global module from the current one and
    the round's :class:`~broker_server.aggregation.ClientUpdate` list, without mutating either
    (``tests/test_strategy_matrix.py`` states the properties every rule keeps). ``heterogeneous``
    rules take modules of different ranks (as ``hetlora``). Clipping, FedAvgM, clusters and
    distillation wrap a registered rule as they wrap the built-in ones (DP-FedAvg replaces the rule
    with its own). A name that is taken, or not a plain identifier, is
    refused: the built-in rules cannot be replaced. Register before building the service (or
    calling ``fedpeft``'s ``main``) in the same process.
    """
    if not name.isidentifier():
        raise ConfigError(f"a strategy name is a plain identifier, got {name!r}")
    if name in registered_strategies():
        raise ConfigError(f"strategy {name!r} is already registered")
    if not callable(rule):
        raise ConfigError(f"strategy {name!r}: the rule must be callable, got {type(rule).__name__}")
    if heterogeneous:
        HETEROGENEOUS_STRATEGIES[name] = rule
    else:
        STRATEGIES[name] = rule


def registered_strategies() -> list[str]:
    """Every ``--strategy`` name, sorted."""
    return sorted([*STRATEGIES, *STATEFUL_STRATEGIES, *HETEROGENEOUS_STRATEGIES])


@dataclass(frozen=True)
class StrategyRule:
    """A registered strategy built for one module: its pure step and whether it keeps a carry."""

    name: str
    step: Callable[[Mapping[str, np.ndarray], Sequence[ClientUpdate], Carry], tuple[State, Carry]]
    keeps_carry: bool = False

    def aggregate(
        self, state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], carry: Carry | None = None
    ) -> tuple[State, Carry]:
        """The new global state and carry from ``state``, the round's ``updates`` and ``carry``."""
        return self.step(state, updates, {} if carry is None else carry)


def stateless(
    rule: Strategy,
) -> Callable[[Mapping[str, np.ndarray], Sequence[ClientUpdate], Carry], tuple[State, Carry]]:
    """A stateless rule as a step that keeps no carry."""

    def step(
        state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], carry: Carry
    ) -> tuple[State, Carry]:
        return rule(state, updates), {}

    return step


def build_strategy(name: str, peft: PeftSpec | None = None) -> StrategyRule:
    """The rule registered under ``name`` for a module of ``peft`` (the LoRA rules need its spec)."""
    check_strategy(name)
    if name == "exact":
        if not isinstance(peft, LoraSpec):
            raise ConfigError("--strategy exact averages LoRA products: it needs the module's LoraSpec")
        scale = peft.alpha / peft.rank

        def exact_step(
            state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], carry: Carry
        ) -> tuple[State, Carry]:
            return exact_fedavg(state, updates, scale, carry or None)

        return StrategyRule(name, exact_step, keeps_carry=True)
    if name == "ffa":
        return StrategyRule(name, stateless(ffa_fedavg))
    return StrategyRule(name, stateless(get_strategy(name)))
