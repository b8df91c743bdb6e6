"""Buffered asynchronous aggregation (FedBuff): the controller (:class:`BufferedVersions`, events in
and commands out) and its jobs, arrivals and buffer (:class:`JobBoard`), without I/O.

A *job* gives one device the current global version; its update *arrives* (on the wall clock, or
on a simulated one); arrivals are taken into the *buffer* in order of arrival, with their
staleness, and every K of them make a new version. :class:`JobBoard` holds that bookkeeping and
answers the controller's questions (may this device get a job, which arrival is next, is this
update for an open job of its device); the service does the I/O and the durable writes around it.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from broker_server.aggregation import ClientUpdate, State
from broker_server.async_ledger import StoredJob
from broker_server.asynchronous import Staleness, StaleUpdate, fedbuff_step, parse_staleness
from broker_server.config import ServiceConfig
from broker_server.intake import PendingUpdate, check_samples, check_update, expected_shapes
from broker_server.layout import TRAIN_PHASE
from broker_server.rounds.events import (
    Accepted,
    Ack,
    Checkpoint,
    CloseJob,
    Command,
    Event,
    Exclude,
    NewVersion,
    OpenJob,
    Refused,
    Reject,
    Status,
    Update,
    redelivery,
    refusal,
)
from edge_runtime.errors import StaleRound, UpdateRejected


class EventClock(Protocol):
    """A simulated clock for asynchronous runs: when devices can start and when their work lands."""

    def start(self, device: str, t: float) -> float:
        """The first time at or after ``t`` at which ``device`` can start a job (it may be offline)."""
        ...

    def finish(self, device: str, start: float, train_s: float, bytes_up: int, bytes_down: int) -> float:
        """When a job started at ``start`` has arrived at the service, given what it measured."""
        ...


@dataclass
class Job:
    """One asynchronous assignment of the current global version to one device."""

    device: str
    version: int
    start: float
    content_id: str
    nbytes: int
    answered: bool = False  # not waited for any more: its update came, it failed, or it was replaced
    updated: bool = False  # its update was accepted (a replaced job still takes one)


Arrival = tuple[float, str, int, PendingUpdate]
"""(arrival time, device, job id, update): ordered by time, then device, then job."""


class JobBoard:
    """The jobs, the arrivals not yet taken and the buffer of one asynchronous run."""

    def __init__(self) -> None:
        self.jobs: dict[int, Job] = {}
        self.seq = 0
        self.arrivals: list[Arrival] = []  # a heap
        self.buffer: list[tuple[int, StaleUpdate]] = []  # (job id, update), in order of arrival

    def in_flight(self) -> bool:
        """Whether any job is still waited for."""
        return any(not job.answered for job in self.jobs.values())

    def earliest_in_flight(self) -> float:
        """No job in flight can land before it started (a device offline until later cannot)."""
        return min((job.start for job in self.jobs.values() if not job.answered), default=float("inf"))

    def open_jobs(self, device: str) -> list[tuple[int, Job]]:
        """The device's jobs still waited for."""
        return [(i, j) for i, j in self.jobs.items() if j.device == device and not j.answered]

    def unanswered(self) -> list[tuple[int, Job]]:
        """Every job still waited for."""
        return [(i, j) for i, j in self.jobs.items() if not j.answered]

    def replace_for(self, device: str, version: int, *, returning: bool = False) -> list[int] | None:
        """Whether ``device`` may get a job on ``version`` now: None if an update of its waits for
        the buffer or it has a job open, else the ids of its jobs this closes (a device
        ``returning`` from offline has its jobs on older versions replaced: an update for a replaced
        job, should it still come, is taken within the staleness bound, but is no longer waited for)."""
        if any(d == device for _, d, _, _ in self.arrivals):
            return None
        open_jobs = self.open_jobs(device)
        if open_jobs and not (returning and all(job.version < version for _, job in open_jobs)):
            return None
        for _, job in open_jobs:
            job.answered = True
        return [i for i, _ in open_jobs]

    def next_id(self) -> int:
        """The id the next job gets (its module's round number on the wire)."""
        return self.seq + 1

    def open(self, device: str, version: int, start: float, content_id: str, nbytes: int) -> int:
        """Record a new job; returns its id."""
        self.seq += 1
        self.jobs[self.seq] = Job(device, version, start, content_id, nbytes)
        return self.seq

    def job_for(self, job_id: int, device: str, base_id: str) -> Job:
        """The open job an update of ``device`` answers, or :class:`StaleRound`/:class:`UpdateRejected`."""
        job = self.jobs.get(job_id)
        if job is None or job.device != device:
            raise StaleRound(f"{device} has no job {job_id}", round=job_id)
        if base_id != job.content_id:
            raise StaleRound(f"job {job_id} was trained on another module", round=job_id)
        if job.updated:
            raise UpdateRejected("a second, different update for the job", round=job_id)
        return job

    def fail(self, job_id: object, device: str) -> bool:
        """The device reported it could not do job ``job_id``: not waited for; True if it was its job."""
        job = self.jobs.get(job_id) if isinstance(job_id, int) else None
        if job is None or job.device != device:
            return False
        job.answered = True
        return True

    def arrive(self, arrival: float, device: str, job_id: int, pending: PendingUpdate) -> None:
        """An accepted update for ``job_id``; it lands at ``arrival``."""
        job = self.jobs[job_id]
        job.answered = job.updated = True
        heapq.heappush(self.arrivals, (arrival, device, job_id, pending))

    def requeue(self, arrival: Arrival) -> None:
        """An accepted update a run before a restart had not yet taken (its job is as stored)."""
        heapq.heappush(self.arrivals, arrival)

    def next_arrival(self, simulated: bool) -> Arrival | None:
        """The next arrival to take, if it is final: on a simulated clock, only once no job in
        flight can land earlier."""
        if self.arrivals and (not simulated or self.arrivals[0][0] <= self.earliest_in_flight()):
            return heapq.heappop(self.arrivals)
        return None

    def take(self, arrival: Arrival, version: int, max_staleness: int) -> int | None:
        """Take an arrival into the buffer with its staleness; None if it is staler than the bound
        (then it stays out)."""
        _, device, job_id, pending = arrival
        tau = version - self.jobs[job_id].version
        if tau > max_staleness:
            return None
        u = pending.update
        update = ClientUpdate(device, u.num_samples, u.tensors, u.metrics)
        self.buffer.append((job_id, StaleUpdate(update, tau)))
        return tau

    def drain(self) -> list[tuple[int, StaleUpdate]]:
        """Empty the buffer, in the order aggregation sums it (device, staleness, job: arrival order
        must not change the floats)."""
        buffer, self.buffer = self.buffer, []
        return sorted(buffer, key=lambda b: (b[1].update.device_id, b[1].staleness, b[0]))

    def unaggregated(self) -> list[dict[str, Any]]:
        """Accepted updates no version took in: the buffer's, then the arrivals'."""
        return [{"client": b.update.device_id, "job": j} for j, b in self.buffer] + [
            {"client": d, "job": j} for _, d, j, _ in sorted(self.arrivals, key=lambda a: a[:3])
        ]

    def restore(self, jobs: list[StoredJob]) -> None:
        """Take back the jobs a run before a restart had opened."""
        for j in jobs:
            job = Job(j.device, j.version, j.start, j.content_id, j.nbytes, j.answered, j.updated)
            self.jobs[j.job] = job
        self.seq = max(self.jobs, default=0)


