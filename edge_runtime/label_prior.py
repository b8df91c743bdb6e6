"""A device's label prior, for logit adjustment in training and Bayes' rule in personalization.

Logit adjustment (Menon et al. 2021; FedLC, Zhang et al. 2022, for federated label skew) trains
with ``logits + tau * log p_device(y)``: the softmax then explains away how often the device sees
each class, so the head it learns stays a classifier for *balanced* classes instead of drifting
toward the device's own labels. It is done here, engine-neutrally, by shifting the head's bias by
``tau * log p`` before training and back after (a bias shift is exactly an additive logit
offset, and AdamW's steps do not depend on the offset), so both engines get it unchanged.
"""

from __future__ import annotations

import numpy as np

from edge_runtime.data import Dataset
from edge_runtime.engines.base import ProgressFn, TrainingEngine, TrainResult

HEAD_BIAS = "head.bias"


def label_prior_bias(counts: np.ndarray) -> np.ndarray:
    """log p(y) of a device's labels, Laplace smoothed and centred: added to a head's bias, it turns
    the global classifier into one for this device's label distribution (Bayes' rule)."""
    counts = np.asarray(counts, dtype=np.float64)
    log_prior = np.log((counts + 1.0) / (counts.sum() + len(counts)))
    return (log_prior - log_prior.mean()).astype(np.float32)


def train_logit_adjusted(
    engine: TrainingEngine,
    data: Dataset,
    *,
    epochs: int,
    seed: int,
    tau: float,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train ``engine`` on ``data`` with logits offset by ``tau * log p_data(y)``; the module it
    ends with carries no offset. ``tau = 0`` (or a module without a head bias) is plain training."""
    state = engine.trainable_state()
    if tau <= 0 or HEAD_BIAS not in state:
        return engine.train(data, epochs=epochs, seed=seed, progress=progress)
    shift = (tau * label_prior_bias(data.label_histogram())).astype(np.float32)
    state[HEAD_BIAS] = state[HEAD_BIAS] + shift
    engine.load_trainable_state(state)
    try:
        return engine.train(data, epochs=epochs, seed=seed, progress=progress)
    finally:
        trained = engine.trainable_state()
        trained[HEAD_BIAS] = trained[HEAD_BIAS] - shift
        engine.load_trainable_state(trained)
