"""The aggregation service: registers devices, assigns modules, validates, aggregates, publishes.

Messages arrive on the transport's network thread and are only queued there; one service thread
does every check, every write and every publish, so the state needs no further locking.

Rounds are synchronous: the service publishes round r's global module (retained), collects the
updates trained on it until every participant has answered or the deadline passes, aggregates
with a pure strategy function, evaluates, checkpoints and publishes round r+1. Round 0 is a
statistics round when the head starts from class means (FedNCM). With ``mode="async"`` the rounds
after it are buffered asynchronous versions (FedBuff).

This class is the I/O shell: it builds the pieces, routes each decoded message to the controller
of the phase (:class:`~broker_server.rounds.sync.SyncRounds`, or
:class:`~broker_server.rounds.buffered.BufferedVersions` for asynchronous versions) and carries
out the commands it gets back in order (:meth:`AggregationService.execute`). The controllers
decide; nothing here decides whether an update is accepted. The pieces have their own modules:

- :mod:`~broker_server.inbound`: the inbox; decode, check and route hellos, updates and statuses;
- :mod:`~broker_server.round_loop`: the synchronous rounds, personalization, restart;
- :mod:`~broker_server.version_loop`: the asynchronous versions, their jobs and restart;
- :mod:`~broker_server.rounds.aggregation`: a round's rule, composed of wrappers (strategy, per
  cluster, clip, FedAvgM, distillation; DP replaces all) and its carry;
- :mod:`~broker_server.journal`: rejections, bytes and round records, durably;
- :mod:`~broker_server.config`, :mod:`~broker_server.registry`, :mod:`~broker_server.broadcast`,
  :mod:`~broker_server.publisher`, :mod:`~broker_server.checkpoint`,
  :mod:`~broker_server.cluster_groups`, :mod:`~broker_server.fleet_evaluation` and
  :mod:`~broker_server.records` (the fleet summary the reports read).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from broker_server.allocation import Allocator
from broker_server.async_ledger import AsyncLedger
from broker_server.broadcast import Broadcast
from broker_server.checkpoint import dp_key
from broker_server.cluster_groups import ClusterGroups
from broker_server.clustering import Clustering, parse_clusters, split_state
from broker_server.config import ServiceConfig, check_combination
from broker_server.distillation import KindDistillation
from broker_server.evaluation import ModelEvaluator
from broker_server.fleet_evaluation import evaluate_fleet, initial_state
from broker_server.inbound import Inbound
from broker_server.journal import Journal
from broker_server.layout import DONE_PHASE
from broker_server.publisher import Publisher
from broker_server.records import DeviceSummary, FleetSummary, final_figures, personalization_means
from broker_server.registry import DeviceRecord, DeviceRegistry
from broker_server.report import allocation_entry
from broker_server.round_loop import RoundLoop
from broker_server.rounds.aggregation import RoundAggregation
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
    Update,
)
from broker_server.rounds.sync import SyncRounds
from broker_server.state import TRAIN_CONFIG_KEY, StateStore
from broker_server.version_loop import VersionLoop
from edge_runtime.artifact_transfer import DEFAULT_CHUNK_BYTES, ArtifactInfo
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset
from edge_runtime.engines.base import EvalResult
from edge_runtime.transport import Transport

log = logging.getLogger("fedpeft.server")


RoundCallback = Callable[[dict[str, Any]], None]


class AggregationService:
    """Runs the rounds of one fleet over a transport; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        config: ServiceConfig,
        evaluator: ModelEvaluator,
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
        self.transport = transport
        self.config = config
        self.evaluator = evaluator
        self.store = store
        self.on_round = on_round  # read at each record: callers may set it after construction
        self.on_accept = on_accept
        self.clock = clock
        self.allocator = allocator
        self.serve_artifacts = serve_artifacts
        self._stopped = False
        mixed = allocator is not None
        # formed once the expected devices said hello (broker_server.cluster_groups); None when off
        self.clusters: ClusterGroups | None = None
        if config.clusters != "off":
            self.clusters = ClusterGroups(
                parse_clusters(config.clusters), seed=config.seed, share=config.cluster_share, store=store
            )
        self.registry = DeviceRegistry(config.train, allocator, store, serve_artifacts=serve_artifacts)
        self.publisher = Publisher(
            transport, config, artifacts_cache=artifacts_cache, artifact_chunk_bytes=artifact_chunk_bytes
        )
        # the global module, its groups' views, the delta downlink (broker_server.broadcast)
        self.broadcast = Broadcast(
            config,
            self.publisher,
            self.registry.devices,
            clusters=self.clusters,
            mixed=mixed,
            shapes_of=evaluator.shapes,
            store=store,
        )
        self.config_id = self.broadcast.config_id
        self.global_topic = self.broadcast.global_topic
        # asynchronous mode: versions, jobs and the buffer in the store (None without one)
        ledger = AsyncLedger(store) if store is not None and config.mode == "async" else None
        self.journal = Journal(self.registry, store, self._position, ledger=ledger)
        # cross-kind distillation after each training round (a wrapper of the round's rule)
        self.distillation: KindDistillation | None = None
        if config.distill_epochs > 0:
            assert allocator is not None and unlabeled is not None  # check_combination
            self.distillation = KindDistillation(
                evaluator,
                self._kind_configs,
                unlabeled,
                alpha=config.distill_alpha,
                epochs=config.distill_epochs,
                seed=config.seed,
            )
        # how each synchronous round aggregates, and the carry it keeps (broker_server.rounds.aggregation)
        self.aggregation = RoundAggregation(
            config, mixed=mixed, clusters=self.clusters, distillation=self.distillation, store=store
        )
        # (device, round) -> content id of every accepted update, to re-acknowledge redeliveries
        accepted_ids: dict[tuple[str, int], str] = {}
        self.sync = SyncRounds.from_config(config, accepted_ids=accepted_ids)
        self.buffered = BufferedVersions.from_config(
            config, event_clock=event_clock, accepted_ids=accepted_ids
        )
        self.inbound = Inbound(
            transport,
            config,
            self.registry,
            self.broadcast,
            self.publisher,
            self.journal,
            self,
            clock=clock,
            clusters=self.clusters,
            serve_artifacts=serve_artifacts,
        )
        loops: dict[str, Any] = {
            "registry": self.registry,
            "broadcast": self.broadcast,
            "journal": self.journal,
            "inbound": self.inbound,
            "execute": self.execute,
            "evaluate": self._evaluate,
            "clock": clock,
            "stopped": lambda: self._stopped,
            "store": store,
            "on_round": self._recorded,
        }
        self.rounds_loop = RoundLoop(
            config,
            sync=self.sync,
            aggregation=self.aggregation,
            clusters=self.clusters,
            distillation=self.distillation,
            allocator=allocator,
            **loops,
        )
        self.versions = VersionLoop(
            config,
            publisher=self.publisher,
            buffered=self.buffered,
            ledger=ledger,
            event_clock=event_clock,
            **loops,
        )

    # --- what the reports and callers read -----------------------------------------------------

    @property
    def devices(self) -> dict[str, DeviceRecord]:
        """Every device that said hello, by id (see :class:`~broker_server.registry.DeviceRegistry`)."""
        return self.registry.devices

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """Every round's (and asynchronous version's) record so far (:class:`Journal`)."""
        return self.journal.rounds

    @property
    def rejected(self) -> list[dict[str, Any]]:
        """Every rejection so far, with its device, round and reason."""
        return self.journal.rejected

    @property
    def personalization(self) -> dict[str, dict[str, float]]:
        """Device -> what its personalization phase measured on its own held-out samples."""
        return self.journal.personalization

    @property
    def bytes_up_total(self) -> int:
        """Every payload received on the update topics, accepted or not."""
        return self.journal.bytes_up_total

    @property
    def jobs(self) -> JobBoard:
        """The asynchronous jobs, arrivals and buffer (:class:`~broker_server.rounds.buffered.JobBoard`)."""
        return self.buffered.jobs

    @property
    def resyncs(self) -> list[dict[str, Any]]:
        """Devices that asked for the whole module, with the round."""
        return self.broadcast.resyncs

    @property
    def round(self) -> int:
        """The current round, or asynchronous version."""
        return self.broadcast.round

    def module_params(self, config: TrainConfig) -> int:
        """Trainable parameters of ``config``'s module (its view of the global state)."""
        return self.broadcast.module_params(config)

    def privacy_spent(self) -> float | None:
        """Epsilon spent so far at ``dp_delta`` (None without DP): one sampled Gaussian mechanism at
        rate q per release made, round 0's class statistics included."""
        dp = self.aggregation.dp
        return None if dp is None else dp.epsilon(self.aggregation.releases, self.config.dp_delta)

    def privacy_report(self) -> dict[str, Any] | None:
        """What the DP guarantee is and covers, for the report (None without DP)."""
        dp = self.aggregation.dp
        return None if dp is None else dp.report(self.aggregation.releases, self.config.dp_delta)

    def final_state(self) -> dict[str, np.ndarray]:
        """The current global module (the final one once :meth:`run` has returned); with clusters,
        every cluster's module under ``cluster{k}/`` names (see :meth:`cluster_states`)."""
        return dict(self.broadcast.state)

    @property
    def clustering(self) -> Clustering | None:
        """The fleet's clusters (None without ``--clusters`` or before they are formed)."""
        return None if self.clusters is None else self.clusters.clustering

    def cluster_of(self, device: str) -> int | None:
        """The device's cluster; a device that joins after clustering goes to the nearest one."""
        if self.clusters is None:
            return None
        record = self.devices.get(device)
        return self.clusters.member(device, None if record is None else record.hello)

    def cluster_states(self) -> dict[int, dict[str, np.ndarray]]:
        """Every cluster's current module (one entry, cluster 0, without clusters)."""
        if self.clustering is None:
            return {0: dict(self.broadcast.state)}
        return split_state(self.broadcast.state, self.clustering.k)

    def cluster_summary(self) -> dict[str, Any] | None:
        """Clusters for the report: how many, their sizes and the silhouette (None when off)."""
        return None if self.clusters is None else self.clusters.summary()

    def artifact_for(self, config: TrainConfig) -> ArtifactInfo:
        """Build and publish ``config``'s ORT artifacts (see :meth:`Publisher.artifact_for`)."""
        return self.publisher.artifact_for(config)

    @property
    def artifacts_published(self) -> dict[str, ArtifactInfo]:
        """The ORT artifacts this process published, by artifact key."""
        return self.publisher.artifacts_published

    # --- the shell ---------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to the fleet's hello, update and status topics (once)."""
        self.inbound.start()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current step."""
        self._stopped = True
        self.inbound.wake()

    def _position(self) -> tuple[int, int]:
        """The current round (or version) and its stale updates, for the stored counters."""
        stale = self.buffered.stale if self.versions.active else self.sync.stale
        return self.broadcast.round, stale

    def _recorded(self, record: dict[str, Any]) -> None:
        """A round's (or version's) record is in: tell :attr:`on_round`, if set."""
        if self.on_round is not None:
            self.on_round(record)

    def _kind_configs(self) -> list[TrainConfig]:
        """The largest configuration of each PEFT kind the fleet trains (distillation's students)."""
        assert self.allocator is not None
        kinds = {rec.config.peft.kind for rec in self.devices.values() if not rec.excluded}
        return [c for c in self.allocator.largest(self.config.train) if c.peft.kind in kinds]

    def _evaluate(self) -> tuple[EvalResult | None, dict[str, float]]:
        """The global model's test figures (:func:`~broker_server.fleet_evaluation.evaluate_fleet`)."""
        return evaluate_fleet(
            self.broadcast.state,
            self.evaluator,
            train=self.config.train,
            clusters=self.clusters,
            allocator=self.allocator,
            devices=self.devices.values(),
        )

    # routing (broker_server.inbound.Router): decoded messages to the controller of the phase

    def update(self, event: Update) -> None:
        """A decoded update, to the controller of the phase."""
        if self.versions.active:
            self.execute(self.buffered.handle(event, self.versions.now()))
        else:
            self.execute(self.sync.handle(event, self.clock()))

    def refused(self, event: Refused) -> None:
        """A rejected message: it still ends that device's turn in the round."""
        self.execute(self.sync.handle(event, self.clock()))

    def failed(self, event: Status) -> None:
        """A device could not train: its turn in the round ends; asynchronously, it gets no more."""
        ended = self.sync.handle(event, self.clock())
        self.execute(self.buffered.handle(event, self.clock()) + ended)

    def hello(self, record: DeviceRecord, returning: bool) -> None:
        """A device that can train said hello: back (or new), it gets the newest version."""
        if self.versions.active:
            self.versions.offer(record.device_id, returning=returning)

    def execute(self, commands: list[Command]) -> CloseRound | RoundFailed | None:
        """Carry out a controller's commands in order; the round's end, if one came."""
        ended: CloseRound | RoundFailed | None = None
        for command in commands:
            if isinstance(command, Publish):
                resumed = self.rounds_loop.resumed_payload if command.resumed else None
                self.broadcast.publish(command.phase, checkpoint=resumed)
            elif isinstance(command, Checkpoint):
                self.journal.keep(command)
            elif isinstance(command, Ack):
                self.publisher.ack(
                    command.device, command.round, command.content_id, command.accepted, command.reason
                )
            elif isinstance(command, Accepted):
                if self.on_accept is not None:
                    self.on_accept(command.device)
            elif isinstance(command, Reject) and command.what == "dropped":
                self.journal.drop(command)
            elif isinstance(command, Reject):
                said = "rejected update from %s (round %s): %s"
                if command.what != "update":
                    said = "device %s failed round %s: %s"
                log.warning(said, command.device, command.round, command.reason)
                self.journal.reject(command.device, command.round, command.reason)
            elif isinstance(command, Shortfall):
                log.warning(
                    "round %d: %d of %d updates by the deadline (attempt %d); keeping the global module",
                    command.round,
                    command.got,
                    self.config.min_clients,
                    command.attempt,
                )
            elif isinstance(command, CloseJob) and self.journal.ledger is not None:
                self.journal.ledger.close_job(command.job)
            elif isinstance(command, OpenJob):
                self.versions.dispatch(command.device, self.buffered.now)
            elif isinstance(command, Exclude):
                self.devices[command.device].excluded = command.reason
            elif isinstance(command, NewVersion):
                self.versions.new_version(command)
            elif isinstance(command, CloseRound | RoundFailed):
                ended = command
        return ended

    def restore(self) -> int | None:
        """Start from the first global state and take back the last checkpoint, if the store
        holds one (what :meth:`run` does first); the round to continue, or None if fresh."""
        self.broadcast.state = initial_state(self.evaluator, self.allocator, self.config.train)
        if self.store is not None:
            # what the checkpointed modules belong to: ``fedpeft export`` rebuilds them on this model
            self.store.set_meta(TRAIN_CONFIG_KEY, self.config.train.to_dict())
        if self.aggregation.dp is not None:
            self.rounds_loop.key_dp(dp_key(self.store))
        return self.rounds_loop.resume()

    def run(self) -> None:
        """Run every round; returns when the last global module is published or on stop."""
        resume_round = self.restore()
        ledger = self.journal.ledger
        snapshot = ledger.restore() if ledger is not None else None
        if snapshot is not None:  # asynchronous versions had begun: continue them
            self.versions.take_back(snapshot)
        self.start()
        if resume_round is None and snapshot is None:
            self.rounds_loop.wait_for_devices()
            if self.clusters is not None:
                self.rounds_loop.form_clusters()
        start = self.clock() - (float(self.rounds[-1]["wall_s"]) if self.rounds else 0.0)
        first = 0 if self.config.head_init == "ncm" else 1
        if resume_round is not None:
            first = resume_round
        last_sync = self.config.rounds if self.config.mode == "sync" else 0
        if snapshot is not None:
            first = last_sync + 1
        self.rounds_loop.run(start, resume_round, first, last_sync)
        if self.config.mode == "async" and not self._stopped:
            self.versions.run(start, snapshot)
        if self._stopped:
            return
        if self.config.personalize_epochs > 0:
            self.rounds_loop.personalize(resume_round)
            if self._stopped:
                return
        self.broadcast.round = self.config.rounds + (2 if self.config.personalize_epochs > 0 else 1)
        self.broadcast.publish(DONE_PHASE)

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
            self.journal.final_eval,
            self.personalization_summary(),
            self.cluster_summary(),
            self.privacy_spent(),
            self.config.dp_delta if self.aggregation.dp is not None else None,
            self.privacy_report(),
        )
        return FleetSummary(
            rounds=[dict(r) for r in self.rounds],
            final=final,
            devices=devices,
            bytes_up_total=self.bytes_up_total,
            rejected=[dict(r) for r in self.rejected],
            unaggregated=list(self.journal.unaggregated),
            fleet_params=self.module_params(self.config.train),
        )

    def personalization_summary(self) -> dict[str, float | None]:
        """Means over the devices that measured on held-out samples (None without any)."""
        return personalization_means(self.personalization)
