"""The synchronous round controller (broker_server.rounds.sync.SyncRounds) driven with plain events:
no broker, no model, no clock but the numbers passed in."""

from __future__ import annotations

import numpy as np

from broker_server.layout import STATS_PHASE, TRAIN_PHASE
from broker_server.rounds.events import (
    Accepted,
    Ack,
    Checkpoint,
    CloseRound,
    Command,
    Publish,
    Refused,
    Reject,
    RoundFailed,
    Shortfall,
    Status,
    Tick,
    Update,
)
from broker_server.rounds.sync import NOT_SAMPLED, SyncRounds
from edge_runtime import wire

SHAPES = {"a": (2,), "b": (1, 3)}
MODULE = "module-r1"


def hello(device: str, samples: int = 10) -> wire.Hello:
    return wire.Hello(device_id=device, profile={}, num_samples=samples, label_histogram=(samples,))


def update(
    device: str,
    round_: int = 1,
    *,
    value: float = 1.0,
    samples: int = 4,
    base: str = MODULE,
    shapes: dict[str, tuple[int, ...]] = SHAPES,
) -> Update:
    tensors = {k: np.full(s, value, np.float32) for k, s in shapes.items()}
    msg = wire.UpdateMessage(
        device_id=device,
        round=round_,
        base_id=base,
        num_samples=samples,
        tensors=tensors,
        metrics={},
        bits=32,
    )
    payload = wire.encode_update(msg, np.random.default_rng(0))
    return Update(device, msg, payload, MODULE, SHAPES, hello(device))


def controller(**kw: object) -> SyncRounds:
    args: dict[str, object] = {
        "min_clients": 2,
        "round_timeout_s": 10.0,
        "max_round_retries": 1,
        "norm_bound": 100.0,
    }
    args.update(kw)
    return SyncRounds(**args)  # type: ignore[arg-type]


def opened(rounds: SyncRounds, participants: set[str], now: float = 0.0, round_: int = 1) -> list[Command]:
    commands = rounds.open_round(round_, TRAIN_PHASE)
    rounds.collect(participants, now)
    return commands


def kinds(commands: list[Command]) -> list[type]:
    return [type(c) for c in commands]


def test_a_round_publishes_its_module_then_closes_once_every_participant_has_answered() -> None:
    rounds = controller()
    assert opened(rounds, {"a", "b", "c"}) == [Publish(1, TRAIN_PHASE)]
    got = rounds.handle(update("a", value=1.0), 1.0)
    assert kinds(got) == [Checkpoint, Ack, Accepted]  # stored before the ack, hook after it
    ack = got[1]
    assert isinstance(ack, Ack) and ack.accepted and ack.content_id == got[0].pending.content_id  # type: ignore[union-attr]
    assert rounds.handle(Tick(), 2.0) == []  # two of three: enough, but the deadline is far
    rounds.handle(update("c", value=3.0), 3.0)
    rounds.handle(Status("b", "failed", 1, "over its memory cap"), 4.0)  # ends b's turn
    closed = rounds.handle(Tick(), 4.0)
    assert len(closed) == 1 and isinstance(closed[0], CloseRound) and closed[0].complete
    # the round's updates, sorted by device whatever their arrival order
    assert [u.device_id for u in closed[0].updates] == ["a", "c"]
    np.testing.assert_array_equal(closed[0].updates[1].delta["a"], [3.0, 3.0])


def test_a_duplicate_is_acknowledged_again_and_reported_once_and_a_second_different_update_is_refused() -> (
    None
):
    rounds = controller()
    opened(rounds, {"a", "b"})
    first = update("a")
    rounds.handle(first, 1.0)
    again = rounds.handle(first, 2.0)  # the device never got its ack and sent the same bytes again
    assert again == [
        Ack("a", 1, first.content_id, True, "duplicate of an accepted update"),
        Reject("a", 1, "duplicate: redelivery of an accepted update, counted once"),
    ]
    other = rounds.handle(update("a", value=2.0), 3.0)
    assert kinds(other) == [Ack, Reject]
    assert isinstance(other[0], Ack) and not other[0].accepted
    assert "second, different update" in other[0].reason
    assert list(rounds.pending) == ["a"] and len(rounds.pending) == 1


def test_stale_and_ahead_updates_are_refused_with_their_reason_and_stale_ones_are_counted() -> None:
    rounds = controller()
    rounds.open_round(2, TRAIN_PHASE)
    rounds.collect({"a", "b", "c"}, 0.0)
    late = rounds.handle(update("a", round_=1), 1.0)
    assert kinds(late) == [Ack, Reject] and isinstance(late[1], Reject)
    assert late[1].reason.startswith("stale_round: trained on round 1, current is 2")
    wrong_base = rounds.handle(update("b", round_=2, base="an-older-module"), 1.0)
    assert isinstance(wrong_base[1], Reject) and wrong_base[1].reason.startswith("stale_round")
    ahead = rounds.handle(update("c", round_=3), 1.0)
    assert isinstance(ahead[1], Reject) and "ahead of the current 2" in ahead[1].reason
    assert rounds.stale == 2 and rounds.pending == {}
    # a rejection for this round ends the device's turn; one for another round does not
    assert rounds.answered == {"b"}


def test_updates_that_fail_intake_checks_are_refused_and_not_kept() -> None:
    rounds = controller(norm_bound=1.0)
    opened(rounds, {"a", "b", "c"})
    shape = rounds.handle(update("a", shapes={"a": (3,), "b": (1, 3)}), 1.0)
    norm = rounds.handle(update("b", value=5.0), 1.0)
    greedy = rounds.handle(update("c", value=0.1, samples=11), 1.0)  # its hello said 10
    reasons = [c.reason for c in (*shape, *norm, *greedy) if isinstance(c, Reject)]
    assert [r.split(":")[0] for r in reasons] == ["shape_mismatch", "norm_too_large", "rejected"]
    assert "hello said 10" in reasons[2]
    assert rounds.pending == {}


