"""Synchronous rounds: the controller that collects a round (:class:`SyncRounds`), without I/O.

Events in, commands out. The aggregation that closes a round is
:class:`~broker_server.rounds.aggregation.RoundAggregation`; the loop that drives both is
:mod:`broker_server.round_loop`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

from broker_server.aggregation import (
    ClientUpdate,
)
from broker_server.config import ServiceConfig
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
from edge_runtime.errors import StaleRound, UpdateRejected


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

    def updates(self) -> list[ClientUpdate]:
        """The round's accepted updates in device order (arrival order must not change the floats)."""
        return [
            ClientUpdate(p.update.device_id, p.update.num_samples, p.update.tensors, p.update.metrics)
            for _, p in sorted(self.pending.items())
        ]

    def _close(self, *, complete: bool) -> CloseRound:
        return CloseRound(self.round, self.updates(), complete)

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
