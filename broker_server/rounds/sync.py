"""Synchronous rounds: the controller that collects a round (:class:`SyncRounds`, events in and
commands out) and the aggregation that closes it (:class:`RoundAggregation`).

The aggregation of one synchronous round: (state, accepted updates) -> the next state.

It picks the rule the configuration names (a registered strategy, the coverage mean of a mixed
fleet, per-cluster steps), clips, applies the server's momentum (FedAvgM) and keeps what the rule
carries between rounds, writing each carry to the state store with its round, so that a restart
aggregates the interrupted round as the run before it would have. No transport, no round loop;
DP-FedAvg's releases and cross-kind distillation stay with the service, which owns their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from broker_server.aggregation import (
    ClientUpdate,
    State,
    head_from_class_means,
    robust_head_from_statistics,
    server_momentum_step,
    sum_class_statistics,
)
from broker_server.checkpoint import encode_carry
from broker_server.cluster_groups import ClusterGroups
from broker_server.config import ServiceConfig
from broker_server.heterogeneous import coverage_mean
from broker_server.intake import PendingUpdate, check_samples, check_update, expected_shapes
from broker_server.layout import TRAIN_PHASE
from broker_server.rounds.events import (
    Accepted,
    Ack,
    Checkpoint,
    CloseRound,
    Command,
    Event,
    Publish,
    Refused,
    Reject,
    RoundFailed,
    Shortfall,
    Status,
    Update,
    redelivery,
    refusal,
)
from broker_server.state import StateStore
from broker_server.strategies import (
    ROBUST_STRATEGIES,
    STATEFUL_STRATEGIES,
    StrategyRule,
    build_strategy,
    get_strategy,
    stateless,
)
from broker_server.strategy_wrappers import wrap
from edge_runtime.errors import ConfigError, StaleRound, UpdateRejected


class RoundAggregation:
    """How a synchronous run aggregates its rounds, and the carries it keeps between them."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        mixed: bool = False,
        clusters: ClusterGroups | None = None,
        store: StateStore | None = None,
        noise: Callable[[int], np.random.Generator] | None = None,
    ) -> None:
        self.config = config
        stateful = config.strategy in STATEFUL_STRATEGIES
        # the stateless rule (per cluster too); exact and ffa need the LoRA pairs and run as a StrategyRule
        self.strategy = get_strategy("fedit" if stateful else config.strategy)
        self.rule = build_strategy(config.strategy, config.train.peft) if stateful else None
        # a mixed fleet: zero-pad and average each element over the clients that trained it
        # (hetlora pads and weighs ranks itself)
        self.mixed = mixed and config.strategy != "hetlora"
        inner = self.rule or StrategyRule(
            config.strategy, stateless(coverage_mean if self.mixed else self.strategy)
        )
        # clipping wraps the rule (broker_server.strategy_wrappers); clusters clip per cluster
        self.step = inner if config.clip_norm is None else wrap("clip", inner, clip_norm=config.clip_norm)
        # DP-FedAvg (broker_server.privacy): the mechanism, its noise by round (keyed by the
        # service once its store is open) and the releases made so far
        self.dp = config.dp_mechanism()
        self.noise = noise
        self.releases = 0
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
        if self.clusters is not None:
            return self.clusters.step(state, updates, self.strategy, self.config.clip_norm)
        new, carry = self.step.aggregate(state, updates, self.carry)
        if self.rule is not None:
            self.carry = carry
            if self.rule.keeps_carry and self.store is not None:
                self.store.save_residual(round_, encode_carry(round_, "residual", self.carry))
            return new
        return self._server_step(dict(state), new, round_)

    def _noise(self, round_: int) -> np.random.Generator:
        """The secret generator of a round's DP noise (the same when a round is redone)."""
        if self.noise is None:
            raise ConfigError("DP-FedAvg needs the service's noise generator (its key is in the store)")
        return self.noise(round_)

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


