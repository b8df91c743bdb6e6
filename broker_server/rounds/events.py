"""What the round controllers take in and give back: events in, commands out.

The controllers (:class:`~broker_server.rounds.sync.SyncRounds` for synchronous rounds,
:class:`~broker_server.rounds.buffered.BufferedVersions` for buffered asynchronous versions) never
touch a transport, a store or a clock: the service decodes a message into an event, hands it to
the controller with the time, and carries out the commands it gets back, in order. Events and
commands are plain data, so a test can drive a controller with numpy arrays and nothing else.

Events: :class:`Update` (a decoded update with what its device's module looks like),
:class:`Refused` (an update or hello that failed before the controller saw it), :class:`Status`
(a device's status message) and :class:`Tick` (time passes).

Commands: :class:`Publish` (a round's global module goes out), :class:`Checkpoint` (count an
accepted update and store it durably, before the :class:`Ack` that follows), :class:`Ack`,
:class:`Accepted` (after the ack: the service's hook), :class:`Reject` (a rejection for the log and
the report), :class:`Exclude` (give a device no more jobs), :class:`CloseJob`, :class:`OpenJob`,
:class:`Shortfall`, :class:`CloseRound`, :class:`RoundFailed` and :class:`NewVersion`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from broker_server.aggregation import ClientUpdate, State
from broker_server.asynchronous import StaleUpdate
from broker_server.intake import PendingUpdate
from edge_runtime import wire
from edge_runtime.errors import DuplicateUpdate

Shapes = Mapping[str, tuple[int, ...]]

# --- events in ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Update:
    """A decoded update from a known device, with what the controller checks it against: the id of
    the module its device's group holds now, that module's shapes and the device's hello."""

    device: str
    update: wire.UpdateMessage
    payload: bytes
    module_id: str
    shapes: Shapes
    hello: wire.Hello

    @property
    def content_id(self) -> str:
        """The update's content address (what an ack names)."""
        return wire.content_id(self.payload)


@dataclass(frozen=True)
class Refused:
    """An update (or hello) the service refused before any controller saw it: it did not decode,
    came from an unknown device, or was a redelivery; ``known`` says whether the device said hello."""

    device: str | None
    round: int | None
    code: str
    reason: str
    known: bool
    duplicate: bool = False


@dataclass(frozen=True)
class Status:
    """A device's status message: ``state`` and what it says about the ``round`` (or job) it names."""

    device: str
    state: str
    round: object = None
    reason: str = ""


@dataclass(frozen=True)
class Tick:
    """Time passes: deadlines may fall, arrivals may become final."""


Event = Update | Refused | Status | Tick

# --- commands out --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """Publish round ``round``'s global module for ``phase``; ``resumed``: the stored bytes again."""

    round: int
    phase: str
    resumed: bool = False


@dataclass(frozen=True)
class Checkpoint:
    """Count an accepted update on its device and store it durably, before it is acknowledged;
    ``arrival`` is where it lands on the asynchronous clock (None in a synchronous round)."""

    device: str
    round: int
    pending: PendingUpdate
    payload: bytes
    arrival: float | None = None


@dataclass(frozen=True)
class Ack:
    """Acknowledge (or refuse) the device's update of ``round``."""

    device: str
    round: int
    content_id: str
    accepted: bool
    reason: str


@dataclass(frozen=True)
class Accepted:
    """An update was accepted and acknowledged (the service's ``on_accept`` hook)."""

    device: str


@dataclass(frozen=True)
class Reject:
    """A rejection, for the log and the report (durably, with the counters it changed)."""

    device: str | None
    round: object
    reason: str
    # "update"; "failed": the device reported it could not train; "dropped": a buffered update
    # staler than the bound, whose ``job`` the ledger marks
    what: str = "update"
    job: int | None = None


@dataclass(frozen=True)
class Exclude:
    """Give ``device`` no more work, for ``reason``."""

    device: str
    reason: str


@dataclass(frozen=True)
class CloseJob:
    """An asynchronous job is no longer waited for."""

    job: int


@dataclass(frozen=True)
class OpenJob:
    """Give ``device`` a job on the newest version (if it is online and not excluded)."""

    device: str


@dataclass(frozen=True)
class Shortfall:
    """Round ``round`` had only ``got`` updates at the deadline of its ``attempt``-th wait."""

    round: int
    got: int
    attempt: int


@dataclass(frozen=True)
class CloseRound:
    """Round ``round`` is over: aggregate ``updates`` (sorted by device: arrival order must not
    change the floats); ``complete`` if every participant answered before the deadline."""

    round: int
    updates: list[ClientUpdate]
    complete: bool


@dataclass(frozen=True)
class RoundFailed:
    """Round ``round`` got ``got`` updates after every retry: too few to aggregate."""

    round: int
    got: int


@dataclass(frozen=True)
class NewVersion:
    """The buffer made version ``version``: its module and the buffered updates it took, with
    their job ids and staleness, in the order they were summed."""

    version: int
    state: State
    taken: list[tuple[int, StaleUpdate]] = field(default_factory=list)
    stale: int = 0  # updates dropped as too stale since the version before


Command = (
    Publish
    | Checkpoint
    | Ack
    | Accepted
    | Reject
    | Exclude
    | CloseJob
    | OpenJob
    | Shortfall
    | CloseRound
    | RoundFailed
    | NewVersion
)


def refusal(event: Refused, current_round: int) -> tuple[bool, list[Command]]:
    """What a refused update costs its device: whether it ends the device's turn in
    ``current_round``, and the commands (a refusal ack unless it was a redelivery, which was
    acknowledged as accepted, and the rejection for the report)."""
    reason = f"{event.code}: {event.reason}"
    commands: list[Command] = []
    ends_turn = False
    if event.device is not None and event.round is not None and event.known:
        ends_turn = event.round == current_round
        if not event.duplicate:  # tell the device, so it stops resending what will never be accepted
            commands.append(Ack(event.device, event.round, "", False, reason))
    commands.append(Reject(event.device, event.round, reason))
    return ends_turn, commands


def redelivery(accepted_ids: Mapping[tuple[str, int], str], event: Update) -> list[Command] | None:
    """An update accepted before (perhaps before a crash that ate its ack) is acknowledged again
    and reported as a duplicate, counted once; None if ``event`` is not one."""
    u = event.update
    cid = event.content_id
    if accepted_ids.get((event.device, u.round)) != cid:
        return None
    duplicate = Refused(
        event.device, u.round, DuplicateUpdate.code, "redelivery of an accepted update, counted once",
        known=True, duplicate=True,
    )  # fmt: skip
    return [
        Ack(event.device, u.round, cid, True, "duplicate of an accepted update"),
        *refusal(duplicate, -1)[1],
    ]
