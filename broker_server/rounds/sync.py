"""The aggregation of one synchronous round: (state, accepted updates) -> the next state.

It picks the rule the configuration names (a registered strategy, the coverage mean of a mixed
fleet, per-cluster steps), clips, applies the server's momentum (FedAvgM) and keeps what the rule
carries between rounds, writing each carry to the state store with its round, so that a restart
aggregates the interrupted round as the run before it would have. No transport, no round loop;
DP-FedAvg's releases and cross-kind distillation stay with the service, which owns their inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from broker_server.aggregation import (
    ClientUpdate,
    State,
    clip_update,
    head_from_class_means,
    robust_head_from_statistics,
    server_momentum_step,
    sum_class_statistics,
)
from broker_server.checkpoint import encode_carry
from broker_server.cluster_groups import ClusterGroups
from broker_server.config import ServiceConfig
from broker_server.heterogeneous import coverage_mean
from broker_server.state import StateStore
from broker_server.strategies import ROBUST_STRATEGIES, STATEFUL_STRATEGIES, build_strategy, get_strategy


class RoundAggregation:
    """How a synchronous run aggregates its rounds, and the carries it keeps between them."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        mixed: bool = False,
        clusters: ClusterGroups | None = None,
        store: StateStore | None = None,
    ) -> None:
        self.config = config
        stateful = config.strategy in STATEFUL_STRATEGIES
        # the stateless rule (per cluster too); exact and ffa need the LoRA pairs and run as a StrategyRule
        self.strategy = get_strategy("fedit" if stateful else config.strategy)
        self.rule = build_strategy(config.strategy, config.train.peft) if stateful else None
        # a mixed fleet: zero-pad and average each element over the clients that trained it
        # (hetlora pads and weighs ranks itself)
        self.mixed = mixed and config.strategy != "hetlora"
        self.clusters = clusters
        self.store = store
        self.carry: dict[str, np.ndarray] = {}  # the rule's (exact: the fed-back residual)
        self.momentum: dict[str, np.ndarray] = {}  # FedAvgM's

    def restore(self, carries: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Take back the carries a checkpoint stored (see :mod:`broker_server.checkpoint`)."""
        if "residual" in carries:
            self.carry = dict(carries["residual"])
        if "server_momentum" in carries:
            self.momentum = dict(carries["server_momentum"])

    def head(self, updates: Sequence[ClientUpdate]) -> dict[str, np.ndarray]:
        """The class-mean head from a statistics round's updates (screened under robust rules)."""
        if self.config.strategy in ROBUST_STRATEGIES:
            return robust_head_from_statistics(updates, self.config.head_scale, self.config.strategy)
        sums, counts = sum_class_statistics(updates)
        return head_from_class_means(sums, counts, self.config.head_scale)

    def statistics(self, state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> State:
        """A statistics round: the class-mean head (one per cluster with clusters)."""
        if self.clusters is not None:
            return self.clusters.heads(state, updates, self.head)
        return {**state, **self.head(updates)}

    def train(self, state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], round_: int) -> State:
        """A training round's step from ``state``; carries are stored under ``round_``."""
        clip = self.config.clip_norm
        if self.clusters is not None:
            return self.clusters.step(state, updates, self.strategy, clip)
        if clip is not None:
            updates = [clip_update(u, clip) for u in updates]
        if self.rule is not None:
            new, self.carry = self.rule.aggregate(state, updates, self.carry)
            if self.rule.keeps_carry and self.store is not None:
                self.store.save_residual(round_, encode_carry(round_, "residual", self.carry))
            return new
        rule = coverage_mean if self.mixed else self.strategy
        return self._server_step(dict(state), rule(state, updates), round_)

    def _server_step(self, before: State, after: State, round_: int) -> State:
        """FedAvgM over the rule's step, with its momentum kept in the state store."""
        lr, beta = self.config.server_lr, self.config.server_momentum
        if lr == 1.0 and beta == 0.0:
            return after
        new, self.momentum = server_momentum_step(before, after, self.momentum, lr=lr, beta=beta)
        if self.store is not None and beta > 0:
            momentum = {k: v.astype(np.float32) for k, v in self.momentum.items()}
            carry = encode_carry(round_, "server-momentum", momentum)
            self.store.save_carry(round_, "server_momentum", carry)
        return new
