"""ONNX Runtime on-device training artifacts, built on the server for devices without torch.

A device that runs :class:`edge_runtime.engines.ort_engine.OrtEngine` needs no torch,
transformers or peft: everything model-specific comes in one self-contained folder built here.

- The torch model is built by :class:`~edge_runtime.engines.torch_engine.TorchEngine` itself, so
  the frozen weights, the PEFT module's initial values and its parameter names are the torch
  engine's for the same configuration and seed.
- It is exported (TorchScript exporter, eager attention, eval mode, opset 14) with three inputs
  ``input_ids``, ``attention_mask``, ``labels`` (int64) and three outputs: the mean cross-entropy
  ``loss`` first (the gradient graph starts there), then ``logits`` and the unit-norm pooled
  ``features``. A BERT encoder (MiniLM) is exported through
  :func:`~broker_server.packed_encoder.packed_features`: its linear layers compute the real
  tokens only, not the padding (the same features up to rounding). Opset 17 would export
  LayerNormalization, which the gradient builder of ORT 1.19 cannot differentiate; onnx is pinned
  to 1.16.2 because 1.17+ writes IR versions ORT 1.19 cannot load. Constant folding is off so
  that no trainable weight is folded into an anonymous initializer (a transposed LoRA factor).
- :func:`onnxruntime.training.artifacts.generate_artifacts` then writes the training, eval and
  AdamW optimizer models and the checkpoint (trainable = the PEFT module and the head, frozen =
  every other initializer).

The folder also holds the tokenizer (``tokenizer.json``, read on the device by the ``tokenizers``
package or, without it, by the built-in :class:`~edge_runtime.wordpiece.WordPieceTokenizer`) and
``manifest.json``: which configuration it was built for, and the map from each trainable ONNX
initializer to its engine-neutral name (the names of :meth:`TorchEngine.trainable_state`, so both
engines speak the same wire format).

A second flavour, ``step`` (``build_artifacts(config, flavour="step")``), is for devices with
plain ``onnxruntime`` only (:class:`edge_runtime.engines.ort_step_engine.OrtStepEngine`): one
graph of standard operators that computes the loss, the logits, the features and the gradient of
every trainable tensor (:mod:`broker_server.step_graph`), the module's initial values
(``initial_state.npz``), the tokenizer and the manifest (``"flavour": "step"``). It needs no
onnxruntime-training on either side and trains every PEFT kind.

Folders are cached under :func:`default_cache_dir`, keyed by a SHA-256 over everything that
changes the graph or the initial weights: the model's name and its folder's contents, the PEFT
spec, the number of labels, the sequence length, the seed, the versions of the exporting
libraries, the graph's token layout (:data:`TRAINING_LAYOUT`) and, when not fp32, how the frozen
linear weights are held (``TrainConfig.frozen_weights``: ``int8`` rewrites the training folder's
graphs with :func:`broker_server.int8_weights.quantize_frozen_linears`). A folder is
built in a temporary sibling and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.config import TrainConfig
from edge_runtime.engines.ort_engine import (
    ARTIFACT_FORMAT,
    INPUT_NAMES,
    MANIFEST_NAME,
    ORT_TRAINING_INSTALL,
    OUTPUT_NAMES,
    TOKENIZER_NAME,
    check_ort_support,
    ort_available,
)
from edge_runtime.engines.ort_step_engine import (
    INITIAL_STATE_NAME,
    STEP_FLAVOUR,
    STEP_MODEL_NAME,
    check_step_support,
)
from edge_runtime.errors import ConfigError, EngineError
from edge_runtime.models import resolve_model

if TYPE_CHECKING:
    from edge_runtime.engines.torch_engine import TorchEngine

OPSET = 14
STEP_OPSET = 17  # broker_server.onnx_lowering.OPSET, kept here so the key needs no torch import
# what decides the weights and the tokenizer; sharded checkpoints included
_MODEL_FILES = (
    "config.json",
    "*.safetensors",
    "*.bin",
    "tokenizer*.json",
    "vocab.txt",
    "special_tokens*.json",
)
_VERSIONED = ("torch", "transformers", "peft", "onnx", "onnxruntime-training")
TRAINING_FLAVOUR = "training"
TRAINING_LAYOUT = "packed-2"  # a new value rebuilds every cached training-flavour folder
FLAVOURS = (TRAINING_FLAVOUR, STEP_FLAVOUR)


@dataclass(frozen=True)
class ArtifactPaths:
    """The files of one artifact folder, as the ORT engine reads them."""

    folder: Path

    @property
    def training_model(self) -> Path:
        """Forward, loss and gradient graph."""
        return self.folder / "training_model.onnx"

    @property
    def eval_model(self) -> Path:
        """Forward and loss graph, no gradients."""
        return self.folder / "eval_model.onnx"

    @property
    def optimizer_model(self) -> Path:
        """ORT's AdamW graph over the trainable parameters."""
        return self.folder / "optimizer_model.onnx"

    @property
    def checkpoint(self) -> Path:
        """Every parameter's initial value: frozen weights and the module's starting point."""
        return self.folder / "checkpoint"

    @property
    def tokenizer(self) -> Path:
        """The model's tokenizer (``tokenizer.json``, Hugging Face tokenizers' format)."""
        return self.folder / TOKENIZER_NAME

    @property
    def manifest(self) -> Path:
        """What the folder was built for, and the trainable names."""
        return self.folder / MANIFEST_NAME


