"""The plain ONNX Runtime training engine: one step graph run for inference, AdamW in numpy.

For devices where onnxruntime-training cannot be installed (its wheels are x86_64 and Python <=
3.11 only; a Raspberry Pi is aarch64). This module imports numpy, the device tokenizer
(:mod:`edge_runtime.tokenizer`: ``tokenizers`` if installed, else the built-in WordPiece) and plain
``onnxruntime`` only; the tests run it with torch, transformers, peft and
``onnxruntime.training`` made unimportable.

The server builds, once per configuration, an artifact folder of the ``step`` flavour
(``broker_server.artifacts.build_artifacts(config, flavour="step")``, from
``broker_server.step_graph``): ``step_model.onnx``, a graph of standard ONNX operators whose inputs
are the trainable tensors (by their engine-neutral names) and a batch (``input_ids``,
``attention_mask``, ``labels``) and whose outputs are the mean cross-entropy ``loss``, the
``logits``, the unit-norm pooled ``features`` and ``grad.<name>`` for every trainable tensor;
``initial_state.npz``, the module's starting values; ``tokenizer.json`` and ``manifest.json``.
Each step feeds the current module into an ``onnxruntime.InferenceSession`` and takes torch's
clipping and AdamW step in numpy (:func:`edge_runtime.engines.adamw.adamw_step`, shared with the
onnxruntime-training engine), with the proximal term and FFA-LoRA's frozen ``A`` handled as
there. Logit adjustment needs nothing here: :mod:`edge_runtime.label_prior` shifts the head's bias.

What matches the torch engine: the model, initial values, tokenisation, batch order, loss,
update rule and metrics. Every PEFT kind trains (LoRA, bottleneck adapters, soft prompts), since
the graph is traced from the torch engine's own model. Not the same: no dropout (the graph is
traced in eval mode; LoRA dropout above 0 is refused), and :meth:`class_feature_sums` is not
available for soft prompts (the frozen base without the prompt is not in the graph).
Evaluation runs the same graph, so it computes gradients it throws away.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import time
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
from edge_runtime.engines.ort_engine import (
    TOKENIZER_NAME,
    import_onnxruntime,
    load_manifest,
    use_lean_allocator,
    wants_lean_memory,
)
from edge_runtime.errors import ConfigError, EngineError
from edge_runtime.peft_specs import AdapterSpec, LoraSpec
from edge_runtime.tokenizer import load_tokenizer

STEP_INPUTS = ("input_ids", "attention_mask", "labels")
STEP_OUTPUTS = ("loss", "logits", "features")
GRAD_PREFIX = "grad."
STEP_FLAVOUR = "step"
STEP_MODEL_NAME = "step_model.onnx"
INITIAL_STATE_NAME = "initial_state.npz"


def check_step_support(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` if the step graph cannot train ``config``'s module as torch would."""
    refuse_classless_task(config.task)
    refuse_image_model(config.model)
    spec = config.peft
    if isinstance(spec, LoraSpec) and spec.dropout > 0:
        raise ConfigError(
            f"the plain ORT engine's step graph has no dropout; LoraSpec.dropout must be 0, "
            f"got {spec.dropout!r} (use engine 'torch' for LoRA dropout)"
        )


def plain_ort_available() -> bool:
    """True if an ``onnxruntime`` package (plain or training) is installed, checked without importing it."""
    return importlib.util.find_spec("onnxruntime") is not None


def _bypass_names(config: TrainConfig, names: list[str]) -> list[str]:
    """The tensors whose zeroing leaves the frozen base model: LoRA's B, an adapter's up projection."""
    if isinstance(config.peft, LoraSpec):
        return [n for n in names if n.endswith(".lora_B")]
    if isinstance(config.peft, AdapterSpec):
        return [n for n in names if ".adapter.up." in n]
    raise EngineError(
        f"the plain ORT engine cannot bypass a {config.peft.kind!r} module to gather frozen-model "
        "statistics; use engine 'torch' for that phase"
    )


