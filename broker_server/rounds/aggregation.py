"""The aggregation of one synchronous round: (state, accepted updates) -> the next state.

A training round's rule is one :class:`~broker_server.strategies.StrategyRule`, composed once from
the configuration, each layer a wrapper around the one inside it::

    strategy -> per cluster -> clip -> FedAvgM -> distillation

- the strategy the configuration names (:func:`~broker_server.strategies.build_strategy`), or the
  coverage mean of a mixed fleet (zero-padded views averaged over the devices that trained each
  element; ``hetlora`` pads and weighs ranks itself);
- per cluster (:meth:`~broker_server.cluster_groups.ClusterGroups.around`) with ``--clusters``;
- clipping (``clip`` of :mod:`~broker_server.strategy_wrappers`) with ``--clip-norm``; clipping
  each update before the clusters split them is clipping it per cluster;
- the server's optimizer (``fedavgm``) unless ``--server-lr 1 --server-momentum 0``;
- cross-kind distillation (:meth:`~broker_server.distillation.KindDistillation.around`) with
  ``--distill-epochs``.

DP-FedAvg replaces all of it with its release (``dp`` around ``fedit``). The rule's carry (the
exact residual, FedAvgM's momentum) is kept here between rounds and written to the state store
under the round, so that a restart aggregates the interrupted round as the run before it would
have. The statistics round (the class-mean head) is not a strategy and is done here too. No
transport, no round loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from broker_server.aggregation import (
    ClientUpdate,
    State,
    head_from_class_means,
    robust_head_from_statistics,
    sum_class_statistics,
)
from broker_server.checkpoint import encode_carry
from broker_server.cluster_groups import ClusterGroups
from broker_server.config import ServiceConfig
from broker_server.distillation import KindDistillation
from broker_server.heterogeneous import coverage_mean
from broker_server.state import StateStore
from broker_server.strategies import (
    ROBUST_STRATEGIES,
    Carry,
    StrategyRule,
    build_strategy,
    stateless,
)
from broker_server.strategy_wrappers import join_carry, split_carry, wrap
from edge_runtime.errors import ConfigError


def train_rule(
    config: ServiceConfig,
    *,
    mixed: bool = False,
    clusters: ClusterGroups | None = None,
    distillation: KindDistillation | None = None,
) -> StrategyRule:
    """The rule of a training round without DP, composed as the module docstring says."""
    if mixed and config.strategy != "hetlora":
        rule = StrategyRule(config.strategy, stateless(coverage_mean))
    else:
        rule = build_strategy(config.strategy, config.train.peft)
    if clusters is not None:
        rule = clusters.around(rule)
    if config.clip_norm is not None:
        rule = wrap("clip", rule, clip_norm=config.clip_norm)
    if config.server_lr != 1.0 or config.server_momentum != 0.0:
        rule = wrap("fedavgm", rule, lr=config.server_lr, beta=config.server_momentum)
    if distillation is not None:
        rule = distillation.around(rule)
    return rule


class RoundAggregation:
    """How a synchronous run aggregates its rounds, and the carry it keeps between them."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        mixed: bool = False,
        clusters: ClusterGroups | None = None,
        distillation: KindDistillation | None = None,
        store: StateStore | None = None,
        noise: Callable[[int], np.random.Generator] | None = None,
    ) -> None:
        self.config = config
        self.clusters = clusters
        self.distillation = distillation
        self.rule = train_rule(config, mixed=mixed, clusters=clusters, distillation=distillation)
        # whether the strategy itself keeps a carry (exact: the fed-back residual)
        self.keeps_residual = build_strategy(config.strategy, config.train.peft).keeps_carry
        # DP-FedAvg (broker_server.privacy): the mechanism, its noise by round (keyed by the
        # service once its store is open) and the releases made so far
        self.dp = config.dp_mechanism()
        self.noise = noise
        self.releases = 0
        self.store = store
        self.carry: Carry = {}  # the rule's: the strategy's own, FedAvgM's under its prefix

    @property
    def residual(self) -> Carry:
        """The strategy's own carry (the exact residual), without FedAvgM's momentum."""
        return split_carry(self.carry)[0]

    @property
    def momentum(self) -> Carry:
        """FedAvgM's momentum, by tensor name (empty without it)."""
        return split_carry(self.carry)[1]

    def restore(self, carries: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Take back the carries a checkpoint stored (see :mod:`broker_server.checkpoint`)."""
        residual = dict(carries.get("residual", self.residual))
        momentum = dict(carries.get("server_momentum", self.momentum))
        self.carry = join_carry(residual, momentum)

    def head(self, updates: Sequence[ClientUpdate]) -> dict[str, np.ndarray]:
        """The class-mean head from a statistics round's updates (screened under robust rules)."""
        if self.config.strategy in ROBUST_STRATEGIES:
            return robust_head_from_statistics(updates, self.config.head_scale, self.config.strategy)
        sums, counts = sum_class_statistics(updates)
        return head_from_class_means(sums, counts, self.config.head_scale)

    def statistics(
        self, state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], round_: int = 0
    ) -> State:
        """A statistics round: the class-mean head (one per cluster with clusters; with DP, from
        the noisy sums of the sampled devices' statistics, one release)."""
        if self.dp is not None:
            self.releases += 1
            c, h = state["head.weight"].shape
            return {
                **state,
                **self.dp.class_head(updates, (c, h), self.config.head_scale, self._noise(round_)),
            }
        if self.clusters is not None:
            return self.clusters.heads(state, updates, self.head)
        return {**state, **self.head(updates)}

    def train(self, state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], round_: int) -> State:
        """A training round's step from ``state``; carries are stored under ``round_``. Each DP
        release, even one with no sampled update, is one step of the accountant."""
        if self.dp is not None:
            self.releases += 1
            noise = self._noise
            release = wrap("dp", build_strategy("fedit"), mechanism=self.dp, noise=lambda: noise(round_))
            return release.aggregate(state, updates)[0]
        if self.distillation is not None:
            self.distillation.round = round_
        new, self.carry = self.rule.aggregate(state, updates, self.carry)
        self._save(round_)
        return new

    def _save(self, round_: int) -> None:
        """Write the carry to the store under ``round_``: the residual and the momentum apart."""
        if self.store is None:
            return
        if self.keeps_residual:
            self.store.save_residual(round_, encode_carry(round_, "residual", self.residual))
        if self.config.server_momentum > 0:
            momentum = {k: v.astype(np.float32) for k, v in self.momentum.items()}
            self.store.save_carry(
                round_, "server_momentum", encode_carry(round_, "server-momentum", momentum)
            )

    def _noise(self, round_: int) -> np.random.Generator:
        """The secret generator of a round's DP noise (the same when a round is redone)."""
        if self.noise is None:
            raise ConfigError("DP-FedAvg needs the service's noise generator (its key is in the store)")
        return self.noise(round_)
