"""The global module and how it goes out: the state, the groups that share a topic and a view of
it, the delta downlink, and the retained publication of each round's module.

A group is the devices that train one view of the global state on one topic: every device of a
configuration (a mixed fleet has one group per configuration, each with its view's shapes), every
device of a cluster, or, in asynchronous mode, one device (its jobs go to its own topic). With the
delta downlink (one module shared by every device, synchronous rounds), the shared topic carries
the quantized change from the version before and the state becomes what devices rebuild from it;
a device that cannot apply a delta asks for the whole module and gets it on its own topic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from broker_server.cluster_groups import ClusterGroups
from broker_server.clustering import split_state
from broker_server.config import ServiceConfig
from broker_server.heterogeneous import view
from broker_server.layout import DONE_PHASE, PERSONALIZE_PHASE, STATS_PHASE, TRAIN_PHASE, Group, config_id
from broker_server.publisher import Publisher
from broker_server.registry import DeviceRecord
from broker_server.state import StateStore
from edge_runtime import wire
from edge_runtime.config import TrainConfig
from edge_runtime.downlink import DownlinkEncoder
from edge_runtime.errors import UnknownDevice

log = logging.getLogger("fedpeft.server")

Shapes = dict[str, tuple[int, ...]]


class Broadcast:
    """The global state of one fleet, its groups' views, and their publication."""

    def __init__(
        self,
        config: ServiceConfig,
        publisher: Publisher,
        devices: Mapping[str, DeviceRecord],
        *,
        clusters: ClusterGroups | None,
        mixed: bool,
        shapes_of: Callable[[TrainConfig], Shapes],
        store: StateStore | None = None,
    ) -> None:
        self.config = config
        self.publisher = publisher
        self.devices = devices  # the registry's, by id
        self.clusters = clusters  # None without --clusters
        self.mixed = mixed  # a mixed fleet (allocation): one view per configuration
        self.shapes_of = shapes_of  # a configuration's module shapes (the evaluator's)
        self.store = store
        self.state: dict[str, np.ndarray] = {}
        self.round = 0
        self.phase = TRAIN_PHASE
        self.global_id = ""  # the content id of the current round's checkpointed module
        self.groups: dict[str, Group] = {}
        self.config_id = config_id(config.train)
        self.global_topic = wire.topic(config.fleet, "global", self.config_id)
        # the downlink's encoder, where deltas apply (one module shared by every device, sync)
        self.downlink: DownlinkEncoder | None = (
            DownlinkEncoder(config.train.bits, full_bits=16)
            if config.delta_downlink and config.mode == "sync" and not mixed and clusters is None
            else None
        )
        self.prepared: tuple[int, str, bytes] | None = None  # the next version, encoded early
        self.resumed_shared: bytes | None = None  # the stored downlink message of a resumed round
        self.resyncs: list[dict[str, Any]] = []  # devices that asked for the whole module
        self._resync_waiting: set[str] = set()

    # --- groups and views --------------------------------------------------------------------

    def group(self, config: TrainConfig) -> Group:
        """The group of every device that trains ``config`` (created, and in a mixed fleet during a
        round given the current module at once, on first use)."""
        cid = config_id(config)
        group = self.groups.get(cid)
        if group is None:
            shapes = self.shapes_for(config)
            group = Group(config, cid, wire.topic(self.config.fleet, "global", cid), shapes)
            self.groups[cid] = group
            if self.mixed and self.global_id:  # a newcomer joins the current round
                payload = self.encode_global(self.phase, cid, view(self.state, shapes))
                self.publisher.publish_group(group, payload)
        return group

    def module_params(self, config: TrainConfig) -> int:
        """Trainable parameters of ``config``'s module (its view of the global state)."""
        if not self.state:
            return 0
        return int(sum(int(np.prod(shape)) for shape in self.shapes_for(config).values()))

    def shapes_for(self, config: TrainConfig) -> Shapes:
        """The shapes of ``config``'s view of the global state."""
        if self.clusters is not None and self.clusters.base_shapes:
            return dict(self.clusters.base_shapes)
        group = self.groups.get(config_id(config))
        if group is not None:
            return group.shapes
        if not self.mixed:
            return {k: tuple(v.shape) for k, v in self.state.items()}
        return self.shapes_of(config)

    def group_of(self, record: DeviceRecord) -> Group:
        """The group whose global module this device trains: its configuration's, its cluster's, or
        (asynchronous mode) its own job topic's."""
        if self.config.mode == "async":
            key = f"{self.config_id}-{record.device_id}"
            group = self.groups.get(key)
            if group is None:
                shapes = {k: tuple(v.shape) for k, v in self.state.items()}
                group = Group(self.config.train, key, wire.topic(self.config.fleet, "global", key), shapes)
                self.groups[key] = group
            return group
        if self.clusters is None:
            return self.group(record.config)
        cluster = self.clusters.member(record.device_id, record.hello)
        if cluster is None:
            raise UnknownDevice(f"{record.device_id!r} has no cluster yet")
        return self.cluster_group(cluster)

    def cluster_group(self, cluster: int) -> Group:
        """The group of a cluster's devices."""
        assert self.clusters is not None
        key = f"{self.config_id}-k{cluster}"
        group = self.groups.get(key)
        if group is None:
            topic = wire.topic(self.config.fleet, "global", key)
            group = Group(self.config.train, key, topic, dict(self.clusters.base_shapes))
            self.groups[key] = group
        return group

    # --- encoding ----------------------------------------------------------------------------

    def encode_global(
        self, phase: str, cid: str, tensors: dict[str, np.ndarray], round_: int | None = None
    ) -> bytes:
        """A global module of ``round_`` (default: the current round) for topic key ``cid``."""
        return self.publisher.encode_global(phase, cid, tensors, self.round if round_ is None else round_)

    def encode_shared(self, phase: str, round_: int) -> bytes:
        """The downlink message of a version; the state becomes what devices rebuild from it."""
        assert self.downlink is not None
        prepared, self.prepared = self.prepared, None
        if prepared is not None and prepared[:2] == (round_, phase):
            return prepared[2]
        if phase == STATS_PHASE and self.downlink.held is None:
            # class statistics come from the frozen base: the round needs no tensors
            return self.encode_global(phase, self.config_id, {}, round_)
        payload, self.state = self.downlink.encode(
            self.state,
            round_=round_,
            config_id=self.config_id,
            meta=self.publisher.meta(phase),
            seed=self.config.seed,
        )
        return payload

    def prepare_shared(self, round_: int) -> None:
        """Right after aggregating: encode the next version now, so that the evaluation (and the
        report) measure the module devices will hold, not the one before its quantization."""
        if self.downlink is None:
            return
        if round_ < self.config.rounds:
            nxt = (round_ + 1, TRAIN_PHASE)
        else:
            nxt = (
                self.config.rounds + 1,
                PERSONALIZE_PHASE if self.config.personalize_epochs > 0 else DONE_PHASE,
            )
        self.prepared = (*nxt, self.encode_shared(nxt[1], nxt[0]))

    def send_full(self, device: str) -> None:
        """A device that cannot apply the shared delta gets the held module whole, on its own topic."""
        if self.downlink is None or self.downlink.held is None:
            return
        if self.prepared is not None:
            # the encoder already holds the next version, which devices get only when it is
            # published: answer once it is out, with that version
            self._resync_waiting.add(device)
            return
        self.resyncs.append({"client": device, "round": self.round})
        if self.store is not None:  # the round's record lists them, also after a restart
            self.store.set_meta("resyncs", self.resyncs)
        payload = self.downlink.full(
            round_=self.round, config_id=self.config_id, meta=self.publisher.meta(self.phase)
        )
        self.publisher.send_full(device, payload)
        log.info("device %s asked for the full module: sent %d bytes", device, len(payload))

    # --- publication -------------------------------------------------------------------------

    def publish(self, phase: str, checkpoint: bytes | None = None) -> None:
        """Checkpoint the whole state, then publish every group's view of it (retained).

        ``checkpoint`` is the stored payload when resuming: published again byte for byte, so the
        content ids that devices trained on before a crash stay valid (views are re-encoded from
        it deterministically).
        """
        shared: bytes | None = None
        if self.downlink is not None:
            shared = self.encode_shared(phase, self.round) if checkpoint is None else self.resumed_shared
        if checkpoint is None:
            checkpoint = self.encode_global(phase, self.config_id, self.state)
            self.global_id = wire.content_id(checkpoint)
            if self.store is not None:
                stored: tuple[bytes, bytes] | None = None
                if shared is not None and self.downlink is not None:
                    residual = {k: v.astype(np.float32) for k, v in self.downlink.residual.items()}
                    module = wire.GlobalModule(self.round, "downlink-residual", residual)
                    stored = (shared, wire.encode_global(module, bits=32))
                self.store.save_global(self.round, self.global_id, checkpoint, downlink=stored)
        if self.config.mode == "async":  # every device on its own topic
            for device_record in self.devices.values():
                if not device_record.excluded:
                    self.group_of(device_record)
            for group in self.groups.values():
                self.publisher.publish_group(group, self.encode_global(phase, group.config_id, self.state))
            return
        if self.clusters is not None:
            assert self.clusters.clustering is not None
            for cluster, state in split_state(self.state, self.clusters.clustering.k).items():
                group = self.cluster_group(cluster)
                self.publisher.publish_group(group, self.encode_global(phase, group.config_id, state))
            return
        if not self.mixed:
            payload = checkpoint if shared is None else shared
            # messages on the shared topic never name another module: their id is their content's
            self.group(self.config.train).global_id = wire.content_id(payload)
            self.publisher.publish_retained(self.global_topic, payload)
            waiting, self._resync_waiting = self._resync_waiting, set()
            for device in sorted(waiting):
                self.send_full(device)
            return
        for group in self.groups.values():
            payload = self.encode_global(phase, group.config_id, view(self.state, group.shapes))
            self.publisher.publish_group(group, payload)
