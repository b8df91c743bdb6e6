"""Inbound messages: queued on the transport's thread, then decoded, checked and routed one at a
time on the service's thread.

A hello registers (or welcomes back) its device and assigns it a module; an update is counted on
the wire, put back together from its chunks, decoded (:func:`~broker_server.intake.decode_update`)
and handed on as an :class:`~broker_server.rounds.events.Update`; a status marks its device online
or offline, asks for the whole module, or reports a failed round. Nothing here decides whether an
update is accepted: the round controllers do, behind a :class:`Router` (the service). A message
that cannot be decoded is rejected with its reason, and one bad message never stops the others.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import Protocol

from broker_server.broadcast import Broadcast
from broker_server.cluster_groups import ClusterGroups
from broker_server.config import ServiceConfig
from broker_server.intake import decode_update
from broker_server.journal import Journal
from broker_server.publisher import Publisher
from broker_server.registry import DeviceRecord, DeviceRegistry
from broker_server.rounds.events import Refused, Status, Update
from edge_runtime import wire
from edge_runtime.chunking import ChunkAssembler, is_chunk
from edge_runtime.downlink import RESYNC_STATE
from edge_runtime.engines import artifact_flavour
from edge_runtime.errors import DuplicateUpdate, FedPeftError, UnknownDevice, UpdateRejected
from edge_runtime.transport import Transport

log = logging.getLogger("fedpeft.server")

KINDS = ("hello", "update", "status")
"""The fleet topics the service subscribes to: ``fl/<fleet>/<kind>/<device>``."""


class Router(Protocol):
    """Where decoded messages go: the round controller of the phase (the service routes)."""

    def update(self, event: Update) -> None:
        """A decoded update from a registered device."""
        ...

    def refused(self, event: Refused) -> None:
        """A message rejected before any controller saw it."""
        ...

    def failed(self, event: Status) -> None:
        """A device reports that it could not train."""
        ...

    def hello(self, record: DeviceRecord, returning: bool) -> None:
        """A device that can train said hello (``returning``: it was offline)."""
        ...


class Inbound:
    """The service's inbox and the handling of each message in it."""

    def __init__(
        self,
        transport: Transport,
        config: ServiceConfig,
        registry: DeviceRegistry,
        broadcast: Broadcast,
        publisher: Publisher,
        journal: Journal,
        router: Router,
        *,
        clock: Callable[[], float],
        clusters: ClusterGroups | None = None,
        serve_artifacts: bool = True,
    ) -> None:
        self.transport = transport
        self.config = config
        self.registry = registry
        self.broadcast = broadcast
        self.publisher = publisher
        self.journal = journal
        self.router = router
        self.clock = clock
        self.clusters = clusters
        # ORT training artifacts: whether devices fetch them from here (the simulator hands its
        # workers a local folder instead)
        self.serve_artifacts = serve_artifacts
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.chunks = ChunkAssembler(max_bytes=config.max_payload_bytes)
        self.started = False

    def start(self) -> None:
        """Subscribe to the fleet's hello, update and status topics (once)."""
        if self.started:
            return
        self.started = True
        for kind in KINDS:
            self.transport.subscribe(f"fl/{self.config.fleet}/{kind}/+", self.enqueue, qos=1)

    def enqueue(self, topic: str, payload: bytes) -> None:
        """Runs on the network thread: only queue, never decode or write here."""
        self.inbox.put((topic, payload))

    def wake(self) -> None:
        """Wake a :meth:`pump` that waits (the service is stopping)."""
        self.inbox.put(("", b""))

    def pump(self, until: float) -> bool:
        """Handle queued messages until ``until``; True if a message was handled."""
        timeout = max(0.0, until - self.clock())
        try:
            topic, payload = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return False
        if not topic:
            return False
        self.handle(topic, payload)
        return True

    def handle(self, topic: str, payload: bytes) -> None:
        """Handle one message as it arrived on ``topic``; a bad one is rejected with its reason."""
        try:
            _, kind, device = wire.parse_topic(topic)
        except UpdateRejected as exc:
            self.reject(exc, None, None)
            return
        try:
            if kind == "hello":
                self.on_hello(device, payload)
            elif kind == "update":
                self.on_update(device, payload)
            elif kind == "status":
                self.on_status(device, payload)
        except UpdateRejected as exc:
            self.reject(exc, device, exc.round)
        except FedPeftError as exc:  # a bad config in a hello, say: log and go on
            self.reject(UpdateRejected(str(exc)), device, None)

    def reject(self, exc: UpdateRejected, device: str | None, round_: int | None) -> None:
        """Hand a rejection to the controller: it still ends that device's turn in the round."""
        refused = Refused(
            device, round_, exc.code, exc.reason, known=device in self.registry.devices,
            duplicate=isinstance(exc, DuplicateUpdate),
        )  # fmt: skip
        self.router.refused(refused)

    def on_hello(self, device: str, payload: bytes) -> None:
        """Register the device (or take it back) and, if it can train, assign it a module."""
        if not payload:
            return  # a cleared retained hello
        hello = wire.decode_hello(payload, max_bytes=self.config.max_payload_bytes)
        if hello.device_id != device:
            raise UnknownDevice(f"hello for {hello.device_id!r} published under {device!r}")
        record, returning = self.registry.hello(device, hello, payload)
        if not record.excluded:
            self.assign(record)
            self.router.hello(record, returning)

    def assign(self, record: DeviceRecord) -> None:
        """Tell the device what to train and where its global module is (with clusters, once
        the clusters are formed: the assignment names its cluster's topic)."""
        if self.clusters is not None and self.clusters.member(record.device_id, record.hello) is None:
            return
        artifact = None
        if self.serve_artifacts and artifact_flavour(record.config.engine) is not None:
            try:
                artifact = self.publisher.artifact_for(record.config)
            except (FedPeftError, ImportError, OSError) as exc:
                # no artifacts, no training: leave the device out with the reason, keep serving
                record.excluded = f"cannot serve ORT artifacts: {exc}"
                log.error("device %s left out: %s", record.device_id, record.excluded)
                return
        msg = wire.Assignment(
            device_id=record.device_id,
            round=self.broadcast.round,
            config=record.config.to_dict(),
            global_topic=self.broadcast.group_of(record).topic,
            artifact=None if artifact is None else artifact.to_dict(),
        )
        self.publisher.assign(msg)

    def on_status(self, device: str, payload: bytes) -> None:
        """Online, offline, a resync request, or a round the device could not train."""
        if not payload:
            return  # a cleared retained status
        status = wire.decode_status(payload, max_bytes=self.config.max_payload_bytes)
        log.info("device %s is %s", device, status.state)
        record = self.registry.get(device)
        if record is None:
            return
        record.online = status.state != "offline"
        if status.state == RESYNC_STATE:
            self.broadcast.send_full(device)
        if status.state == "failed":
            # the device could not train this round (over its memory cap, say): end its turn
            round_ = status.detail.get("round")
            reason = str(status.detail.get("reason", "no reason given"))
            self.router.failed(Status(device, status.state, round_, reason))

    def on_update(self, device: str, payload: bytes) -> None:
        """Count the payload, put chunks together, decode, and route the update."""
        self.journal.received(device, len(payload))
        record = self.registry.get(device)
        if is_chunk(payload):
            if record is None:
                raise UnknownDevice(f"{device!r} never said hello")
            whole = self.chunks.add(device, payload)
            if whole is None:
                return
            payload = whole
        update = decode_update(device, payload, self.config.max_payload_bytes)
        if record is None:
            raise UnknownDevice(f"{device!r} never said hello", round=update.round)
        record.updates_received += 1
        group = self.broadcast.group_of(record)
        self.router.update(Update(device, update, payload, group.global_id, group.shapes, record.hello))
