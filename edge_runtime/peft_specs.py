"""PEFT module specifications, their one registry, and what training them costs.

A spec says *what* a device trains (LoRA of some rank on some modules, bottleneck adapters, a soft
prompt); the engines say *how*. Specs travel inside assignments, so they are frozen dataclasses
with ``to_dict`` and ``from_dict``. Adding a kind means one spec class and one
:func:`register_peft_kind` call.

Every spec also predicts what one training step costs on a BERT-family encoder
(:meth:`PeftSpec.predict_cost`), so the server can choose a module that fits a device before the
device tries. The prediction is a sum of parts (:class:`TrainingCost`):

- the frozen encoder's fp32 weights;
- the trainable parameters (module and head) four times: weights, gradients and two AdamW moments;
- the tensors autograd keeps for the backward pass, layer by layer: a frozen linear keeps only its
  weight, so what is kept is Q, K and V, the attention map (softmax output, dropout noise, dropped
  map), the LayerNorm inputs, the GELU input and the dropout noise of both sublayers, in every
  layer that gradients flow through; layers below the first trained one keep nothing. A prompt
  lengthens the sequence every layer sees;
- the backward pass's largest transients (the top layer's attention-map gradients);
- a runtime constant: the interpreter, torch, transformers, the tokenizer (calibrated).

Activations are multiplied by a calibrated factor for the forward temporaries autograd does not
keep and what the allocator holds beyond live tensors. Both constants were fitted to the peak RSS
of fresh processes training all-MiniLM-L6-v2 (torch's CPU build, one thread) at batch x seq_len
8 x 64, 32 x 64 and 8 x 256, and are checked at 16 x 128 and 4 x 32 (``tests/test_peft_kinds.py``).
Other hardware, allocators or thread counts shift them: re-measure with
:func:`edge_runtime.engines.memory_probe.measure_training`.

The step's arithmetic is ~2 FLOPs per weight per token forward, the same again backward for the
input gradients of every layer gradients flow through, and 2 per *trainable* weight per token for
the weight gradients (frozen weights get none); attention adds 4 * seq * hidden per token and layer
each way. :meth:`TrainingCost.step_s` turns it into seconds for a device's GFLOPS figure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from edge_runtime.errors import ConfigError

MIB = 1024.0 * 1024.0
FP32_BYTES = 4
# model_type values whose config.json ModelDims.from_hf_config reads (the BERT layout)
BERT_LAYOUT_TYPES = ("bert", "roberta", "xlm-roberta")
# names of the query, key and value projections across the supported families: LoRA on one of
# them makes gradients flow into the lowest layer's attention block
QKV_MODULES = frozenset({"query", "key", "value", "q_lin", "k_lin", "v_lin", "q_proj", "k_proj", "v_proj"})
ADAMW_COPIES = 4  # weight, gradient and the two AdamW moments, all fp32

# Fitted to peak RSS of fresh single-threaded processes (edge_runtime.engines.memory_probe) training
# all-MiniLM-L6-v2 with torch 2.13 CPU, two steps, at (batch, seq_len) = (8, 64), (32, 64) and
# (8, 256) for each kind; least squares with one factor gave 430 MiB and 1.81. Re-measured with
# VmHWM (not ru_maxrss, which exec inflates with the parent's size) at 4x32, 8x64 and 16x128 the
# prediction ran 4-11% low, so the runtime constant was raised by 50 MiB: over- beats under-predicting.
RUNTIME_MB = 480.0  # python, torch, transformers, the tokenizer, the first step's one-off buffers
ACTIVATION_FACTOR = 1.8  # forward temporaries autograd does not keep, and allocator slack
DEFAULT_MICRO_BATCH = 8
"""Rows of a forward and backward pass by default (``TrainConfig.micro_batch``), and what
:meth:`PeftSpec.predict_cost` assumes unless told otherwise: a bigger batch runs in micro-batches
of this many rows. On all-MiniLM-L6-v2, batch 32, a step peaked at 0.36x-0.60x the memory of the
whole batch at once, and a device's two epochs on 150 real posts took 0.78x the time
(``bench/micro_batch.py``; bench/results/micro_batch/)."""


class PeftSpec(Protocol):
    """What every PEFT spec offers: its kind, a dict form, a parameter count and a cost."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form that travels in an assignment."""
        ...

    def trainable_params(self, hidden: int, layers: int, num_labels: int) -> int:
        """Trainable parameters on an encoder of this width and depth, head included."""
        ...

    def predict_cost(
        self,
        dims: ModelDims,
        batch: int,
        seq_len: int,
        num_labels: int = 2,
        *,
        micro_batch: int = DEFAULT_MICRO_BATCH,
    ) -> TrainingCost:
        """Predicted peak memory and arithmetic of one training step on an encoder of ``dims``;
        the activations are those of ``micro_batch`` rows where it is smaller than ``batch``
        (``TrainConfig.micro_batch``, the engines' default unless given; 0: the whole batch)."""
        ...


