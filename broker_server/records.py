"""Round records and the fleet summary: what a run measured, in the one shape every report reads.

Both report builders (``fedpeft simulate`` in :mod:`sdk.simulate`, ``fedpeft serve`` in
:mod:`sdk.commands`) take a :class:`FleetSummary` from the service instead of reading its fields,
so a figure has one definition whichever command wrote the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker_server.asynchronous import Staleness, StaleUpdate
from broker_server.intake import PendingUpdate
from edge_runtime.config import TrainConfig
from edge_runtime.engines.base import EvalResult
from edge_runtime.families import QA_TASK, TASK_FIGURES

PER_CLIENT_KEYS = ("client_train_s", "client_bytes")
"""Round-record fields the simulator's clock reads and the report leaves out."""


@dataclass(frozen=True)
class DeviceSummary:
    """What the service knows of one device at the end of a run."""

    device_id: str
    profile: str
    config: TrainConfig
    trainable_params: int
    allocation: dict[str, Any] | None
    cluster: int | None
    updates_received: int
    updates_accepted: int
    train_s: float
    samples: int
    last_metrics: Mapping[str, float] = field(default_factory=dict)
    personalization: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FleetSummary:
    """A run as the reports see it: rounds, final figures, devices, bytes and rejections."""

    rounds: Sequence[Mapping[str, Any]]
    final: Mapping[str, Any]
    devices: Mapping[str, DeviceSummary]
    bytes_up_total: int
    rejected: Sequence[Mapping[str, Any]]
    unaggregated: Sequence[Mapping[str, Any]]
    fleet_params: int
    """Trainable parameters of the fleet's configured module (for devices that never registered)."""

    @property
    def participations(self) -> int:
        """Updates aggregated over every round."""
        return sum(int(r["participants"]) for r in self.rounds)

    @property
    def bytes_down(self) -> int:
        """What the devices counted coming in, over every round."""
        return sum(int(r["bytes_down"]) for r in self.rounds)

    def reported_rounds(self) -> list[dict[str, Any]]:
        """The round records as the report holds them (the per-client timing left out)."""
        return [{k: v for k, v in r.items() if k not in PER_CLIENT_KEYS} for r in self.rounds]


@dataclass(frozen=True)
class Timing:
    """When a round ended: since the run started, since the round started, on the simulated clock
    (the wall clock outside simulation), and the server's own share."""

    wall_s: float
    round_wall_s: float
    virtual_s: float
    server_s: float


EVAL_PENDING = "eval_pending"
"""Key of a round record whose test figures are still being computed (the service tests a
round's module while the devices train the next: :meth:`RoundLoop.run`)."""


def evaluated_figures(result: EvalResult | None) -> dict[str, float | None]:
    """A record's test figures (None without a test set)."""
    figures = {
        "accuracy": None if result is None else result.accuracy,
        "macro_f1": None if result is None else result.macro_f1,
        "loss": None if result is None else result.loss,
    }
    if result is not None and result.task == QA_TASK:
        # question answering reports SQuAD's figures where classification's go, and by name
        figures |= {"exact_match": result.accuracy, "f1": result.macro_f1}
    if result is not None:
        # image-text matching's recalls both ways, causal LM's perplexity: by name
        figures |= {k: float(v) for k, v in result.extra.items()}
    return figures


