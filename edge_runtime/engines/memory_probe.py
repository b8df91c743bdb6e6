"""Measure what training really costs: peak resident memory and seconds per step, in a fresh process.

:func:`measure_training` runs ``python -m edge_runtime.engines.memory_probe`` in a child process,
so nothing the caller already holds (a test runner, other models, a warm allocator) is counted.
The child builds the engine the configuration names, trains ``steps`` steps on synthetic texts
that fill every batch to exactly ``seq_len`` tokens, and prints one JSON object on stdout: the
peak resident set size over its whole life (``VmHWM``, so loading the model counts too), the
resident size after the imports and after loading, and the mean step time
without the first (warm-up) step. :func:`measure_in_process` is that measurement on its own, for
a child process that builds an engine this module does not know (``bench/step_speed.py``'s full
fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from edge_runtime.config import TrainConfig
from edge_runtime.errors import ConfigError, EngineError

if TYPE_CHECKING:
    from edge_runtime.engines.base import TrainingEngine

# Words that MiniLM's (BERT's uncased WordPiece) vocabulary holds whole: one token each.
_WORDS = (
    "the of and to in is was for on as with by he at from his an were are which this be or "
    "has had one not but first new after two time who they she been its all also would more "
    "year can when there game city team world school state during other war made their film"
).split()


@dataclass(frozen=True)
class TrainingMeasurement:
    """What a fresh process used to train: peak memory (MiB) and mean seconds per step."""

    peak_rss_mb: float
    step_s: float
    steps: int
    startup_rss_mb: float
    loaded_rss_mb: float
    trainable_params: int
    total_params: int


def _rss_now_mb() -> float:
    """Current resident set size (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)
    except (OSError, ValueError, IndexError):
        return _rss_peak_mb()


