"""The synchronous round loop: waits for the fleet, then for each round opens it, collects its
updates, aggregates, evaluates and records it; and the personalization phase after the last.

The loop feeds the controller (:class:`~broker_server.rounds.sync.SyncRounds`) the ticks of the
clock and hands its commands to the service to carry out; messages come in through
:class:`~broker_server.inbound.Inbound`. Round 0 is a statistics round when the head starts from
class means (FedNCM): devices send per-class feature sums of the frozen model instead of trained
deltas. A restarted service takes its last checkpoint back here (:meth:`RoundLoop.resume`) and
continues the interrupted round with the updates acknowledged before the crash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from broker_server.allocation import Allocator, RewardTable, peft_key
from broker_server.broadcast import Broadcast
from broker_server.checkpoint import read_round_checkpoint
from broker_server.cluster_groups import ClusterGroups
from broker_server.config import ServiceConfig
from broker_server.distillation import KindDistillation
from broker_server.inbound import Inbound
from broker_server.journal import Journal
from broker_server.layout import PERSONALIZE_PHASE, STATS_PHASE, TRAIN_PHASE
from broker_server.privacy import PoissonSampler
from broker_server.records import EVAL_PENDING, Timing, evaluated_figures, round_record
from broker_server.registry import DeviceRegistry
from broker_server.rounds.aggregation import RoundAggregation
from broker_server.rounds.events import CloseRound, Command, RoundFailed, Tick
from broker_server.rounds.sync import SyncRounds
from broker_server.state import StateStore
from edge_runtime import wire
from edge_runtime.engines.base import EvalResult
from edge_runtime.errors import FedPeftError

log = logging.getLogger("fedpeft.server")

Execute = Callable[[list[Command]], CloseRound | RoundFailed | None]
"""Carry out a controller's commands in order; the round's end, if one came."""

Evaluate = Callable[[], tuple[EvalResult | None, dict[str, float]]]
"""The current global state's test figures, overall and by PEFT kind."""


