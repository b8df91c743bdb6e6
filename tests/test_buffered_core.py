"""The asynchronous round core (broker_server.rounds.buffered.JobBoard) with plain data: no broker,
no model, no clock but the numbers passed in."""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.intake import PendingUpdate
from broker_server.rounds.buffered import JobBoard
from edge_runtime import wire
from edge_runtime.errors import StaleRound, UpdateRejected


def pending(device: str, job: int, samples: int = 4) -> PendingUpdate:
    tensors = {"a": np.full((2,), float(job), np.float32)}
    msg = wire.UpdateMessage(
        device_id=device, round=job, base_id="m", num_samples=samples, tensors=tensors, metrics={}, bits=32
    )
    return PendingUpdate(msg, f"cid-{device}-{job}", 100)


def test_a_device_gets_one_job_at_a_time_and_a_returning_one_is_moved_to_the_newest_version() -> None:
    board = JobBoard()
    assert board.replace_for("pi", 0) == []
    first = board.open("pi", 0, 0.0, "m0", 10)
    assert board.replace_for("pi", 0) is None  # it is training
    assert board.replace_for("pi", 0, returning=True) is None  # back, but its job is on the newest
    assert board.replace_for("pi", 1, returning=True) == [first]  # back after a new version: replaced
    assert board.jobs[first].answered and not board.in_flight()


def test_updates_answer_only_their_device_s_open_job_on_its_module_once() -> None:
    board = JobBoard()
    job = board.open("pi", 0, 1.0, "m0", 10)
    with pytest.raises(StaleRound):
        board.job_for(job, "other", "m0")
    with pytest.raises(StaleRound):
        board.job_for(job, "pi", "another-module")
    with pytest.raises(StaleRound):
        board.job_for(job + 1, "pi", "m0")
    assert board.job_for(job, "pi", "m0") is board.jobs[job]
    board.arrive(3.0, "pi", job, pending("pi", job))
    with pytest.raises(UpdateRejected, match="second"):
        board.job_for(job, "pi", "m0")
    assert board.replace_for("pi", 0) is None  # its update waits for the buffer


def test_arrivals_are_final_on_a_simulated_clock_only_when_no_job_in_flight_can_land_earlier() -> None:
    board = JobBoard()
    fast, slow = board.open("fast", 0, 0.0, "m", 10), board.open("slow", 0, 0.5, "m", 10)
    board.arrive(1.0, "fast", fast, pending("fast", fast))
    assert board.next_arrival(simulated=True) is None  # "slow" started at 0.5 and may land first
    assert board.next_arrival(simulated=False) is not None  # on the wall clock, arrival is final
    board.arrive(2.0, "fast", fast, pending("fast", fast))
    board.arrive(0.7, "slow", slow, pending("slow", slow))
    assert [a[1] for a in (board.next_arrival(True), board.next_arrival(True))] == ["slow", "fast"]


def test_the_buffer_takes_updates_within_the_staleness_bound_and_drains_in_a_fixed_order() -> None:
    board = JobBoard()
    jobs = {d: board.open(d, v, 0.0, "m", 10) for d, v in (("b", 2), ("a", 1), ("c", 0))}
    for t, d in enumerate(("b", "a", "c")):
        board.arrive(float(t), d, jobs[d], pending(d, jobs[d]))
    taken = [board.take(a, 3, max_staleness=2) for a in (board.next_arrival(False) for _ in range(3)) if a]
    assert taken == [1, 2, None]  # c trained on version 0: three versions old, over the bound
    assert board.unaggregated() == [{"client": "b", "job": jobs["b"]}, {"client": "a", "job": jobs["a"]}]
    drained = board.drain()
    assert [(b.update.device_id, b.staleness) for _, b in drained] == [("a", 2), ("b", 1)]
    assert board.buffer == [] and board.unaggregated() == []
