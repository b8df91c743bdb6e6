"""The training configuration a device receives in its assignment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import DEFAULT_MICRO_BATCH, LoraSpec, PeftSpec, spec_from_dict

ENGINES = ("torch", "ort", "ort-plain")
SUPPORTED_BITS = (32, 16, 8, 4, 2)
FROZEN_WEIGHTS = ("fp32", "int8", "int8-grad")
"""How the ORT engine's artifacts hold the frozen linear weights: ``fp32``; ``int8`` in the
forward (``broker_server.int8_weights``: not exact, faster; the input gradients stay fp32); or
``int8-grad``: the input gradients' products in int8 too, the gradient quantized per row."""
TRAIN_TASKS = ("classification", "question-answering", "image-text-matching", "causal-lm")
"""``classification``: the model family's classifier (texts, or images for ViT);
``question-answering``: extractive answer spans of a text encoder; ``image-text-matching``: CLIP's
two towers, contrastive; ``causal-lm``: next-token prediction of a decoder. The last three have no
classes and no head (question answering's span head aside): ``num_labels`` is 2 for them."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a device needs to train its module for one round; travels in an assignment."""

    peft: PeftSpec = field(default_factory=LoraSpec)
    model: str = field(default="all-MiniLM-L6-v2", metadata={"help": "model name or local path"})
    num_labels: int = 2
    bits: int = field(default=8, metadata={"help": "uplink bit width: 32, 16, 8, 4 or 2"})
    batch_size: int = 16
    micro_batch: int = field(
        default=DEFAULT_MICRO_BATCH,
        metadata={
            "help": "rows a forward and backward pass takes at once; a bigger batch runs in such "
            "micro-batches, sorted by length, and sums their gradients before its one update "
            "(the same update as the whole batch at once, in less memory; 0: the whole batch)"
        },
    )
    seq_len: int = 128
    local_epochs: int = 1
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate of the PEFT module"})
    head_lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the head"})
    weight_decay: float = 0.0
    prox_mu: float = field(default=0.0, metadata={"help": "lambda of lambda ||theta - theta0||^2"})
    logit_adjust: float = field(
        default=1.0, metadata={"help": "tau: train with logits + tau log p_device(y); 0 turns it off"}
    )
    engine: str = "torch"
    mem_cap_mb: float | None = None
    frozen_weights: str = field(
        default="fp32",
        metadata={
            "help": "fp32; int8: the ORT engine's forward multiplies by int8 copies of the frozen "
            "linear weights; int8-grad: the input gradients too (not exact; engine ort only)"
        },
    )
    task: str = field(
        default="classification",
        metadata={
            "help": "classification, question-answering (a start/end span head), "
            "image-text-matching (CLIP) or causal-lm (a decoder's next tokens)"
        },
    )

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool]] = [
            ("num_labels", self.num_labels >= 2),
            ("bits", self.bits in SUPPORTED_BITS),
            ("batch_size", self.batch_size >= 1),
            ("micro_batch", self.micro_batch >= 0),
            ("seq_len", 8 <= self.seq_len <= 4096),
            ("local_epochs", self.local_epochs >= 1),
            ("lr", self.lr > 0),
            ("head_lr", self.head_lr >= 0),
            ("weight_decay", self.weight_decay >= 0),
            ("prox_mu", self.prox_mu >= 0),
            ("logit_adjust", 0 <= self.logit_adjust <= 10),
            ("engine", self.engine in ENGINES),
            ("mem_cap_mb", self.mem_cap_mb is None or self.mem_cap_mb > 0),
            ("task", self.task in TRAIN_TASKS),
            ("frozen_weights", self.frozen_weights in FROZEN_WEIGHTS),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"TrainConfig.{name} is invalid: {getattr(self, name)!r}")
        if self.task != "classification" and self.num_labels != 2:
            raise ConfigError(
                f"TrainConfig.num_labels must be 2 for {self.task} (question answering's start "
                f"and end logits; the other tasks have no classes), got {self.num_labels}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form for the wire and the report."""
        out: dict[str, Any] = {
            "peft": self.peft.to_dict(),
            "model": self.model,
            "num_labels": self.num_labels,
            "bits": self.bits,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "local_epochs": self.local_epochs,
            "lr": self.lr,
            "head_lr": self.head_lr,
            "weight_decay": self.weight_decay,
            "prox_mu": self.prox_mu,
            "logit_adjust": self.logit_adjust,
            "engine": self.engine,
            "mem_cap_mb": self.mem_cap_mb,
        }
        # the default task is left out, so a classification configuration keeps the content
        # address (layout.config_id) and artifact cache key it had before tasks existed
        if self.task != "classification":
            out["task"] = self.task
        # the default micro-batch is left out too: it changes how a step is computed, not what
        # it computes, and a runtime from before micro-batches still reads the assignment
        if self.micro_batch != DEFAULT_MICRO_BATCH:
            out["micro_batch"] = self.micro_batch
        # and fp32 frozen weights, for the same reasons
        if self.frozen_weights != "fp32":
            out["frozen_weights"] = self.frozen_weights
        return out

    def micro_rows(self) -> int:
        """Rows of one forward and backward pass: the micro-batch, at most the batch."""
        return min(self.micro_batch or self.batch_size, self.batch_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild from the wire form, rejecting unknown fields."""
        if not isinstance(data, dict):
            raise ConfigError("a training configuration must be an object")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown training configuration fields: {sorted(unknown)}")
        values = dict(data)
        if "peft" in values:
            values["peft"] = spec_from_dict(values["peft"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"bad training configuration: {exc}") from None
