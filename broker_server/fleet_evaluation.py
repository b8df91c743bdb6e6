"""The fleet's global model, measured: the initial state and the test figures, for a uniform fleet,
a clustered one (one module per cluster) or a mixed one (one view per PEFT kind, weighted by the
devices that train it)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from broker_server.allocation import Allocator
from broker_server.cluster_groups import ClusterGroups
from broker_server.evaluation import ModelEvaluator
from broker_server.heterogeneous import view
from broker_server.records import weighted
from broker_server.registry import DeviceRecord
from edge_runtime.config import TrainConfig
from edge_runtime.engines.base import EvalResult


def initial_state(
    evaluator: ModelEvaluator, allocator: Allocator | None, train: TrainConfig
) -> dict[str, np.ndarray]:
    """The first global state: the configured module's, or in a mixed fleet the union of every
    kind's largest module, and one head."""
    if allocator is None:
        return evaluator.initial_state()
    state: dict[str, np.ndarray] = {}
    for cfg in allocator.largest(train):
        for name, value in evaluator.initial_state(cfg).items():
            state.setdefault(name, value)
    return state


def evaluate_fleet(
    state: Mapping[str, np.ndarray],
    evaluator: ModelEvaluator,
    *,
    train: TrainConfig,
    clusters: ClusterGroups | None = None,
    allocator: Allocator | None = None,
    devices: Iterable[DeviceRecord] = (),
) -> tuple[EvalResult | None, dict[str, float]]:
    """The global model's test figures; in a mixed fleet, per kind, weighted by its devices."""
    if clusters is not None:
        return clusters.evaluate(state, evaluator), {}
    if allocator is None:
        return evaluator.evaluate(state), {}
    members: dict[str, int] = {}
    for rec in devices:
        if not rec.excluded:
            members[rec.config.peft.kind] = members.get(rec.config.peft.kind, 0) + 1
    results: list[tuple[int, EvalResult]] = []
    by_kind: dict[str, float] = {}
    for cfg in allocator.largest(train):
        if cfg.peft.kind not in members:
            continue
        res = evaluator.evaluate(view(state, evaluator.shapes(cfg)), cfg)
        if res is None:
            return None, {}
        results.append((members[cfg.peft.kind], res))
        by_kind[cfg.peft.kind] = res.accuracy
    return weighted(results), by_kind