class Sampler(Protocol):
    """Which devices a round uses (DP-FedAvg's :class:`~broker_server.privacy.PoissonSampler`)."""

    def includes(self, round_: int, device: str) -> bool:
        """Whether ``device`` is sampled in ``round_``."""
        ...


NOT_SAMPLED = "not_sampled: DP-FedAvg did not sample it in that round"


class SyncRounds:
    """The synchronous round controller: one round at a time, collected until every participant
    answered or the deadline, then closed with the updates that arrived. No I/O: events in,
    commands out (:mod:`broker_server.rounds.events`).

    A device's turn in a round ends with its accepted update, a rejected one, or its report that it
    failed; the round closes early once every participant's turn has ended, else at the deadline if
    at least ``enough`` updates came in, else it waits again, up to ``max_round_retries`` times.
    """

    def __init__(
        self,
        *,
        min_clients: int,
        round_timeout_s: float,
        max_round_retries: int,
        norm_bound: float,
        sampler: Sampler | None = None,
        accepted_ids: dict[tuple[str, int], str] | None = None,
    ) -> None:
        self.min_clients = min_clients
        self.round_timeout_s = round_timeout_s
        self.max_round_retries = max_round_retries
        self.norm_bound = norm_bound
        self.sampler = sampler
        self.round = 0
        self.phase = TRAIN_PHASE
        self.pending: dict[str, PendingUpdate] = {}  # device -> its accepted update this round
        self.answered: set[str] = set()  # devices whose turn ended without an accepted update
        # (device, round) -> content id of every accepted update, to acknowledge redeliveries again
        self.accepted_ids = {} if accepted_ids is None else accepted_ids
        self.stale = 0  # this round's updates trained on an older module
        self.bytes_down = 0  # what this round's accepted updates say they downloaded
        self.participants: set[str] = set()
        self.enough = min_clients
        self.deadline = math.inf
        self.attempt = 0

    @classmethod
    def from_config(
        cls,
        config: ServiceConfig,
        *,
        sampler: Sampler | None = None,
        accepted_ids: dict[tuple[str, int], str] | None = None,
    ) -> SyncRounds:
        """A controller with the service configuration's limits."""
        return cls(
            min_clients=config.min_clients,
            round_timeout_s=config.round_timeout_s,
            max_round_retries=config.max_round_retries,
            norm_bound=config.norm_bound,
            sampler=sampler,
            accepted_ids=accepted_ids,
        )

    def open_round(
        self,
        round_: int,
        phase: str,
        *,
        resumed: bool = False,
        turns_ended: Iterable[str] = (),
        stale: int = 0,
    ) -> list[Command]:
        """Start round ``round_``: publish its module. ``resumed``: the round a restart
        interrupted, with the updates already in :attr:`pending` acknowledged again (the crash may
        have come between storing and acknowledging them), the turns its rejections had ended and
        its count of stale updates."""
        self.round, self.phase = round_, phase
        if not resumed:
            self.pending, self.answered, self.stale, self.bytes_down = {}, set(), 0, 0
            return [Publish(round_, phase)]
        self.answered = set(turns_ended)
        self.stale = stale
        self.bytes_down = sum(int(p.update.metrics.get("bytes_down", 0)) for p in self.pending.values())
        acks: list[Command] = [
            Ack(device, round_, p.content_id, True, "accepted before a restart")
            for device, p in sorted(self.pending.items())
        ]
        return [Publish(round_, phase, resumed=True), *acks]

    def collect(self, participants: Iterable[str], now: float, enough: int | None = None) -> None:
        """Wait for ``participants`` from ``now``; the round may close at its deadline with at
        least ``enough`` updates (default ``min_clients``; with 0 an empty round closes at once)."""
        self.participants = set(participants)
        self.enough = self.min_clients if enough is None else enough
        self.deadline = now + self.round_timeout_s
        self.attempt = 0

    def handle(self, event: Event, now: float) -> list[Command]:
        """The commands that ``event``, at time ``now``, calls for."""
        if isinstance(event, Update):
            return self._update(event)
        if isinstance(event, Refused):
            return self._refuse(event)
        if isinstance(event, Status):
            return self._status(event)
        return self._tick(now)

    def stop(self) -> list[Command]:
        """The service is stopping: close with what came in if it is enough, else fail."""
        got = len(self.pending)
        if got >= self.enough:
            return [self._close(complete=False)]
        return [Shortfall(self.round, got, self.attempt + 1), RoundFailed(self.round, got)]

    def _everyone_answered(self) -> bool:
        return bool(self.participants or self.enough == 0) and self.participants <= (
            set(self.pending) | self.answered
        )

    def _tick(self, now: float) -> list[Command]:
        if self._everyone_answered():
            return [self._close(complete=True)]
        if now < self.deadline:
            return []
        got = len(self.pending)
        if got >= self.enough:
            return [self._close(complete=False)]
        self.attempt += 1
        if self.attempt > self.max_round_retries:
            return [Shortfall(self.round, got, self.attempt), RoundFailed(self.round, got)]
        self.deadline = now + self.round_timeout_s
        return [Shortfall(self.round, got, self.attempt)]

    def _close(self, *, complete: bool) -> CloseRound:
        updates = [
            ClientUpdate(p.update.device_id, p.update.num_samples, p.update.tensors, p.update.metrics)
            for _, p in sorted(self.pending.items())  # arrival order must not change the floats
        ]
        return CloseRound(self.round, updates, complete)

    def _refuse(self, event: Refused) -> list[Command]:
        ends_turn, commands = refusal(event, self.round)
        if ends_turn and event.device is not None:
            self.answered.add(event.device)
        return commands

    def _status(self, event: Status) -> list[Command]:
        if event.state != "failed":
            return []
        # the device could not train this round (over its memory cap, say): end its turn
        if event.round == self.round:
            self.answered.add(event.device)
        return [Reject(event.device, event.round, f"device_failed: {event.reason}", what="failed")]

    def _update(self, event: Update) -> list[Command]:
        u, device = event.update, event.device
        again = redelivery(self.accepted_ids, event)
        if again is not None:
            if u.round == self.round:
                self.answered.add(device)
            return again
        if self.sampler is not None and not self.sampler.includes(u.round, device):
            # DP-FedAvg uses sampled devices' updates only; every device trains, so this is
            # expected, not a fault: it ends the device's turn, late or not
            if u.round == self.round:
                self.answered.add(device)
            return [Ack(device, u.round, "", False, NOT_SAMPLED)]
        try:
            self._check(event)
        except UpdateRejected as exc:
            return self._refuse(Refused(device, exc.round, exc.code, exc.reason, known=True))
        cid = event.content_id
        pending = PendingUpdate(u, cid, len(event.payload))
        self.pending[device] = pending
        self.accepted_ids[(device, u.round)] = cid
        self.bytes_down += int(u.metrics.get("bytes_down", 0))
        return [
            Checkpoint(device, u.round, pending, event.payload),
            Ack(device, u.round, cid, True, ""),
            Accepted(device),
        ]

    def _check(self, event: Update) -> None:
        """Raise :class:`UpdateRejected` unless the update answers this round, once, as asked."""
        u = event.update
        if u.round < self.round or (u.round == self.round and u.base_id != event.module_id):
            self.stale += 1
            raise StaleRound(f"trained on round {u.round}, current is {self.round}", round=u.round)
        if u.round > self.round:
            raise StaleRound(f"round {u.round} is ahead of the current {self.round}", round=u.round)
        check_update(u, expected_shapes(self.phase, event.shapes), self.phase, self.norm_bound)
        if event.device in self.pending:
            raise UpdateRejected("a second, different update for the round", round=u.round)
        check_samples(u, event.hello)