def test_the_deadline_closes_a_round_with_who_arrived_if_enough_did() -> None:
    rounds = controller(min_clients=2)
    opened(rounds, {"a", "b", "c"}, now=100.0)
    rounds.handle(update("b"), 101.0)
    rounds.handle(update("a"), 102.0)
    assert rounds.handle(Tick(), 109.9) == []
    closed = rounds.handle(Tick(), 110.0)
    assert len(closed) == 1 and isinstance(closed[0], CloseRound)
    assert not closed[0].complete and [u.device_id for u in closed[0].updates] == ["a", "b"]


def test_too_few_by_the_deadline_waits_again_then_fails_after_the_last_retry() -> None:
    rounds = controller(min_clients=2, max_round_retries=1)
    opened(rounds, {"a", "b"}, now=0.0)
    rounds.handle(update("a"), 1.0)
    assert rounds.handle(Tick(), 10.0) == [Shortfall(1, 1, 1)]
    assert rounds.deadline == 20.0  # a second wait, as long as the first
    assert rounds.handle(Tick(), 15.0) == []
    assert rounds.handle(Tick(), 20.0) == [Shortfall(1, 1, 2), RoundFailed(1, 1)]


def test_a_round_that_needs_no_updates_closes_at_once_and_stopping_closes_with_what_came() -> None:
    rounds = controller()
    rounds.open_round(1, TRAIN_PHASE)
    rounds.collect({"a"}, 0.0, enough=0)  # DP's fixed denominator: any number of updates is valid
    assert rounds.handle(Tick(), 0.0) == []  # "a" may still answer
    rounds.collect(set(), 0.0, enough=0)
    closed = rounds.handle(Tick(), 0.0)
    assert isinstance(closed[0], CloseRound) and closed[0].updates == []
    rounds = controller(min_clients=1)
    opened(rounds, {"a", "b"})
    assert kinds(rounds.stop()) == [Shortfall, RoundFailed]
    rounds.handle(update("a"), 1.0)
    stopped = rounds.stop()
    assert isinstance(stopped[0], CloseRound) and [u.device_id for u in stopped[0].updates] == ["a"]


class EveryOther:
    def includes(self, round_: int, device: str) -> bool:
        return device != "b"


def test_an_unsampled_device_is_refused_without_a_rejection_and_its_turn_ends() -> None:
    rounds = controller(sampler=EveryOther())
    opened(rounds, {"a", "b"})
    refused = rounds.handle(update("b"), 1.0)
    assert refused == [Ack("b", 1, "", False, NOT_SAMPLED)]
    assert rounds.answered == {"b"} and rounds.pending == {}


def test_a_resumed_round_publishes_the_stored_bytes_and_acknowledges_its_stored_updates_again() -> None:
    before = controller()
    opened(before, {"a", "b", "c"})
    before.handle(update("c"), 1.0)
    before.handle(update("a"), 2.0)
    after = controller()  # a restart: the store gives back the pending updates and the ended turns
    after.pending = dict(before.pending)
    commands = after.open_round(1, TRAIN_PHASE, resumed=True, turns_ended={"b"}, stale=3)
    assert commands[0] == Publish(1, TRAIN_PHASE, resumed=True)
    assert [(c.device, c.reason) for c in commands[1:] if isinstance(c, Ack)] == [
        ("a", "accepted before a restart"),
        ("c", "accepted before a restart"),
    ]
    after.collect({"a", "b", "c"}, 0.0)
    assert after.stale == 3 and isinstance(after.handle(Tick(), 0.0)[0], CloseRound)


def test_refusals_from_intake_end_a_known_device_s_turn_and_say_why() -> None:
    rounds = controller()
    opened(rounds, {"a", "b"})
    known = rounds.handle(Refused("a", 1, "malformed", "truncated tensor table", known=True), 1.0)
    assert known == [
        Ack("a", 1, "", False, "malformed: truncated tensor table"),
        Reject("a", 1, "malformed: truncated tensor table"),
    ]
    stranger = rounds.handle(Refused("x", 1, "unknown_device", "'x' never said hello", known=False), 1.0)
    assert stranger == [Reject("x", 1, "unknown_device: 'x' never said hello")]  # no ack to a stranger
    assert rounds.answered == {"a"}


def test_a_statistics_round_expects_class_statistics_not_the_module() -> None:
    rounds = controller()
    rounds.open_round(0, STATS_PHASE)
    rounds.collect({"a"}, 0.0)
    shapes = {"head.weight": (2, 3)}
    msg = wire.UpdateMessage(
        device_id="a", round=0, base_id=MODULE, num_samples=2, bits=32, metrics={},
        tensors={
            "stats.class_sums": np.array([[1.0, 0, 0], [0, 1.0, 0]], np.float32),
            "stats.class_counts": np.array([1.0, 1.0], np.float32),
        },
    )  # fmt: skip
    event = Update("a", msg, wire.encode_update(msg, np.random.default_rng(0)), MODULE, shapes, hello("a"))
    assert kinds(rounds.handle(event, 1.0)) == [Checkpoint, Ack, Accepted]
    trained = update("b", round_=0, shapes={"head.weight": (2, 3)})
    wrong = Update("b", trained.update, trained.payload, MODULE, shapes, hello("b"))
    assert any(isinstance(c, Reject) and "shape_mismatch" in c.reason for c in rounds.handle(wrong, 1.0))
