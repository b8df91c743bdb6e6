"""Training engines behind one interface; :func:`create_engine` picks one by name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edge_runtime.config import TrainConfig
from edge_runtime.engines.base import EvalResult, TrainingEngine, TrainResult
from edge_runtime.errors import ConfigError

__all__ = [
    "ARTIFACT_FLAVOURS",
    "EvalResult",
    "TrainResult",
    "TrainingEngine",
    "artifact_flavour",
    "create_engine",
    "device_engines",
]

DEVICE_ENGINE_CHOICES = ("auto", "torch", "ort", "ort-plain")
# The engines that train from an artifact folder the server builds, and the flavour each needs
# (broker_server.artifacts.build_artifacts): onnxruntime-training's graphs, or the step graph.
ARTIFACT_FLAVOURS = {"ort": "training", "ort-plain": "step"}


def artifact_flavour(engine: str) -> str | None:
    """The artifact flavour engine ``engine`` trains from; None: it needs no artifacts (torch)."""
    return ARTIFACT_FLAVOURS.get(engine)


def device_engines(choice: str = "auto") -> tuple[str, ...]:
    """The engines this host trains with, in order of preference, as its hello lists them.

    ``auto``: ``ort`` (onnxruntime-training's API) where onnxruntime-training is installed, else
    ``ort-plain`` (the step graph in plain onnxruntime) where any onnxruntime is, then torch where
    it is. Checked with ``find_spec`` only, so an ORT device never imports torch.
    """
    from edge_runtime.engines.ort_engine import ORT_TRAINING_INSTALL, ort_available
    from edge_runtime.engines.ort_step_engine import plain_ort_available

    if choice not in DEVICE_ENGINE_CHOICES:
        raise ConfigError(f"--engine must be one of {', '.join(DEVICE_ENGINE_CHOICES)}, got {choice!r}")
    has_ort = ort_available()
    has_plain = plain_ort_available()
    has_torch = importlib.util.find_spec("torch") is not None
    if choice == "ort" and not has_ort:
        raise ConfigError(f"--engine ort needs {ORT_TRAINING_INSTALL}")
    if choice == "ort-plain" and not has_plain:
        raise ConfigError("--engine ort-plain needs onnxruntime (pip install 'fedpeft[edge]')")
    if choice == "torch" and not has_torch:
        raise ConfigError("--engine torch needs torch, transformers and peft (pip install fedpeft)")
    if choice != "auto":
        return (choice,)
    ort = ("ort",) if has_ort else ("ort-plain",) if has_plain else ()
    found = ort + (("torch",) if has_torch else ())
    if not found:
        raise ConfigError("no training engine is installed: install onnxruntime or torch")
    return found


def create_engine(
    config: TrainConfig,
    *,
    seed: int = 0,
    threads: int | None = None,
    artifacts: str | Path | None = None,
    device_cap_mb: float | None = None,
) -> TrainingEngine:
    """The engine named in ``config.engine``; torch is imported only when it is the torch engine.

    ``device_cap_mb`` is the device's own memory cap, if any: under it (or under the assignment's
    ``config.mem_cap_mb``) the ORT engines use the lean allocator, which trades step time for peak
    memory (:func:`edge_runtime.engines.ort_engine.wants_lean_memory`).

    The ORT engines need the folder of artifacts built for ``config``
    (:func:`broker_server.artifacts.build_artifacts`; flavour ``step`` for ``ort-plain``).
    """
    if config.task != "classification" and config.engine != "torch":
        raise ConfigError(
            f"the {config.engine} engine trains classification only; "
            f"{config.task} trains with the torch engine"
        )
    if config.frozen_weights != "fp32" and config.engine != "ort":
        raise ConfigError(
            f"frozen_weights {config.frozen_weights!r} is an option of the ort engine's artifacts; "
            f"the {config.engine} engine multiplies by fp32 weights"
        )
    if config.engine == "torch":
        from edge_runtime.engines.torch_engine import TorchEngine

        return TorchEngine(config, seed=seed, threads=threads)
    if config.engine == "ort":
        if artifacts is None:
            raise ConfigError(
                "the ORT engine needs its training artifacts (broker_server.artifacts.build_artifacts)"
            )
        from edge_runtime.engines.ort_engine import OrtEngine, wants_lean_memory

        lean = wants_lean_memory(config, device_cap_mb)
        return OrtEngine(config, artifacts=artifacts, seed=seed, threads=threads, lean_memory=lean)
    if config.engine == "ort-plain":
        if artifacts is None:
            raise ConfigError(
                "the plain ORT engine needs its step graph "
                "(broker_server.artifacts.build_artifacts(config, flavour='step'))"
            )
        from edge_runtime.engines.ort_engine import wants_lean_memory
        from edge_runtime.engines.ort_step_engine import OrtStepEngine

        lean = wants_lean_memory(config, device_cap_mb)
        return OrtStepEngine(config, artifacts=artifacts, seed=seed, threads=threads, lean_memory=lean)
    raise ConfigError(f"engine {config.engine!r} is not available in this build")