class OrtStepEngine:
    """Trains any PEFT module with plain onnxruntime: gradients from the step graph, AdamW in numpy."""

    name = "ort-plain"

    def __init__(
        self,
        config: TrainConfig,
        *,
        artifacts: str | Path,
        seed: int = 0,
        threads: int | None = None,
        lean_memory: bool | None = None,
    ) -> None:
        check_step_support(config)
        # None: lean only under a memory cap (wants_lean_memory); the setting is process-wide
        self.lean_memory = wants_lean_memory(config) if lean_memory is None else lean_memory
        if self.lean_memory:
            use_lean_allocator()
        self.config = config
        self.seed = seed
        folder = Path(artifacts)
        manifest = load_manifest(folder)
        if manifest.get("flavour") != STEP_FLAVOUR:
            raise ConfigError(f"{folder} holds onnxruntime-training artifacts, not a step graph")
        for field_name, expected in (
            ("peft", config.peft.to_dict()),
            ("num_labels", config.num_labels),
            ("model", config.model),
        ):
            if manifest.get(field_name) != expected:
                raise ConfigError(
                    f"ORT artifacts in {folder} were built for {field_name}={manifest.get(field_name)!r}, "
                    f"not {expected!r}"
                )
        self.hidden = int(manifest["hidden"])
        self._total_params = int(manifest["total_params"])
        self._pad_id = int(manifest["pad_token_id"])
        shapes = {t["name"]: tuple(int(d) for d in t["shape"]) for t in manifest["trainable"]}
        self._grad_names = {t["name"]: t["grad"] for t in manifest["trainable"]}

        self._tokenizer = load_tokenizer(folder / TOKENIZER_NAME, config.seq_len)
        onnxruntime = import_onnxruntime()

        try:
            options = onnxruntime.SessionOptions()
            options.enable_cpu_mem_arena = False  # the arena would keep its high-water mark for good
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            self._session = onnxruntime.InferenceSession(
                str(folder / STEP_MODEL_NAME), options, providers=["CPUExecutionProvider"]
            )
            with np.load(folder / INITIAL_STATE_NAME, allow_pickle=False) as initial:
                values = {n: np.array(initial[n], dtype=np.float32) for n in shapes}
        except KeyError as exc:
            raise EngineError(f"{folder / INITIAL_STATE_NAME} has no tensor {exc}") from None
        except Exception as exc:  # ORT raises its own runtime errors; all mean the same here
            raise EngineError(f"cannot load the ORT step graph from {folder}: {exc}") from None
        for name, value in values.items():
            if value.shape != shapes[name]:
                raise EngineError(f"initial value of {name} has shape {value.shape}, not {shapes[name]}")
        inputs = {i.name for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        missing = (set(shapes) | set(STEP_INPUTS)) - inputs
        missing |= (set(self._grad_names.values()) | set(STEP_OUTPUTS)) - outputs
        if missing:
            raise EngineError(f"the step graph in {folder} lacks {sorted(missing)[:3]}")
        self._values: dict[str, np.ndarray] = values
        self._token_cache = TokenCache(self._tokenizer.encode_batch)

    @property
    def total_params(self) -> int:
        """Parameters of the whole model, frozen ones included (as the torch engine counts them)."""
        return self._total_params

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The trainable parameters by canonical name, as float32 arrays (copies)."""
        return {n: v.copy() for n, v in self._values.items()}

    def load_trainable_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the trainable parameters; names and shapes must match exactly."""
        values = checked_state(self._values, state)
        self._values = values

    def _tokens(self, data: Dataset) -> list[list[int]]:
        return self._token_cache.ids(data)

    def _batch(self, ids: list[list[int]], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return padded_batch(ids, rows, self._pad_id)

    def _run(
        self, input_ids: np.ndarray, mask: np.ndarray, labels: np.ndarray, outputs: list[str]
    ) -> list[np.ndarray]:
        """One run of the step graph on the current module."""
        feeds: dict[str, Any] = dict(self._values)
        feeds.update(input_ids=input_ids, attention_mask=mask, labels=labels)
        try:
            return list(self._session.run(outputs, feeds))
        except Exception as exc:  # ORT's runtime errors carry no common base class
            raise EngineError(f"the ORT step graph failed: {exc}") from None

    def _step(
        self, input_ids: np.ndarray, mask: np.ndarray, target: np.ndarray, wanted: list[str]
    ) -> tuple[float, np.ndarray, list[np.ndarray]]:
        """Loss, logits and the gradients in ``wanted[2:]`` of one micro-batch."""
        out = self._run(input_ids, mask, target, wanted)
        return float(out[0]), out[1], out[2:]

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
            # FFA-LoRA: a rate of 0 leaves A out of ``trained``: no step, clipping or weight decay
            rates.update({n: 0.0 for n in rates if "lora_A" in n})
        trained = [n for n, rate in rates.items() if rate > 0]
        wanted = ["loss", "logits"] + [self._grad_names[n] for n in trained]
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
        for _ in range(epochs):
            order = rng.permutation(len(data))
            for b in range(steps_per_epoch):
                rows = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                loss, hits, grads = micro_batch_step(
                    functools.partial(self._step, wanted=wanted),
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
                        grads[n] = grads[n] + 2.0 * cfg.prox_mu * (self._values[n] - anchor[n])
                if not math.isfinite(loss):
                    raise EngineError(f"training diverged (loss {loss}) at step {step}")
                self._values.update(adamw_step(self._values, grads, m, v, rates, step + 1, cfg.weight_decay))
                step += 1
                loss_sum += loss * len(rows)
                correct += hits
                seen += len(rows)
                if progress is not None:
                    progress(step, total)
        return TrainResult(
            steps=step,
            samples=seen,
            loss=loss_sum / max(seen, 1),
            accuracy=correct / max(seen, 1),
            seconds=time.perf_counter() - start,
        )

    def _outputs(self, data: Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Logits and pooled features of ``data``, in ``data``'s order."""
        ids = self._tokens(data)
        labels = np.asarray(data.labels, dtype=np.int64)
        order = np.argsort([len(s) for s in ids], kind="stable")  # similar lengths pad less
        logits = np.empty((len(data), self.config.num_labels), dtype=np.float32)
        features = np.empty((len(data), self.hidden), dtype=np.float32)
        for start in range(0, len(data), batch_size):
            rows = order[start : start + batch_size]
            input_ids, mask = self._batch(ids, rows)
            logits[rows], features[rows] = self._run(input_ids, mask, labels[rows], ["logits", "features"])
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
        """Per-class sums of the frozen model's pooled features (module bypassed) and per-class counts.

        LoRA is bypassed by zeroing every ``lora_B``, an adapter by zeroing its up projection
        (both exact); a soft prompt cannot be left out of the graph and raises :class:`EngineError`.
        """
        saved = dict(self._values)
        try:
            for name in _bypass_names(self.config, list(saved)):
                self._values[name] = np.zeros_like(saved[name])
            _, feats = self._outputs(data, EVAL_BATCH)
        finally:
            self._values = saved
        c = self.config.num_labels
        labels = np.asarray(data.labels, dtype=np.int64)
        sums = np.zeros((c, self.hidden), dtype=np.float64)
        np.add.at(sums, labels, feats.astype(np.float64))
        counts = np.bincount(labels, minlength=c).astype(np.float64)
        return sums.astype(np.float32), counts.astype(np.float32)
