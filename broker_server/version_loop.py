"""The asynchronous version loop (FedBuff): devices train the newest version whenever they are free,
and every K updates (in order of arrival, on the simulated clock if there is one) make a new one.

The controller (:class:`~broker_server.rounds.buffered.BufferedVersions`) decides; this loop feeds
it the ticks, gives jobs out (:meth:`VersionLoop.dispatch`), records the versions it makes
(:meth:`VersionLoop.new_version`) and, with a state store, keeps jobs, the buffer and every version
in the :class:`~broker_server.async_ledger.AsyncLedger`, so that a restarted service continues
from the newest stored version with no acknowledged update lost or counted twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from broker_server.async_ledger import AsyncLedger, AsyncSnapshot
from broker_server.broadcast import Broadcast
from broker_server.config import ServiceConfig
from broker_server.inbound import Inbound
from broker_server.intake import PendingUpdate
from broker_server.journal import Journal
from broker_server.layout import TRAIN_PHASE
from broker_server.publisher import Publisher
from broker_server.records import Timing, version_record
from broker_server.registry import DeviceRegistry
from broker_server.round_loop import Evaluate, Execute
from broker_server.rounds.buffered import BufferedVersions, EventClock
from broker_server.rounds.events import NewVersion, Tick
from broker_server.state import StateStore
from edge_runtime import wire
from edge_runtime.errors import FedPeftError

log = logging.getLogger("fedpeft.server")


class VersionLoop:
    """Runs the asynchronous versions of one fleet (see the module docstring)."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        registry: DeviceRegistry,
        broadcast: Broadcast,
        publisher: Publisher,
        journal: Journal,
        inbound: Inbound,
        buffered: BufferedVersions,
        execute: Execute,
        evaluate: Evaluate,
        clock: Callable[[], float],
        stopped: Callable[[], bool],
        ledger: AsyncLedger | None = None,
        store: StateStore | None = None,
        event_clock: EventClock | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.broadcast = broadcast
        self.publisher = publisher
        self.journal = journal
        self.inbound = inbound
        self.buffered = buffered
        self.execute = execute
        self.evaluate = evaluate
        self.clock = clock
        self.stopped = stopped
        self.ledger = ledger
        self.store = store
        self.event_clock = event_clock
        self.on_round = on_round
        self.active = False  # the asynchronous phase has begun (messages go to its controller)
        self.start = 0.0  # where the asynchronous clock's 0 is on the service's clock
        # when the run, the current version and the current step of the asynchronous phase began
        self.wall_start = self.version_start = self.tick_start = 0.0

    def now(self) -> float:
        """The asynchronous clock (the service's, from where the phase began)."""
        return self.clock() - self.start

    def offer(self, device: str, *, returning: bool = False) -> None:
        """Give ``device`` the newest version unless it must wait (:meth:`BufferedVersions.offer`)."""
        self.execute(self.buffered.offer(device, returning=returning))

    def dispatch(self, device: str, t: float) -> None:
        """Give ``device`` a job: the current global version, on its own topic (retained); with a
        store, the job is recorded before its module goes out."""
        record = self.registry.devices[device]
        if not record.online or record.excluded:
            return
        start = self.event_clock.start(device, t) if self.event_clock is not None else t
        b, jobs = self.broadcast, self.buffered.jobs
        group = b.group_of(record)
        payload = b.encode_global(TRAIN_PHASE, group.config_id, b.state, jobs.next_id())
        group.global_id = wire.content_id(payload)
        job_id = jobs.open(device, b.round, start, group.global_id, len(payload))
        if self.ledger is not None:
            self.ledger.open_job(job_id, device, b.round, group.global_id, len(payload), start)
        self.publisher.publish_retained(group.topic, payload)

    def version_payload(self) -> bytes:
        """The current version's module as the ledger keeps it: fp32, exact."""
        return wire.encode_global(
            wire.GlobalModule(self.broadcast.round, "async", self.broadcast.state), bits=32
        )

    def take_back(self, snapshot: AsyncSnapshot) -> None:
        """From a restart's snapshot, what the report counts: the versions' records, the devices
        (registered from their stored hellos), their accepted updates and those updates' ids."""
        assert self.store is not None
        devices = self.registry.devices
        for device, hello_payload in self.store.devices().items():
            if device not in devices:
                self.registry.register(device, wire.decode_hello(hello_payload))
        for device, count in snapshot.accepted_counts.items():
            if device in devices:
                devices[device].updates_accepted += count
        self.buffered.accepted_ids.update(snapshot.accepted_ids)
        # the class-mean round, if any, was over before version 0 was saved
        self.journal.take_back_records(self.store.round_records() + snapshot.records)

    def restore(self, snapshot: AsyncSnapshot) -> float:
        """Continue from the newest stored version: its module, the jobs, the buffer (acknowledged
        again: a crash may have eaten those acks), and every open job's module published again,
        byte for byte, in case a crash came between recording the job and publishing it. Returns
        the asynchronous clock where the run before stopped."""
        assert self.ledger is not None
        b, jobs = self.broadcast, self.buffered.jobs
        big = max(len(snapshot.payload), wire.DEFAULT_MAX_PAYLOAD)
        b.state = dict(wire.decode_global(snapshot.payload, max_bytes=big).tensors)
        b.round = snapshot.version
        jobs.restore(snapshot.jobs)
        now = max((j.start for j in snapshot.jobs), default=0.0)
        for stored in snapshot.waiting:
            update = wire.decode_update(stored.payload, max_bytes=max(len(stored.payload), big))
            pending = PendingUpdate(update, stored.content_id, len(stored.payload))
            jobs.requeue((stored.arrival, stored.device, stored.job, pending))
            self.publisher.ack(
                stored.device, stored.job, stored.content_id, True, "accepted before a restart"
            )
            now = max(now, stored.arrival)
        counters = self.store.counters() if self.store is not None else None
        if counters is not None and counters.get("round") == b.round:
            self.buffered.stale = int(counters["round_stale"])
            self.journal.round_bytes_up = int(counters["round_bytes_up"])
        for job_id, job in sorted(jobs.jobs.items()):
            if job.answered or job.device not in self.registry.devices:
                continue
            stored_version = self.ledger.version_payload(job.version)
            group = b.group_of(self.registry.devices[job.device])
            payload = b""
            if stored_version is not None:
                state = wire.decode_global(stored_version, max_bytes=big).tensors
                payload = b.encode_global(TRAIN_PHASE, group.config_id, dict(state), job_id)
            if wire.content_id(payload) == job.content_id:
                group.global_id = job.content_id
                self.publisher.publish_retained(group.topic, payload)
            else:  # cannot rebuild it: not waited for; the device gets a new job below
                job.answered = True
                self.ledger.close_job(job_id)
        log.warning(
            "resumed async version %d from %s: %d updates in the buffer, %d jobs open",
            b.round,
            self.ledger.store.path,
            len(jobs.arrivals),
            len(jobs.unanswered()),
        )
        return now

    def run(self, wall_start: float, snapshot: AsyncSnapshot | None = None) -> None:
        """FedBuff until the last version (see the module docstring)."""
        b, jobs = self.broadcast, self.buffered.jobs
        self.active = True
        b.phase = TRAIN_PHASE
        self.buffered.stale = 0
        self.journal.round_bytes_up = 0
        if snapshot is None:
            b.round = 0
            now = 0.0
            if self.ledger is not None:  # version 0, what the first jobs train on
                self.ledger.save_version(0, self.version_payload(), None, [], self.journal.counters())
        else:
            now = self.restore(snapshot)
        self.buffered.begin(b.state, b.round, now)
        self.start = self.clock() - now
        self.wall_start = wall_start
        self.version_start = self.clock()
        for device in sorted(self.registry.devices):
            self.offer(device)
        while b.round < self.config.rounds and not self.stopped():
            # with a simulated clock an arrival is final only once no job in flight can land earlier
            if self.buffered.ready():
                self.tick_start = self.clock()
                self.execute(self.buffered.handle(Tick(), self.now()))
                continue
            if self.buffered.idle():
                raise FedPeftError(
                    f"version {b.round}: no device is training and the buffer holds "
                    f"{len(jobs.buffer)} of {self.config.buffer_size} updates"
                )
            deadline = self.clock() + self.config.round_timeout_s
            while not self.stopped() and self.clock() < deadline:
                if self.inbound.pump(min(deadline, self.clock() + 0.5)):
                    break
            else:
                if not self.stopped():
                    lost = len(jobs.unanswered())
                    log.warning(
                        "%d jobs unanswered after %.0f s: given up", lost, self.config.round_timeout_s
                    )
                    self.execute(self.buffered.give_up())
        self.active = False
        self.journal.unaggregated = jobs.unaggregated()

    def new_version(self, command: NewVersion) -> None:
        """A version the buffer made: evaluated, recorded, saved with the buffer it consumed."""
        b = self.broadcast
        b.state, b.round = command.state, command.version
        result, _ = self.evaluate()
        end = self.clock()
        timing = Timing(
            end - self.wall_start, end - self.version_start, self.buffered.now, end - self.tick_start
        )
        record = version_record(
            b.round,
            TRAIN_PHASE,
            timing,
            result,
            command.taken,
            self.buffered.staleness,
            stale=command.stale,
            bytes_up=self.journal.round_bytes_up,
        )
        self.journal.round_bytes_up = 0
        if self.ledger is not None:  # the version and the buffer it consumed, in one transaction
            self.ledger.save_version(
                b.round, self.version_payload(), record, record["jobs"], self.journal.counters()
            )
        self.journal.evaluated(result)
        self.journal.record_round(record, store=False)
        if self.on_round is not None:
            self.on_round(record)
        self.version_start = self.clock()
