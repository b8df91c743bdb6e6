"""Heterogeneous PEFT fusion: each kind's global module distilled toward the other kinds' ensemble.

In a fleet whose devices train different kinds (LoRA, adapters, prompts), each kind's module only
learns from the devices of that kind. After aggregating a training round, the service lets
knowledge flow across kinds on unlabeled server-side text: every kind's module (its view of the
super-state) is trained for a few epochs toward the mean class probabilities of the *other* kinds'
modules, with

    L = a * CE(student, argmax teacher) + (1 - a) * KL(student || teacher)

(the text's labels are never read: the task term uses the ensemble's pseudo-labels). Teachers are
computed from the state before any kind is distilled, so the result does not depend on the order
of kinds. The shared head stays as aggregated: only each kind's own tensors move.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from broker_server.aggregation import ClientUpdate, State
from broker_server.evaluation import ModelEvaluator
from broker_server.heterogeneous import corner, view
from broker_server.strategies import Carry, StrategyRule
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset
from edge_runtime.errors import ConfigError


@dataclass(frozen=True)
class DistillResult:
    """The fused state and, per kind, the student's agreement with its teacher before and after."""

    state: State
    agreement_before: dict[str, float]
    agreement_after: dict[str, float]


def unlabeled(texts: Sequence[str], label_names: Sequence[str]) -> TextDataset:
    """Server-side text as a dataset whose labels are all 0 (distillation never reads them)."""
    return TextDataset(tuple(texts), np.zeros(len(texts), dtype=np.int64), tuple(label_names))


def _agreement(probs: np.ndarray, teacher: np.ndarray) -> float:
    return float(np.mean(probs.argmax(-1) == teacher.argmax(-1)))


def fuse_kinds(
    evaluator: ModelEvaluator,
    state: Mapping[str, np.ndarray],
    configs: Sequence[TrainConfig],
    texts: TextDataset,
    *,
    alpha: float = 0.5,
    epochs: int = 1,
    seed: int = 0,
) -> DistillResult:
    """Distill every kind's module toward the mean prediction of the other kinds' modules."""
    if not 0 <= alpha <= 1:
        raise ConfigError(f"the distillation weight a must be in [0, 1], got {alpha}")
    kinds = [c.peft.kind for c in configs]
    if len(set(kinds)) != len(kinds):
        raise ConfigError(f"one configuration per kind, got {kinds}")
    new: State = {k: np.array(v, dtype=np.float32) for k, v in state.items()}
    if len(configs) < 2 or len(texts) == 0:
        return DistillResult(new, {}, {})
    probs: dict[str, np.ndarray] = {}
    for cfg in configs:
        engine = evaluator.engine_for(cfg)
        engine.load_trainable_state(view(state, evaluator.shapes(cfg)))
        probs[cfg.peft.kind] = engine.predict_proba(texts)
    before, after = {}, {}
    for cfg in configs:
        kind = cfg.peft.kind
        teacher = np.mean([p for k, p in probs.items() if k != kind], axis=0)
        engine = evaluator.engine_for(cfg)
        engine.load_trainable_state(view(state, evaluator.shapes(cfg)))
        before[kind] = _agreement(probs[kind], teacher)
        engine.distill(texts, teacher, alpha=alpha, epochs=epochs, seed=seed)
        after[kind] = _agreement(engine.predict_proba(texts), teacher)
        for name, value in engine.trainable_state().items():
            if not name.startswith("head."):
                new[name][corner(value.shape)] = value
    return DistillResult(new, before, after)


class KindDistillation:
    """Cross-kind distillation after each training round, as a wrapper around the round's rule.

    A wrapper like those of :mod:`broker_server.strategy_wrappers` (same ``StrategyRule`` in and
    out), kept out of their registry because it needs objects of the run, not keyword parameters:
    the evaluator that builds each kind's engine, the configurations of the kinds in the fleet
    (asked for each round: devices come and go) and the unlabeled text. Each call is seeded with
    ``seed + round``, the round being the one :attr:`round` names when the rule runs; the agreement
    of the last call is kept in :attr:`agreement` for the round's record.
    """

    def __init__(
        self,
        evaluator: ModelEvaluator,
        configs: Callable[[], Sequence[TrainConfig]],
        texts: TextDataset,
        *,
        alpha: float,
        epochs: int,
        seed: int,
    ) -> None:
        self.evaluator = evaluator
        self.configs = configs
        self.texts = texts
        self.alpha = alpha
        self.epochs = epochs
        self.seed = seed
        self.round = 0
        self.agreement: dict[str, dict[str, float]] = {}  # the last round's, before and after

    def fuse(self, state: Mapping[str, np.ndarray]) -> State:
        """Every kind's module distilled toward the other kinds' ensemble (:func:`fuse_kinds`)."""
        result = fuse_kinds(
            self.evaluator,
            state,
            self.configs(),
            self.texts,
            alpha=self.alpha,
            epochs=self.epochs,
            seed=self.seed + self.round,
        )
        self.agreement = {"before": result.agreement_before, "after": result.agreement_after}
        return result.state

    def around(self, inner: StrategyRule) -> StrategyRule:
        """``inner``, then every kind distilled toward the others; ``inner``'s carry passes through."""

        def step(
            state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], carry: Carry
        ) -> tuple[State, Carry]:
            new, carry = inner.aggregate(state, updates, carry)
            return self.fuse(new), carry

        return StrategyRule(f"distill({inner.name})", step, keeps_carry=inner.keeps_carry)