def task_figures(
    final: Mapping[str, Any], task: str, rounds: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """The report's ``final`` block with the task named; for question answering, ``accuracy``
    (exact match) and ``macro_f1`` (token F1) are also given as ``exact_match`` and ``f1``; for
    image-text matching and causal LM, the task's named figures (:data:`TASK_FIGURES`: recalls,
    perplexity) are those of the last round record that has them (the evaluation ``final``
    reports)."""
    out = dict(final) | {"task": task}
    if task == QA_TASK:
        out |= {"exact_match": out.get("accuracy"), "f1": out.get("macro_f1")}
    names = TASK_FIGURES.get(task, ())
    for record in reversed(rounds):
        if names and all(record.get(k) is not None for k in names):
            out |= {k: record[k] for k in names}
            break
    return out


def round_record(
    round_: int,
    phase: str,
    timing: Timing,
    result: EvalResult | None,
    pending: Mapping[str, PendingUpdate],
    *,
    stale: int,
    bytes_up_all: int,
    bytes_down: int,
    resyncs: Sequence[str],
) -> dict[str, Any]:
    """The record of a synchronous round that aggregated ``pending`` (device -> accepted update)."""
    return {
        "round": round_,
        "phase": phase,
        "wall_s": timing.wall_s,
        "round_wall_s": timing.round_wall_s,
        "virtual_s": timing.virtual_s,
        "server_s": timing.server_s,
        **evaluated_figures(result),
        "participants": len(pending),
        "stale_updates": stale,
        "bytes_up": sum(p.nbytes for p in pending.values()),
        "bytes_up_all": bytes_up_all,
        "bytes_down": bytes_down,
        "train_loss": mean_of([p.update.metrics.get("loss") for p in pending.values()]),
        "clients": sorted(pending),
        "client_train_s": {d: float(p.update.metrics.get("train_s", 0.0)) for d, p in pending.items()},
        "client_bytes": {d: p.nbytes for d, p in pending.items()},
        # devices that could not apply this round's delta and got the module whole
        "resyncs": sorted(resyncs),
    }


def version_record(
    version: int,
    phase: str,
    timing: Timing,
    result: EvalResult | None,
    ordered: Sequence[tuple[int, StaleUpdate]],
    staleness: Staleness,
    *,
    stale: int,
    bytes_up: int,
) -> dict[str, Any]:
    """The record of an asynchronous version made from ``ordered`` (job id, update) of the buffer;
    ``bytes_up`` is every payload received since the version before, each counted once."""
    updates = [b for _, b in ordered]
    return {
        "round": version,
        "phase": phase,
        "mode": "async",
        "wall_s": timing.wall_s,
        "round_wall_s": timing.round_wall_s,
        "virtual_s": timing.virtual_s,
        "server_s": timing.server_s,
        **evaluated_figures(result),
        "participants": len(ordered),
        "stale_updates": stale,
        "staleness": [b.staleness for b in updates],
        # s(tau) of each update, in the order of "clients"
        "staleness_weights": [staleness(b.staleness) for b in updates],
        "bytes_up": bytes_up,
        "bytes_up_all": bytes_up,
        # what the devices counted coming in since their previous update (the versions they got)
        "bytes_down": int(sum(b.update.metrics.get("bytes_down", 0.0) for b in updates)),
        "train_loss": mean_of([b.update.metrics.get("loss") for b in updates]),
        "clients": [b.update.device_id for b in updates],
        "jobs": [job for job, _ in ordered],
        "client_train_s": {},
        "client_bytes": {},
    }


def final_figures(
    final_eval: Mapping[str, float],
    personalization: Mapping[str, float | None],
    clusters: Mapping[str, Any] | None,
    dp_epsilon: float | None,
    dp_delta: float | None,
    dp: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The report's ``final`` block; a run that never evaluated says so."""
    final: dict[str, Any] = dict(final_eval) or {"accuracy": 0.0, "macro_f1": 0.0, "evaluated": False}
    final |= dict(personalization)
    final["clusters"] = None if clusters is None else dict(clusters)
    final["dp_epsilon"] = dp_epsilon
    final["dp_delta"] = dp_delta
    final["dp"] = None if dp is None else dict(dp)
    return final


def weighted(results: list[tuple[int, EvalResult]]) -> EvalResult | None:
    """Test figures of several modules, weighted by their devices (None without any)."""
    if not results:
        return None
    total = sum(n for n, _ in results)
    shared = set.intersection(*(set(r.extra) for _, r in results))
    return EvalResult(
        accuracy=sum(n * r.accuracy for n, r in results) / total,
        macro_f1=sum(n * r.macro_f1 for n, r in results) / total,
        loss=sum(n * r.loss for n, r in results) / total,
        predictions=results[0][1].predictions,
        task=results[0][1].task,
        extra={k: sum(n * r.extra[k] for n, r in results) / total for k in sorted(shared)},
    )


def mean_of(values: list[Any]) -> float | None:
    """The mean of the numbers among ``values`` (None if there are none)."""
    nums = [float(v) for v in values if isinstance(v, (int, float))]
    return float(np.mean(nums)) if nums else None


def personalization_means(personalization: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """Means over the devices that measured on held-out samples (None without any)."""
    measured = [m for m in personalization.values() if m.get("holdout", 0) > 0]
    keys = ("personalized_accuracy", "global_own_accuracy", "prior_accuracy")
    return {
        k: float(np.mean([m[k] for m in measured])) if measured and all(k in m for m in measured) else None
        for k in keys
    }
