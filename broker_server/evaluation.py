"""Server-side model: builds the initial global module and evaluates global modules."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset
from edge_runtime.engines.base import EvalResult


class Evaluator:
    """Holds one torch engine for the assigned configuration and a held-out test set."""

    def __init__(
        self, config: TrainConfig, test: TextDataset | None, *, seed: int, threads: int | None = None
    ) -> None:
        from edge_runtime.engines.torch_engine import TorchEngine

        self.engine = TorchEngine(config, seed=seed, threads=threads)
        self.test = test

    def initial_state(self) -> dict[str, np.ndarray]:
        """The seeded initial module (LoRA A random, B zero, head random)."""
        return self.engine.trainable_state()

    @property
    def total_params(self) -> int:
        """Parameters of the full model, for the full-model communication baseline."""
        return self.engine.total_params

    def evaluate(self, state: Mapping[str, np.ndarray]) -> EvalResult | None:
        """Accuracy and macro F1 of ``state`` on the test set (None without one)."""
        if self.test is None or len(self.test) == 0:
            return None
        self.engine.load_trainable_state(state)
        return self.engine.evaluate(self.test)