@contextmanager
def _native_stderr_captured() -> Iterator[Path]:
    """Send what native code writes to file descriptor 2 into a temporary file for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.NamedTemporaryFile("w+b", suffix=".log") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield Path(log.name)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def default_cache_dir() -> Path:
    """``$FEDPEFT_ARTIFACTS``, else ``~/.cache/fedpeft/ort-artifacts``."""
    env = os.environ.get("FEDPEFT_ARTIFACTS")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedpeft" / "ort-artifacts"


def _model_folder(config: TrainConfig) -> Path:
    path = Path(resolve_model(config.model))
    if not path.is_dir():
        raise ConfigError(f"ORT artifacts need a local model folder; {config.model!r} is not one")
    return path


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def artifact_key(config: TrainConfig, *, seed: int = 0, flavour: str = TRAINING_FLAVOUR) -> str:
    """Content hash of everything that changes the exported graphs or their initial weights."""
    folder = _model_folder(config)
    digest = hashlib.sha256()
    paths = sorted({p for pattern in _MODEL_FILES for p in folder.glob(pattern) if p.is_file()})
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    described = {
        "format": ARTIFACT_FORMAT,
        "opset": OPSET,
        "model": config.model,  # the manifest records it and the engine checks it
        "model_files": digest.hexdigest(),
        "peft": config.peft.to_dict(),
        "num_labels": config.num_labels,
        "seq_len": config.seq_len,
        "seed": seed,
        "versions": {p: _version(p) for p in _VERSIONED},
    }
    if flavour != TRAINING_FLAVOUR:  # left out for the first flavour: its cached folders keep their keys
        described["flavour"] = flavour
    else:  # BERT graphs compute on the real tokens only since this layout (broker_server.packed_encoder)
        described["layout"] = TRAINING_LAYOUT
        if config.frozen_weights != "fp32":  # left out for fp32: its cached folders keep their keys
            described["frozen_weights"] = config.frozen_weights
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


def build_artifacts(
    config: TrainConfig,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    threads: int | None = None,
    flavour: str = TRAINING_FLAVOUR,
) -> ArtifactPaths:
    """The artifact folder for ``config`` and ``seed``, built (once) in the cache if missing.

    ``flavour`` ``training``: onnxruntime-training artifacts (LoRA only); ``step``: the step
    graph for plain onnxruntime (every PEFT kind).
    """
    if flavour not in FLAVOURS:
        raise ConfigError(f"artifact flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}")
    if flavour == STEP_FLAVOUR:
        check_step_support(config)
        if config.frozen_weights != "fp32":
            raise ConfigError(
                f"frozen_weights {config.frozen_weights!r} is an option of the training flavour "
                "(engine ort), not of the step graph"
            )
    else:
        check_ort_support(config)
        if not ort_available():  # a cached pack would not help: its key names the package's version
            raise ConfigError(f"training artifacts for the ort engine need {ORT_TRAINING_INSTALL}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = artifact_key(config, seed=seed, flavour=flavour)
    final = cache / key
    if (final / MANIFEST_NAME).is_file():
        return ArtifactPaths(final)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        if flavour == STEP_FLAVOUR:
            _build_step_into(work, config, seed=seed, key=key, threads=threads)
        else:
            _build_into(work, config, seed=seed, key=key, threads=threads)
        try:
            os.replace(work, final)
        except OSError:
            if not (final / MANIFEST_NAME).is_file():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ArtifactPaths(final)


def build_artifacts_apart(
    config: TrainConfig,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    threads: int | None = None,
    flavour: str = TRAINING_FLAVOUR,
) -> ArtifactPaths:
    """:func:`build_artifacts`, with the export (if the folder is not cached) in a child process.

    The export imports torch, transformers and the model and traces it, and a process keeps most
    of that memory after the export is done (the libraries stay loaded, the heap keeps its pages).
    A process that only evaluates from the folders (``fedpeft simulate`` with an ORT fleet) builds
    them here and never holds it. A cached folder is returned without a child; the child's errors
    are raised here.
    """
    if flavour not in FLAVOURS:
        raise ConfigError(f"artifact flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (cache / artifact_key(config, seed=seed, flavour=flavour) / MANIFEST_NAME).is_file():
        return build_artifacts(config, seed=seed, cache_dir=cache, threads=threads, flavour=flavour)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(
            build_artifacts, config, seed=seed, cache_dir=cache, threads=threads, flavour=flavour
        )
        return job.result()


def _build_into(
    folder: Path,
    config: TrainConfig,
    *,
    seed: int,
    key: str,
    threads: int | None,
    engine: TorchEngine | None = None,
) -> None:
    """Export the torch model of ``config`` and write every artifact into ``folder``.

    ``engine``: the :class:`TorchEngine` to export instead of one built for ``config`` and
    ``seed``; whatever of its model requires grad is trained (``bench/step_speed.py`` passes one
    with every weight trainable, to time full fine-tuning).
    """
    import onnx
    import onnxruntime
    import torch
    from onnxruntime.training import artifacts as ort_artifacts
    from torch import nn

    from broker_server.packed_encoder import (
        gathers_as_gather_nd,
        packable,
        packed_features,
        row_gradients_as_gathers,
    )
    from edge_runtime.engines.torch_engine import TextClassifier, TorchEngine, _canonical

    if engine is None:
        engine = TorchEngine(config, seed=seed, threads=threads)
    classifier = engine.model
    if not isinstance(classifier, TextClassifier):  # check_ort_support refuses image models first
        raise ConfigError(
            f"ONNX Runtime training artifacts are built for text models; {config.model!r} is not one"
        )
    classifier.eval()
    packed = packable(classifier)  # BERT: linear layers on the real tokens only

    class WithLoss(nn.Module):
        """The classifier with the mean cross-entropy on ``labels`` as its first output."""

        def __init__(self, inner: TextClassifier) -> None:
            super().__init__()
            self.inner = inner

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if packed:
                features = packed_features(self.inner, input_ids, attention_mask)
            else:
                features = self.inner.features(input_ids, attention_mask)
            logits = self.inner.head(features)
            return nn.functional.cross_entropy(logits, labels), logits, features

    wrapper = WithLoss(classifier)
    prefix = "inner."
    trainable = {n: p for n, p in classifier.named_parameters() if p.requires_grad}
    sample = engine.tokenizer(["a short example", "another"], padding=True, return_tensors="pt")
    example = (sample["input_ids"], sample["attention_mask"], torch.zeros(2, dtype=torch.long))
    onnx_path = folder / "forward.onnx"
    # The TorchScript exporter on purpose: the dynamo one targets opset 18 and up, whose
    # LayerNormalization the ORT 1.19 gradient builder cannot differentiate.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            example,
            str(onnx_path),
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "labels": {0: "batch"},
                "logits": {0: "batch"},
                "features": {0: "batch"},
            },
            opset_version=OPSET,
            do_constant_folding=False,
            export_params=True,
            # as graph inputs the initializers escape the exporter's deduplication, which would
            # merge, say, every zero-initialised lora_B into one tensor
            keep_initializers_as_inputs=True,
        )
    model = onnx.load(str(onnx_path))
    if packed:
        gathers_as_gather_nd(model)
    user_inputs = [i for i in model.graph.input if i.name in INPUT_NAMES]
    del model.graph.input[:]
    model.graph.input.extend(user_inputs)
    initializers = {init.name for init in model.graph.initializer}
    names: dict[str, str] = {}  # ONNX initializer -> canonical name
    for torch_name in trainable:
        onnx_name = prefix + torch_name
        if onnx_name not in initializers:
            raise EngineError(
                f"the export lost trainable parameter {torch_name!r} (no initializer {onnx_name})"
            )
        names[onnx_name] = _canonical(torch_name)
    frozen = sorted(initializers - set(names))
    onnxruntime.set_default_logger_severity(3)
    with _native_stderr_captured() as log_path:  # the gradient builder logs every pass at INFO
        try:
            ort_artifacts.generate_artifacts(
                model,
                requires_grad=sorted(names),
                frozen_params=frozen,
                loss=None,  # the exported graph's first output is already the loss
                optimizer=ort_artifacts.OptimType.AdamW,
                artifact_directory=str(folder),
            )
        except Exception as exc:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-10:])
            raise EngineError(f"building the ORT training artifacts failed: {exc}\n{tail}") from None
    onnx_path.unlink()
    if packed:  # the packed gathers' gradients as gathers (exact; far faster than GatherNDGrad)
        training_path = folder / "training_model.onnx"
        training = onnx.load(str(training_path))
        if row_gradients_as_gathers(training):
            onnx.save(training, str(training_path))
    if config.frozen_weights != "fp32":
        from broker_server.int8_weights import quantize_frozen_linears

        quantize_frozen_linears(folder, set(names), gradients=config.frozen_weights == "int8-grad")
    manifest = {
        **_manifest_head(engine, config, folder, key=key, seed=seed),
        "trainable": [
            {"onnx": onnx_name, "name": canonical, "shape": list(trainable[onnx_name[len(prefix) :]].shape)}
            for onnx_name, canonical in names.items()
        ],
        "opset": OPSET,
        "tokens": "packed" if packed else "padded",
        "frozen_weights": config.frozen_weights,
        "versions": {p: _version(p) for p in _VERSIONED},
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def _manifest_head(engine: Any, config: TrainConfig, folder: Path, *, key: str, seed: int) -> dict[str, Any]:
    """Save the model's tokenizer.json into ``folder``; the manifest fields both flavours share."""
    tokenizer: Any = engine.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"model {config.model!r} has no fast tokenizer to save as tokenizer.json")
    tokenizer.backend_tokenizer.save(str(folder / TOKENIZER_NAME))
    return {
        "format": ARTIFACT_FORMAT,
        "key": key,
        "seed": seed,
        "model": config.model,
        "peft": config.peft.to_dict(),
        "num_labels": config.num_labels,
        "seq_len": config.seq_len,
        "hidden": engine.hidden,
        "total_params": engine.total_params,
        "pad_token_id": int(tokenizer.pad_token_id or 0),
    }


