"""Intake: decode one update and check it against what the round expects, or raise.

No transport, no torch, no service state: the caller passes what the round expects (the phase, the
module's shapes, the norm bound, the device's hello) and gets the decoded update back or an
:class:`~edge_runtime.errors.UpdateRejected` whose code and reason go to the log and the report.
Which round an update belongs to (stale, ahead, a duplicate) is the round controller's question.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from broker_server.layout import PERSONALIZE_PHASE, STATS_PHASE, TRAIN_PHASE
from edge_runtime import wire
from edge_runtime.errors import NormTooLarge, ShapeMismatch, UnknownDevice, UpdateRejected

Shapes = Mapping[str, tuple[int, ...]]


@dataclass
class PendingUpdate:
    """An accepted update waiting for its round's aggregation."""

    update: wire.UpdateMessage
    content_id: str
    nbytes: int


def decode_update(device: str, payload: bytes, max_bytes: int) -> wire.UpdateMessage:
    """Decode ``payload`` published under ``device``'s topic; it must name that device."""
    update = wire.decode_update(payload, max_bytes=max_bytes)
    if update.device_id != device:
        raise UnknownDevice(f"update for {update.device_id!r} published under {device!r}", round=update.round)
    return update


def expected_shapes(phase: str, module: Shapes) -> dict[str, tuple[int, ...]]:
    """The tensors an update must carry in ``phase`` for a device whose module has ``module``'s
    shapes: class statistics in the statistics round, nothing when personalizing."""
    if phase == STATS_PHASE:
        c, h = module["head.weight"]
        return {"stats.class_sums": (c, h), "stats.class_counts": (c,)}
    if phase == PERSONALIZE_PHASE:
        return {}  # only measurements come back: the personal modules stay on the devices
    return dict(module)


def check_update(update: wire.UpdateMessage, expected: Shapes, phase: str, norm_bound: float) -> None:
    """The tensors have the expected names and shapes, and what the phase asks of them holds."""
    got = {k: tuple(v.shape) for k, v in update.tensors.items()}
    if set(got) != set(expected):
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        raise ShapeMismatch(f"tensors differ: missing {missing}, unexpected {extra}", round=update.round)
    for name, shape in expected.items():
        if got[name] != shape:
            raise ShapeMismatch(f"{name}: shape {got[name]} != {shape}", round=update.round)
    if phase == STATS_PHASE:
        check_statistics(update)
    if phase == PERSONALIZE_PHASE:
        check_personalization(update)
    if phase == TRAIN_PHASE:
        norm = update_norm(update)
        if norm > norm_bound:
            raise NormTooLarge(f"update norm {norm:.3g} exceeds {norm_bound:.3g}", round=update.round)


def update_norm(update: wire.UpdateMessage) -> float:
    """The L2 norm of all of the update's tensors together (in float64)."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.tensors.values())))


def check_statistics(update: wire.UpdateMessage) -> None:
    """Class statistics must be consistent: features are unit vectors, counts add up."""
    sums = update.tensors["stats.class_sums"].astype(np.float64)
    counts = update.tensors["stats.class_counts"].astype(np.float64)
    if np.any(counts < 0) or np.any(counts != np.round(counts)):
        raise UpdateRejected("class counts must be non-negative integers", round=update.round)
    if int(counts.sum()) != update.num_samples:
        raise UpdateRejected(
            f"class counts add up to {int(counts.sum())}, the update claims {update.num_samples}",
            round=update.round,
        )
    # the sum of n unit vectors has a norm of at most n
    if np.any(np.linalg.norm(sums, axis=1) > counts * (1 + 1e-3) + 1e-3):
        raise NormTooLarge("a class sum is longer than its count of unit features allows", round=update.round)


def check_personalization(update: wire.UpdateMessage) -> None:
    """A personalization report: held-out count >= 0 and, with held-out samples, accuracies in [0, 1]."""
    m = update.metrics
    keys = ("global_own_accuracy", "personalized_accuracy")
    if (
        not m.get("holdout", -1) >= 0
        or (m["holdout"] > 0 and not all(0 <= m.get(k, -1) <= 1 for k in keys))
        or not 0 <= m.get("prior_accuracy", 0) <= 1
    ):
        raise UpdateRejected(
            "personalization metrics need holdout >= 0 and, with held-out samples, both accuracies in [0, 1]",
            round=update.round,
        )


def check_samples(update: wire.UpdateMessage, hello: wire.Hello) -> None:
    """An update may not claim more samples than its device's hello said it holds."""
    if update.num_samples > hello.num_samples:
        raise UpdateRejected(
            f"claims {update.num_samples} samples, hello said {hello.num_samples}", round=update.round
        )
