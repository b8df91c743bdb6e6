"""Simulated Byzantine devices, for testing robust aggregation: sign flips and scaling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import ConfigError

UpdateHook = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class AttackSpec:
    """``count`` devices multiply what they send by ``factor`` (-1 flips signs)."""

    kind: str
    factor: float
    count: int

    def __post_init__(self) -> None:
        if self.kind not in ("flip", "scale"):
            raise ConfigError(f"AttackSpec.kind must be flip or scale, got {self.kind!r}")
        if self.count < 0:
            raise ConfigError("AttackSpec.count must be non-negative")


def parse_attack(text: str) -> AttackSpec:
    """``flip:COUNT`` or ``scale=FACTOR:COUNT`` (e.g. ``scale=1e4:2``)."""
    head, _, count = text.partition(":")
    try:
        n = int(count)
        if head == "flip":
            return AttackSpec("flip", -1.0, n)
        if head.startswith("scale="):
            return AttackSpec("scale", float(head[len("scale=") :]), n)
    except ValueError:
        pass
    raise ConfigError(f"bad --attack {text!r}; use flip:COUNT or scale=FACTOR:COUNT")


def attack_hook(spec: AttackSpec) -> UpdateHook:
    """Multiply every tensor (class sums, not counts, in the statistics round) by the factor."""

    def hook(phase: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            k: v if k == "stats.class_counts" else (np.asarray(v) * spec.factor).astype(np.float32)
            for k, v in tensors.items()
        }

    return hook
