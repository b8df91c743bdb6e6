"""PEFT module specifications and their one registry.

A spec says *what* a device trains (LoRA of some rank on some modules, ...); the engines say
*how*. Specs travel inside assignments, so they are frozen dataclasses with ``to_dict`` and
``from_dict``. Adding a kind means one spec class and one :func:`register_peft_kind` call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

from edge_runtime.errors import ConfigError


class PeftSpec(Protocol):
    """What every PEFT spec offers: its kind, a dict form and a parameter count."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form that travels in an assignment."""
        ...

    def trainable_params(self, hidden: int, layers: int, num_labels: int) -> int:
        """Trainable parameters on an encoder of this width and depth, head included."""
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

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form that travels in an assignment."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return {"kind": self.kind, **data}

    def trainable_params(self, hidden: int, layers: int, num_labels: int) -> int:
        """LoRA factors on square attention projections plus the classification head."""
        per_module = 2 * hidden * self.rank
        return layers * len(self.target_modules) * per_module + hidden * num_labels + num_labels
