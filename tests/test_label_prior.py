"""Logit adjustment: devices train with logits + tau log p(y), and send a head without the offset."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from edge_runtime.data import TextDataset
from edge_runtime.engines.base import ProgressFn, TrainResult
from edge_runtime.label_prior import label_prior_bias, train_logit_adjusted


class BiasStepEngine:
    """A stand-in engine whose 'training' adds a fixed step to the bias and records what it saw."""

    name = "stub"

    def __init__(self, classes: int) -> None:
        self.state = {
            "head.weight": np.zeros((classes, 2), np.float32),
            "head.bias": np.zeros(classes, np.float32),
        }
        self.seen_bias: np.ndarray | None = None

    def trainable_state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.state.items()}

    def load_trainable_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.state = {k: np.asarray(v, np.float32).copy() for k, v in state.items()}

    def train(
        self, data: TextDataset, *, epochs: int, seed: int, progress: ProgressFn | None = None
    ) -> TrainResult:
        self.seen_bias = self.state["head.bias"].copy()
        self.state["head.bias"] = self.state["head.bias"] + 0.5
        return TrainResult(steps=1, samples=len(data), loss=0.0, accuracy=0.0, seconds=0.0)


def _data(labels: list[int], classes: int) -> TextDataset:
    return TextDataset(
        tuple(f"t{i}" for i in range(len(labels))),
        np.asarray(labels, np.int64),
        tuple(f"c{i}" for i in range(classes)),
    )


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_training_sees_the_prior_and_the_module_leaves_without_it(tau: float) -> None:
    data = _data([0] * 30 + [1] * 10, 4)  # classes 2 and 3 never seen here
    engine = BiasStepEngine(4)
    train_logit_adjusted(engine, data, epochs=1, seed=0, tau=tau)  # type: ignore[arg-type]
    prior = label_prior_bias(data.label_histogram())
    assert engine.seen_bias is not None
    np.testing.assert_allclose(engine.seen_bias, tau * prior, atol=1e-6)
    assert engine.seen_bias[0] > engine.seen_bias[1] > engine.seen_bias[2] == engine.seen_bias[3]
    # what the device sends: the training step alone, no trace of its own label prior
    np.testing.assert_allclose(engine.state["head.bias"], np.full(4, 0.5), atol=1e-6)


def test_tau_zero_is_plain_training() -> None:
    engine = BiasStepEngine(3)
    train_logit_adjusted(engine, _data([0, 0, 1], 3), epochs=1, seed=0, tau=0.0)  # type: ignore[arg-type]
    assert engine.seen_bias is not None and not engine.seen_bias.any()


def test_the_prior_is_bayes_rule_for_the_devices_labels() -> None:
    bias = label_prior_bias(np.array([30, 10, 0, 0]))
    p = np.exp(bias) / np.exp(bias).sum()
    np.testing.assert_allclose(p, np.array([31, 11, 1, 1]) / 44, rtol=1e-6)
    assert abs(float(bias.mean())) < 1e-6
