"""Scores of the tasks without classes, in numpy: recall@k (image-text matching), next-token figures.

Image-text matching is scored by retrieval recall@k both ways; causal LM by next-token accuracy,
macro F1 and perplexity.

Retrieval: row ``i`` of a texts x images similarity matrix is caption ``i``, and its match is image
``i`` (the diagonal). A caption's rank is the number of *other* images scoring at least as high as
its own, so ties count against it (a model that scores every image alike has recall@k 0 for k
below the split size, not a lucky 1); recall@k is the fraction of captions of rank below k.
Image->text is the same on the transposed matrix.
"""

from __future__ import annotations

import math

import numpy as np

from edge_runtime.errors import ConfigError

RECALL_KS = (1, 5)


def match_ranks(similarity: np.ndarray) -> np.ndarray:
    """Each row's rank of its own column (the diagonal) among the row's columns; ties count against."""
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ConfigError(f"a similarity matrix of pairs must be square and non-empty, got {sim.shape}")
    own = np.diag(sim)
    return (sim >= own[:, None]).sum(axis=1) - 1  # minus the row's own column


def recall_at_k(similarity: np.ndarray, k: int) -> float:
    """The fraction of rows whose own column ranks within the top ``k``."""
    if k < 1:
        raise ConfigError(f"recall@k needs k >= 1, got {k}")
    return float((match_ranks(similarity) < k).mean())


def retrieval_figures(similarity: np.ndarray) -> dict[str, float]:
    """Recall@1 and @5 both ways of a texts x images similarity matrix, and their means."""
    sim = np.asarray(similarity, dtype=np.float64)
    out: dict[str, float] = {}
    for k in RECALL_KS:
        t2i, i2t = recall_at_k(sim, k), recall_at_k(sim.T, k)
        out[f"text_to_image_recall@{k}"] = t2i
        out[f"image_to_text_recall@{k}"] = i2t
        out[f"mean_recall@{k}"] = (t2i + i2t) / 2
    return out


def next_token_figures(predicted: np.ndarray, target: np.ndarray, loss_sum: float) -> dict[str, float]:
    """Next-token accuracy, macro F1 over the token ids that occur (as target or prediction), mean
    cross-entropy and perplexity, from every scored position's prediction and target and the
    summed cross-entropy."""
    pred = np.asarray(predicted, dtype=np.int64).reshape(-1)
    gold = np.asarray(target, dtype=np.int64).reshape(-1)
    if pred.shape != gold.shape or pred.size == 0:
        raise ConfigError(
            f"next-token scores need as many predictions as targets (>0): {pred.size}, {gold.size}"
        )
    ids = np.unique(np.concatenate([pred, gold]))
    f1s = []
    for t in ids:
        tp = int(np.sum((pred == t) & (gold == t)))
        fp = int(np.sum((pred == t) & (gold != t)))
        fn = int(np.sum((pred != t) & (gold == t)))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    loss = loss_sum / pred.size
    return {
        "next_token_accuracy": float((pred == gold).mean()),
        "macro_f1": float(np.mean(f1s)),
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": float(pred.size),
    }
