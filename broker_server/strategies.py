"""The strategy registry: every ``--strategy`` name, and the stateless rule behind it.

It sits above the modules that define the rules (:mod:`broker_server.aggregation`,
:mod:`broker_server.heterogeneous`, the service's own ``exact`` and ``ffa``), so that those import
only the types and rules below them and nothing imports in a circle (``tests/test_import_graph.py``).
"""

from __future__ import annotations

from broker_server.aggregation import Strategy, coordinate_median, fedit, layerwise, trimmed_mean
from broker_server.heterogeneous import hetlora_mean
from edge_runtime.errors import ConfigError

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
