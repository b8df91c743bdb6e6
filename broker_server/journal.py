"""The run's journal: what the report holds (rejections, bytes, round records, per-device figures),
kept in memory and, with a state store, written before anything it counts is acknowledged.

Every rejection is written with the counters it changed (the service's bytes, the device's
figures) in one transaction, so that the report written after a kill -9 and a restart still lists
it with its reason; an accepted update is stored (synchronous rounds: the store's ``updates``;
asynchronous jobs: the :class:`~broker_server.async_ledger.AsyncLedger`) before its ack goes out.
:meth:`Journal.take_back` reads it all back after a restart (:mod:`broker_server.checkpoint`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from broker_server.async_ledger import AsyncLedger
from broker_server.checkpoint import ReportInputs, read_report_inputs
from broker_server.registry import DeviceRegistry
from broker_server.rounds.events import Checkpoint, Reject
from broker_server.state import StateStore
from edge_runtime.engines.base import EvalResult
from edge_runtime.errors import FedPeftError

log = logging.getLogger("fedpeft.server")

Position = Callable[[], tuple[int, int]]
"""The current round (or version) and its count of stale updates, for the stored counters."""


class Journal:
    """Rejections, bytes and round records of one run, in memory and in the state store."""

    def __init__(
        self,
        registry: DeviceRegistry,
        store: StateStore | None,
        position: Position,
        *,
        ledger: AsyncLedger | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.ledger = ledger
        self.position = position
        self.rejected: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self.final_eval: dict[str, float] = {}
        # device -> what its personalization phase measured on its own held-out samples
        self.personalization: dict[str, dict[str, float]] = {}
        # accepted updates no version took in before the run ended (asynchronous mode)
        self.unaggregated: list[dict[str, Any]] = []
        self.bytes_up_total = 0
        self.round_bytes_up = 0  # bytes received in the current round (or since the last version)

    def counters(self) -> dict[str, Any]:
        """The service's counters for the state store: bytes up, all and in the current round."""
        round_, stale = self.position()
        return {
            "bytes_up_total": self.bytes_up_total,
            "round": round_,
            "round_bytes_up": self.round_bytes_up,
            "round_stale": stale,
        }

    def received(self, device: str, nbytes: int) -> None:
        """Count an update's payload (or chunk) on the wire, whoever sent it."""
        self.bytes_up_total += nbytes
        self.round_bytes_up += nbytes
        record = self.registry.get(device)
        if record is not None:
            record.bytes_up += nbytes

    def _device_counters(self, device: str | None) -> dict[str, Any] | None:
        record = None if device is None else self.registry.get(device)
        return None if record is None else record.counters()

    def reject(self, client: str | None, round_: object, reason: str) -> None:
        """Add a rejection to the report and, with a state store, durably with the counters it
        changed, so that the report written after a crash still holds it."""
        # the report's round is an integer or null; a device's status may carry anything there
        reported = round_ if isinstance(round_, int) and not isinstance(round_, bool) else None
        self.rejected.append({"client": client, "round": reported, "reason": reason})
        if self.store is not None:
            self.store.add_rejection(
                client,
                reported,
                reason,
                time.time(),
                counters=self.counters(),
                device_counters=self._device_counters(client),
            )

    def drop(self, command: Reject) -> None:
        """An update staler than the bound: rejected with the reason, durably marked dropped."""
        log.warning("dropped update from %s: %s", command.device, command.reason)
        if self.ledger is None or command.job is None or command.device is None:
            self.reject(command.device, command.round, command.reason)
            return
        self.rejected.append({"client": command.device, "round": command.round, "reason": command.reason})
        self.ledger.drop(
            command.job,
            command.device,
            self.position()[0],
            command.reason,
            time.time(),
            counters=self.counters(),
            device_counters=self._device_counters(command.device),
        )

    def keep(self, command: Checkpoint) -> None:
        """Count an accepted update on its device and store it before it is acknowledged: what is
        acknowledged survives a crash."""
        record = self.registry.devices[command.device]
        record.took(command.pending.update)
        if command.arrival is not None:  # an asynchronous job's update: into the job ledger
            if self.ledger is not None:
                self.ledger.accept(
                    command.round,
                    command.device,
                    command.pending.content_id,
                    command.payload,
                    command.arrival,
                    counters=self.counters(),
                    device_counters=record.counters(),
                )
            return
        if self.store is not None:
            self.store.add_update(
                command.round,
                command.device,
                command.pending.content_id,
                command.payload,
                counters=self.counters(),
                device_counters=record.counters(),
            )

    def evaluated(self, result: EvalResult | None) -> None:
        """The latest test figures, for the report's ``final`` block."""
        if result is not None:
            self.final_eval = {"accuracy": result.accuracy, "macro_f1": result.macro_f1}

    def record_round(self, record: dict[str, Any], *, store: bool = True, replace: bool = False) -> None:
        """A round's (or version's) record; a synchronous round's is stored with its round (an
        asynchronous version's goes into the ledger with the version). ``replace``: the record,
        already here, was completed (its test figures): stored again, not added."""
        if not replace:
            self.rounds.append(record)
        elif not any(r is record for r in self.rounds):
            raise FedPeftError(f"round {record['round']}'s record to replace is not in the journal")
        if store and self.store is not None:
            self.store.save_round_record(int(record["round"]), record)

    def take_back_records(self, records: Iterable[dict[str, Any]]) -> None:
        """The round records a restart read back, and the last test figures among them."""
        self.rounds = list(records)
        for record in self.rounds:
            if record.get("accuracy") is not None:
                self.final_eval = {"accuracy": record["accuracy"], "macro_f1": record["macro_f1"]}

    def take_back(self) -> ReportInputs | None:
        """After a restart: the rejections, each device's counters and the byte counters as the
        store holds them (None without a store). Returns what was read, for the rest of the
        restore (module resyncs, the interrupted round's counters)."""
        if self.store is None:
            return None
        inputs = read_report_inputs(self.store)
        self.rejected = inputs.rejected
        self.registry.stored_counters = inputs.device_counters
        if inputs.counters is not None:
            self.bytes_up_total = int(inputs.counters["bytes_up_total"])
        return inputs

    def turns_ended(self, round_: int) -> set[str]:
        """Devices whose turn in ``round_`` a recorded rejection ended."""
        return {
            str(x["client"])
            for x in self.rejected
            if x["round"] == round_ and x["client"] in self.registry.devices
        }
