"""The device agent: says hello, takes its assignment, trains each global module, sends updates.

Network callbacks only record what arrived; training runs in the caller's thread through
:meth:`DeviceAgent.run_pending` (or :meth:`DeviceAgent.run`), so a worker process can host many
agents that train one at a time on one shared engine.

An assignment to an ONNX Runtime engine names an artifact pack: onnxruntime-training's graphs and
checkpoint for ``ort``, the step graph and initial state for ``ort-plain``, each with the
tokenizer. The agent takes it from its cache, or fetches its chunks once (retained on the broker), checks
them and unpacks them there before it trains (:mod:`edge_runtime.artifact_transfer`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import wire
from edge_runtime.artifact_transfer import ArtifactAssembler, ArtifactInfo, cached_folder, unpack
from edge_runtime.chunking import split_payload
from edge_runtime.config import TrainConfig
from edge_runtime.data import Dataset
from edge_runtime.downlink import RESYNC_STATE, ModuleReceiver, Received
from edge_runtime.engines import artifact_flavour, create_engine
from edge_runtime.engines.base import ProgressFn, TrainingEngine
from edge_runtime.errors import FedPeftError, MemoryCapExceeded, UpdateRejected
from edge_runtime.label_prior import label_prior_bias, train_logit_adjusted
from edge_runtime.memory import MemoryGuard
from edge_runtime.module_store import GLOBAL_MODULE, PERSONAL_MODULE, ModuleStore
from edge_runtime.outbox import Outbox
from edge_runtime.peft_specs import layer_group
from edge_runtime.transport import Transport

log = logging.getLogger("fedpeft.edge")

EngineFactory = Callable[[TrainConfig], TrainingEngine]
IMPORTANCE_SAMPLES = 64  # held-out samples a device evaluates per layer for layer-wise weighting
STATS_PHASE = "stats"
PERSONALIZE_PHASE = "personalize"
DONE_PHASE = "done"


def default_artifacts_cache() -> Path:
    """Where a device keeps the ORT artifact folders it fetched, unless told otherwise."""
    return Path.home() / ".cache" / "fedpeft" / "device-artifacts"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class DeviceStats:
    """What a device did, for its report entry."""

    device_id: str
    updates_sent: int = 0
    updates_accepted: int = 0
    updates_rejected: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    train_s: float = 0.0
    peak_rss_mb: float = 0.0
    rounds_trained: list[int] = field(default_factory=list)
    rounds_accepted: list[int] = field(default_factory=list)  # rounds (async: jobs) acknowledged
    config: dict[str, Any] = field(default_factory=dict)
    last_error: str | None = None


class DeviceAgent:
    """One device's side of the protocol over a :class:`Transport`."""

    def __init__(
        self,
        device_id: str,
        fleet: str,
        transport: Transport,
        data: Dataset,
        engine_factory: EngineFactory | None = None,
        *,
        profile: dict[str, Any] | None = None,
        engines: tuple[str, ...] = ("torch",),
        seed: int = 0,
        outbox: Outbox | None = None,
        on_ready: Callable[[DeviceAgent], None] | None = None,
        progress: ProgressFn | None = None,
        update_hook: Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        max_message_bytes: int | None = None,
        artifacts_cache: str | Path | None = None,
        holdout: Dataset | None = None,
        mem_cap_mb: float | None = None,
        modules: ModuleStore | None = None,
    ) -> None:
        self.device_id = device_id
        # where the final global module and the personal one are kept (``fedpeft export`` reads them)
        self.modules = modules
        # the device's own cap (its operator's); training stays under it and the assignment's
        self.mem_cap_mb = mem_cap_mb
        self.fleet = fleet
        self.transport = transport
        self.data = data
        # this device's own held-out samples: personalization is measured on them, never trained on
        self.holdout = holdout
        self.personal_state: dict[str, np.ndarray] | None = None  # the locally fine-tuned module
        self.personalization: dict[str, float] = {}
        # None: create_engine with the fetched ORT artifacts (if any), one engine kept at a time
        self.engine_factory: EngineFactory = engine_factory or self._default_engine
        self._engine_cache: dict[str, TrainingEngine] = {}
        self.artifacts_cache = Path(artifacts_cache) if artifacts_cache else default_artifacts_cache()
        self.artifact_folder: Path | None = None  # the ORT artifacts of the current assignment
        self._fetch: ArtifactAssembler | None = None
        self.profile = profile or {}
        self.engines = engines
        self.seed = seed
        self.outbox = outbox or Outbox()
        self.on_ready = on_ready
        self.progress = progress
        self.max_message_bytes = max_message_bytes  # the broker's limit; larger updates go in chunks
        self.update_hook = update_hook  # (phase, tensors) -> tensors, e.g. local DP or simulated attacks
        self.stats = DeviceStats(device_id)
        self.assignment: wire.Assignment | None = None
        self.config: TrainConfig | None = None
        self.done = threading.Event()
        self.final_state: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._pending_global: Received | None = None
        self._receiver = ModuleReceiver()  # the module this device holds, rebuilt from deltas
        self._last_round = -1
        self._bytes_down_since_update = 0
        self._wake = threading.Event()
        self._hello = b""
        self._hello_at = 0.0
        self._last_send = time.monotonic()

    # --- network thread ----------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to this device's topics, resend unacknowledged updates and say hello."""
        self.transport.subscribe(wire.topic(self.fleet, "assign", self.device_id), self._on_assign)
        self.transport.subscribe(wire.topic(self.fleet, "ack", self.device_id), self._on_ack)
        for _, topic, payload in self.outbox.pending():
            self._send(topic, payload)
        hello = wire.Hello(
            device_id=self.device_id,
            profile=self.profile,
            num_samples=len(self.data),
            label_histogram=tuple(int(x) for x in self.data.label_histogram()),
            engines=self.engines,
        )
        # Retained, so a service that starts (or restarts) after this device still finds it.
        self._hello = wire.encode_hello(hello)
        self._hello_at = time.monotonic()
        self.transport.publish(wire.topic(self.fleet, "hello", self.device_id), self._hello, retain=True)

    def _count_down(self, payload: bytes) -> None:
        with self._lock:
            self.stats.bytes_down += len(payload)
            self._bytes_down_since_update += len(payload)

    def _on_assign(self, topic: str, payload: bytes) -> None:
        self._count_down(payload)
        try:
            assignment = wire.decode_assignment(payload)
            config = TrainConfig.from_dict(assignment.config)
        except FedPeftError as exc:
            log.error("device %s: bad assignment: %s", self.device_id, exc)
            return
        first = self.assignment is None or self.assignment.global_topic != assignment.global_topic
        self.assignment, self.config = assignment, config
        self.stats.config = assignment.config
        # ort and ort-plain train from a folder the server built (each of its own flavour: the
        # server picks it, the engine checks the manifest); torch needs none
        if artifact_flavour(config.engine) is not None and assignment.artifact is not None:
            self._prepare_artifacts(assignment.artifact)  # before the global: training needs them
        if first:
            self.transport.subscribe(assignment.global_topic, self._on_global)
            own = wire.topic(self.fleet, "global", self.device_id)  # the full module, when asked for
            if own != assignment.global_topic:
                self.transport.subscribe(own, self._on_global)

    def _prepare_artifacts(self, announced: dict[str, Any]) -> None:
        """Use the cached artifact folder, or start fetching its chunks (once per key)."""
        try:
            info = ArtifactInfo.from_dict(announced)
        except FedPeftError as exc:
            log.error("device %s: bad artifact in the assignment: %s", self.device_id, exc)
            return
        folder = cached_folder(self.artifacts_cache, info.key)
        if folder is not None:
            self.artifact_folder = folder
            return
        if self._fetch is not None and self._fetch.key == info.key:
            return  # already fetching (a repeated assignment)
        if self._fetch is not None:  # reassigned to another module mid-fetch
            self._fetch.close()
        self.artifact_folder = None
        self.artifacts_cache.mkdir(parents=True, exist_ok=True)
        self._fetch = ArtifactAssembler(
            info.key, expected=info, spool_dir=self.artifacts_cache, progress=self._fetch_progress
        )
        log.info(
            "device %s: fetching ORT artifacts %s (%.1f MB in %d chunks)",
            self.device_id,
            info.key,
            info.size / 1e6,
            info.chunks,
        )
        # retained: every chunk arrives now, or as soon as the service has published it
        self.transport.subscribe(wire.artifact_filter(self.fleet, info.key), self._on_artifact_chunk)

    def _fetch_progress(self, received: int, count: int) -> None:
        if received == count or received * 10 // count > (received - 1) * 10 // count:
            log.info(
                "device %s: artifacts %d%% (%d of %d chunks)",
                self.device_id,
                100 * received // count,
                received,
                count,
            )

    def _on_artifact_chunk(self, topic: str, payload: bytes) -> None:
        fetch = self._fetch
        if fetch is None or not payload:
            return  # fetched already (a redelivery), or a cleared retained chunk
        self._count_down(payload)
        try:
            key = wire.parse_artifact_topic(topic)[1]
            if key != fetch.key or not fetch.add(payload):
                return
        except UpdateRejected as exc:
            # a stale or forged chunk; a bad hash means a chunk was wrong: give up on this copy
            log.warning("device %s: artifact chunk on %s rejected: %s", self.device_id, topic, exc)
            if not fetch.all_in:
                return
            fetch.close()
            self._fetch = None
        else:
            try:
                self.artifact_folder = unpack(fetch.payload(), self.artifacts_cache, fetch.key)
                log.info("device %s: ORT artifacts ready in %s", self.device_id, self.artifact_folder)
            except (FedPeftError, OSError) as exc:
                log.error("device %s: cannot unpack artifacts %s: %s", self.device_id, fetch.key, exc)
            finally:
                fetch.close()
                self._fetch = None
        # the global module that waited for the artifacts can be trained now (or fail clearly)
        self._wake.set()
        if self.on_ready is not None and self._pending_global is not None:
            self.on_ready(self)

    def _default_engine(self, config: TrainConfig) -> TrainingEngine:
        key = json.dumps([config.to_dict(), str(self.artifact_folder)], sort_keys=True)
        if key not in self._engine_cache:
            self._engine_cache.clear()  # one engine at a time: a device has little memory
            self._engine_cache[key] = create_engine(
                config, seed=self.seed, artifacts=self.artifact_folder, device_cap_mb=self.mem_cap_mb
            )
        return self._engine_cache[key]

    def _on_global(self, topic: str, payload: bytes) -> None:
        self._count_down(payload)
        # applied here, in order of arrival: a delta needs the version before it, and a newer
        # message may arrive before the training thread takes this one
        with self._lock:
            try:
                received = self._receiver.receive(payload)
            except FedPeftError as exc:
                log.error("device %s: bad global module: %s", self.device_id, exc)
                return
            if received is not None:
                self._pending_global = received
            resync = self._receiver.needs_full
        if resync:
            log.info("device %s: cannot apply the global delta, asking for the full module", self.device_id)
            status = wire.Status(device_id=self.device_id, state=RESYNC_STATE, detail={})
            self.transport.publish(
                wire.topic(self.fleet, "status", self.device_id), wire.encode_status(status), qos=1
            )
            return
        self._wake.set()
        if self.on_ready is not None:
            self.on_ready(self)

    def _on_ack(self, topic: str, payload: bytes) -> None:
        try:
            ack = wire.decode_ack(payload)
        except UpdateRejected as exc:
            log.error("device %s: bad ack: %s", self.device_id, exc)
            return
        if self.outbox.ack(ack.round):
            if ack.accepted:
                self.stats.updates_accepted += 1
                self.stats.rounds_accepted.append(ack.round)
            else:
                self.stats.updates_rejected += 1
                log.warning("device %s: round %d rejected: %s", self.device_id, ack.round, ack.reason)

    # --- training thread ---------------------------------------------------------------------

    def run_pending(self) -> bool:
        """Train on the newest global module if one arrived; True if work was done."""
        with self._lock:
            if self._fetch is not None:
                return False  # the ORT artifacts are still on their way; the module waits for them
            received, self._pending_global = self._pending_global, None
        if received is None or self.config is None:
            return False
        module = received.module
        phase = str(module.meta.get("phase", "train"))
        if phase == DONE_PHASE:
            self.final_state = dict(module.tensors)
            self._keep(GLOBAL_MODULE, self.final_state, module.round)
            self.done.set()
            return True
        if module.round <= self._last_round:
            return False  # a redelivered or retained copy of a module already trained on
        try:
            self._train_and_send(module, received.module_id, phase)
        except FedPeftError as exc:
            self.stats.last_error = str(exc)
            self._last_round = module.round  # do not retry the same module forever
            log.error("device %s: round %d failed: %s", self.device_id, module.round, exc)
            # tell the service, so the round does not wait for this device until its deadline
            status = wire.Status(
                device_id=self.device_id,
                state="failed",
                detail={
                    "round": module.round,
                    "reason": f"{getattr(exc, 'code', type(exc).__name__)}: {exc}",
                },
            )
            self.transport.publish(
                wire.topic(self.fleet, "status", self.device_id), wire.encode_status(status), qos=1
            )
        return True

    def run(
        self,
        stop: threading.Event | None = None,
        poll_s: float = 0.5,
        rehello_s: float = 15.0,
        resend_s: float = 30.0,
    ) -> None:
        """Train every global module as it arrives until the server says done (or ``stop``)."""
        while not self.done.is_set() and not (stop is not None and stop.is_set()):
            self._wake.wait(poll_s)
            self._wake.clear()
            self.run_pending()
            self.rehello_if_unassigned(rehello_s)
            self.resend_unacknowledged(resend_s)

    def resend_unacknowledged(self, after_s: float) -> None:
        """Publish again what the service has not acknowledged after ``after_s`` (it may have crashed)."""
        if time.monotonic() - self._last_send < after_s:
            return
        pending = self.outbox.pending()
        if pending:
            self._last_send = time.monotonic()
            for _, topic, payload in pending:
                self._send(topic, payload)

    def rehello_if_unassigned(self, every_s: float) -> None:
        """Say hello again while no assignment came (the service may have been down)."""
        if self.assignment is None and self._hello and time.monotonic() - self._hello_at > every_s:
            self._hello_at = time.monotonic()
            self.transport.publish(wire.topic(self.fleet, "hello", self.device_id), self._hello, retain=True)

    def _send(self, topic: str, payload: bytes) -> int:
        parts = (
            [payload] if self.max_message_bytes is None else split_payload(payload, self.max_message_bytes)
        )
        for part in parts:
            self.transport.publish(topic, part, qos=1)
        return sum(len(p) for p in parts)

    def _compute(
        self, config: TrainConfig, module: wire.GlobalModule, phase: str, seed: int, guard: MemoryGuard
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Train (or gather statistics) under the memory guard; the update's tensors and metrics."""
        with guard:
            guard.check()  # already over the cap before training: fail now, not mid-step
            engine = self.engine_factory(config)
            if phase == STATS_PHASE:  # from the frozen base model: the module does not matter
                sums, counts = engine.class_feature_sums(self.data)
                guard.check()
                return {"stats.class_sums": sums, "stats.class_counts": counts}, {}
            engine.load_trainable_state(module.tensors)
            if phase == PERSONALIZE_PHASE:
                epochs = int(module.meta.get("epochs", config.local_epochs))
                metrics = self._personalize(engine, epochs, seed, guard, module.round)
                return {}, metrics
            result = train_logit_adjusted(
                engine,
                self.data,
                epochs=config.local_epochs,
                seed=seed,
                tau=config.logit_adjust,
                progress=guard.wrap(self.progress),
            )
            guard.check()
            trained = engine.trainable_state()
            metrics = {"loss": result.loss, "train_accuracy": result.accuracy, "steps": float(result.steps)}
            if module.meta.get("importance"):
                metrics |= self._layer_importance(engine, module.tensors, trained)
                guard.check()
        tensors = {k: trained[k] - np.asarray(module.tensors[k], dtype=np.float32) for k in trained}
        return tensors, metrics

    def _layer_importance(
        self, engine: TrainingEngine, start: dict[str, np.ndarray], trained: dict[str, np.ndarray]
    ) -> dict[str, float]:
        """How much each layer's update lowers the loss on held-out samples (layer-wise weighting).

        For each layer group g (see :func:`layer_group`): importance.g = max(0, L(trained with g
        reverted to the global module) - L(trained)). Without held-out samples nothing is sent and
        the service weighs this device by its samples alone.
        """
        if self.holdout is None or len(self.holdout) == 0:
            return {}
        val = self.holdout.subset(np.arange(min(len(self.holdout), IMPORTANCE_SAMPLES)))
        full = engine.evaluate(val).loss
        groups: dict[str, list[str]] = {}
        for name in trained:
            groups.setdefault(layer_group(name), []).append(name)
        out = {"importance.loss": float(full)}
        for group, names in sorted(groups.items()):
            reverted = dict(trained)
            for name in names:
                reverted[name] = np.asarray(start[name], dtype=np.float32)
            engine.load_trainable_state(reverted)
            out[f"importance.{group}"] = max(0.0, float(engine.evaluate(val).loss - full))
        engine.load_trainable_state(trained)
        return out

    def _personalize(
        self, engine: TrainingEngine, epochs: int, seed: int, guard: MemoryGuard, round_: int
    ) -> dict[str, float]:
        """Personalize the final global module on this device's data and keep it here (in memory,
        and in the device's module store when it has one).

        Two steps: the head's bias takes the log of this device's own label prior (Laplace
        smoothed: classes the device never sees become unlikely, as they are here), then the module
        is fine-tuned for ``epochs``. The global module, the prior-corrected one and the fine-tuned
        one are measured on the device's held-out samples; only the accuracies leave the device,
        never the personal module.
        """
        if self.holdout is None or len(self.holdout) == 0:
            log.warning("device %s: no held-out samples, personalization is not measured", self.device_id)
            return {"holdout": 0.0}
        before = engine.evaluate(self.holdout)
        guard.check()
        state = engine.trainable_state()
        if "head.bias" in state:
            state["head.bias"] = state["head.bias"] + label_prior_bias(self.data.label_histogram())
            engine.load_trainable_state(state)
        prior = engine.evaluate(self.holdout)
        result = engine.train(self.data, epochs=epochs, seed=seed, progress=guard.wrap(self.progress))
        guard.check()
        after = engine.evaluate(self.holdout)
        self.personal_state = engine.trainable_state()
        self._keep(PERSONAL_MODULE, self.personal_state, round_)
        self.personalization = {
            "holdout": float(len(self.holdout)),
            "global_own_accuracy": before.accuracy,
            "prior_accuracy": prior.accuracy,
            "personalized_accuracy": after.accuracy,
            "personal_epochs": float(epochs),
            "loss": result.loss,
        }
        return dict(self.personalization)

    def _keep(self, name: str, tensors: dict[str, np.ndarray], round_: int) -> None:
        """Write a module to this device's module store, if it has one; a failure is logged, not fatal."""
        if self.modules is None or self.config is None:
            return
        try:
            path = self.modules.save(name, tensors, self.config, device_id=self.device_id, round_=round_)
        except OSError as exc:
            self.stats.last_error = f"cannot keep the {name} module: {exc}"
            log.error("device %s: cannot keep the %s module: %s", self.device_id, name, exc)
        else:
            log.info("device %s: %s module kept in %s", self.device_id, name, path)

    def _train_and_send(self, module: wire.GlobalModule, base_id: str, phase: str) -> None:
        assert self.config is not None
        config = self.config
        seed = _job_seed(self.seed, self.device_id, module.round)
        start = time.perf_counter()
        bits = 32 if phase == STATS_PHASE else config.bits  # statistics must stay exact
        retries = 0
        while True:
            guard = MemoryGuard(_tighter(config.mem_cap_mb, self.mem_cap_mb))
            try:
                tensors, metrics = self._compute(config, module, phase, seed, guard)
                break
            except MemoryCapExceeded as exc:
                # only the text: the exception's traceback holds the failed step's activations
                reason = str(exc)
                exc.__traceback__ = None
                if config.batch_size == 1:
                    raise MemoryCapExceeded(f"{reason}, even with a batch of 1") from None
                smaller = max(1, config.batch_size // 2)
                log.warning("device %s: %s; retrying with batch %d", self.device_id, reason, smaller)
                config = replace(config, batch_size=smaller)
                retries += 1
        # the peak of the attempt that fitted; attempts the guard stopped are counted apart
        peak = guard.peak_mb
        if self.update_hook is not None:
            tensors = self.update_hook(phase, tensors)
        train_s = time.perf_counter() - start
        self.stats.train_s += train_s
        # the peak while this device trained (the process may have held more before, for others)
        self.stats.peak_rss_mb = max(self.stats.peak_rss_mb, peak)
        metrics["batch_size"] = float(config.batch_size)
        metrics["memory_retries"] = float(retries)
        with self._lock:
            bytes_down, self._bytes_down_since_update = self._bytes_down_since_update, 0
        metrics.update(
            train_s=train_s,
            peak_rss_mb=peak,
            bytes_down=float(bytes_down),
            updates_sent=float(self.stats.updates_sent + 1),
        )
        update = wire.UpdateMessage(
            device_id=self.device_id,
            round=module.round,
            base_id=base_id,
            num_samples=len(self.data),
            metrics=metrics,
            tensors=tensors,
            bits=bits,
        )
        payload = wire.encode_update(update, rng=np.random.default_rng(seed))
        topic = wire.topic(self.fleet, "update", self.device_id)
        self.outbox.put(module.round, topic, payload)
        sent = self._send(topic, payload)
        self._last_send = time.monotonic()
        self._last_round = module.round
        self.stats.updates_sent += 1
        self.stats.bytes_up += sent
        self.stats.rounds_trained.append(module.round)


def _tighter(a: float | None, b: float | None) -> float | None:
    """The smaller of two caps, either of which may be absent."""
    caps = [c for c in (a, b) if c is not None]
    return min(caps) if caps else None


def _job_seed(seed: int, device_id: str, round_: int) -> int:
    digest = hashlib.sha256(f"{seed}/{device_id}/{round_}".encode()).digest()
    return int.from_bytes(digest[:8], "little")