class RoundLoop:
    """Runs the synchronous rounds of one fleet (see the module docstring)."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        registry: DeviceRegistry,
        broadcast: Broadcast,
        journal: Journal,
        inbound: Inbound,
        sync: SyncRounds,
        aggregation: RoundAggregation,
        execute: Execute,
        evaluate: Evaluate,
        clock: Callable[[], float],
        stopped: Callable[[], bool],
        clusters: ClusterGroups | None = None,
        distillation: KindDistillation | None = None,
        allocator: Allocator | None = None,
        store: StateStore | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.broadcast = broadcast
        self.journal = journal
        self.inbound = inbound
        self.sync = sync
        self.aggregation = aggregation
        self.execute = execute
        self.evaluate = evaluate
        self.clock = clock
        self.stopped = stopped
        self.clusters = clusters
        self.distillation = distillation
        self.allocator = allocator
        self.store = store
        self.on_round = on_round
        # DP-FedAvg's sampler (keyed by the service once the store is open) and this round's sample
        self.sampler: PoissonSampler | None = None
        self.sampled: set[str] = set()
        # what a restart took back: the interrupted round's (stale updates, bytes up) and module
        self.resumed_round_counters = (0, 0)
        self.resumed_payload = b""

    def key_dp(self, key: bytes) -> None:
        """Key DP-FedAvg's sampling of devices and its noise (the same draws after a restart)."""
        assert self.aggregation.dp is not None
        self.sampler = self.sync.sampler = PoissonSampler(key, self.aggregation.dp.sample_rate)
        self.aggregation.noise = self.sampler.noise_rng

    # --- the fleet ---------------------------------------------------------------------------

    def wait_for_devices(self) -> None:
        """Handle messages until the expected devices said hello (or enough by the deadline)."""
        want = self.config.expected_clients or self.config.min_clients
        deadline = self.clock() + self.config.hello_timeout_s
        # every device counts as here once it said hello, even one the allocator left out
        while self.registry.online_count() < want and not self.stopped():
            if self.clock() >= deadline:
                if len(self.registry.able()) >= self.config.min_clients:
                    break
                raise FedPeftError(
                    f"only {len(self.registry.devices)} of {want} devices said hello within "
                    f"{self.config.hello_timeout_s:.0f} s"
                )
            self.inbound.pump(min(deadline, self.clock() + 0.5))
        able = self.registry.able()
        if len(able) < self.config.min_clients and not self.stopped():
            left_out = self.registry.left_out()
            raise FedPeftError(
                f"only {len(able)} devices can train, {self.config.min_clients} needed (left out: {left_out})"
            )

    def form_clusters(self) -> None:
        """Group the devices that said hello by their label histograms; one module per cluster."""
        assert self.clusters is not None
        devices = self.registry.devices
        able = {d: r.hello for d, r in devices.items() if not r.excluded}
        self.broadcast.state = self.clusters.form(self.broadcast.state, able)
        for record in devices.values():
            if not record.excluded:
                self.inbound.assign(record)

    # --- rounds ------------------------------------------------------------------------------

    def collect(self, participants: set[str], enough: int | None = None) -> bool:
        """Handle messages until every participant answered or the deadline; True if at least
        ``enough`` (default min_clients) updates came in. With ``enough`` 0 an empty round closes
        at once."""
        self.sync.collect(participants, self.clock(), enough)
        while True:
            commands = self.sync.stop() if self.stopped() else self.sync.handle(Tick(), self.clock())
            ended = self.execute(commands)
            if ended is not None:
                return isinstance(ended, CloseRound)
            self.inbound.pump(min(self.sync.deadline, self.clock() + 0.5))

    def aggregate(self) -> None:
        """The round's accepted updates into the next global state (:class:`RoundAggregation`)."""
        updates = self.sync.updates()  # in device order: arrival order must not change the floats
        b = self.broadcast
        if b.phase == STATS_PHASE:
            b.state = self.aggregation.statistics(b.state, updates, b.round)
        else:
            b.state = self.aggregation.train(b.state, updates, b.round)

    def overlaps_evaluation(self) -> bool:
        """Whether each round's module is tested while the devices train the next one: where the
        config allows it, nothing about the next round depends on the figures (no allocator
        learning from them, no clusters or distillation reading them) and there is no state store
        (with one, a round is recorded whole before the next goes out, so a restart never finds a
        round without its figures, and a stop asked for on a round's record sends no more rounds)."""
        return (
            self.config.evaluate_during_next_round
            and self.allocator is None
            and self.clusters is None
            and self.distillation is None
            and self.store is None
        )

    def run(self, start: float, resume_round: int | None, first: int, last: int) -> None:
        """Rounds ``first`` to ``last``; ``resume_round`` is the one a restart interrupted.

        With :meth:`overlaps_evaluation`, a round other than the last is recorded as soon as it is
        aggregated, its test figures pending; the next round opens at once, and the figures are
        filled in (and the round reported) while its devices train.
        """
        b = self.broadcast
        overlap = self.overlaps_evaluation()
        untested: dict[str, Any] | None = None
        for r in range(first, last + 1):
            if self.stopped():
                break
            b.round = r
            b.phase = STATS_PHASE if (r == 0 and self.config.head_init == "ncm") else TRAIN_PHASE
            resuming = r == resume_round
            # resuming: what the interrupted round had counted, and whose turn a rejection had ended
            opening = self.sync.open_round(
                r,
                b.phase,
                resumed=resuming,
                turns_ended=self.journal.turns_ended(r) if resuming else (),
                stale=self.resumed_round_counters[0],
            )
            self.journal.round_bytes_up = self.resumed_round_counters[1] if resuming else 0
            participants = self.registry.participants()
            if self.sampler is not None:
                # Poisson sampling over every registered device; an offline one sampled is a dropout
                devices = self.registry.devices
                self.sampled = self.sampler.sample(r, (d for d, rec in devices.items() if not rec.excluded))
                participants &= self.sampled
            round_start = self.clock()
            # resuming: exactly the checkpointed bytes again (same content id, so devices' updates
            # trained on it before the crash stay valid), and the stored updates acknowledged again
            self.execute(opening)
            if untested is not None:  # the previous round's module, while this round's devices train
                self._test(untested)
                untested = None
                if self.stopped():  # told to stop when that round was reported: as before, no more
                    break
            # DP: the fixed denominator makes any number of updates (none too) a valid release
            if not self.collect(participants, 0 if self.aggregation.dp is not None else None):
                raise FedPeftError(f"round {r} got too few updates after every retry")
            server_start = self.clock()
            self.aggregate()
            if not self.stopped():
                b.prepare_shared(r)
            # overlapping, every round but the last is tested while the next one trains (_test)
            tested = not (overlap and r < last and not self.stopped())
            result, by_kind = self.evaluate() if tested else (None, {})
            now = self.clock()
            timing = Timing(now - start, now - round_start, now - start, now - server_start)
            record = self._record(r, timing, result, by_kind, tested=tested)
            untested = None if tested else record
        if untested is not None:  # stopped before the next round opened
            self._test(untested)

    def _test(self, record: dict[str, Any]) -> None:
        """Fill in a recorded round's test figures (the current global module's, which the next
        round's devices are training from), then report the round."""
        begun = self.clock()
        result, by_kind = self.evaluate()
        record.pop(EVAL_PENDING, None)
        record.update(evaluated_figures(result))
        if by_kind:
            record["accuracy_by_kind"] = by_kind
        record["eval_s"] = self.clock() - begun
        record["tested_during_next_round"] = True
        self._report(record, result, replace=True)

    def _record(
        self,
        r: int,
        timing: Timing,
        result: EvalResult | None,
        by_kind: dict[str, float],
        *,
        tested: bool = True,
    ) -> dict[str, Any]:
        """The round's record: into the journal (and the store), the rewards, the callback.
        Untested (``tested`` False), it is stored with its figures pending and reported only once
        :meth:`_test` filled them in."""
        record = round_record(
            r,
            self.broadcast.phase,
            timing,
            result,
            self.sync.pending,
            stale=self.sync.stale,
            bytes_up_all=self.journal.round_bytes_up,
            bytes_down=self.sync.bytes_down,
            resyncs=[x["client"] for x in self.broadcast.resyncs if x["round"] == r],
        )
        if by_kind:
            record["accuracy_by_kind"] = by_kind
        if (
            self.distillation is not None
            and self.distillation.agreement
            and self.broadcast.phase == TRAIN_PHASE
        ):
            record["distill_agreement"] = dict(self.distillation.agreement)
        if self.clusters is not None:
            record["accuracy_by_cluster"] = dict(self.clusters.by_cluster)
            record["shared_tensors"] = list(self.clusters.shared)
        dp = self.aggregation.dp
        if dp is not None:
            record["dp_epsilon"] = dp.epsilon(self.aggregation.releases, self.config.dp_delta)
            record["dp_sampled"] = len(self.sampled)
        if not tested:
            record[EVAL_PENDING] = True
            self.journal.record_round(record)
            return record
        self._report(record, result)
        return record

    def _report(self, record: dict[str, Any], result: EvalResult | None, *, replace: bool = False) -> None:
        """A tested round's record: the rewards, the journal (and the store), the callback."""
        self._learn_rewards(record)
        self.journal.evaluated(result)
        self.journal.record_round(record, replace=replace)
        if self.on_round is not None:
            self.on_round(record)

    def _learn_rewards(self, record: dict[str, Any]) -> None:
        """Credit this round's accuracy gain to the configurations that took part (train rounds)."""
        if self.allocator is None or record["phase"] != TRAIN_PHASE or record["accuracy"] is None:
            return
        before = [r["accuracy"] for r in self.journal.rounds if r.get("accuracy") is not None]
        if not before:
            return
        devices = self.registry.devices
        keys = [peft_key(devices[d].config.peft) for d in record["clients"] if d in devices]
        self.allocator.rewards.observe(keys, float(record["accuracy"]) - float(before[-1]))
        if self.store is not None:
            self.store.set_meta("rewards", self.allocator.rewards.to_dict())

    def personalize(self, resume_round: int | None) -> None:
        """The personalization phase after the last round: devices fine-tune the final global module
        on their own data and report its accuracy, and the global module's, on their held-out
        samples. Nothing is aggregated; the personal modules stay on the devices."""
        r = self.config.rounds + 1
        if resume_round is not None and resume_round > r:
            return  # done before a restart
        self.broadcast.round, self.broadcast.phase = r, PERSONALIZE_PHASE
        resumed = resume_round == r
        turns_ended = self.journal.turns_ended(r) if resumed else set()
        self.execute(self.sync.open_round(r, PERSONALIZE_PHASE, resumed=resumed, turns_ended=turns_ended))
        if not self.collect(self.registry.participants()):
            log.warning("personalization: %d devices reported by the deadline", len(self.sync.pending))
        for device, pending in sorted(self.sync.pending.items()):
            self.journal.personalization[device] = dict(pending.update.metrics)

    # --- restart -----------------------------------------------------------------------------

    def resume(self) -> int | None:
        """Restore the last checkpoint from the store (:mod:`broker_server.checkpoint`); the round
        to continue, or None if fresh."""
        inputs = self.journal.take_back()
        if inputs is None or self.store is None:
            return None
        b = self.broadcast
        b.resyncs = inputs.resyncs
        carries = (("residual",) if self.aggregation.keeps_residual else ()) + (
            ("server_momentum",) if self.config.server_momentum > 0 else ()
        )
        ckpt = read_round_checkpoint(
            self.store,
            inputs.counters,
            clustered=self.clusters is not None,
            carries=carries,
            personalize_round=self.config.rounds + 1 if self.config.personalize_epochs > 0 else None,
            downlink=b.downlink is not None,
        )
        if ckpt is None:
            return None
        b.state, b.round = ckpt.state, ckpt.round
        if ckpt.clustering is not None and self.clusters is not None:
            self.clusters.restore(ckpt.clustering, b.state)
        for device, hello in ckpt.hellos.items():
            device_record = self.registry.register(device, hello)
            if not device_record.excluded and self.clusters is None and self.config.mode == "sync":
                b.group(device_record.config)
        if self.allocator is not None:
            self.allocator.rewards = RewardTable.from_dict(ckpt.rewards)
        b.global_id = ckpt.global_id  # after the groups exist: run() publishes them, in phase
        for device, count in ckpt.accepted_counts.items():
            if device in self.registry.devices:
                self.registry.devices[device].updates_accepted = count
        self.journal.take_back_records(ckpt.records)
        if ckpt.legacy_bytes_up is not None:
            self.journal.bytes_up_total = ckpt.legacy_bytes_up
        if self.aggregation.dp is not None:  # the privacy budget spent before the crash: one step a release
            self.aggregation.releases = sum(
                1 for rec in self.journal.rounds if rec.get("phase") in (STATS_PHASE, TRAIN_PHASE)
            )
        self.aggregation.restore(ckpt.carries)
        self.sync.accepted_ids.clear()  # shared with the controllers: refilled, not replaced
        self.sync.accepted_ids.update(ckpt.accepted_ids)
        self.sync.pending = ckpt.pending
        self.resumed_round_counters = ckpt.round_counters
        self.journal.personalization.update(ckpt.personalization)
        self.resumed_payload = ckpt.payload
        b.resumed_shared = None
        if b.downlink is not None and ckpt.downlink is not None:
            shared, residual = ckpt.downlink
            if residual is not None:
                b.downlink.restore(b.state, wire.content_id(shared), residual)
            b.resumed_shared = shared
            # without a stored delta (a statistics round) devices get the checkpoint itself
        log.warning(
            "resumed round %d from %s with %d acknowledged updates",
            ckpt.round,
            self.store.path,
            len(self.sync.pending),
        )
        return ckpt.round
