"""Checkpoints: what a restarted service reads back from its SQLite state store.

Reading is separate from applying: the functions here turn the store's rows into plain values
(decoded modules, hellos, pending updates, counters), and the service takes them back. Carries
(the exact residual, the server's momentum) are stored the same way for every strategy: an fp32
array map in a global-module container, by round and name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker_server.clustering import Clustering
from broker_server.intake import PendingUpdate
from broker_server.privacy import new_key
from broker_server.state import StateStore
from edge_runtime import wire

Arrays = dict[str, np.ndarray]


def encode_carry(round_: int, name: str, tensors: Mapping[str, np.ndarray]) -> bytes:
    """A strategy's carry as the store keeps it: the tensors at 32 bits, named ``name``."""
    return wire.encode_global(wire.GlobalModule(round_, name, dict(tensors)), bits=32)


def decode_carry(payload: bytes) -> Arrays:
    """The carry stored by :func:`encode_carry`, in float64 (what the strategies compute in)."""
    module = wire.decode_global(payload, max_bytes=max(len(payload), wire.DEFAULT_MAX_PAYLOAD))
    return {k: np.asarray(v, dtype=np.float64) for k, v in module.tensors.items()}


def dp_key(store: StateStore | None) -> bytes:
    """DP-FedAvg's secret key of the sampling and noise draws: kept in the store across restarts
    (made and stored on first use; a fresh one without a store)."""
    if store is None:
        return new_key()
    stored = store.get_meta("dp_key")
    if stored is None:
        key = new_key()
        store.set_meta("dp_key", key.hex())
        return key
    return bytes.fromhex(str(stored))


@dataclass(frozen=True)
class ReportInputs:
    """What the report counts, as the store holds it, fresh start or not."""

    rejected: list[dict[str, Any]]
    resyncs: list[dict[str, Any]]
    device_counters: dict[str, dict[str, Any]]
    counters: dict[str, Any] | None
    """The service's byte counters (None in a state folder from before they were stored)."""


def read_report_inputs(store: StateStore) -> ReportInputs:
    """The rejections, module resyncs, each device's counters and the service's counters."""
    return ReportInputs(
        rejected=store.rejections(),
        resyncs=[dict(x) for x in store.get_meta("resyncs", [])],
        device_counters=store.device_counters(),
        counters=store.counters(),
    )


@dataclass
class RoundCheckpoint:
    """The state of a synchronous run at its last checkpointed round, read back from the store.

    Everything acknowledged is in the store (it is written before the ack), so ``pending`` holds
    exactly the acknowledged updates of the interrupted round.
    """

    round: int
    global_id: str
    payload: bytes
    state: Arrays
    hellos: dict[str, wire.Hello]
    accepted_counts: dict[str, int]
    accepted_ids: dict[tuple[str, int], str]
    records: list[dict[str, Any]]
    pending: dict[str, PendingUpdate]
    round_counters: tuple[int, int]
    """The interrupted round's (stale updates, bytes up)."""
    legacy_bytes_up: int | None = None
    """Bytes up rebuilt from the records when the store has no counters (an older state folder)."""
    clustering: Clustering | None = None
    rewards: dict[str, Any] = field(default_factory=dict)
    carries: dict[str, Arrays] = field(default_factory=dict)
    personalization: dict[str, dict[str, float]] = field(default_factory=dict)
    downlink: tuple[bytes, Arrays | None] | None = None
    """The shared downlink message of the round and the encoder's residual (None when that message
    carried no tensors: the statistics round)."""


def read_round_checkpoint(
    store: StateStore,
    counters: dict[str, Any] | None,
    *,
    clustered: bool = False,
    carries: tuple[str, ...] = (),
    personalize_round: int | None = None,
    downlink: bool = False,
) -> RoundCheckpoint | None:
    """The last checkpoint, or None if the store holds no global module yet.

    ``carries`` names the strategy carries to read (``residual`` is the exact strategy's);
    ``personalize_round`` is the personalization round, whose measurements are read back once it
    is over; ``downlink`` reads the round's shared delta message and its encoder residual.
    """
    latest = store.latest_global()
    if latest is None:
        return None
    round_, cid, payload = latest
    state = dict(wire.decode_global(payload).tensors)
    clustering = None
    saved_clusters = store.get_meta("clusters") if clustered else None
    if saved_clusters is not None:
        clustering = Clustering(
            {str(d): int(c) for d, c in saved_clusters["members"].items()},
            np.asarray(saved_clusters["centroids"], dtype=np.float64),
            float(saved_clusters["silhouette"]),
        )
    # A crash after a round's record was written but before the next global went out redoes
    # that round from the same stored updates (summed in device order: the same floats).
    records = [rec for rec in store.round_records() if int(rec["round"]) < round_]
    pending = {}
    for device, ucid, upayload in store.updates(round_):
        pending[device] = PendingUpdate(wire.decode_update(upayload), ucid, len(upayload))
    accepted_bytes = sum(p.nbytes for p in pending.values())
    legacy = None
    if counters is None:
        legacy = sum(int(r.get("bytes_up_all", 0)) for r in records) + accepted_bytes
    if counters is not None and counters.get("round") == round_:
        round_counters = (int(counters["round_stale"]), int(counters["round_bytes_up"]))
    else:  # nothing counted in this round yet (or an older state folder)
        round_counters = (0, accepted_bytes)
    stored_carries: dict[str, Arrays] = {}
    for name in carries:  # the carry that aggregating this round starts from
        saved = store.residual_before(round_) if name == "residual" else store.carry_before(round_, name)
        if saved is not None:
            stored_carries[name] = decode_carry(saved)
    personalization = {}
    if personalize_round is not None and round_ > personalize_round:
        for device, _, upayload in store.updates(personalize_round):
            personalization[device] = dict(wire.decode_update(upayload).metrics)
    shared_downlink = None
    stored = store.downlink(round_) if downlink else None
    if stored is not None:
        shared, residual_payload = stored
        sent = wire.decode_global(shared)
        residual = None
        if sent.tensors or "base" in sent.meta:  # not the statistics round's empty message
            big = max(len(residual_payload), wire.DEFAULT_MAX_PAYLOAD)
            residual = dict(wire.decode_global(residual_payload, max_bytes=big).tensors)
        shared_downlink = (shared, residual)
    return RoundCheckpoint(
        round=round_,
        global_id=cid,
        payload=payload,
        state=state,
        hellos={d: wire.decode_hello(p) for d, p in store.devices().items()},
        accepted_counts=store.accepted_counts(),
        accepted_ids=store.accepted_ids(),
        records=records,
        pending=pending,
        round_counters=round_counters,
        legacy_bytes_up=legacy,
        clustering=clustering,
        rewards=store.get_meta("rewards", {}),
        carries=stored_carries,
        personalization=personalization,
        downlink=shared_downlink,
    )
