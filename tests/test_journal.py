"""The run's journal (broker_server.journal): what the report holds survives closing the state store
and opening it again, as after a kill -9: rejections with their reasons, bytes (all and in the
round), each device's figures, accepted updates, round records; and asynchronous drops."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from broker_server.async_ledger import AsyncLedger
from broker_server.intake import PendingUpdate
from broker_server.journal import Journal
from broker_server.registry import DeviceRegistry
from broker_server.rounds.events import Checkpoint, Reject
from broker_server.state import StateStore
from edge_runtime import wire
from edge_runtime.config import TrainConfig

TRAIN = TrainConfig(model="tiny", num_labels=3)
HELLO = wire.Hello(device_id="d", profile={}, num_samples=5, label_histogram=(2, 3, 0))


def _registry(store: StateStore | None) -> DeviceRegistry:
    return DeviceRegistry(TRAIN, None, store, serve_artifacts=False)


def _accepted(round_: int, loss: float) -> tuple[PendingUpdate, bytes]:
    update = wire.UpdateMessage(
        device_id="d",
        round=round_,
        base_id="base",
        num_samples=5,
        metrics={"loss": loss, "train_s": 2.0},
        tensors={"w": np.full(3, loss, np.float32)},
        bits=32,
    )
    payload = wire.encode_update(update, rng=np.random.default_rng(0))
    return PendingUpdate(update, wire.content_id(payload), len(payload)), payload


def test_the_journal_survives_a_reopen_of_its_store(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = StateStore(path)
    registry = _registry(store)
    registry.hello("d", HELLO, wire.encode_hello(HELLO))
    journal = Journal(registry, store, lambda: (1, 2))  # round 1, two stale updates so far
    journal.received("d", 100)
    journal.received("ghost", 7)  # a device that never said hello: counted in the totals only
    journal.reject("d", 1, "malformed: not an update")
    journal.reject(None, True, "bad_topic: x")  # a round that is no integer is reported as null
    pending, payload = _accepted(1, 0.5)
    journal.keep(Checkpoint("d", 1, pending, payload))
    record = {"round": 0, "phase": "stats", "accuracy": 0.5, "macro_f1": 0.25, "bytes_up_all": 107}
    journal.record_round(record)
    before = registry.devices["d"].counters()
    assert before["bytes_up"] == 100 and before["samples"] == 5 and before["train_s"] == 2.0
    assert journal.rejected == [
        {"client": "d", "round": 1, "reason": "malformed: not an update"},
        {"client": None, "round": None, "reason": "bad_topic: x"},
    ]
    store.close()  # nothing else is shut down: as a killed process leaves it

    reopened = StateStore(path)
    registry2 = _registry(reopened)
    journal2 = Journal(registry2, reopened, lambda: (1, 0))
    assert journal2.rejected == [] and journal2.bytes_up_total == 0  # nothing until taken back
    inputs = journal2.take_back()
    assert inputs is not None
    assert journal2.rejected == journal.rejected
    assert journal2.bytes_up_total == journal.bytes_up_total == 107
    assert inputs.counters == {"bytes_up_total": 107, "round": 1, "round_bytes_up": 107, "round_stale": 2}
    # the device's figures come back when its record is made again (from its stored hello)
    assert registry2.register("d", HELLO).counters() == before
    assert reopened.accepted_ids() == {("d", 1): pending.content_id}
    assert [(d, cid) for d, cid, _ in reopened.updates(1)] == [("d", pending.content_id)]
    journal2.take_back_records(reopened.round_records())
    assert journal2.rounds == [record]
    assert journal2.final_eval == {"accuracy": 0.5, "macro_f1": 0.25}
    # a rejection ended d's turn in round 1, after the restart too
    assert journal2.turns_ended(1) == {"d"} and journal2.turns_ended(0) == set()
    reopened.close()


def test_an_asynchronous_drop_is_in_the_ledger_and_the_report_after_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    store = StateStore(path)
    registry = _registry(store)
    registry.hello("d", HELLO, wire.encode_hello(HELLO))
    ledger = AsyncLedger(store)
    journal = Journal(registry, store, lambda: (5, 1), ledger=ledger)
    version0 = wire.encode_global(wire.GlobalModule(0, "async", {"w": np.zeros(3, np.float32)}), bits=32)
    ledger.save_version(0, version0, None, [])
    for job in (3, 4):
        ledger.open_job(job, "d", 2, f"cid{job}", 10, 0.0)
        pending, payload = _accepted(job, 0.25 * job)
        journal.keep(Checkpoint("d", job, pending, payload, arrival=4.5))  # into the ledger
    assert store.updates(3) == [] and registry.devices["d"].updates_accepted == 2
    journal.drop(
        Reject("d", 5, "stale_round: job 3 trained on version 2, now 5 (bound 2)", what="dropped", job=3)
    )
    store.close()

    reopened = StateStore(path)
    journal2 = Journal(_registry(reopened), reopened, lambda: (5, 0), ledger=AsyncLedger(reopened))
    journal2.take_back()
    assert journal2.rejected == [
        {"client": "d", "round": 5, "reason": "stale_round: job 3 trained on version 2, now 5 (bound 2)"}
    ]
    snapshot = AsyncLedger(reopened).restore()
    assert snapshot is not None
    assert [w.job for w in snapshot.waiting] == [4]  # job 3's update was dropped: never aggregated
    reopened.close()


def test_without_a_store_the_journal_keeps_everything_in_memory() -> None:
    registry = _registry(None)
    registry.hello("d", HELLO, wire.encode_hello(HELLO))
    journal = Journal(registry, None, lambda: (0, 0))
    journal.received("d", 9)
    journal.reject("d", 0, "duplicate: again")
    assert journal.take_back() is None
    assert journal.rejected == [{"client": "d", "round": 0, "reason": "duplicate: again"}]
    assert journal.counters() == {"bytes_up_total": 9, "round": 0, "round_bytes_up": 9, "round_stale": 0}
