"""Server-side model: builds initial global modules and evaluates global modules.

One torch engine per training configuration that the server evaluates (one per PEFT kind in a
mixed fleet, one in a uniform fleet); shapes of other configurations are read off a temporary
engine and kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.config import TrainConfig
from edge_runtime.data import Dataset
from edge_runtime.engines.base import EvalResult

if TYPE_CHECKING:
    from edge_runtime.engines.torch_engine import TorchEngine


def _key(config: TrainConfig) -> str:
    return json.dumps(config.peft.to_dict(), sort_keys=True)


class Evaluator:
    """Holds a torch engine for the assigned configuration (and others on demand) and a test set."""

    def __init__(
        self, config: TrainConfig, test: Dataset | None, *, seed: int, threads: int | None = None
    ) -> None:
        from edge_runtime.engines.torch_engine import TorchEngine

        self.config = config
        self.seed = seed
        self.threads = threads
        self.engine = TorchEngine(config, seed=seed, threads=threads)
        self._engines = {_key(config): self.engine}
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self.test = test

    def _engine(self, config: TrainConfig | None) -> TorchEngine:
        from edge_runtime.engines.torch_engine import TorchEngine

        if config is None:
            return self.engine
        key = _key(config)
        if key not in self._engines:
            self._engines[key] = TorchEngine(config, seed=self.seed, threads=self.threads)
        return self._engines[key]

    def engine_for(self, config: TrainConfig) -> TorchEngine:
        """The server's torch engine for ``config``'s module (created once, then kept)."""
        return self._engine(config)

    def initial_state(self, config: TrainConfig | None = None) -> dict[str, np.ndarray]:
        """The seeded initial module (LoRA A random, B zero, head random) of ``config``."""
        return self._engine(config).trainable_state()

    def shapes(self, config: TrainConfig) -> dict[str, tuple[int, ...]]:
        """Tensor shapes of ``config``'s module (from a temporary engine if not evaluated here)."""
        from edge_runtime.engines.torch_engine import TorchEngine

        key = _key(config)
        if key not in self._shapes:
            engine = self._engines.get(key) or TorchEngine(config, seed=self.seed, threads=self.threads)
            self._shapes[key] = {k: tuple(v.shape) for k, v in engine.trainable_state().items()}
        return self._shapes[key]

    @property
    def total_params(self) -> int:
        """Parameters of the full model, for the full-model communication baseline."""
        return self.engine.total_params

    def evaluate(
        self, state: Mapping[str, np.ndarray], config: TrainConfig | None = None
    ) -> EvalResult | None:
        """Accuracy and macro F1 of ``state`` (a module of ``config``) on the test set (None without one)."""
        if self.test is None or len(self.test) == 0:
            return None
        engine = self._engine(config)
        engine.load_trainable_state(state)
        return engine.evaluate(self.test)
