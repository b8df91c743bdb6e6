"""The publisher: what the service sends, encoded, on its topics.

Global modules (retained, one topic per group), assignments, acknowledgements and ONNX Runtime
training artifacts (retained chunks). It knows the wire format and the topics, not the rounds:
the caller says which phase, round and tensors a message carries.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from broker_server.config import ServiceConfig
from broker_server.layout import PERSONALIZE_PHASE, TRAIN_PHASE, Group, config_id
from edge_runtime import wire
from edge_runtime.artifact_transfer import DEFAULT_CHUNK_BYTES, ArtifactInfo, iter_chunks, pack_folder
from edge_runtime.config import TrainConfig
from edge_runtime.engines import artifact_flavour
from edge_runtime.errors import ConfigError
from edge_runtime.transport import Transport

log = logging.getLogger("fedpeft.server")


class Publisher:
    """Encodes and publishes the service's messages for one fleet over ``transport``."""

    def __init__(
        self,
        transport: Transport,
        config: ServiceConfig,
        *,
        artifacts_cache: Path | None = None,
        artifact_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        self.transport = transport
        self.config = config
        self.artifacts_cache = artifacts_cache  # None: broker_server.artifacts.default_cache_dir()
        self.artifact_chunk_bytes = artifact_chunk_bytes
        self.artifacts_published: dict[str, ArtifactInfo] = {}  # by artifact key
        self._artifact_of: dict[str, str] = {}  # config id -> artifact key

    def meta(self, phase: str) -> dict[str, Any]:
        """What a global module tells devices besides its tensors: the phase and what it asks."""
        return (
            {"phase": phase, "fleet": self.config.fleet, "rounds": self.config.rounds}
            | ({"epochs": self.config.personalize_epochs} if phase == PERSONALIZE_PHASE else {})
            # layer-wise weighting: devices measure each layer's effect on their held-out samples
            | ({"importance": 1} if phase == TRAIN_PHASE and self.config.strategy == "layerwise" else {})
        )

    def encode_global(self, phase: str, cid: str, tensors: Mapping[str, np.ndarray], round_: int) -> bytes:
        """A global module of ``round_`` for configuration (or topic key) ``cid``, at the downlink's bits."""
        msg = wire.GlobalModule(round=round_, config_id=cid, tensors=dict(tensors), meta=self.meta(phase))
        return wire.encode_global(msg, bits=self.config.down_bits)

    def publish_group(self, group: Group, payload: bytes) -> None:
        """Publish ``payload`` retained on the group's topic; it becomes the group's current module."""
        group.global_id = wire.content_id(payload)
        self.transport.publish(group.topic, payload, qos=1, retain=True)

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish ``payload`` retained on ``topic``."""
        self.transport.publish(topic, payload, qos=1, retain=True)

    def send_full(self, device: str, payload: bytes) -> None:
        """A whole module for one device on its own global topic (not retained)."""
        self.transport.publish(wire.topic(self.config.fleet, "global", device), payload, qos=1)

    def ack(self, device: str, round_: int, cid: str, accepted: bool, reason: str) -> None:
        """Acknowledge (or refuse) the device's update of ``round_``."""
        ack = wire.Ack(device_id=device, round=round_, content_id=cid, accepted=accepted, reason=reason)
        self.transport.publish(wire.topic(self.config.fleet, "ack", device), wire.encode_ack(ack), qos=1)

    def assign(self, msg: wire.Assignment) -> None:
        """Tell a device its configuration and where its global module is."""
        topic = wire.topic(self.config.fleet, "assign", msg.device_id)
        self.transport.publish(topic, wire.encode_assignment(msg), qos=1)

    def artifact_for(self, config: TrainConfig) -> ArtifactInfo:
        """Build ``config``'s ORT artifacts if missing and publish them (once per key).

        The flavour is the one ``config.engine`` trains from: onnxruntime-training's graphs for
        ``ort``, the step graph for ``ort-plain``. The chunks go out retained, so a device that
        joins later (or after a restart of this service, which publishes them again on its first
        assignment) still finds them.
        """
        flavour = artifact_flavour(config.engine)
        if flavour is None:
            raise ConfigError(f"engine {config.engine!r} trains without ORT artifacts")
        cid = config_id(config)  # the engine is part of it, so each flavour has its own entry
        key = self._artifact_of.get(cid)
        if key is not None and key in self.artifacts_published:
            return self.artifacts_published[key]
        # imported here: building needs torch, transformers and onnx, which only ORT fleets use
        from broker_server.artifacts import build_artifacts

        start = time.perf_counter()
        folder = build_artifacts(
            config, seed=self.config.seed, cache_dir=self.artifacts_cache, flavour=flavour
        ).folder
        key = folder.name  # build_artifacts names the folder by its artifact_key
        self._artifact_of[cid] = key
        info = self.artifacts_published.get(key)
        if info is None:
            info = self._publish_artifact(key, folder)
            log.info(
                "published ORT artifacts %s (%s): %.1f MB in %d chunks (%.1f s)",
                key,
                flavour,
                info.size / 1e6,
                info.chunks,
                time.perf_counter() - start,
            )
        return info

    def _publish_artifact(self, key: str, folder: Path) -> ArtifactInfo:
        with tempfile.TemporaryFile() as spool:
            pack_folder(folder, spool)
            info, chunks = iter_chunks(key, spool, chunk_bytes=self.artifact_chunk_bytes)
            for index, chunk in enumerate(chunks):
                self.publish_retained(wire.artifact_topic(self.config.fleet, key, index), chunk)
        self.artifacts_published[key] = info
        return info
