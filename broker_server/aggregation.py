"""Aggregation rules: pure functions from (global state, accepted updates) to a new global state.

The service around them does the I/O; these functions only do arithmetic, never mutate their
inputs, and do not depend on the order in which clients are given (up to float rounding).
This module imports no other module of ``broker_server``: the rules built on it (``exact``,
``heterogeneous``, ``clustering``, ...) import it, and :mod:`broker_server.strategies` looks every
rule up by its ``--strategy`` name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import layer_group

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted update: the client's parameter deltas and the samples it trained on."""

    device_id: str
    num_samples: int
    delta: Mapping[str, np.ndarray]
    metrics: Mapping[str, float] = field(default_factory=dict)


Strategy = Callable[[Mapping[str, np.ndarray], Sequence[ClientUpdate]], State]
"""A stateless rule: (global state, accepted updates) -> the new global state."""


def sample_weights(updates: Sequence[ClientUpdate]) -> np.ndarray:
    """Weights n_c / sum n (uniform if every client reports zero samples)."""
    n = np.array([max(u.num_samples, 0) for u in updates], dtype=np.float64)
    if n.sum() <= 0:
        return np.full(len(updates), 1.0 / len(updates))
    return n / n.sum()


def fedit(global_state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> State:
    """FedIT: sample-weighted mean of each tensor (LoRA A and B separately, head likewise).

    Devices send theta_c - theta, so averaging deltas and adding them to the shared start
    equals averaging the clients' factors: A = sum n_c A_c / sum n_c, B likewise.
    """
    if not updates:
        raise ConfigError("cannot aggregate zero updates")
    weights = sample_weights(updates)
    new: State = {}
    for name, value in global_state.items():
        acc = np.zeros(value.shape, dtype=np.float64)
        for w, u in zip(weights, updates, strict=True):
            acc += w * np.asarray(u.delta[name], dtype=np.float64)
        new[name] = (np.asarray(value, dtype=np.float64) + acc).astype(np.float32)
    return new


def server_momentum_step(
    old: Mapping[str, np.ndarray],
    aggregated: Mapping[str, np.ndarray],
    momentum: Mapping[str, np.ndarray],
    *,
    lr: float,
    beta: float,
) -> tuple[State, dict[str, np.ndarray]]:
    """A server optimizer over the aggregation rule (FedAvgM, Hsu et al. 2019; Reddi et al. 2021).

    The rule's step ``g = aggregated - old`` is a pseudo-gradient: ``m = beta m + g`` and the new
    state is ``old + lr m``. ``lr = 1, beta = 0`` is the rule itself. Returns the state and ``m``.
    """
    new: State = {}
    carry: dict[str, np.ndarray] = {}
    for name, value in old.items():
        base = np.asarray(value, dtype=np.float64)
        g = np.asarray(aggregated[name], dtype=np.float64) - base
        m = beta * np.asarray(momentum.get(name, 0.0), dtype=np.float64) + g
        carry[name] = m
        new[name] = (base + lr * m).astype(np.float32)
    return new, carry


def coordinate_median(global_state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> State:
    """Coordinate-wise median of the deltas (Yin et al. 2018): robust to a minority of attackers.

    Sample counts are ignored on purpose: an attacker can claim any count it likes.
    """
    if not updates:
        raise ConfigError("cannot aggregate zero updates")
    return {
        name: (
            np.asarray(value, dtype=np.float64)
            + np.median(np.stack([np.asarray(u.delta[name], dtype=np.float64) for u in updates]), axis=0)
        ).astype(np.float32)
        for name, value in global_state.items()
    }


def trimmed_mean(
    global_state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], trim: float = 0.25
) -> State:
    """Coordinate-wise mean after dropping the ``trim`` fraction of highest and of lowest values.

    With n updates, floor(trim * n) are dropped at each end (never all of them), so up to that
    many attackers per coordinate cannot move the result outside the honest range.
    """
    if not updates:
        raise ConfigError("cannot aggregate zero updates")
    if not 0 <= trim < 0.5:
        raise ConfigError(f"trim must be in [0, 0.5), got {trim}")
    k = int(np.floor(trim * len(updates)))
    new: State = {}
    for name, value in global_state.items():
        stacked = np.sort(np.stack([np.asarray(u.delta[name], dtype=np.float64) for u in updates]), axis=0)
        kept = stacked[k : len(updates) - k]
        new[name] = (np.asarray(value, dtype=np.float64) + kept.mean(axis=0)).astype(np.float32)
    return new


def clip_update(update: ClientUpdate, max_norm: float) -> ClientUpdate:
    """The update scaled down so that its global L2 norm is at most ``max_norm``."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.delta.values())))
    if norm <= max_norm or norm == 0.0:
        return update
    factor = max_norm / norm
    delta = {
        k: (np.asarray(v, dtype=np.float64) * factor).astype(np.float32) for k, v in update.delta.items()
    }
    return ClientUpdate(update.device_id, update.num_samples, delta, update.metrics)


def layer_weights(updates: Sequence[ClientUpdate], group: str) -> np.ndarray:
    """Per-client weights of one layer group: w_c = n_c * I_c / sum_k n_k * I_k.

    I_c is the importance the client measured for the group on its own held-out samples, the rise
    of its validation loss when that layer's update is reverted (``importance.{group}`` in its
    metrics). A client that sent no importance figures counts with the mean importance of those
    that did, and a group every client found useless (all zero) falls back to n_c / sum n.
    """
    n = np.array([max(u.num_samples, 0) for u in updates], dtype=np.float64)
    key = f"importance.{group}"
    given = [float(u.metrics[key]) for u in updates if key in u.metrics]
    fill = float(np.mean(given)) if given else 1.0
    imp = np.array([max(float(u.metrics.get(key, fill)), 0.0) for u in updates], dtype=np.float64)
    raw = n * imp
    if raw.sum() <= 0 or not np.all(np.isfinite(raw)):
        return sample_weights(updates)
    return raw / raw.sum()


def layerwise(global_state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> State:
    """Layer-wise importance weighting: each layer's tensors averaged with :func:`layer_weights`.

    A client whose update to a layer helped its own validation loss more counts more in that
    layer (the head and prompts are groups of their own). With equal importances it is FedIT.
    Importances are claims: combine with ``--norm-bound``, and prefer median or trimmed mean
    where devices may lie.
    """
    if not updates:
        raise ConfigError("cannot aggregate zero updates")
    weights = {g: layer_weights(updates, g) for g in sorted({layer_group(n) for n in global_state})}
    new: State = {}
    for name, value in global_state.items():
        acc = np.zeros(value.shape, dtype=np.float64)
        for w, u in zip(weights[layer_group(name)], updates, strict=True):
            acc += w * np.asarray(u.delta[name], dtype=np.float64)
        new[name] = (np.asarray(value, dtype=np.float64) + acc).astype(np.float32)
    return new


def head_from_class_means(sums: np.ndarray, counts: np.ndarray, scale: float) -> dict[str, np.ndarray]:
    """A cosine head whose rows are the scaled unit class means (zero rows for unseen classes).

    With unit-norm features this is the nearest-normalised-class-mean classifier (FedNCM,
    Legate et al. 2023): a start that needs no training and survives label skew.
    """
    means = np.asarray(sums, dtype=np.float64) / np.maximum(np.asarray(counts)[:, None], 1.0)
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    weight = np.where(norms > 0, scale * means / np.maximum(norms, 1e-12), 0.0)
    return {
        "head.weight": weight.astype(np.float32),
        "head.bias": np.zeros(len(counts), dtype=np.float32),
    }


def robust_head_from_statistics(
    updates: Sequence[ClientUpdate],
    scale: float,
    rule: str = "median",
    trim: float = 0.25,
    min_cosine: float = 0.0,
) -> dict[str, np.ndarray]:
    """A class-mean head that a minority of lying clients cannot steer.

    Each client's class means are normalised and screened, and each class takes the coordinate-wise
    median (or trimmed mean) over the clients that have that class, ignoring the counts they claim.

    Screening: every device embeds with the same frozen encoder, whose sentence features share a
    common direction (they are anisotropic: on 20 Newsgroups and BANKING77, MiniLM's class means
    have cosine 0.17 to 0.6 with the mean of all features). The reference is the coordinate-wise
    median of the clients' overall mean features, which a minority cannot move far; a class mean
    with cosine below ``min_cosine`` to it (a sign-flipped or fabricated one) is left out. Under
    label skew a class is often held by two or three clients, too few for the median alone.
    """
    if not updates:
        raise ConfigError("no class statistics to combine")
    sums = np.stack([np.asarray(u.delta["stats.class_sums"], dtype=np.float64) for u in updates])
    counts = np.stack([np.asarray(u.delta["stats.class_counts"], dtype=np.float64) for u in updates])
    means = sums / np.maximum(counts[..., None], 1.0)
    units = means / np.maximum(np.linalg.norm(means, axis=2, keepdims=True), 1e-12)
    overall = sums.sum(axis=1)
    overall /= np.maximum(np.linalg.norm(overall, axis=1, keepdims=True), 1e-12)
    reference = np.median(overall, axis=0)
    reference /= max(float(np.linalg.norm(reference)), 1e-12)
    plausible = (units @ reference) >= min_cosine  # (clients, classes)
    classes, hidden = sums.shape[1], sums.shape[2]
    combined = np.zeros((classes, hidden))
    for c in range(classes):
        have = units[(counts[:, c] > 0) & plausible[:, c], c]
        if len(have) == 0:
            continue
        if rule == "median":
            combined[c] = np.median(have, axis=0)
        else:
            k = int(np.floor(trim * len(have)))
            combined[c] = np.sort(have, axis=0)[k : len(have) - k].mean(axis=0)
    present = np.asarray(np.linalg.norm(combined, axis=1) > 0, dtype=np.float64)
    return head_from_class_means(combined, present, scale)


def sum_class_statistics(updates: Sequence[ClientUpdate]) -> tuple[np.ndarray, np.ndarray]:
    """Add up the clients' per-class feature sums and counts from a statistics round."""
    if not updates:
        raise ConfigError("no class statistics to add up")
    sums = sum(np.asarray(u.delta["stats.class_sums"], dtype=np.float64) for u in updates)
    counts = sum(np.asarray(u.delta["stats.class_counts"], dtype=np.float64) for u in updates)
    return np.asarray(sums), np.asarray(counts)