def _rss_peak_mb() -> float:
    """Peak resident set size of this process's own address space.

    ``VmHWM`` from ``/proc/self/status`` where there is one: ``getrusage``'s ``ru_maxrss`` is not
    used on Linux because exec carries the parent's high-water mark into it, so a child of a big
    process (a test runner) would report the parent's size.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS


def measure_training(
    config: TrainConfig,
    *,
    batch: int | None = None,
    seq_len: int | None = None,
    steps: int = 3,
    threads: int | None = None,
    timeout_s: float = 600.0,
    artifacts: str | None = None,
    lean_memory: bool | None = None,
) -> TrainingMeasurement:
    """Train ``steps`` steps of ``config`` (batch and length overridable) in a fresh process.

    ``lean_memory`` sets the ORT engines' allocator (None: their policy, lean only under a cap).

    With ``config.engine`` ``ort`` or ``ort-plain``, ``artifacts`` is the folder from
    :func:`broker_server.artifacts.build_artifacts`, and the child makes torch, transformers and
    peft unimportable first, as on a device that has only the ``edge`` extra (for ``ort-plain``
    ``onnxruntime.training`` too, as on a device with plain onnxruntime).
    """
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    changes: dict[str, Any] = {}
    if batch is not None:
        changes["batch_size"] = batch
    if seq_len is not None:
        changes["seq_len"] = seq_len
    config = replace(config, **changes)
    cmd = [
        sys.executable,
        "-m",
        "edge_runtime.engines.memory_probe",
        "--config",
        json.dumps(config.to_dict()),
        "--steps",
        str(steps),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    if config.engine in ("ort", "ort-plain"):
        if artifacts is None:
            raise ConfigError("measuring the ORT engine needs its artifact folder")
        cmd += ["--artifacts", str(artifacts)]
        if lean_memory is not None:
            cmd += ["--lean", str(int(lean_memory))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise EngineError(f"the memory probe did not finish within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise EngineError(f"the memory probe failed (exit {done.returncode}): {tail}")
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return TrainingMeasurement(**result)
    except (IndexError, ValueError, TypeError) as exc:
        raise EngineError(f"the memory probe printed no result: {exc}: {done.stdout[-200:]!r}") from None


def measure_in_process(
    build: Callable[[], TrainingEngine], config: TrainConfig, steps: int
) -> TrainingMeasurement:
    """Build an engine with ``build`` and train ``steps`` synthetic batches of ``config`` here.

    The texts fill every batch to exactly ``config.seq_len`` tokens. Meant for a fresh process
    (:func:`measure_training` runs one, and so does a benchmark that builds an engine of its own):
    the peak memory is the whole process's. Resident size is read before and after ``build``.
    """
    import numpy as np

    from edge_runtime.data import TextDataset

    startup = _rss_now_mb()
    engine = build()
    loaded = _rss_now_mb()
    rows = steps * config.batch_size
    rng = np.random.default_rng(0)
    # seq_len words always tokenize past seq_len with [CLS] and [SEP], so truncation fills each row
    texts = tuple(" ".join(rng.choice(_WORDS, size=config.seq_len)) for _ in range(rows))
    labels = np.arange(rows) % config.num_labels
    data = TextDataset(texts, labels, tuple(f"class{i}" for i in range(config.num_labels)))
    stamps: list[float] = []
    start = time.perf_counter()
    engine.train(data, epochs=1, seed=0, progress=lambda step, total: stamps.append(time.perf_counter()))
    times = np.diff([start, *stamps])
    step_s = float(times[1:].mean()) if len(times) > 1 else float(times[0])
    trainable = sum(int(v.size) for v in engine.trainable_state().values())
    return TrainingMeasurement(
        peak_rss_mb=_rss_peak_mb(),
        step_s=step_s,
        steps=len(stamps),
        startup_rss_mb=startup,
        loaded_rss_mb=loaded,
        trainable_params=trainable,
        total_params=engine.total_params,
    )


def _probe(
    config: TrainConfig,
    steps: int,
    threads: int | None,
    artifacts: str | None,
    lean_memory: bool | None = None,
) -> TrainingMeasurement:
    """Runs in the child: build the engine of ``config.engine``, train, measure."""

    def build() -> TrainingEngine:
        if config.engine == "ort":
            from edge_runtime.engines.ort_engine import OrtEngine

            return OrtEngine(
                config, artifacts=str(artifacts), seed=0, threads=threads, lean_memory=lean_memory
            )
        if config.engine == "ort-plain":
            from edge_runtime.engines.ort_step_engine import OrtStepEngine

            return OrtStepEngine(
                config, artifacts=str(artifacts), seed=0, threads=threads, lean_memory=lean_memory
            )
        from edge_runtime.engines.torch_engine import TorchEngine

        return TorchEngine(config, seed=0, threads=threads)

    return measure_in_process(build, config, steps)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process: prints one JSON object."""
    parser = argparse.ArgumentParser(description="measure peak memory and step time of training")
    parser.add_argument("--config", required=True, help="TrainConfig as JSON")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--artifacts", default=None, help="ORT artifact folder (engines ort, ort-plain)")
    parser.add_argument(
        "--lean", type=int, choices=(0, 1), default=None, help="ORT allocator (default: policy)"
    )
    args = parser.parse_args(argv)
    config = TrainConfig.from_dict(json.loads(args.config))
    if config.engine in ("ort", "ort-plain"):  # as on a device with the edge extra only
        blocked: tuple[str, ...] = ("torch", "transformers", "peft")
        if config.engine == "ort-plain":  # and with plain onnxruntime, not onnxruntime-training
            blocked += ("onnxruntime.training",)
        for name in blocked:
            sys.modules[name] = None  # type: ignore[assignment]
    lean = None if args.lean is None else bool(args.lean)
    result = _probe(config, args.steps, args.threads, args.artifacts, lean)
    print(json.dumps(result.__dict__))
    return 0


if __name__ == "__main__":
    sys.exit(main())
