"""What both ONNX Runtime engines do alike in numpy: module checks, token caching, padded batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from edge_runtime.data import Dataset, TextDataset
from edge_runtime.engines.base import micro_batches, require_text, row_shares
from edge_runtime.errors import ShapeMismatch


def checked_state(
    current: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``state`` as float32 arrays, if its names and shapes are exactly those of ``current``."""
    missing = set(current) - set(state)
    extra = set(state) - set(current)
    if missing or extra:
        raise ShapeMismatch(
            f"module names differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
        )
    values = {}
    for name, now in current.items():
        value = np.array(state[name], dtype=np.float32)
        if value.shape != now.shape:
            raise ShapeMismatch(f"{name}: shape {value.shape} != {now.shape}")
        values[name] = value
    return values


class TokenCache:
    """Token ids per dataset object, so a device tokenizes its data once across rounds."""

    def __init__(self, encode: Callable[[Sequence[str]], list[list[int]]]) -> None:
        self._encode = encode
        self._cache: dict[int, tuple[TextDataset, list[list[int]]]] = {}

    def ids(self, data: Dataset) -> list[list[int]]:
        """The token ids of every text of ``data`` (computed on first use); images are refused."""
        data = require_text(data)
        cached = self._cache.get(id(data))
        if cached is not None and cached[0] is data:
            return cached[1]
        ids = self._encode(data.texts)
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[id(data)] = (data, ids)
        return ids


def padded_batch(ids: list[list[int]], rows: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Input ids padded to the longest of ``rows`` and their attention mask (int64)."""
    seqs = [ids[int(i)] for i in rows]
    width = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
    return input_ids, mask


# one forward and backward pass of padded rows: (mean loss, logits, gradients of the trained names)
StepRun = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[float, np.ndarray, list[np.ndarray]]]


def micro_batch_step(
    run: StepRun,
    ids: list[list[int]],
    labels: np.ndarray,
    rows: np.ndarray,
    *,
    micro_rows: int,
    pad_id: int,
    names: Sequence[str],
) -> tuple[float, int, dict[str, np.ndarray]]:
    """One batch's mean loss, hits and gradients, computed in micro-batches of ``micro_rows``.

    The rows are sorted by length so that each micro-batch pads only to its own longest text;
    each micro-batch's mean loss and gradients are weighted by its share of the rows, so the sums
    are the whole batch's (up to float rounding), as the torch engine computes them.
    """
    chunks = micro_batches(rows, micro_rows, [len(ids[int(i)]) for i in rows])
    loss = 0.0
    hits = 0
    grads: dict[str, np.ndarray] = {}
    for chunk, share in zip(chunks, row_shares(chunks), strict=True):
        input_ids, mask = padded_batch(ids, chunk, pad_id)
        target = labels[chunk]
        chunk_loss, logits, chunk_grads = run(input_ids, mask, target)
        loss += chunk_loss * share
        hits += int(np.sum(np.asarray(logits).argmax(-1) == target))
        for name, grad in zip(names, chunk_grads, strict=True):
            weighted = np.asarray(grad, dtype=np.float32) * np.float32(share)
            grads[name] = grads[name] + weighted if name in grads else weighted
    return loss, hits, grads
