"""Training engines behind one interface; :func:`create_engine` picks one by name."""

from __future__ import annotations

from pathlib import Path

from edge_runtime.config import TrainConfig
from edge_runtime.engines.base import EvalResult, TrainingEngine, TrainResult
from edge_runtime.errors import ConfigError

__all__ = ["EvalResult", "TrainResult", "TrainingEngine", "create_engine"]


def create_engine(
    config: TrainConfig,
    *,
    seed: int = 0,
    threads: int | None = None,
    artifacts: str | Path | None = None,
) -> TrainingEngine:
    """The engine named in ``config.engine``; torch is imported only when it is the torch engine.

    The ORT engine needs the folder of training artifacts built for ``config``
    (:func:`broker_server.artifacts.build_artifacts`).
    """
    if config.engine == "torch":
        from edge_runtime.engines.torch_engine import TorchEngine

        return TorchEngine(config, seed=seed, threads=threads)
    if config.engine == "ort":
        if artifacts is None:
            raise ConfigError(
                "the ORT engine needs its training artifacts (broker_server.artifacts.build_artifacts)"
            )
        from edge_runtime.engines.ort_engine import OrtEngine

        return OrtEngine(config, artifacts=artifacts, seed=seed, threads=threads)
    raise ConfigError(f"engine {config.engine!r} is not available in this build")
