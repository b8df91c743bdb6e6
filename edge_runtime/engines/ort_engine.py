"""The ONNX Runtime on-device training engine: no torch, transformers or peft on the device.

Everything model-specific arrives in one artifact folder built on the server by
``broker_server.artifacts.build_artifacts`` (training and eval graphs, checkpoint, optimizer graph,
``tokenizer.json`` and ``manifest.json``). This module imports numpy, the device tokenizer
(:mod:`edge_runtime.tokenizer`: ``tokenizers`` if installed) and the ONNX Runtime training API
only. ``import onnxruntime.training`` would import torch (its ``optim`` and ``amp`` subpackages
do), so :func:`_training_api` loads the ``onnxruntime.training.api`` modules without running that
package's ``__init__`` (on an install without torch, the public ``from onnxruntime.training.api
import Module`` fails for that reason). Where torch *is* installed, the onnxruntime-training
extension module itself imports it on ``import onnxruntime`` (for its ORTModule bindings); nothing
here does, and the tests run this engine with torch, transformers and peft made unimportable.

What matches the torch engine, and what does not:

- Same model, same initial weights, same trainable names: the artifacts are exported from a
  :class:`~edge_runtime.engines.torch_engine.TorchEngine` built with the same configuration and seed.
- Same tokenisation (the torch engine's fast tokenizer, saved as ``tokenizer.json``), padding,
  batch order (``numpy.random.default_rng(seed).permutation`` per epoch), loss and metrics.
- Same update rule: ORT computes the loss and the gradients (``Module.train_step``); the step is
  taken here in numpy with torch's AdamW arithmetic, two learning rates (``lr`` for the module,
  ``head_lr`` for the head, a frozen head if ``head_lr`` is 0), gradient clipping to norm 1 and
  the proximal term ``prox_mu ||theta - theta0||^2`` (its gradient ``2 prox_mu (theta - theta0)``
  is added before clipping, as autograd does in the torch engine). With ``LoraSpec.train_a``
  False (FFA-LoRA) the ``lora_A`` factors get rate 0 and are never stepped. ORT's own optimizer graph
  (``optimizer_model.onnx``, AdamW) is built but not used: it has one learning rate, no clipping
  and no proximal term.
- Not the same: the graphs are exported in eval mode, so no dropout runs while training. The torch
  engine puts the whole model in train mode while training, so a base model with dropout (BERT
  and MiniLM have 0.1) trains with it there and without it here. LoRA dropout above 0 is refused
  (:class:`ConfigError`) rather than silently dropped.
- PEFT kinds: LoRA only. Adapters and soft prompts raise :class:`ConfigError`.

:meth:`OrtEngine.class_feature_sums` bypasses LoRA exactly by running the eval graph with every
``lora_B`` set to zero (``W x + s B A x`` with ``B = 0`` is ``W x``), then restores them.
"""

from __future__ import annotations

import functools
import gc
import importlib
import importlib.util
import json
import math
import sys
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.config import TrainConfig
from edge_runtime.data import Dataset
from edge_runtime.engines.adamw import adamw_step
from edge_runtime.engines.base import (
    EVAL_BATCH,
    EvalResult,
    ProgressFn,
    TrainResult,
    macro_f1,
    refuse_classless_task,
    refuse_image_model,
)
from edge_runtime.engines.numpy_state import TokenCache, checked_state, micro_batch_step, padded_batch
from edge_runtime.errors import ConfigError, EngineError
from edge_runtime.peft_specs import LoraSpec
from edge_runtime.tokenizer import load_tokenizer

ARTIFACT_FORMAT = 1
"""Version of the artifact folder layout and manifest; bumped when either changes."""
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
INPUT_NAMES = ("input_ids", "attention_mask", "labels")
OUTPUT_NAMES = ("loss", "logits", "features")


