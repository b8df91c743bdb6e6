"""The aggregation service: registers devices, assigns modules, validates, aggregates, publishes.

Messages arrive on the transport's network thread and are only queued there; one service thread
does every check, every write and every publish, so the state needs no further locking.

Rounds are synchronous: the service publishes round r's global module (retained), collects the
updates trained on it until every participant has answered or the deadline passes, aggregates
with a pure strategy function, evaluates, checkpoints and publishes round r+1. Round 0 is a
statistics round when the head starts from class means (FedNCM): devices send per-class feature
sums of the frozen model instead of trained deltas. With ``mode="async"`` the rounds after it are
buffered asynchronous versions (FedBuff).

This class is the I/O shell and the loops that drive the round controllers: it decodes each
message into an event (:mod:`~broker_server.rounds.events`), hands it to the controller of the
phase (:class:`~broker_server.rounds.sync.SyncRounds` for synchronous rounds,
:class:`~broker_server.rounds.buffered.BufferedVersions` for asynchronous versions), and carries
out the commands it gets back in order (:meth:`AggregationService._execute`): publish, store,
acknowledge, reject, open and close jobs, aggregate. The controllers decide; nothing here decides
whether an update is accepted. The pieces around it live in their own modules:
:mod:`~broker_server.config` (ServiceConfig, the combinations it runs),
:mod:`~broker_server.registry` (devices), :mod:`~broker_server.intake` (decode and check an
update), :mod:`~broker_server.broadcast` (the global state, its groups' views, the delta downlink),
:mod:`~broker_server.publisher` (encoding, topics, artifacts), :mod:`~broker_server.checkpoint`
(restore from SQLite), :mod:`~broker_server.cluster_groups` (clusters),
:mod:`~broker_server.rounds.sync` (the synchronous controller and a round's aggregation, with the
strategy wrappers of :mod:`~broker_server.strategy_wrappers`), :mod:`~broker_server.fleet_evaluation`
and :mod:`~broker_server.records` (round records and the fleet summary the reports read).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from broker_server.aggregation import (
    ClientUpdate,
)
from broker_server.allocation import Allocator, RewardTable, peft_key
from broker_server.async_ledger import AsyncLedger, AsyncSnapshot
from broker_server.broadcast import Broadcast
from broker_server.checkpoint import read_report_inputs, read_round_checkpoint
from broker_server.cluster_groups import ClusterGroups
from broker_server.clustering import (
    Clustering,
    parse_clusters,
    split_state,
)
from broker_server.config import ServiceConfig, check_combination
from broker_server.distillation import fuse_kinds
from broker_server.evaluation import Evaluator
from broker_server.fleet_evaluation import evaluate_fleet, initial_state
from broker_server.intake import PendingUpdate, decode_update
from broker_server.layout import DONE_PHASE, PERSONALIZE_PHASE, STATS_PHASE, TRAIN_PHASE
from broker_server.privacy import PoissonSampler, new_key
from broker_server.publisher import Publisher
from broker_server.records import (
    DeviceSummary,
    FleetSummary,
    Timing,
    final_figures,
    personalization_means,
    round_record,
    version_record,
)
from broker_server.registry import DeviceRecord, DeviceRegistry
from broker_server.report import allocation_entry
from broker_server.rounds.buffered import BufferedVersions, EventClock, JobBoard
from broker_server.rounds.events import (
    Accepted,
    Ack,
    Checkpoint,
    CloseJob,
    CloseRound,
    Command,
    Exclude,
    NewVersion,
    OpenJob,
    Publish,
    Refused,
    Reject,
    RoundFailed,
    Shortfall,
    Status,
    Tick,
    Update,
)
from broker_server.rounds.sync import RoundAggregation, SyncRounds
from broker_server.state import TRAIN_CONFIG_KEY, StateStore
from edge_runtime import wire
from edge_runtime.artifact_transfer import DEFAULT_CHUNK_BYTES, ArtifactInfo
from edge_runtime.chunking import ChunkAssembler, is_chunk
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset
from edge_runtime.downlink import RESYNC_STATE
from edge_runtime.engines import artifact_flavour
from edge_runtime.engines.base import EvalResult
from edge_runtime.errors import (
    DuplicateUpdate,
    FedPeftError,
    UnknownDevice,
    UpdateRejected,
)
from edge_runtime.transport import Transport

log = logging.getLogger("fedpeft.server")


RoundCallback = Callable[[dict[str, Any]], None]


class AggregationService:
    """Runs the rounds of one fleet over a transport; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        config: ServiceConfig,
        evaluator: Evaluator,
        *,
        store: StateStore | None = None,
        on_round: RoundCallback | None = None,
        on_accept: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        allocator: Allocator | None = None,
        serve_artifacts: bool = True,
        artifacts_cache: Path | None = None,
        artifact_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        unlabeled: TextDataset | None = None,
        event_clock: EventClock | None = None,
    ) -> None:
        check_combination(
            config, mixed=allocator is not None, unlabeled=0 if unlabeled is None else len(unlabeled)
        )
        # asynchronous mode: versions, jobs and the buffer in the store (None without one)
        self._ledger = AsyncLedger(store) if store is not None and config.mode == "async" else None
        self.event_clock = event_clock
        self._async_start = 0.0  # where the asynchronous clock's 0 is on the service's clock
        self._async_active = False
        # when the run, the current version and the current step of the asynchronous phase began
        self._wall_start = self._version_start = self._tick_start = 0.0
        # accepted updates no version took in before the run ended (asynchronous mode)
        self.unaggregated: list[dict[str, Any]] = []
        self.unlabeled = unlabeled
        self.distilled: dict[str, dict[str, float]] = {}  # the last round's agreement, by kind
        self.transport = transport
        self.config = config
        self.evaluator = evaluator
        self.store = store
        self.on_round = on_round
        self.on_accept = on_accept
        self.clock = clock
        self.allocator = allocator
        self.clustered = config.clusters != "off"
        # formed once the expected devices said hello (broker_server.cluster_groups)
        self.clusters = ClusterGroups(
            parse_clusters(config.clusters), seed=config.seed, share=config.cluster_share, store=store
        )
        # exact and ffa (broker_server.strategies): the rule and its carry (exact: the fed-back part)
        # how each synchronous round aggregates, and the carries it keeps (broker_server.rounds.sync)
        self.aggregation = RoundAggregation(
            config,
            mixed=allocator is not None,
            clusters=self.clusters if self.clustered else None,
            store=store,
        )
        self.registry = DeviceRegistry(config.train, allocator, store, serve_artifacts=serve_artifacts)
        self.rejected: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self.final_eval: dict[str, float] = {}
        # device -> what its personalization phase measured on its own held-out samples
        self.personalization: dict[str, dict[str, float]] = {}
        self.bytes_up_total = 0
        self.bytes_down_reported = 0
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        # (device, round) -> content id of every accepted update, to re-acknowledge redeliveries
        self._accepted_ids: dict[tuple[str, int], str] = {}
        # the synchronous rounds' controller: what a round collected, whose turn ended, deadlines
        self.sync = SyncRounds.from_config(config, accepted_ids=self._accepted_ids)
        # the asynchronous versions' controller: jobs, arrivals, the buffer, staleness
        self.buffered = BufferedVersions.from_config(
            config, event_clock=event_clock, accepted_ids=self._accepted_ids
        )
        self._round_bytes_up = 0
        # what a restarted service takes back from the store: each device's counters (applied when
        # its record is made) and the interrupted round's (stale updates, bytes up)
        self._resumed_round_counters = (0, 0)
        self._stopped = False
        self._started = False
        self._resumed_payload = b""
        # DP-FedAvg (broker_server.privacy): the mechanism, its sampler (keyed once the store is
        # open), the releases made so far and this round's sample
        self._dp = config.dp_mechanism()
        self._sampler: PoissonSampler | None = None
        self._sampled: set[str] = set()
        self._chunks = ChunkAssembler(max_bytes=config.max_payload_bytes)
        # ORT training artifacts: whether devices fetch them from here (the simulator hands its
        # workers a local folder instead), where they are built, and what this process published
        self.serve_artifacts = serve_artifacts
        self.publisher = Publisher(
            transport, config, artifacts_cache=artifacts_cache, artifact_chunk_bytes=artifact_chunk_bytes
        )
        # the global module, its groups' views, the delta downlink (broker_server.broadcast)
        self.broadcast = Broadcast(
            config,
            self.publisher,
            self.registry.devices,
            clusters=self.clusters if self.clustered else None,
            mixed=allocator is not None,
            shapes_of=evaluator.shapes,
            store=store,
        )
        self.config_id = self.broadcast.config_id
        self.global_topic = self.broadcast.global_topic

    @property
    def _state(self) -> dict[str, np.ndarray]:
        """The global state (:attr:`Broadcast.state`)."""
        return self.broadcast.state

    @_state.setter
    def _state(self, value: dict[str, np.ndarray]) -> None:
        self.broadcast.state = value

    @property
    def _round(self) -> int:
        """The current round, or asynchronous version."""
        return self.broadcast.round

    @_round.setter
    def _round(self, value: int) -> None:
        self.broadcast.round = value

    @property
    def _phase(self) -> str:
        """The current round's phase."""
        return self.broadcast.phase

    @_phase.setter
    def _phase(self, value: str) -> None:
        self.broadcast.phase = value

    @property
    def resyncs(self) -> list[dict[str, Any]]:
        """Devices that asked for the whole module, with the round."""
        return self.broadcast.resyncs

    def module_params(self, config: TrainConfig) -> int:
        """Trainable parameters of ``config``'s module (its view of the global state)."""
        return self.broadcast.module_params(config)

    @property
    def _pending(self) -> dict[str, PendingUpdate]:
        """The current synchronous round's accepted updates, by device."""
        return self.sync.pending

    @property
    def _stale(self) -> int:
        """Updates of the current round (or version) that were trained on an older module."""
        return self.buffered.stale if self._async_active else self.sync.stale

    @_stale.setter
    def _stale(self, value: int) -> None:
        if self._async_active:
            self.buffered.stale = value
        else:
            self.sync.stale = value

    @property
    def jobs(self) -> JobBoard:
        """The asynchronous jobs, arrivals and buffer (:class:`~broker_server.rounds.buffered.JobBoard`)."""
        return self.buffered.jobs

    @property
    def _async_now(self) -> float:
        """The asynchronous clock: the last arrival taken (new jobs start there)."""
        return self.buffered.now

    @_async_now.setter
    def _async_now(self, value: float) -> None:
        self.buffered.now = value

    @property
    def devices(self) -> dict[str, DeviceRecord]:
        """Every device that said hello, by id (see :class:`~broker_server.registry.DeviceRegistry`)."""
        return self.registry.devices

    # --- inbound -----------------------------------------------------------------------------

    def privacy_spent(self) -> float | None:
        """Epsilon spent so far at ``dp_delta`` (None without DP): one sampled Gaussian mechanism at
        rate q per release made, round 0's class statistics included."""
        if self._dp is None:
            return None
        return self._dp.epsilon(self.aggregation.releases, self.config.dp_delta)

    def privacy_report(self) -> dict[str, Any] | None:
        """What the DP guarantee is and covers, for the report (None without DP)."""
        if self._dp is None:
            return None
        return self._dp.report(self.aggregation.releases, self.config.dp_delta)

    def _dp_key(self) -> bytes:
        """The secret key of the sampling and noise draws, kept in the store across restarts."""
        if self.store is None:
            return new_key()
        stored = self.store.get_meta("dp_key")
        if stored is None:
            key = new_key()
            self.store.set_meta("dp_key", key.hex())
            return key
        return bytes.fromhex(str(stored))

    def final_state(self) -> dict[str, np.ndarray]:
        """The current global module (the final one once :meth:`run` has returned); with clusters,
        every cluster's module under ``cluster{k}/`` names (see :meth:`cluster_states`)."""
        return dict(self._state)

    def cluster_states(self) -> dict[int, dict[str, np.ndarray]]:
        """Every cluster's current module (one entry, cluster 0, without clusters)."""
        if self.clustering is None:
            return {0: dict(self._state)}
        return split_state(self._state, self.clustering.k)

    def start(self) -> None:
        """Subscribe to the fleet's hello, update and status topics (once)."""
        if self._started:
            return
        self._started = True
        fleet = self.config.fleet
        for kind in ("hello", "update", "status"):
            self.transport.subscribe(f"fl/{fleet}/{kind}/+", self._enqueue, qos=1)

    def _enqueue(self, topic: str, payload: bytes) -> None:
        # Runs on the network thread: only queue, never decode or write here.
        self._inbox.put((topic, payload))

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current step."""
        self._stopped = True
        self._inbox.put(("", b""))

    def _reject(self, exc: UpdateRejected, device: str | None, round_: int | None) -> None:
        refused = Refused(
            device, round_, exc.code, exc.reason, known=device in self.devices,
            duplicate=isinstance(exc, DuplicateUpdate),
        )  # fmt: skip
        # a rejected update still ends that device's turn in the round
        self._execute(self.sync.handle(refused, self.clock()))

    def _execute(self, commands: list[Command]) -> CloseRound | RoundFailed | None:
        """Carry out a controller's commands in order; the round's end, if one came."""
        ended: CloseRound | RoundFailed | None = None
        for command in commands:
            if isinstance(command, Publish):
                resumed = self._resumed_payload if command.resumed else None
                self.broadcast.publish(command.phase, checkpoint=resumed)
            elif isinstance(command, Checkpoint):
                self._keep(command)
            elif isinstance(command, Ack):
                self._ack(command.device, command.round, command.content_id, command.accepted, command.reason)
            elif isinstance(command, Accepted):
                if self.on_accept is not None:
                    self.on_accept(command.device)
            elif isinstance(command, Reject) and command.what == "dropped":
                self._drop(command)
            elif isinstance(command, Reject):
                if command.what == "update":
                    log.warning(
                        "rejected update from %s (round %s): %s",
                        command.device,
                        command.round,
                        command.reason,
                    )
                else:
                    log.warning(
                        "device %s failed round %s: %s", command.device, command.round, command.reason
                    )
                self._record_rejection(command.device, command.round, command.reason)
            elif isinstance(command, Shortfall):
                log.warning(
                    "round %d: %d of %d updates by the deadline (attempt %d); keeping the global module",
                    command.round,
                    command.got,
                    self.config.min_clients,
                    command.attempt,
                )
            elif isinstance(command, CloseJob):
                if self._ledger is not None:
                    self._ledger.close_job(command.job)
            elif isinstance(command, OpenJob):
                self._dispatch(command.device, self.buffered.now)
            elif isinstance(command, Exclude):
                self.devices[command.device].excluded = command.reason
            elif isinstance(command, NewVersion):
                self._new_version(command)
            elif isinstance(command, CloseRound | RoundFailed):
                ended = command
        return ended

    def _keep(self, command: Checkpoint) -> None:
        """Count an accepted update on its device and store it before it is acknowledged: what is
        acknowledged survives a crash."""
        record = self.devices[command.device]
        record.took(command.pending.update)
        if command.arrival is not None:  # an asynchronous job's update: into the job ledger
            if self._ledger is not None:
                self._ledger.accept(
                    command.round,
                    command.device,
                    command.pending.content_id,
                    command.payload,
                    command.arrival,
                    counters=self._counters(),
                    device_counters=record.counters(),
                )
            return
        if self.store is not None:
            self.store.add_update(
                command.round,
                command.device,
                command.pending.content_id,
                command.payload,
                counters=self._counters(),
                device_counters=record.counters(),
            )

    def _record_rejection(self, client: str | None, round_: object, reason: str) -> None:
        """Add a rejection to the report and, with a state store, durably with the counters it
        changed, so that the report written after a crash still holds it."""
        # the report's round is an integer or null; a device's status may carry anything there
        reported = round_ if isinstance(round_, int) and not isinstance(round_, bool) else None
        self.rejected.append({"client": client, "round": reported, "reason": reason})
        if self.store is not None:
            record = None if client is None else self.devices.get(client)
            self.store.add_rejection(
                client,
                reported,
                reason,
                time.time(),
                counters=self._counters(),
                device_counters=None if record is None else record.counters(),
            )

    def _counters(self) -> dict[str, Any]:
        """The service's counters for the state store: bytes up, all and in the current round."""
        return {
            "bytes_up_total": self.bytes_up_total,
            "round": self._round,
            "round_bytes_up": self._round_bytes_up,
            "round_stale": self._stale,
        }

    def _pump(self, until: float) -> bool:
        """Handle queued messages until ``until``; True if a message was handled."""
        timeout = max(0.0, until - self.clock())
        try:
            topic, payload = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return False
        if not topic:
            return False
        try:
            _, kind, device = wire.parse_topic(topic)
        except UpdateRejected as exc:
            self._reject(exc, None, None)
            return True
        try:
            if kind == "hello":
                self._on_hello(device, payload)
            elif kind == "update":
                self._on_update(device, payload)
            elif kind == "status":
                self._on_status(device, payload)
        except UpdateRejected as exc:
            self._reject(exc, device, exc.round)
        except FedPeftError as exc:  # a bad config in a hello, say: log and go on
            self._reject(UpdateRejected(str(exc)), device, None)
        return True

    def _on_hello(self, device: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained hello
        hello = wire.decode_hello(payload, max_bytes=self.config.max_payload_bytes)
        if hello.device_id != device:
            raise UnknownDevice(f"hello for {hello.device_id!r} published under {device!r}")
        record, returning = self.registry.hello(device, hello, payload)
        if not record.excluded:
            self._assign(record)
            if self._async_active:  # back (or new): the newest version, unless it is busy
                self._offer(device, returning=returning)

    # --- clusters ----------------------------------------------------------------------------

    @property
    def clustering(self) -> Clustering | None:
        """The fleet's clusters (None without ``--clusters`` or before they are formed)."""
        return self.clusters.clustering

    def cluster_of(self, device: str) -> int | None:
        """The device's cluster; a device that joins after clustering goes to the nearest one."""
        record = self.devices.get(device)
        return self.clusters.member(device, None if record is None else record.hello)

    def _form_clusters(self) -> None:
        """Group the devices that said hello by their label histograms; one module per cluster."""
        able = {d: r.hello for d, r in self.devices.items() if not r.excluded}
        self._state = self.clusters.form(self._state, able)
        for record in self.devices.values():
            if not record.excluded:
                self._assign(record)

    def cluster_summary(self) -> dict[str, Any] | None:
        """Clusters for the report: how many, their sizes and the silhouette (None when off)."""
        return self.clusters.summary()

    def artifact_for(self, config: TrainConfig) -> ArtifactInfo:
        """Build and publish ``config``'s ORT artifacts (see :meth:`Publisher.artifact_for`)."""
        return self.publisher.artifact_for(config)

    @property
    def artifacts_published(self) -> dict[str, ArtifactInfo]:
        """The ORT artifacts this process published, by artifact key."""
        return self.publisher.artifacts_published

    def _assign(self, record: DeviceRecord) -> None:
        if self.clustered and self.cluster_of(record.device_id) is None:
            return  # assigned once the clusters are formed: the assignment names its cluster's topic
        artifact = None
        if self.serve_artifacts and artifact_flavour(record.config.engine) is not None:
            try:
                artifact = self.artifact_for(record.config)
            except (FedPeftError, ImportError, OSError) as exc:
                # no artifacts, no training: leave the device out with the reason, keep serving
                record.excluded = f"cannot serve ORT artifacts: {exc}"
                log.error("device %s left out: %s", record.device_id, record.excluded)
                return
        msg = wire.Assignment(
            device_id=record.device_id,
            round=self._round,
            config=record.config.to_dict(),
            global_topic=self.broadcast.group_of(record).topic,
            artifact=None if artifact is None else artifact.to_dict(),
        )
        self.publisher.assign(msg)

    def _on_status(self, device: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status
        status = wire.decode_status(payload, max_bytes=self.config.max_payload_bytes)
        log.info("device %s is %s", device, status.state)
        record = self.devices.get(device)
        if record is not None:
            record.online = status.state != "offline"
        if record is not None and status.state == RESYNC_STATE:
            self.broadcast.send_full(device)
        if record is not None and status.state == "failed":
            # the device could not train this round (over its memory cap, say): end its turn
            round_ = status.detail.get("round")
            failed = Status(device, status.state, round_, str(status.detail.get("reason", "no reason given")))
            ended = self.sync.handle(failed, self.clock())  # ends its turn in the round
            # asynchronous mode: not waited for, given no more
            self._execute(self.buffered.handle(failed, self.clock()) + ended)

    def _on_update(self, device: str, payload: bytes) -> None:
        self.bytes_up_total += len(payload)
        self._round_bytes_up += len(payload)
        record = self.devices.get(device)
        if record is not None:
            record.bytes_up += len(payload)
        if is_chunk(payload):
            if record is None:
                raise UnknownDevice(f"{device!r} never said hello")
            whole = self._chunks.add(device, payload)
            if whole is None:
                return
            payload = whole
        update = decode_update(device, payload, self.config.max_payload_bytes)
        if record is None:
            raise UnknownDevice(f"{device!r} never said hello", round=update.round)
        record.updates_received += 1
        group = self.broadcast.group_of(record)
        event = Update(device, update, payload, group.global_id, group.shapes, record.hello)
        if not self._async_active:
            self._execute(self.sync.handle(event, self.clock()))
            return
        self._execute(self.buffered.handle(event, self.clock() - self._async_start))

    def _ack(self, device: str, round_: int, cid: str, accepted: bool, reason: str) -> None:
        self.publisher.ack(device, round_, cid, accepted, reason)

    # --- rounds ------------------------------------------------------------------------------

    def _wait_for_devices(self) -> None:
        want = self.config.expected_clients or self.config.min_clients
        deadline = self.clock() + self.config.hello_timeout_s
        # every device counts as here once it said hello, even one the allocator left out
        while self.registry.online_count() < want and not self._stopped:
            if self.clock() >= deadline:
                if len(self.registry.able()) >= self.config.min_clients:
                    break
                raise FedPeftError(
                    f"only {len(self.devices)} of {want} devices said hello within "
                    f"{self.config.hello_timeout_s:.0f} s"
                )
            self._pump(min(deadline, self.clock() + 0.5))
        able = self.registry.able()
        if len(able) < self.config.min_clients and not self._stopped:
            left_out = self.registry.left_out()
            raise FedPeftError(
                f"only {len(able)} devices can train, {self.config.min_clients} needed (left out: {left_out})"
            )

    def _collect(self, participants: set[str], enough: int | None = None) -> bool:
        """Handle messages until every participant answered or the deadline; True if at least
        ``enough`` (default min_clients) updates came in. With ``enough`` 0 an empty round closes
        at once."""
        self.sync.collect(participants, self.clock(), enough)
        while True:
            commands = self.sync.stop() if self._stopped else self.sync.handle(Tick(), self.clock())
            ended = self._execute(commands)
            if ended is not None:
                return isinstance(ended, CloseRound)
            self._pump(min(self.sync.deadline, self.clock() + 0.5))

    def _aggregate(self) -> None:
        updates = [
            ClientUpdate(p.update.device_id, p.update.num_samples, p.update.tensors, p.update.metrics)
            for _, p in sorted(self._pending.items())  # arrival order must not change the floats
        ]
        if self._phase == STATS_PHASE:
            self._state = self.aggregation.statistics(self._state, updates, self._round)
        else:
            self._state = self.aggregation.train(self._state, updates, self._round)
            if self.config.distill_epochs > 0 and not self.clustered and self.aggregation.rule is None:
                self._distill()

    def _distill(self) -> None:
        """Let knowledge flow across the PEFT kinds of the fleet (:mod:`broker_server.distillation`)."""
        assert self.allocator is not None and self.unlabeled is not None
        kinds = {rec.config.peft.kind for rec in self.devices.values() if not rec.excluded}
        configs = [c for c in self.allocator.largest(self.config.train) if c.peft.kind in kinds]
        result = fuse_kinds(
            self.evaluator,
            self._state,
            configs,
            self.unlabeled,
            alpha=self.config.distill_alpha,
            epochs=self.config.distill_epochs,
            seed=self.config.seed + self._round,
        )
        self._state = result.state
        self.distilled = {"before": result.agreement_before, "after": result.agreement_after}

    def _initial_state(self) -> dict[str, np.ndarray]:
        """The first global state (:func:`~broker_server.fleet_evaluation.initial_state`)."""
        return initial_state(self.evaluator, self.allocator, self.config.train)

    def _evaluate(self) -> tuple[EvalResult | None, dict[str, float]]:
        """The global model's test figures (:func:`~broker_server.fleet_evaluation.evaluate_fleet`)."""
        return evaluate_fleet(
            self._state,
            self.evaluator,
            train=self.config.train,
            clusters=self.clusters if self.clustered else None,
            allocator=self.allocator,
            devices=self.devices.values(),
        )

    def _learn_rewards(self, record: dict[str, Any]) -> None:
        """Credit this round's accuracy gain to the configurations that took part (train rounds)."""
        if self.allocator is None or record["phase"] != TRAIN_PHASE or record["accuracy"] is None:
            return
        before = [r["accuracy"] for r in self.rounds if r.get("accuracy") is not None]
        if not before:
            return
        keys = [peft_key(self.devices[d].config.peft) for d in record["clients"] if d in self.devices]
        self.allocator.rewards.observe(keys, float(record["accuracy"]) - float(before[-1]))
        if self.store is not None:
            self.store.set_meta("rewards", self.allocator.rewards.to_dict())

    def _resume(self) -> int | None:
        """Restore the last checkpoint from the store (:mod:`broker_server.checkpoint`); the round
        to continue, or None if fresh."""
        if self.store is None:
            return None
        inputs = read_report_inputs(self.store)
        self.rejected = inputs.rejected
        self.broadcast.resyncs = inputs.resyncs
        self.registry.stored_counters = inputs.device_counters
        if inputs.counters is not None:
            self.bytes_up_total = int(inputs.counters["bytes_up_total"])
        carries = (("residual",) if self.config.strategy == "exact" else ()) + (
            ("server_momentum",) if self.config.server_momentum > 0 else ()
        )
        ckpt = read_round_checkpoint(
            self.store,
            inputs.counters,
            clustered=self.clustered,
            carries=carries,
            personalize_round=self.config.rounds + 1 if self.config.personalize_epochs > 0 else None,
            downlink=self.broadcast.downlink is not None,
        )
        if ckpt is None:
            return None
        round_ = ckpt.round
        self._state = ckpt.state
        self._round = round_
        if ckpt.clustering is not None:
            self.clusters.restore(ckpt.clustering, self._state)
        for device, hello in ckpt.hellos.items():
            device_record = self.registry.register(device, hello)
            if not device_record.excluded and not self.clustered and self.config.mode == "sync":
                self.broadcast.group(device_record.config)
        if self.allocator is not None:
            self.allocator.rewards = RewardTable.from_dict(ckpt.rewards)
        self.broadcast.global_id = ckpt.global_id  # after the groups exist: run() publishes them, in phase
        for device, count in ckpt.accepted_counts.items():
            if device in self.devices:
                self.devices[device].updates_accepted = count
        self.rounds = ckpt.records
        for record in self.rounds:
            if record.get("accuracy") is not None:
                self.final_eval = {"accuracy": record["accuracy"], "macro_f1": record["macro_f1"]}
        if ckpt.legacy_bytes_up is not None:
            self.bytes_up_total = ckpt.legacy_bytes_up
        if self._dp is not None:  # the privacy budget spent before the crash: one step a release
            self.aggregation.releases = sum(
                1 for rec in self.rounds if rec.get("phase") in (STATS_PHASE, TRAIN_PHASE)
            )
        self.aggregation.restore(ckpt.carries)
        self._accepted_ids.clear()  # shared with the controllers: refilled, not replaced
        self._accepted_ids.update(ckpt.accepted_ids)
        self.sync.pending = ckpt.pending
        self._resumed_round_counters = ckpt.round_counters
        self.personalization.update(ckpt.personalization)
        self._resumed_payload = ckpt.payload
        self.broadcast.resumed_shared = None
        if self.broadcast.downlink is not None and ckpt.downlink is not None:
            shared, residual = ckpt.downlink
            if residual is not None:
                self.broadcast.downlink.restore(self._state, wire.content_id(shared), residual)
            self.broadcast.resumed_shared = shared
            # without a stored delta (a statistics round) devices get the checkpoint itself
        log.warning(
            "resumed round %d from %s with %d acknowledged updates",
            round_,
            self.store.path,
            len(self._pending),
        )
        return round_

    def _turns_ended(self, round_: int) -> set[str]:
        """Devices whose turn in ``round_`` a recorded rejection ended (see :meth:`_reject`)."""
        return {
            str(x["client"]) for x in self.rejected if x["round"] == round_ and x["client"] in self.devices
        }

    def run(self) -> None:
        """Run every round; returns when the last global module is published or on stop."""
        self._state = self._initial_state()
        if self.store is not None:
            # what the checkpointed modules belong to: ``fedpeft export`` rebuilds them on this model
            self.store.set_meta(TRAIN_CONFIG_KEY, self.config.train.to_dict())
        if self._dp is not None:
            self._sampler = PoissonSampler(self._dp_key(), self._dp.sample_rate)
            self.sync.sampler = self._sampler
            self.aggregation.noise = self._sampler.noise_rng
        resume_round = self._resume()
        snapshot = self._ledger.restore() if self._ledger is not None else None
        if snapshot is not None:  # asynchronous versions had begun: continue them
            self._take_back_versions(snapshot)
        self.start()
        if resume_round is None and snapshot is None:
            self._wait_for_devices()
            if self.clustered:
                self._form_clusters()
        start = self.clock() - (float(self.rounds[-1]["wall_s"]) if self.rounds else 0.0)
        first = 0 if self.config.head_init == "ncm" else 1
        if resume_round is not None:
            first = resume_round
        last_sync = self.config.rounds if self.config.mode == "sync" else 0
        if snapshot is not None:
            first = last_sync + 1
        for r in range(first, last_sync + 1):
            if self._stopped:
                break
            self._round = r
            self._phase = STATS_PHASE if (r == 0 and self.config.head_init == "ncm") else TRAIN_PHASE
            resuming = r == resume_round
            # resuming: what the interrupted round had counted, and whose turn a rejection had ended
            opening = self.sync.open_round(
                r,
                self._phase,
                resumed=resuming,
                turns_ended=self._turns_ended(r) if resuming else (),
                stale=self._resumed_round_counters[0],
            )
            self._round_bytes_up = self._resumed_round_counters[1] if resuming else 0
            participants = self.registry.participants()
            if self._sampler is not None:
                # Poisson sampling over every registered device; an offline one sampled is a dropout
                self._sampled = self._sampler.sample(
                    r, (d for d, rec in self.devices.items() if not rec.excluded)
                )
                participants &= self._sampled
            round_start = self.clock()
            # resuming: exactly the checkpointed bytes again (same content id, so devices' updates
            # trained on it before the crash stay valid), and the stored updates acknowledged again
            self._execute(opening)
            # DP: the fixed denominator makes any number of updates (none too) a valid release
            if not self._collect(participants, 0 if self._dp is not None else None):
                raise FedPeftError(f"round {r} got too few updates after every retry")
            server_start = self.clock()
            self._aggregate()
            if not self._stopped:
                self.broadcast.prepare_shared(r)
            result, by_kind = self._evaluate()
            now = self.clock()
            timing = Timing(now - start, now - round_start, now - start, now - server_start)
            record = round_record(
                r,
                self._phase,
                timing,
                result,
                self.sync.pending,
                stale=self.sync.stale,
                bytes_up_all=self._round_bytes_up,
                bytes_down=self.sync.bytes_down,
                resyncs=[x["client"] for x in self.resyncs if x["round"] == r],
            )
            if by_kind:
                record["accuracy_by_kind"] = by_kind
            if self.distilled and self._phase == TRAIN_PHASE:
                record["distill_agreement"] = dict(self.distilled)
            if self.clustered:
                record["accuracy_by_cluster"] = dict(self.clusters.by_cluster)
                record["shared_tensors"] = list(self.clusters.shared)
            if self._dp is not None:
                record["dp_epsilon"] = self.privacy_spent()
                record["dp_sampled"] = len(self._sampled)
            self._learn_rewards(record)
            if result is not None:
                self.final_eval = {"accuracy": result.accuracy, "macro_f1": result.macro_f1}
            self.rounds.append(record)
            if self.store is not None:
                self.store.save_round_record(r, record)
            if self.on_round is not None:
                self.on_round(record)
        if self.config.mode == "async" and not self._stopped:
            self._run_async(start, snapshot)
        if self._stopped:
            return
        if self.config.personalize_epochs > 0:
            self._personalize(resume_round)
            if self._stopped:
                return
        self._round = self.config.rounds + (2 if self.config.personalize_epochs > 0 else 1)
        self.broadcast.publish(DONE_PHASE)

    # --- asynchronous mode --------------------------------------------------------------------

    def _offer(self, device: str, *, returning: bool = False) -> None:
        """Give ``device`` the newest version unless it must wait (:meth:`BufferedVersions.offer`)."""
        self._execute(self.buffered.offer(device, returning=returning))

    def _dispatch(self, device: str, t: float) -> None:
        """Give ``device`` a job: the current global version, on its own topic (retained); with a
        store, the job is recorded before its module goes out."""
        record = self.devices[device]
        if not record.online or record.excluded:
            return
        start = self.event_clock.start(device, t) if self.event_clock is not None else t
        group = self.broadcast.group_of(record)
        payload = self.broadcast.encode_global(TRAIN_PHASE, group.config_id, self._state, self.jobs.next_id())
        group.global_id = wire.content_id(payload)
        job_id = self.jobs.open(device, self._round, start, group.global_id, len(payload))
        if self._ledger is not None:
            self._ledger.open_job(job_id, device, self._round, group.global_id, len(payload), start)
        self.publisher.publish_retained(group.topic, payload)

    def _version_payload(self) -> bytes:
        """The current version's module as the ledger keeps it: fp32, exact."""
        return wire.encode_global(wire.GlobalModule(self._round, "async", self._state), bits=32)

    def _take_back_versions(self, snapshot: AsyncSnapshot) -> None:
        """From a restart's snapshot, what the report counts: the versions' records, the devices
        (registered from their stored hellos), their accepted updates and those updates' ids."""
        assert self.store is not None
        for device, hello_payload in self.store.devices().items():
            if device not in self.devices:
                self.registry.register(device, wire.decode_hello(hello_payload))
        for device, count in snapshot.accepted_counts.items():
            if device in self.devices:
                self.devices[device].updates_accepted += count
        self._accepted_ids.update(snapshot.accepted_ids)
        # the class-mean round, if any, was over before version 0 was saved
        self.rounds = self.store.round_records() + snapshot.records
        for record in self.rounds:
            if record.get("accuracy") is not None:
                self.final_eval = {"accuracy": record["accuracy"], "macro_f1": record["macro_f1"]}

    def _restore_async(self, snapshot: AsyncSnapshot) -> float:
        """Continue from the newest stored version: its module, the jobs, the buffer (acknowledged
        again: a crash may have eaten those acks), and every open job's module published again,
        byte for byte, in case a crash came between recording the job and publishing it. Returns
        the asynchronous clock where the run before stopped."""
        assert self._ledger is not None
        big = max(len(snapshot.payload), wire.DEFAULT_MAX_PAYLOAD)
        self._state = dict(wire.decode_global(snapshot.payload, max_bytes=big).tensors)
        self._round = snapshot.version
        self.jobs.restore(snapshot.jobs)
        now = max((j.start for j in snapshot.jobs), default=0.0)
        for stored in snapshot.waiting:
            update = wire.decode_update(stored.payload, max_bytes=max(len(stored.payload), big))
            pending = PendingUpdate(update, stored.content_id, len(stored.payload))
            self.jobs.requeue((stored.arrival, stored.device, stored.job, pending))
            self._ack(stored.device, stored.job, stored.content_id, True, "accepted before a restart")
            now = max(now, stored.arrival)
        counters = self.store.counters() if self.store is not None else None
        if counters is not None and counters.get("round") == self._round:
            self._stale, self._round_bytes_up = int(counters["round_stale"]), int(counters["round_bytes_up"])
        for job_id, job in sorted(self.jobs.jobs.items()):
            if job.answered or job.device not in self.devices:
                continue
            stored_version = self._ledger.version_payload(job.version)
            group = self.broadcast.group_of(self.devices[job.device])
            payload = b""
            if stored_version is not None:
                state = wire.decode_global(stored_version, max_bytes=big).tensors
                payload = self.broadcast.encode_global(TRAIN_PHASE, group.config_id, dict(state), job_id)
            if wire.content_id(payload) == job.content_id:
                group.global_id = job.content_id
                self.publisher.publish_retained(group.topic, payload)
            else:  # cannot rebuild it: not waited for; the device gets a new job below
                job.answered = True
                self._ledger.close_job(job_id)
        log.warning(
            "resumed async version %d from %s: %d updates in the buffer, %d jobs open",
            self._round,
            self._ledger.store.path,
            len(self.jobs.arrivals),
            len(self.jobs.unanswered()),
        )
        return now

    def _run_async(self, wall_start: float, snapshot: AsyncSnapshot | None = None) -> None:
        """FedBuff: devices train the newest version whenever they are free; every K updates (in
        order of arrival, on the simulated clock if there is one) make a new version. The
        controller (:class:`BufferedVersions`) decides; this loop feeds it and carries out."""
        self._async_active = True
        self._phase = TRAIN_PHASE
        self._stale = 0
        self._round_bytes_up = 0
        if snapshot is None:
            self._round = 0
            now = 0.0
            if self._ledger is not None:  # version 0, what the first jobs train on
                self._ledger.save_version(0, self._version_payload(), None, [], self._counters())
        else:
            now = self._restore_async(snapshot)
        self.buffered.begin(self._state, self._round, now)
        self._async_start = self.clock() - now
        self._wall_start = wall_start
        self._version_start = self.clock()
        for device in sorted(self.devices):
            self._offer(device)
        while self._round < self.config.rounds and not self._stopped:
            # with a simulated clock an arrival is final only once no job in flight can land earlier
            if self.buffered.ready():
                self._tick_start = self.clock()
                self._execute(self.buffered.handle(Tick(), self.clock() - self._async_start))
                continue
            if self.buffered.idle():
                raise FedPeftError(
                    f"version {self._round}: no device is training and the buffer holds "
                    f"{len(self.jobs.buffer)} of {self.config.buffer_size} updates"
                )
            deadline = self.clock() + self.config.round_timeout_s
            while not self._stopped and self.clock() < deadline:
                if self._pump(min(deadline, self.clock() + 0.5)):
                    break
            else:
                if not self._stopped:
                    lost = len(self.jobs.unanswered())
                    log.warning(
                        "%d jobs unanswered after %.0f s: given up", lost, self.config.round_timeout_s
                    )
                    self._execute(self.buffered.give_up())
        self._async_active = False
        self.unaggregated = self.jobs.unaggregated()

    def _drop(self, command: Reject) -> None:
        """An update staler than the bound: rejected with the reason, durably marked dropped."""
        log.warning("dropped update from %s: %s", command.device, command.reason)
        if self._ledger is None or command.job is None or command.device is None:
            self._record_rejection(command.device, command.round, command.reason)
            return
        self.rejected.append({"client": command.device, "round": command.round, "reason": command.reason})
        record = self.devices.get(command.device)
        self._ledger.drop(
            command.job,
            command.device,
            self._round,
            command.reason,
            time.time(),
            counters=self._counters(),
            device_counters=None if record is None else record.counters(),
        )

    def _new_version(self, command: NewVersion) -> None:
        """A version the buffer made: evaluated, recorded, saved with the buffer it consumed."""
        self._state, self._round = command.state, command.version
        result, _ = self._evaluate()
        end = self.clock()
        timing = Timing(
            end - self._wall_start, end - self._version_start, self.buffered.now, end - self._tick_start
        )
        record = version_record(
            self._round,
            TRAIN_PHASE,
            timing,
            result,
            command.taken,
            self.buffered.staleness,
            stale=command.stale,
            bytes_up=self._round_bytes_up,
        )
        self._round_bytes_up = 0
        if self._ledger is not None:  # the version and the buffer it consumed, in one transaction
            self._ledger.save_version(
                self._round, self._version_payload(), record, record["jobs"], self._counters()
            )
        if result is not None:
            self.final_eval = {"accuracy": result.accuracy, "macro_f1": result.macro_f1}
        self.rounds.append(record)
        if self.on_round is not None:
            self.on_round(record)
        self._version_start = self.clock()

    def _personalize(self, resume_round: int | None) -> None:
        """The personalization phase after the last round: devices fine-tune the final global module
        on their own data and report its accuracy, and the global module's, on their held-out
        samples. Nothing is aggregated; the personal modules stay on the devices."""
        r = self.config.rounds + 1
        if resume_round is not None and resume_round > r:
            return  # done before a restart
        self._round, self._phase = r, PERSONALIZE_PHASE
        resumed = resume_round == r
        turns_ended = self._turns_ended(r) if resumed else set()
        self._execute(self.sync.open_round(r, self._phase, resumed=resumed, turns_ended=turns_ended))
        participants = self.registry.participants()
        if not self._collect(participants):
            log.warning("personalization: %d devices reported by the deadline", len(self._pending))
        for device, pending in sorted(self._pending.items()):
            self.personalization[device] = dict(pending.update.metrics)

    def fleet_summary(self) -> FleetSummary:
        """The run as every report reads it (:mod:`broker_server.records`)."""
        devices = {
            d: DeviceSummary(
                device_id=d,
                profile=str(r.hello.profile.get("name", "unknown")),
                config=r.config,
                trainable_params=self.module_params(r.config),
                allocation=allocation_entry(r),
                cluster=self.cluster_of(d) if self.clustering else None,
                updates_received=r.updates_received,
                updates_accepted=r.updates_accepted,
                train_s=r.train_s,
                samples=r.samples,
                last_metrics=dict(r.last_metrics),
                personalization=dict(self.personalization.get(d, {})),
            )
            for d, r in self.devices.items()
        }
        final = final_figures(
            self.final_eval,
            self.personalization_summary(),
            self.cluster_summary(),
            self.privacy_spent(),
            self.config.dp_delta if self._dp is not None else None,
            self.privacy_report(),
        )
        return FleetSummary(
            rounds=[dict(r) for r in self.rounds],
            final=final,
            devices=devices,
            bytes_up_total=self.bytes_up_total,
            rejected=[dict(r) for r in self.rejected],
            unaggregated=list(self.unaggregated),
            fleet_params=self.module_params(self.config.train),
        )

    def personalization_summary(self) -> dict[str, float | None]:
        """Means over the devices that measured on held-out samples (None without any)."""
        return personalization_means(self.personalization)