_REGISTRY: dict[str, type] = {}


def register_peft_kind(spec_cls: type) -> type:
    """Register a spec class under its ``kind``; names are unique."""
    kind = getattr(spec_cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{spec_cls.__name__} has no 'kind' name")
    if kind in _REGISTRY and _REGISTRY[kind] is not spec_cls:
        raise ConfigError(f"PEFT kind {kind!r} is already registered")
    _REGISTRY[kind] = spec_cls
    return spec_cls


def peft_kinds() -> tuple[str, ...]:
    """The registered PEFT kinds."""
    return tuple(sorted(_REGISTRY))


def spec_from_dict(data: dict[str, Any]) -> PeftSpec:
    """Rebuild a spec from its dict form, rejecting unknown kinds and fields."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError("a PEFT spec needs a 'kind' field")
    kind = data["kind"]
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown PEFT kind {kind!r}; known: {', '.join(peft_kinds())}")
    fields = {k: v for k, v in data.items() if k != "kind"}
    try:
        spec: PeftSpec = _REGISTRY[kind](**fields)
    except TypeError as exc:
        raise ConfigError(f"bad fields for PEFT kind {kind!r}: {exc}") from None
    return spec


@dataclass(frozen=True)
class ModelDims:
    """The sizes of one transformer tower that decide what training it costs.

    The defaults describe a BERT-style layer (Q, K and V as wide as the hidden states, a two-matrix
    feed-forward block); a LLaMA-style decoder sets ``kv_hidden`` (grouped-query attention) and
    ``gated_ffn``. :mod:`edge_runtime.families` builds these from a model's configuration.
    """

    hidden: int
    layers: int
    intermediate: int
    vocab: int = field(metadata={"help": "token vocabulary; 0 for a vision tower, which has none"})
    heads: int
    total_params: int = field(metadata={"help": "every parameter of the frozen encoder, pooler included"})
    max_positions: int = 512
    kv_hidden: int | None = field(
        default=None, metadata={"help": "width of K and V (grouped-query attention); None: hidden"}
    )
    gated_ffn: bool = field(
        default=False, metadata={"help": "a gated feed-forward block (gate, up, down: LLaMA's SwiGLU)"}
    )

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "intermediate", "heads", "total_params", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ModelDims.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.vocab, int) or isinstance(self.vocab, bool) or self.vocab < 0:
            raise ConfigError(f"ModelDims.vocab must be a non-negative integer, got {self.vocab!r}")
        if self.kv_hidden is not None and (
            not isinstance(self.kv_hidden, int) or isinstance(self.kv_hidden, bool) or self.kv_hidden < 1
        ):
            raise ConfigError(
                f"ModelDims.kv_hidden must be a positive integer or None, got {self.kv_hidden!r}"
            )
        if not isinstance(self.gated_ffn, bool):
            raise ConfigError(f"ModelDims.gated_ffn must be a bool, got {self.gated_ffn!r}")
        if self.hidden % self.heads:
            raise ConfigError(f"ModelDims.hidden ({self.hidden}) is not a multiple of heads ({self.heads})")

    @property
    def kv(self) -> int:
        """Width of the K and V projections' outputs."""
        return self.hidden if self.kv_hidden is None else self.kv_hidden

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices of the feed-forward block: 3 when gated, else 2."""
        return 3 if self.gated_ffn else 2

    @property
    def linear_weights(self) -> int:
        """Weights of the encoder layers' linear projections (Q, K, V, output, feed-forward)."""
        h = self.hidden
        return self.layers * (2 * h * h + 2 * h * self.kv + self.ffn_matrices * h * self.intermediate)

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelDims:
        """From a transformers config object or the dict of a ``config.json`` of a BERT-layout
        encoder (BERT, RoBERTa, XLM-RoBERTa); other families: :func:`edge_runtime.families.model_dims`."""

        def get(name: str, default: int | None = None) -> int:
            value = (
                config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
            )
            if value is None:
                raise ConfigError(f"the model configuration has no {name!r}")
            return int(value)

        model_type = (
            config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
        )
        if model_type not in (None, "", *BERT_LAYOUT_TYPES):
            raise ConfigError(
                f"ModelDims.from_hf_config reads BERT-layout encoders ({', '.join(BERT_LAYOUT_TYPES)}), "
                f"not {model_type!r}: use edge_runtime.families.model_dims"
            )
        hidden, layers = get("hidden_size"), get("num_hidden_layers")
        inter, vocab, positions = get("intermediate_size"), get("vocab_size"), get("max_position_embeddings")
        embeddings = (vocab + positions + get("type_vocab_size", 2)) * hidden + 2 * hidden
        per_layer = 4 * (hidden * hidden + hidden) + (2 * hidden * inter + inter + hidden) + 4 * hidden
        pooler = hidden * hidden + hidden
        return cls(
            hidden=hidden,
            layers=layers,
            intermediate=inter,
            vocab=vocab,
            heads=get("num_attention_heads"),
            total_params=embeddings + layers * per_layer + pooler,
            max_positions=positions,
        )

    @classmethod
    def from_model_dir(cls, folder: str | Path) -> ModelDims:
        """From the ``config.json`` of a BERT-layout model folder, without importing transformers."""
        path = Path(folder) / "config.json"
        try:
            return cls.from_hf_config(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"cannot read model dimensions from {path}: {exc}") from None

    def layer_flops(self, batch: int, seq_len: int, *, attention: bool = True) -> float:
        """Forward FLOPs of one encoder layer; without the attention block if ``attention`` is off."""
        tokens = batch * seq_len
        h = self.hidden
        # attention output and feed-forward
        flops = 2.0 * tokens * (h * h + self.ffn_matrices * h * self.intermediate)
        if attention:
            # Q, K, V and the map
            flops += 2.0 * tokens * (h * h + 2 * h * self.kv) + 4.0 * batch * seq_len * seq_len * h
        return flops

    def layer_saved_bytes(self, batch: int, seq_len: int, *, attention: bool = True) -> float:
        """Bytes autograd keeps in a frozen layer that gradients flow through (all fp32).

        On CPU, dropout keeps its scaled noise tensor (fp32, not a 1-byte mask). Without
        ``attention`` the self-attention block is left out: nothing below it needs gradients.
        A gated feed-forward block keeps the gate's output, its activation and the up projection's
        output instead of one GELU input; a decoder's RMSNorm and its lack of dropout are counted
        as BERT's LayerNorm and dropout (an over-estimate, fitted on MiniLM only).
        """
        tokens = batch * seq_len
        h = self.hidden
        ffn_kept = 3 if self.gated_ffn else 1
        # per sublayer: dropout noise, LayerNorm input, LayerNorm mean and rstd; the GELU input
        sublayers = 2 * (2 * FP32_BYTES * h + 2 * FP32_BYTES)
        saved = tokens * (sublayers + ffn_kept * FP32_BYTES * self.intermediate)
        if attention:
            maps = batch * self.heads * seq_len * seq_len
            # Q, K and V; the softmax output, its dropout noise and the dropped map
            saved += tokens * FP32_BYTES * (h + 2 * self.kv) + 3 * FP32_BYTES * maps
        return float(saved)

    def backward_transient_bytes(self, batch: int, seq_len: int) -> float:
        """The backward pass's short-lived tensors at its start: one layer's map and FFN gradients."""
        maps = batch * self.heads * seq_len * seq_len
        tokens = batch * seq_len
        return float(3 * FP32_BYTES * maps + FP32_BYTES * tokens * (self.intermediate + 2 * self.hidden))


@dataclass(frozen=True)
class TrainingCost:
    """Predicted peak resident memory (MiB, by part) and arithmetic of one training step."""

    frozen_mb: float = field(metadata={"help": "the frozen encoder's fp32 weights"})
    trainable_mb: float = field(metadata={"help": "module and head: weights, gradients, AdamW moments"})
    activation_mb: float = field(metadata={"help": "what autograd keeps for backward, and its transients"})
    runtime_mb: float = field(metadata={"help": "interpreter, libraries and tokenizer"})
    step_flops: float
    trainable_params: int

    @property
    def memory_mb(self) -> float:
        """Predicted peak resident memory of training, in MiB."""
        return self.frozen_mb + self.trainable_mb + self.activation_mb + self.runtime_mb

    def step_s(self, gflops: float) -> float:
        """Seconds per step on a device that sustains ``gflops`` billion FLOPs per second."""
        if not gflops > 0:
            raise ConfigError(f"gflops must be positive, got {gflops!r}")
        return self.step_flops / (gflops * 1e9)


def _check_sizes(batch: int, seq_len: int, num_labels: int) -> None:
    for name, value in (("batch", batch), ("seq_len", seq_len), ("num_labels", num_labels)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _training_cost(
    dims: ModelDims,
    batch: int,
    seq_len: int,
    *,
    trainable: int,
    head: int,
    first_trained_layer: int,
    attention_in_first: bool,
    module_saved_bytes: float,
    module_flops: float,
    micro_batch: int = DEFAULT_MICRO_BATCH,
) -> TrainingCost:
    """Sum the parts of the cost; ``seq_len`` is the length the encoder sees (prompt included).

    Gradients flow through every layer from ``first_trained_layer`` up; in that first layer the
    attention block takes part only if ``attention_in_first`` (something in it is trained).
    Every activation term grows with the rows of one pass, so micro-batches of ``micro_batch``
    rows keep ``micro_batch / batch`` of the whole batch's (the FLOPs stay the batch's).
    """
    if not isinstance(micro_batch, int) or micro_batch < 0:
        raise ConfigError(f"micro_batch must be a non-negative integer, got {micro_batch!r}")
    saved = 0.0
    forward = 0.0
    backward = 0.0
    for layer in range(dims.layers):
        forward += dims.layer_flops(batch, seq_len)
        if layer < first_trained_layer:
            continue
        attention = layer > first_trained_layer or attention_in_first
        saved += dims.layer_saved_bytes(batch, seq_len, attention=attention)
        backward += dims.layer_flops(batch, seq_len, attention=attention)
    tokens = batch * seq_len
    saved += module_saved_bytes + 2 * FP32_BYTES * tokens * dims.hidden  # pooling keeps the last states
    activation = ACTIVATION_FACTOR * (saved + dims.backward_transient_bytes(batch, seq_len))
    activation *= min(micro_batch or batch, batch) / batch
    weight_grads = 2.0 * tokens * (trainable - head)
    return TrainingCost(
        frozen_mb=dims.total_params * FP32_BYTES / MIB,
        trainable_mb=trainable * ADAMW_COPIES * FP32_BYTES / MIB,
        activation_mb=activation / MIB,
        runtime_mb=RUNTIME_MB,
        step_flops=forward + module_flops + backward + module_flops + weight_grads,
        trainable_params=trainable,
    )


def _head_params(hidden: int, num_labels: int) -> int:
    return hidden * num_labels + num_labels


@register_peft_kind
@dataclass(frozen=True)
class LoraSpec:
    """Low-rank adaptation: W + (alpha / rank) B A on the target linear modules."""

    kind: ClassVar[str] = "lora"
    rank: int = field(default=8, metadata={"help": "rank r of the A (r x in) and B (out x r) factors"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator; the update is alpha/r B A"})
    target_modules: tuple[str, ...] = field(
        default=("query", "value"), metadata={"help": "names of the linear modules that get LoRA"}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    train_a: bool = field(
        default=True,
        metadata={
            "help": "train the A factors; False (FFA-LoRA) keeps them at their shared initial values "
            "and trains, sends and averages only B"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoraSpec.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoraSpec.alpha must be positive, got {self.alpha!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ConfigError("LoraSpec.target_modules must name at least one module")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.train_a, bool):
            raise ConfigError(f"LoraSpec.train_a must be a bool, got {self.train_a!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form that travels in an assignment."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        if self.train_a:
            # left out at its default, so configuration ids and ORT artifact keys of plain LoRA
            # stay what they were before the field existed
            del data["train_a"]
        return {"kind": self.kind, **data}

    def trainable_params(self, hidden: int, layers: int, num_labels: int) -> int:
        """LoRA factors on square attention projections plus the classification head.

        The A factors are counted even with ``train_a`` False: they keep their initial values
        then, but they are part of the module's state and travel with it.
        """
        per_module = 2 * hidden * self.rank
        return layers * len(self.target_modules) * per_module + _head_params(hidden, num_labels)

    def predict_cost(
        self,
        dims: ModelDims,
        batch: int,
        seq_len: int,
        num_labels: int = 2,
        *,
        micro_batch: int = DEFAULT_MICRO_BATCH,
    ) -> TrainingCost:
        """LoRA in every layer: gradients flow through all of them; each factor keeps its input."""
        _check_sizes(batch, seq_len, num_labels)
        tokens = batch * seq_len
        modules = len(self.target_modules)
        # A keeps its input (shared by modules on the same input), B keeps the r-wide A output;
        # a dropout above 0 keeps its noise and a dropped copy of the input per module.
        per_layer = FP32_BYTES * tokens * (dims.hidden + modules * self.rank)
        if self.dropout > 0:
            per_layer += modules * tokens * dims.hidden * 2 * FP32_BYTES
        in_attention = any(m in QKV_MODULES for m in self.target_modules)
        return _training_cost(
            dims,
            batch,
            seq_len,
            micro_batch=micro_batch,
            trainable=self.trainable_params(dims.hidden, dims.layers, num_labels),
            head=_head_params(dims.hidden, num_labels),
            first_trained_layer=0,
            attention_in_first=in_attention,
            module_saved_bytes=dims.layers * per_layer,
            module_flops=dims.layers * modules * 2.0 * tokens * 2 * dims.hidden * self.rank,
        )


ADAPTER_ACTIVATIONS = ("gelu", "relu")


@register_peft_kind
@dataclass(frozen=True)
class AdapterSpec:
    """Houlsby bottleneck adapters: h + f(h W_down) W_up after both sublayers' output projections.

    One adapter follows the attention output projection and one the feed-forward output
    projection of each chosen layer, before the residual LayerNorm. ``W_up`` starts at zero, so
    the untrained model is exactly the base model.
    """

    kind: ClassVar[str] = "adapter"
    bottleneck: int = field(default=16, metadata={"help": "width m of the W_down (m x hidden) projection"})
    activation: str = field(default="gelu", metadata={"help": "f: 'gelu' or 'relu'"})
    layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "0-based encoder layers that get adapters; None means all"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.bottleneck, int) or isinstance(self.bottleneck, bool) or self.bottleneck < 1:
            raise ConfigError(f"AdapterSpec.bottleneck must be a positive integer, got {self.bottleneck!r}")
        if self.activation not in ADAPTER_ACTIVATIONS:
            raise ConfigError(
                f"AdapterSpec.activation must be one of {', '.join(ADAPTER_ACTIVATIONS)}, "
                f"got {self.activation!r}"
            )
        if self.layers is not None:
            if (
                not self.layers
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)
                or len(set(self.layers)) != len(self.layers)
            ):
                raise ConfigError(
                    f"AdapterSpec.layers must be distinct non-negative layer indices, got {self.layers!r}"
                )
            object.__setattr__(self, "layers", tuple(sorted(self.layers)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form that travels in an assignment."""
        layers = None if self.layers is None else list(self.layers)
        return {
            "kind": self.kind,
            "bottleneck": self.bottleneck,
            "activation": self.activation,
            "layers": layers,
        }

    def adapted_layers(self, layers: int) -> tuple[int, ...]:
        """The layers of an encoder this deep that get adapters."""
        if self.layers is None:
            return tuple(range(layers))
        return tuple(i for i in self.layers if i < layers)

    def trainable_params(self, hidden: int, layers: int, num_labels: int) -> int:
        """Two adapters (down and up projections with biases) per adapted layer, plus the head."""
        per_adapter = 2 * hidden * self.bottleneck + self.bottleneck + hidden
        return 2 * len(self.adapted_layers(layers)) * per_adapter + _head_params(hidden, num_labels)

    def predict_cost(
        self,
        dims: ModelDims,
        batch: int,
        seq_len: int,
        num_labels: int = 2,
        *,
        micro_batch: int = DEFAULT_MICRO_BATCH,
    ) -> TrainingCost:
        """Gradients flow from the lowest adapted layer's attention output up."""
        _check_sizes(batch, seq_len, num_labels)
        adapted = self.adapted_layers(dims.layers)
        if not adapted:
            raise ConfigError(
                f"AdapterSpec.layers {self.layers} are all beyond the model's {dims.layers} layers"
            )
        tokens = batch * seq_len
        # each adapter keeps its input, the activation's input and W_up's input
        per_adapter = FP32_BYTES * tokens * (dims.hidden + 2 * self.bottleneck)
        return _training_cost(
            dims,
            batch,
            seq_len,
            micro_batch=micro_batch,
            trainable=self.trainable_params(dims.hidden, dims.layers, num_labels),
            head=_head_params(dims.hidden, num_labels),
            first_trained_layer=adapted[0],
            attention_in_first=False,
            module_saved_bytes=2 * len(adapted) * per_adapter,
            module_flops=2 * len(adapted) * 2.0 * tokens * 2 * dims.hidden * self.bottleneck,
        )


PROMPT_INITS = ("vocab", "normal")


@register_peft_kind
@dataclass(frozen=True)
class PromptSpec:
    """Soft prompt tuning: ``length`` trainable input embeddings before the text's own.

    The attention mask covers the prompt, so every token attends to it; the sentence feature
    mean-pools the text's tokens only, never the prompt positions.
    """

    kind: ClassVar[str] = "prompt"
    length: int = field(default=16, metadata={"help": "number of trainable prompt embeddings"})
    init: str = field(
        default="vocab",
        metadata={"help": "'vocab': embeddings of random vocabulary tokens; 'normal': N(0, 0.02^2) noise"},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.length, int) or isinstance(self.length, bool) or not 1 <= self.length <= 512:
            raise ConfigError(f"PromptSpec.length must be an integer in [1, 512], got {self.length!r}")
        if self.init not in PROMPT_INITS:
            raise ConfigError(f"PromptSpec.init must be one of {', '.join(PROMPT_INITS)}, got {self.init!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form that travels in an assignment."""
        return {"kind": self.kind, **asdict(self)}

    def trainable_params(self, hidden: int, layers: int, num_labels: int) -> int:
        """One hidden-wide vector per prompt position, plus the head."""
        return self.length * hidden + _head_params(hidden, num_labels)

    def predict_cost(
        self,
        dims: ModelDims,
        batch: int,
        seq_len: int,
        num_labels: int = 2,
        *,
        micro_batch: int = DEFAULT_MICRO_BATCH,
    ) -> TrainingCost:
        """The encoder sees ``seq_len + length`` tokens and gradients flow through all of it."""
        _check_sizes(batch, seq_len, num_labels)
        seq = seq_len + self.length
        tokens = batch * seq
        # the embedding LayerNorm's input and the embedding dropout's noise
        embeddings = 2 * FP32_BYTES * tokens * dims.hidden
        return _training_cost(
            dims,
            batch,
            seq,
            micro_batch=micro_batch,
            trainable=self.trainable_params(dims.hidden, dims.layers, num_labels),
            head=_head_params(dims.hidden, num_labels),
            first_trained_layer=0,
            attention_in_first=True,
            module_saved_bytes=embeddings,
            module_flops=0.0,
        )


_LAYER_RE = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def layer_group(name: str) -> str:
    """The layer a trainable tensor belongs to, for layer-wise weighting: ``layer{i}`` for tensors
    inside transformer block i, ``head`` for the classifier, ``other`` for the rest (prompts)."""
    if name.startswith("head."):
        return "head"
    match = _LAYER_RE.search(name)
    return f"layer{int(match.group(1))}" if match else "other"
