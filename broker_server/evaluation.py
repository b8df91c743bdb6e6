"""Server-side model: builds initial global modules and evaluates global modules.

:class:`Evaluator` holds one torch engine per training configuration that the server evaluates
(one per PEFT kind in a mixed fleet, one in a uniform fleet); shapes of other configurations are
read off a temporary engine and kept. :class:`OrtEvaluator` does the same with the ONNX Runtime
engine a fleet trains on, from the artifact folders its devices train from, so that a process
serving an ORT fleet never imports torch (it falls back to a torch :class:`Evaluator`, created on
first need, for a configuration without artifacts and for training on the server).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edge_runtime.config import TrainConfig
from edge_runtime.data import Dataset
from edge_runtime.engines.base import EvalResult, TrainingEngine
from edge_runtime.errors import ConfigError

if TYPE_CHECKING:
    from edge_runtime.engines.torch_engine import TorchEngine


def _key(config: TrainConfig) -> str:
    return json.dumps(config.peft.to_dict(), sort_keys=True)


class ModelEvaluator(Protocol):
    """What the service asks of the server-side model (:class:`Evaluator`, :class:`OrtEvaluator`)."""

    test: Dataset | None

    def initial_state(self, config: TrainConfig | None = None) -> dict[str, np.ndarray]: ...

    def shapes(self, config: TrainConfig) -> dict[str, tuple[int, ...]]: ...

    @property
    def total_params(self) -> int: ...

    def evaluate(
        self, state: Mapping[str, np.ndarray], config: TrainConfig | None = None
    ) -> EvalResult | None: ...

    def engine_for(self, config: TrainConfig) -> TorchEngine: ...


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


class OrtEvaluator:
    """The server-side model on an ONNX Runtime engine, built from the fleet's artifact folders.

    ``artifacts``: (configuration, folder) of each module the fleet's ORT devices train, in the
    flavour of ``engine`` (``ort``: onnxruntime-training's graphs, ``ort-plain``: the step graph).
    The initial modules are the folders' checkpointed values, which the artifact builder took from
    a torch engine of the same configuration and seed: the same values the torch
    :class:`Evaluator` starts from. Evaluation runs the folders' graphs, so
    accuracies equal the torch engine's up to float rounding (a prediction whose top two logits
    are that close may differ). A configuration without a folder, and :meth:`engine_for` (training
    on the server: distillation), go to a torch :class:`Evaluator` created on first need.
    """

    def __init__(
        self,
        config: TrainConfig,
        test: Dataset | None,
        *,
        engine: str,
        artifacts: Iterable[tuple[TrainConfig, str | Path]],
        seed: int,
        threads: int | None = None,
    ) -> None:
        from edge_runtime.engines import ARTIFACT_FLAVOURS
        from edge_runtime.engines.ort_engine import load_manifest

        if engine not in ARTIFACT_FLAVOURS:
            raise ConfigError(
                f"an ORT evaluator runs one of {', '.join(ARTIFACT_FLAVOURS)}, not engine {engine!r}"
            )
        self.config = config
        self.test = test
        self.seed = seed
        self.threads = threads
        self.engine_name = engine
        self._folders = {_key(c): Path(f) for c, f in artifacts}
        if not self._folders:
            raise ConfigError(f"an ORT evaluator needs at least one folder of {engine} artifacts")
        self._engines: dict[str, TrainingEngine] = {}
        self._torch: Evaluator | None = None
        self._total_params = int(load_manifest(next(iter(self._folders.values())))["total_params"])

    def _ort(self, config: TrainConfig | None) -> TrainingEngine | None:
        """The ORT engine of ``config``'s module (created once), or None without its artifacts."""
        from dataclasses import replace

        from edge_runtime.engines import create_engine

        config = config or self.config
        key = _key(config)
        if key not in self._folders:
            return None
        if key not in self._engines:
            self._engines[key] = create_engine(
                replace(config, engine=self.engine_name),
                seed=self.seed,
                threads=self.threads,
                artifacts=self._folders[key],
            )
        return self._engines[key]

    def _fallback(self) -> Evaluator:
        """The torch evaluator, for what no artifact folder covers (imports torch, once)."""
        if self._torch is None:
            self._torch = Evaluator(self.config, self.test, seed=self.seed, threads=self.threads)
        return self._torch

    def initial_state(self, config: TrainConfig | None = None) -> dict[str, np.ndarray]:
        """The seeded initial module of ``config`` (the artifact folder's checkpointed values)."""
        engine = self._ort(config)
        if engine is None:
            return self._fallback().initial_state(config)
        return engine.trainable_state()

    def shapes(self, config: TrainConfig) -> dict[str, tuple[int, ...]]:
        """Tensor shapes of ``config``'s module."""
        engine = self._ort(config)
        if engine is None:
            return self._fallback().shapes(config)
        return {k: tuple(v.shape) for k, v in engine.trainable_state().items()}

    @property
    def total_params(self) -> int:
        """Parameters of the full model (from the artifacts' manifest, as the torch engine counts them)."""
        return self._total_params

    def evaluate(
        self, state: Mapping[str, np.ndarray], config: TrainConfig | None = None
    ) -> EvalResult | None:
        """Accuracy and macro F1 of ``state`` (a module of ``config``) on the test set (None without one)."""
        if self.test is None or len(self.test) == 0:
            return None
        engine = self._ort(config)
        if engine is None:
            return self._fallback().evaluate(state, config)
        engine.load_trainable_state(state)
        return engine.evaluate(self.test)

    def engine_for(self, config: TrainConfig) -> TorchEngine:
        """A torch engine for ``config``'s module: training on the server needs torch."""
        return self._fallback().engine_for(config)