def check_ort_support(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` if the ORT engine cannot train ``config``'s module as torch would."""
    refuse_classless_task(config.task)
    refuse_image_model(config.model)
    spec = config.peft
    if not isinstance(spec, LoraSpec):
        raise ConfigError(
            f"the ORT engine supports PEFT kind 'lora' only, not {spec.kind!r}; use engine 'torch'"
        )
    if spec.dropout > 0:
        raise ConfigError(
            f"the ORT engine's graphs are exported without dropout; LoraSpec.dropout must be 0, "
            f"got {spec.dropout!r} (use engine 'torch' for LoRA dropout)"
        )


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LEAN_MMAP_THRESHOLD = 1 << 20


def use_lean_allocator(threshold: int = LEAN_MMAP_THRESHOLD) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes and more with mmap, returned when freed.

    By default glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), so the
    activation buffers of one training step stay in the heap and the next step's land beside
    them: resident memory grows by what fragmentation costs. A fixed 1 MiB threshold measured
    about 150 MiB less peak memory training MiniLM (batch 32, 64 tokens) for 1.32x the time per
    step (``bench/ort_allocator.py``). The setting is process-wide; returns False where it does not
    apply (no glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def wants_lean_memory(config: TrainConfig, device_cap_mb: float | None = None) -> bool:
    """Whether an ORT engine should trade step time for peak memory (:func:`use_lean_allocator`).

    Only under a memory cap, the assignment's (``config.mem_cap_mb``) or the device's own: the lean
    allocator measured 0.86x the peak (887 against 1,035 MiB) and 1.32x the step time training
    MiniLM (LoRA r=8, batch 32, 64 tokens; ``bench/ort_allocator.py``), so an uncapped device trains
    faster without it.
    """
    return config.mem_cap_mb is not None or device_cap_mb is not None


# What to install for the ort engine, and where that is possible at all: the error every missing
# onnxruntime-training raises names it (the engine choice, the simulator, the artifact builder).
ORT_TRAINING_INSTALL = (
    "onnxruntime-training (pip install 'fedpeft[edge-training]'; its wheels are for Linux x86_64 "
    "and CPython <= 3.11 only: elsewhere use --engine ort-plain or torch)"
)


def ort_available() -> bool:
    """True if onnxruntime-training is installed (checked without importing it)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(
        (Path(p) / "training" / "api" / "module.py").is_file() for p in spec.submodule_search_locations
    )


def block_torch(*, plain_ort: bool = False) -> list[str]:
    """Make torch, transformers and peft unimportable, as on a device with the edge extra only;
    with ``plain_ort``, ``onnxruntime.training`` too, as on a device with plain onnxruntime.

    Returns those that were already imported (and so cannot be blocked any more).
    """
    names = ("torch", "transformers", "peft") + (("onnxruntime.training",) if plain_ort else ())
    loaded = [n for n in names if sys.modules.get(n) is not None]
    for name in names:
        if name not in loaded:
            sys.modules[name] = None  # type: ignore[assignment]
    return loaded


def import_onnxruntime() -> Any:
    """``import onnxruntime`` without importing torch.

    onnxruntime-training's ``__init__`` checks its build by importing ``onnxruntime.training``,
    whose ``__init__`` imports torch where torch is installed (about 240 MB resident, measured:
    ``import onnxruntime`` took a process from 44 to 289 MB on this project's venv). Only that
    check needs it: with ``onnxruntime.training`` marked absent during the import, the check
    finds no ORTModule and moves on. The mark is removed afterwards, so a later ``import
    onnxruntime.training`` (the artifact builder's) still gets the real package.
    """
    loaded = sys.modules.get("onnxruntime")
    if loaded is not None:
        return loaded
    marked = "onnxruntime.training" not in sys.modules
    if marked:
        sys.modules["onnxruntime.training"] = None  # type: ignore[assignment]
    try:
        import onnxruntime
    finally:
        if marked and sys.modules.get("onnxruntime.training", 0) is None:
            del sys.modules["onnxruntime.training"]
    return onnxruntime


def _training_api() -> tuple[Any, Any]:
    """``CheckpointState`` and ``Module`` of ``onnxruntime.training.api``, without importing torch."""
    loaded = sys.modules.get("onnxruntime.training.api.module")
    if loaded is None:
        try:
            onnxruntime = import_onnxruntime()
        except ImportError as exc:
            raise EngineError(f"the ORT engine needs {ORT_TRAINING_INSTALL}: {exc}") from None
        package = Path(onnxruntime.__file__).parent / "training"
        if not (package / "api" / "module.py").is_file():
            raise EngineError(f"the ORT engine needs {ORT_TRAINING_INSTALL}; found plain onnxruntime")
        stub = None
        if "onnxruntime.training" not in sys.modules:
            # A bare package object stands in for onnxruntime.training while its api subpackage
            # loads, so the real __init__ (which imports torch) never runs; it is removed again so
            # that a later ``import onnxruntime.training`` still gets the real package.
            stub = types.ModuleType("onnxruntime.training")
            stub.__path__ = [str(package)]
            sys.modules["onnxruntime.training"] = stub
        try:
            importlib.import_module("onnxruntime.training.api.checkpoint_state")
            importlib.import_module("onnxruntime.training.api.module")
        except ImportError as exc:
            raise EngineError(f"cannot load the ONNX Runtime training API: {exc}") from None
        finally:
            if stub is not None and sys.modules.get("onnxruntime.training") is stub:
                del sys.modules["onnxruntime.training"]
    checkpoint_state = sys.modules["onnxruntime.training.api.checkpoint_state"]
    module = sys.modules["onnxruntime.training.api.module"]
    return checkpoint_state.CheckpointState, module.Module


def load_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an artifact folder, checked for its format version."""
    path = folder / MANIFEST_NAME
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read ORT artifact manifest {path}: {exc}") from None
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise EngineError(
            f"{path} has artifact format {manifest.get('format')!r}; this build reads {ARTIFACT_FORMAT}"
        )
    return manifest


class OrtEngine:
    """Trains a LoRA module with ONNX Runtime's on-device training API; no torch on the device.

    ``artifacts`` is a folder built by ``broker_server.artifacts.build_artifacts`` for the same
    configuration; the module starts from the values of that build's seed (``seed`` here only
    matters for training's batch order, which takes its own seed).

    ``profile_prefix``: ONNX Runtime's own profiler records every kernel's time and shapes, and
    writes them as a Chrome trace (JSON) named ``<prefix>_<date>.json`` when the engine is
    released (:meth:`close`); ``bench/step_profile.py`` reads it. The training and evaluation
    sessions get the same name (ORT dates it to the second) and the training session writes last,
    so a profile of training reads back whole; one of evaluation alone may not.
    """

    name = "ort"

    def __init__(
        self,
        config: TrainConfig,
        *,
        artifacts: str | Path,
        seed: int = 0,
        threads: int | None = None,
        lean_memory: bool | None = None,
        profile_prefix: str | Path | None = None,
    ) -> None:
        check_ort_support(config)
        # None: lean only under a memory cap (wants_lean_memory); the setting is process-wide
        self.lean_memory = wants_lean_memory(config) if lean_memory is None else lean_memory
        if self.lean_memory:
            use_lean_allocator()
        self.config = config
        self.seed = seed
        folder = Path(artifacts)
        manifest = load_manifest(folder)
        if manifest.get("flavour", "training") != "training":
            raise ConfigError(f"{folder} holds a step graph for plain onnxruntime, not training artifacts")
        for field_name, expected in (
            ("peft", config.peft.to_dict()),
            ("num_labels", config.num_labels),
            ("model", config.model),
            ("frozen_weights", config.frozen_weights),
        ):
            # a manifest from before the option was built with fp32 frozen weights
            built = manifest.get(field_name, "fp32" if field_name == "frozen_weights" else None)
            if built != expected:
                raise ConfigError(
                    f"ORT artifacts in {folder} were built for {field_name}={built!r}, not {expected!r}"
                )
        self.hidden = int(manifest["hidden"])
        self._total_params = int(manifest["total_params"])
        self._pad_id = int(manifest["pad_token_id"])
        self._onnx_names: dict[str, str] = {t["name"]: t["onnx"] for t in manifest["trainable"]}
        shapes = {t["name"]: tuple(int(d) for d in t["shape"]) for t in manifest["trainable"]}

        self._tokenizer = load_tokenizer(folder / TOKENIZER_NAME, config.seq_len)
        onnxruntime = import_onnxruntime()

        checkpoint_state_cls, module_cls = _training_api()
        try:
            self._state = checkpoint_state_cls.load_checkpoint(str(folder / "checkpoint"))
            options = onnxruntime.SessionOptions()
            # Under a memory cap the arena stays off: it keeps its high-water mark for good, and
            # the cap's predictions were measured without it. Uncapped, ORT's arena reuses the
            # step's buffers instead of a malloc (often an mmap) per tensor
            # (``bench/results/flower-ort-arena/``).
            options.enable_cpu_mem_arena = not self.lean_memory
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            if profile_prefix is not None:
                Path(profile_prefix).parent.mkdir(parents=True, exist_ok=True)
                options.enable_profiling = True
                options.profile_file_prefix = str(profile_prefix)
            self._module = module_cls(
                str(folder / "training_model.onnx"),
                self._state,
                str(folder / "eval_model.onnx"),
                device="cpu",
                session_options=options,
            )
        except Exception as exc:  # ORT raises its own runtime errors; all mean the same here
            raise EngineError(f"cannot load ORT artifacts from {folder}: {exc}") from None
        params = self._state.parameters
        self._values: dict[str, np.ndarray] = {}
        for name, onnx_name in self._onnx_names.items():
            if onnx_name not in params:
                raise EngineError(f"ORT checkpoint has no parameter {onnx_name!r} for {name!r}")
            value = np.array(params[onnx_name].data, dtype=np.float32)
            if value.shape != shapes[name]:
                raise EngineError(f"ORT checkpoint's {onnx_name} has shape {value.shape}, not {shapes[name]}")
            self._values[name] = value
        self._token_cache = TokenCache(self._tokenizer.encode_batch)

    @property
    def total_params(self) -> int:
        """Parameters of the whole model, frozen ones included (as the torch engine counts them)."""
        return self._total_params

    def close(self) -> None:
        """Release the ORT sessions (and write the profile, if one was asked for); unusable after."""
        self._module = None
        gc.collect()

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The trainable parameters by canonical name, as float32 arrays (copies)."""
        return {n: v.copy() for n, v in self._values.items()}

    def load_trainable_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the trainable parameters; names and shapes must match exactly."""
        values = checked_state(self._values, state)
        for name, value in values.items():
            self._set(name, value)

    def _set(self, name: str, value: np.ndarray) -> None:
        """Write one trainable parameter into the ORT checkpoint state and keep our copy."""
        value = np.ascontiguousarray(value, dtype=np.float32)
        self._state.parameters[self._onnx_names[name]] = value
        self._values[name] = value

    def _tokens(self, data: Dataset) -> list[list[int]]:
        return self._token_cache.ids(data)

    def _batch(self, ids: list[list[int]], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return padded_batch(ids, rows, self._pad_id)

    def _step(
        self, input_ids: np.ndarray, mask: np.ndarray, target: np.ndarray, trained: list[str], step: int
    ) -> tuple[float, np.ndarray, list[np.ndarray]]:
        """Loss, logits and the gradients of ``trained`` of one micro-batch (fresh, not summed)."""
        self._module.lazy_reset_grad()
        try:
            outputs = self._module(input_ids, mask, target)
        except Exception as exc:  # ORT's runtime errors carry no common base class
            raise EngineError(f"ORT training step {step} failed: {exc}") from None
        grads = [np.array(self._state.parameters[self._onnx_names[n]].grad) for n in trained]
        return float(outputs[0]), np.asarray(outputs[1]), grads

    def train(
        self, data: Dataset, *, epochs: int, seed: int, progress: ProgressFn | None = None
    ) -> TrainResult:
        """Train the module in place; loss = CE + prox_mu * ||theta - theta0||^2, as the torch engine."""
        cfg = self.config
        if len(data) == 0:
            raise EngineError("cannot train on an empty dataset")
        ids = self._tokens(data)
        labels = np.asarray(data.labels, dtype=np.int64)
        rates = {n: (cfg.head_lr if n.startswith("head.") else cfg.lr) for n in self._values}
        if isinstance(cfg.peft, LoraSpec) and not cfg.peft.train_a:
            # FFA-LoRA: a rate of 0 leaves A out of ``trained``, so no step, clipping or weight
            # decay touches it (as in the torch engine, where A is out of the optimizer)
            rates.update({n: 0.0 for n in rates if "lora_A" in n})
        trained = [n for n, rate in rates.items() if rate > 0]
        anchor = {n: self._values[n].copy() for n in trained} if cfg.prox_mu > 0 else {}
        m = {n: np.zeros_like(self._values[n]) for n in trained}
        v = {n: np.zeros_like(self._values[n]) for n in trained}
        rng = np.random.default_rng(seed)
        steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
        total = steps_per_epoch * epochs
        step = 0
        loss_sum = 0.0
        correct = 0
        seen = 0
        start = time.perf_counter()
        self._module.train()
        for _ in range(epochs):
            order = rng.permutation(len(data))
            for b in range(steps_per_epoch):
                rows = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                loss, hits, grads = micro_batch_step(
                    functools.partial(self._step, trained=trained, step=step),
                    ids,
                    labels,
                    rows,
                    micro_rows=cfg.micro_rows(),
                    pad_id=self._pad_id,
                    names=trained,
                )
                if anchor:
                    prox = sum(float(np.sum((self._values[n] - anchor[n]) ** 2)) for n in trained)
                    loss += cfg.prox_mu * prox
                    for n in trained:
                        grads[n] += 2.0 * cfg.prox_mu * (self._values[n] - anchor[n])
                if not math.isfinite(loss):
                    raise EngineError(f"training diverged (loss {loss}) at step {step}")
                self._adamw_step(grads, m, v, rates, step + 1)
                step += 1
                loss_sum += loss * len(rows)
                correct += hits
                seen += len(rows)
                if progress is not None:
                    progress(step, total)
        self._module.lazy_reset_grad()
        return TrainResult(
            steps=step,
            samples=seen,
            loss=loss_sum / max(seen, 1),
            accuracy=correct / max(seen, 1),
            seconds=time.perf_counter() - start,
        )

    def _adamw_step(
        self,
        grads: dict[str, np.ndarray],
        m: dict[str, np.ndarray],
        v: dict[str, np.ndarray],
        rates: dict[str, float],
        t: int,
    ) -> None:
        """torch's ``clip_grad_norm_(.., 1.0)`` then ``AdamW`` step ``t`` (:func:`adamw_step`)."""
        stepped = adamw_step(self._values, grads, m, v, rates, t, self.config.weight_decay)
        for name, value in stepped.items():
            self._set(name, value)

    def _outputs(self, data: Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Logits and pooled features of ``data`` from the eval graph, in ``data``'s order."""
        ids = self._tokens(data)
        labels = np.asarray(data.labels, dtype=np.int64)
        order = np.argsort([len(s) for s in ids], kind="stable")  # similar lengths pad less
        logits = np.empty((len(data), self.config.num_labels), dtype=np.float32)
        features = np.empty((len(data), self.hidden), dtype=np.float32)
        self._module.eval()
        try:
            for start in range(0, len(data), batch_size):
                rows = order[start : start + batch_size]
                input_ids, mask = self._batch(ids, rows)
                outputs = self._module(input_ids, mask, labels[rows])
                logits[rows] = outputs[1]
                features[rows] = outputs[2]
        except Exception as exc:  # ORT's runtime errors carry no common base class
            raise EngineError(f"ORT evaluation failed: {exc}") from None
        finally:
            self._module.train()
        return logits, features

    def evaluate(self, data: Dataset, *, batch_size: int = EVAL_BATCH) -> EvalResult:
        """Accuracy, macro F1 and mean cross-entropy of the current module on ``data``."""
        if len(data) == 0:
            raise EngineError("cannot evaluate on an empty dataset")
        logits, _ = self._outputs(data, batch_size)
        y = np.asarray(data.labels, dtype=np.int64)
        z = logits.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = float(-log_probs[np.arange(len(y)), y].mean())
        pred = logits.argmax(-1)
        return EvalResult(
            accuracy=float((pred == y).mean()),
            macro_f1=macro_f1(y, pred, self.config.num_labels),
            loss=loss,
            predictions=pred,
        )

    def class_feature_sums(self, data: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """Per-class sums of the frozen model's pooled features (LoRA bypassed) and per-class counts."""
        saved = {n: v for n, v in self._values.items() if n.endswith(".lora_B")}
        try:
            for name, value in saved.items():
                self._set(name, np.zeros_like(value))
            _, feats = self._outputs(data, EVAL_BATCH)
        finally:
            for name, value in saved.items():
                self._set(name, value)
        c = self.config.num_labels
        labels = np.asarray(data.labels, dtype=np.int64)
        sums = np.zeros((c, self.hidden), dtype=np.float64)
        np.add.at(sums, labels, feats.astype(np.float64))
        counts = np.bincount(labels, minlength=c).astype(np.float64)
        return sums.astype(np.float32), counts.astype(np.float32)
