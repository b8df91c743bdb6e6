"""One global state for a fleet whose devices train modules of different kinds and sizes.

The server keeps a *super-state*: the union of every kind's tensors at the largest size in the
allocation grid (LoRA at the highest rank, adapters at the widest bottleneck, prompts at the
longest length) plus the shared head. A device of a smaller configuration trains the leading
corner of each of its tensors: the first r rows of LoRA A and first r columns of B, the first b
units of a bottleneck, the first l prompt vectors (HetLoRA-style truncation, Cho et al. 2024).

Aggregation zero-pads each update back to the super-state's shapes and averages every element over
the clients whose module covers it, weighted by their sample counts; an element no client covered
keeps its value. With identical shapes this is exactly :func:`broker_server.aggregation.fedit`.
Kinds that a client does not train (an adapter device has no LoRA tensors) simply do not take
part in those tensors' averages; the head is shared by all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from broker_server.aggregation import ClientUpdate, State
from broker_server.exact import lora_pairs
from edge_runtime.errors import ConfigError, ShapeMismatch


def corner(shape: Sequence[int]) -> tuple[slice, ...]:
    """The index of the leading corner of this shape."""
    return tuple(slice(0, int(n)) for n in shape)


def view(state: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]]) -> State:
    """The leading corners of ``state``'s tensors that a module of these ``shapes`` trains (copies)."""
    out: State = {}
    for name, shape in shapes.items():
        if name not in state:
            raise ShapeMismatch(f"{name}: not in the global state")
        big = state[name]
        if len(shape) != big.ndim or any(s > b for s, b in zip(shape, big.shape, strict=True)):
            raise ShapeMismatch(f"{name}: shape {tuple(shape)} does not fit in {big.shape}")
        out[name] = np.array(big[corner(shape)], dtype=np.float32)
    return out


def fits(state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> str | None:
    """None if every tensor of ``delta`` is a leading corner of ``state``'s; else the reason."""
    for name, value in delta.items():
        big = state.get(name)
        if big is None:
            return f"unexpected tensor {name}"
        if value.ndim != big.ndim or any(s > b for s, b in zip(value.shape, big.shape, strict=True)):
            return f"{name}: shape {value.shape} does not fit in {big.shape}"
    return None


def coverage_mean(global_state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> State:
    """Per element, the sample-weighted mean delta of the clients whose module covers it.

    Client order does not matter (up to float rounding); one client returns its own module on
    what it covers; identical shapes give FedIT.
    """
    if not updates:
        raise ConfigError("cannot aggregate zero updates")
    new: State = {}
    for name, value in global_state.items():
        total = np.zeros(value.shape, dtype=np.float64)
        weight = np.zeros(value.shape, dtype=np.float64)
        for u in updates:
            if name not in u.delta:
                continue
            delta = np.asarray(u.delta[name], dtype=np.float64)
            if delta.ndim != value.ndim or any(s > b for s, b in zip(delta.shape, value.shape, strict=True)):
                raise ShapeMismatch(f"{name}: {u.device_id}'s shape {delta.shape} does not fit {value.shape}")
            w = float(max(u.num_samples, 0)) or 1.0
            idx = corner(delta.shape)
            total[idx] += w * delta
            weight[idx] += w
        covered = weight > 0
        mean = np.divide(total, weight, out=np.zeros_like(total), where=covered)
        new[name] = (np.asarray(value, dtype=np.float64) + mean).astype(np.float32)
    return new


def _lora_norm(factors: Mapping[str, np.ndarray], pairs: Mapping[str, tuple[str, str]]) -> float:
    """|| sum over pairs of (1/r) B A ||: the Frobenius norm of a client's LoRA update to the weights,
    up to the shared alpha (the scale alpha/r differs by rank), over all its pairs."""
    total = 0.0
    for a_name, b_name in pairs.values():
        if a_name not in factors or b_name not in factors:
            continue
        a = np.asarray(factors[a_name], dtype=np.float64)
        b = np.asarray(factors[b_name], dtype=np.float64)
        total += float(np.sum(np.square(b @ a))) / max(a.shape[0], 1) ** 2
    return float(np.sqrt(total))


def hetlora_mean(global_state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> State:
    """HetLoRA (Cho et al. 2024): zero-padded factor averaging with sparsity-weighted clients.

    Each client's LoRA factors (the global view plus its delta) are zero-padded to the global
    shapes and averaged with weights n_c ||B_c A_c / r_c||_F (normalised): clients whose update to
    the weights is larger count more, and rank components that only some clients train shrink by
    the weight of those that do not (the paper's implicit rank regularisation), where
    :func:`coverage_mean` keeps them at their trainers' mean. Tensors that are not LoRA factors
    (the head, adapters, prompts) take :func:`coverage_mean`. With one rank and equal norms it is
    FedIT; one client returns its own factors, zero beyond its rank.
    """
    if not updates:
        raise ConfigError("cannot aggregate zero updates")
    pairs = lora_pairs(global_state)
    factor_names = {n for pair in pairs.values() for n in pair}
    clients = []
    for u in updates:
        reason = fits(global_state, u.delta)
        if reason is not None:
            raise ShapeMismatch(f"{u.device_id}: {reason}")
        factors = {
            n: np.asarray(global_state[n][corner(d.shape)], dtype=np.float64)
            + np.asarray(d, dtype=np.float64)
            for n, d in u.delta.items()
            if n in factor_names
        }
        clients.append((max(u.num_samples, 0) or 1, factors))
    raw = np.array([n * _lora_norm(f, pairs) for n, f in clients], dtype=np.float64)
    weights = raw / raw.sum() if raw.sum() > 0 else np.full(len(raw), 1.0 / len(raw))
    new = coverage_mean(global_state, updates)
    for name in sorted(factor_names):
        if not any(name in f for _, f in clients):
            continue  # no client trains this pair: it keeps its value
        acc = np.zeros(global_state[name].shape, dtype=np.float64)
        for w, (_, factors) in zip(weights, clients, strict=True):
            if name in factors:
                acc[corner(factors[name].shape)] += w * factors[name]
        new[name] = acc.astype(np.float32)
    return new