class BufferedVersions:
    """The buffered asynchronous controller (FedBuff): jobs on the newest version, updates that
    arrive for them, and a new version every ``buffer_size`` of them, weighted by their samples
    and their staleness. No I/O: events in, commands out (:mod:`broker_server.rounds.events`).

    Times are seconds on the asynchronous clock: for an :class:`Update`, the wall time since the
    asynchronous phase began, unless an :class:`EventClock` says when the job's work lands.
    """

    def __init__(
        self,
        *,
        buffer_size: int,
        max_staleness: int,
        staleness: Staleness,
        server_lr: float,
        norm_bound: float,
        event_clock: EventClock | None = None,
        accepted_ids: dict[tuple[str, int], str] | None = None,
    ) -> None:
        self.buffer_size = buffer_size
        self.max_staleness = max_staleness
        self.staleness = staleness
        self.server_lr = server_lr
        self.norm_bound = norm_bound
        self.event_clock = event_clock
        self.accepted_ids = {} if accepted_ids is None else accepted_ids
        self.jobs = JobBoard()  # jobs, arrivals and the buffer
        self.state: State = {}
        self.version = 0
        self.now = 0.0  # the asynchronous clock: the last arrival taken
        self.stale = 0  # updates dropped as too stale since the last version

    @classmethod
    def from_config(
        cls,
        config: ServiceConfig,
        *,
        event_clock: EventClock | None = None,
        accepted_ids: dict[tuple[str, int], str] | None = None,
    ) -> BufferedVersions:
        """A controller with the service configuration's buffer, bound and staleness weights."""
        return cls(
            buffer_size=config.buffer_size,
            max_staleness=config.max_staleness,
            staleness=parse_staleness(config.staleness),
            server_lr=config.server_lr,
            norm_bound=config.norm_bound,
            event_clock=event_clock,
            accepted_ids=accepted_ids,
        )

    def begin(self, state: Mapping[str, np.ndarray], version: int, now: float = 0.0) -> None:
        """Start (or continue) from ``state`` as version ``version`` at ``now``."""
        self.state, self.version, self.now = dict(state), version, now

    def handle(self, event: Event, now: float) -> list[Command]:
        """The commands that ``event``, at time ``now``, calls for."""
        if isinstance(event, Update):
            return self._update(event, now)
        if isinstance(event, Refused):
            return refusal(event, self.version)[1]
        if isinstance(event, Status):
            return self._status(event)
        return self._take_next()

    def ready(self) -> bool:
        """Whether an arrival is final, so that a :class:`Tick` takes it."""
        arrivals = self.jobs.arrivals
        return bool(arrivals) and (
            self.event_clock is None or arrivals[0][0] <= self.jobs.earliest_in_flight()
        )

    def idle(self) -> bool:
        """No device is training and no update waits: nothing can make the next version."""
        return not self.jobs.in_flight() and not self.jobs.arrivals

    def offer(self, device: str, *, returning: bool = False) -> list[Command]:
        """Give ``device`` a job on the newest version unless the job board says it must wait
        (:meth:`JobBoard.replace_for`); the jobs a returning device's new one replaces close."""
        replaced = self.jobs.replace_for(device, self.version, returning=returning)
        if replaced is None:
            return []
        return [*(CloseJob(job) for job in replaced), OpenJob(device)]

    def give_up(self) -> list[Command]:
        """The deadline passed with no update: stop waiting for every job in flight."""
        commands: list[Command] = []
        for job_id, job in self.jobs.unanswered():
            job.answered = True
            commands += [CloseJob(job_id), Reject(job.device, self.version, "deadline: job unanswered")]
        return commands

    def _status(self, event: Status) -> list[Command]:
        if event.state != "failed" or not isinstance(event.round, int):
            return []
        if not self.jobs.fail(event.round, event.device):
            return []
        # do not wait for it, do not give it more
        reason = f"failed job {event.round}: device_failed: {event.reason}"
        return [Exclude(event.device, reason), CloseJob(event.round)]

    def _update(self, event: Update, now: float) -> list[Command]:
        """Accept an update for one of its device's jobs; it joins the arrivals at its time."""
        again = redelivery(self.accepted_ids, event)
        if again is not None:
            return again
        u, device = event.update, event.device
        try:
            job = self.jobs.job_for(u.round, device, u.base_id)
            check_update(u, expected_shapes(TRAIN_PHASE, event.shapes), TRAIN_PHASE, self.norm_bound)
            check_samples(u, event.hello)
        except UpdateRejected as exc:
            return refusal(Refused(device, exc.round, exc.code, exc.reason, known=True), self.version)[1]
        train_s = float(u.metrics.get("train_s", 0.0))
        if self.event_clock is not None:
            now = self.event_clock.finish(device, job.start, train_s, len(event.payload), job.nbytes)
        cid = event.content_id
        pending = PendingUpdate(u, cid, len(event.payload))
        self.accepted_ids[(device, u.round)] = cid
        self.jobs.arrive(now, device, u.round, pending)
        return [
            Checkpoint(device, u.round, pending, event.payload, arrival=now),
            Ack(device, u.round, cid, True, ""),
            Accepted(device),
        ]

    def _take_next(self) -> list[Command]:
        """Take the next final arrival into the buffer (or drop it as too stale); a full buffer
        makes a new version; the device that sent it gets its next job."""
        if not self.ready():
            return []
        arrival = heapq.heappop(self.jobs.arrivals)
        at, device, job_id, _ = arrival
        self.now = max(self.now, at)
        commands: list[Command] = []
        if self.jobs.take(arrival, self.version, self.max_staleness) is None:
            self.stale += 1
            trained_on = self.jobs.jobs[job_id].version
            reason = (
                f"stale_round: job {job_id} trained on version {trained_on}, now {self.version} "
                f"(bound {self.max_staleness})"
            )
            commands.append(Reject(device, self.version, reason, what="dropped", job=job_id))
        if len(self.jobs.buffer) >= self.buffer_size:
            taken = self.jobs.drain()
            self.state = fedbuff_step(self.state, [b for _, b in taken], self.staleness, self.server_lr)
            self.version += 1
            commands.append(NewVersion(self.version, self.state, taken, stale=self.stale))
            self.stale = 0
        return commands + self.offer(device)