def _build_step_into(
    folder: Path,
    config: TrainConfig,
    *,
    seed: int,
    key: str,
    threads: int | None,
    engine: TorchEngine | None = None,
) -> None:
    """Export the torch model of ``config`` as one step graph and write the ``step`` folder.

    ``engine``: the :class:`TorchEngine` to export instead of one built for ``config`` and ``seed``.
    """
    import numpy as np

    from broker_server.step_graph import export_step_graph
    from edge_runtime.engines.torch_engine import TorchEngine, _canonical

    if engine is None:
        engine = TorchEngine(config, seed=seed, threads=threads)
    classifier = engine.model
    trainable = {n: p for n, p in classifier.named_parameters() if p.requires_grad}
    canonical = {n: _canonical(n) for n in trainable}
    table = export_step_graph(classifier, config.num_labels, canonical, folder / STEP_MODEL_NAME)
    initial = {canonical[n]: p.detach().cpu().numpy().astype(np.float32) for n, p in trainable.items()}
    np.savez(folder / INITIAL_STATE_NAME, **initial)  # type: ignore[arg-type]  # numpy's stub types allow_pickle only
    manifest = {
        **_manifest_head(engine, config, folder, key=key, seed=seed),
        "flavour": STEP_FLAVOUR,
        "trainable": table,
        "opset": STEP_OPSET,
        "versions": {p: _version(p) for p in _VERSIONED},
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
