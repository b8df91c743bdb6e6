"""The asynchronous round core (broker_server.rounds.buffered: the JobBoard and the BufferedVersions
controller) with plain data: no broker, no model, no clock but the numbers passed in."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from broker_server.intake import PendingUpdate
from broker_server.rounds.buffered import BufferedVersions, JobBoard
from broker_server.rounds.events import (
    Accepted,
    Ack,
    Checkpoint,
    CloseJob,
    Exclude,
    NewVersion,
    OpenJob,
    Reject,
    Status,
    Tick,
    Update,
)
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


# --- the controller (BufferedVersions) driven with plain events -----------------------------------

SHAPES = {"a": (2,)}


def job_update(device: str, job: int, value: float, module: str, samples: int = 4) -> Update:
    tensors = {"a": np.full((2,), value, np.float32)}
    msg = wire.UpdateMessage(
        device_id=device, round=job, base_id=module, num_samples=samples, tensors=tensors, metrics={}, bits=32
    )
    hello = wire.Hello(device_id=device, profile={}, num_samples=10, label_histogram=(10,))
    return Update(device, msg, wire.encode_update(msg, np.random.default_rng(0)), module, SHAPES, hello)


def open_jobs(versions: BufferedVersions, devices: list[str]) -> dict[str, int]:
    """Offer each device a job and open it as the service would (content id "m<version>")."""
    jobs = {}
    for device in devices:
        assert versions.offer(device) == [OpenJob(device)]
        jobs[device] = versions.jobs.open(device, versions.version, versions.now, f"m{versions.version}", 10)
    return jobs


def buffered(**kw: Any) -> BufferedVersions:
    args: dict[str, Any] = {
        "buffer_size": 2, "max_staleness": 1, "staleness": lambda tau: 1.0 / (1 + tau), "server_lr": 1.0,
        "norm_bound": 100.0,
    }  # fmt: skip
    args.update(kw)
    versions = BufferedVersions(**args)
    versions.begin({"a": np.zeros(2, np.float32)}, 0)
    return versions


def test_k_updates_make_a_new_version_weighted_by_samples_and_staleness() -> None:
    versions = buffered(buffer_size=2)
    jobs = open_jobs(versions, ["p", "q", "r"])
    accepted = versions.handle(job_update("p", jobs["p"], 2.0, "m0", samples=1), 1.0)
    assert [type(c) for c in accepted] == [Checkpoint, Ack, Accepted]
    assert isinstance(accepted[0], Checkpoint) and accepted[0].arrival == 1.0
    # one update in the buffer: no version yet, and p, its update taken, gets its next job
    assert versions.handle(Tick(), 1.0) == [OpenJob("p")]
    versions.handle(job_update("q", jobs["q"], 4.0, "m0", samples=3), 2.0)
    made = versions.handle(Tick(), 2.0)
    new = [c for c in made if isinstance(c, NewVersion)]
    assert len(new) == 1 and new[0].version == 1 == versions.version
    # both fresh (s(0) = 1): the sample-weighted mean of the deltas, 1/4 * 2 + 3/4 * 4
    np.testing.assert_allclose(new[0].state["a"], [3.5, 3.5])
    assert made[-1] == OpenJob("q")  # the device whose update made the version trains the new one
    # r trained on version 0, now one version old: weight s(1) = 1/2 of its share
    jobs |= open_jobs(versions, ["q2"])
    versions.handle(job_update("r", jobs["r"], 2.0, "m0", samples=1), 3.0)
    versions.handle(job_update("q2", jobs["q2"], 0.0, "m1", samples=1), 3.5)
    versions.handle(Tick(), 3.0)
    second = [c for c in versions.handle(Tick(), 3.5) if isinstance(c, NewVersion)]
    assert len(second) == 1
    assert [(b.update.device_id, b.staleness) for _, b in second[0].taken] == [("q2", 0), ("r", 1)]
    np.testing.assert_allclose(second[0].state["a"], [3.5 + 0.5 * 0.5 * 2.0, 3.5 + 0.5])


def test_an_update_staler_than_the_bound_is_dropped_with_its_reason_and_no_version_comes_of_it() -> None:
    versions = buffered(buffer_size=1, max_staleness=0)
    jobs = open_jobs(versions, ["old", "new"])
    versions.handle(job_update("new", jobs["new"], 1.0, "m0"), 1.0)
    versions.handle(job_update("old", jobs["old"], 1.0, "m0"), 2.0)
    assert any(isinstance(c, NewVersion) for c in versions.handle(Tick(), 1.0))
    dropped = versions.handle(Tick(), 2.0)
    rejects = [c for c in dropped if isinstance(c, Reject)]
    assert len(rejects) == 1 and rejects[0].what == "dropped" and rejects[0].job == jobs["old"]
    assert "trained on version 0, now 1 (bound 0)" in rejects[0].reason
    assert not any(isinstance(c, NewVersion) for c in dropped) and versions.version == 1
    assert versions.stale == 1


def test_updates_for_no_open_job_of_theirs_are_refused_and_a_redelivery_is_acknowledged_again() -> None:
    versions = buffered()
    jobs = open_jobs(versions, ["p"])
    foreign = versions.handle(job_update("q", jobs["p"], 1.0, "m0"), 1.0)
    assert isinstance(foreign[0], Ack) and not foreign[0].accepted and "stale_round" in foreign[0].reason
    wrong_module = versions.handle(job_update("p", jobs["p"], 1.0, "another"), 1.0)
    assert isinstance(wrong_module[-1], Reject) and "another module" in wrong_module[-1].reason
    good = job_update("p", jobs["p"], 1.0, "m0")
    versions.handle(good, 1.0)
    again = versions.handle(good, 2.0)
    assert again[0] == Ack("p", jobs["p"], good.content_id, True, "duplicate of an accepted update")
    assert len(versions.jobs.arrivals) == 1  # counted once


def test_a_failed_job_excludes_its_device_and_the_deadline_gives_up_the_rest() -> None:
    versions = buffered()
    jobs = open_jobs(versions, ["p", "q"])
    assert versions.handle(Status("p", "failed", jobs["p"], "out of memory"), 0.0) == [
        Exclude("p", f"failed job {jobs['p']}: device_failed: out of memory"),
        CloseJob(jobs["p"]),
    ]
    assert versions.handle(Status("p", "failed", 999, "?"), 0.0) == []  # not its job
    assert versions.give_up() == [CloseJob(jobs["q"]), Reject("q", 0, "deadline: job unanswered")]
    assert versions.idle()


def test_on_a_simulated_clock_an_arrival_waits_for_jobs_that_could_land_earlier() -> None:
    class Clock:
        def start(self, device: str, t: float) -> float:
            return t

        def finish(self, device: str, start: float, train_s: float, bytes_up: int, bytes_down: int) -> float:
            return start + (5.0 if device == "slow" else 1.0)

    versions = buffered(event_clock=Clock(), buffer_size=1)
    jobs = open_jobs(versions, ["fast", "slow"])
    versions.handle(job_update("slow", jobs["slow"], 1.0, "m0"), 0.1)  # answered first on the wall
    assert not versions.ready()  # lands at 5.0 on the simulated clock; "fast" (started at 0) may land first
    assert versions.handle(Tick(), 0.2) == []
    versions.handle(job_update("fast", jobs["fast"], 1.0, "m0"), 0.3)  # lands at 1.0
    first = versions.handle(Tick(), 0.3)
    assert (
        versions.now == 1.0
        and next(c for c in first if isinstance(c, NewVersion)).taken[0][0] == jobs["fast"]
    )
    second = versions.handle(Tick(), 0.3)
    assert (
        versions.now == 5.0
        and next(c for c in second if isinstance(c, NewVersion)).taken[0][0] == jobs["slow"]
    )
