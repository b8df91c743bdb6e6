"""The aggregation service: registers devices, assigns modules, validates, aggregates, publishes.

Messages arrive on the transport's network thread and are only queued there; one service thread
does every check, every write and every publish, so the state needs no further locking.

Rounds are synchronous: the service publishes round r's global module (retained), collects the
updates trained on it until every participant has answered or the deadline passes, aggregates
with a pure strategy function, evaluates, checkpoints and publishes round r+1. Round 0 is a
statistics round when the head starts from class means (FedNCM): devices send per-class feature
sums of the frozen model instead of trained deltas.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import queue
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from broker_server.aggregation import (
    ClientUpdate,
    clip_update,
    head_from_class_means,
    robust_head_from_statistics,
    server_momentum_step,
    sum_class_statistics,
)
from broker_server.allocation import Allocation, Allocator, NoFeasibleConfig, RewardTable, peft_key
from broker_server.async_ledger import AsyncLedger, AsyncSnapshot
from broker_server.asynchronous import Staleness, StaleUpdate, fedbuff_step, parse_staleness
from broker_server.clustering import (
    Clustering,
    cluster_clients,
    cluster_heads,
    clustered_step,
    join_states,
    nearest_cluster,
    parse_clusters,
    split_state,
)
from broker_server.distillation import fuse_kinds
from broker_server.evaluation import Evaluator
from broker_server.exact import exact_fedavg, ffa_fedavg
from broker_server.heterogeneous import coverage_mean, view
from broker_server.privacy import DPFedAvg, PoissonSampler, new_key
from broker_server.state import ASSIGNMENT_KEY, TRAIN_CONFIG_KEY, StateStore
from broker_server.strategies import ROBUST_STRATEGIES, STATEFUL_STRATEGIES, check_strategy, get_strategy
from edge_runtime import wire
from edge_runtime.artifact_transfer import DEFAULT_CHUNK_BYTES, ArtifactInfo, iter_chunks, pack_folder
from edge_runtime.chunking import ChunkAssembler, is_chunk
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset
from edge_runtime.downlink import RESYNC_STATE, DownlinkEncoder
from edge_runtime.engines import artifact_flavour
from edge_runtime.engines.base import EvalResult
from edge_runtime.errors import (
    ConfigError,
    DuplicateUpdate,
    FedPeftError,
    NormTooLarge,
    ShapeMismatch,
    StaleRound,
    UnknownDevice,
    UpdateRejected,
)
from edge_runtime.peft_specs import LoraSpec
from edge_runtime.transport import Transport
from hw_profiles import DeviceProfile, ProfileError

log = logging.getLogger("fedpeft.server")

STATS_PHASE = "stats"
TRAIN_PHASE = "train"
PERSONALIZE_PHASE = "personalize"
DONE_PHASE = "done"


@dataclass(frozen=True)
class ServiceConfig:
    """How the aggregation service runs one federation."""

    fleet: str
    rounds: int
    train: TrainConfig
    min_clients: int = 1
    expected_clients: int | None = field(
        default=None, metadata={"help": "start round 0 once this many devices said hello"}
    )
    strategy: str = "fedit"
    head_init: str = field(default="ncm", metadata={"help": "ncm (class means) or random"})
    head_scale: float = field(
        default=16.0, metadata={"help": "norm of the class-mean head's rows (the cosine logit scale)"}
    )
    round_timeout_s: float = 900.0
    hello_timeout_s: float = 300.0
    max_round_retries: int = 3
    max_payload_bytes: int = wire.DEFAULT_MAX_PAYLOAD
    norm_bound: float = field(default=1e3, metadata={"help": "reject deltas with a larger L2 norm"})
    clip_norm: float | None = field(
        default=None, metadata={"help": "scale accepted deltas down to this L2 norm"}
    )
    dp_noise_multiplier: float | None = field(
        default=None, metadata={"help": "DP-FedAvg noise multiplier z (needs clip_norm); None = no DP"}
    )
    dp_delta: float = 1e-5
    dp_sample_rate: float = field(
        default=1.0,
        metadata={
            "help": "DP: each round samples every device independently with this probability q; the "
            "mean's denominator is q times the fleet size (expected_clients, else min_clients)"
        },
    )
    down_bits: int = 32
    delta_downlink: bool = field(
        default=True,
        metadata={
            "help": "send each global module as a delta against the one devices hold, at the uplink's "
            "bits (one synchronous module: no allocation, clusters or async)"
        },
    )
    personalize_epochs: int = field(
        default=0,
        metadata={"help": "after the last round, devices fine-tune the global module this many epochs"},
    )
    clusters: str = field(
        default="off",
        metadata={"help": "off, auto or K: one global module per group of devices with similar labels"},
    )
    cluster_share: float = field(
        default=0.5,
        metadata={"help": "a tensor is shared across clusters when their updates have at least this cosine"},
    )
    distill_epochs: int = field(
        default=0,
        metadata={"help": "mixed kinds: distill each kind toward the others on unlabeled text (0 = off)"},
    )
    distill_alpha: float = field(
        default=0.5, metadata={"help": "weight a of the pseudo-label term (1 - a for the KL term)"}
    )
    mode: str = field(default="sync", metadata={"help": "sync rounds, or async (FedBuff) aggregation"})
    buffer_size: int = field(default=4, metadata={"help": "async: updates per aggregation (K)"})
    staleness: str = field(default="poly:0.5", metadata={"help": "async: constant, poly:A or hinge:A:B"})
    max_staleness: int = field(default=8, metadata={"help": "async: drop updates staler than this"})
    server_lr: float = field(
        default=1.0, metadata={"help": "the server's step size eta (sync: on the rule's step, FedAvgM)"}
    )
    server_momentum: float = field(
        default=0.0, metadata={"help": "sync: the server's momentum beta (FedAvgM); 0 = none"}
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.fleet or any(c in self.fleet for c in "/+#"):
            raise ConfigError(f"ServiceConfig.fleet must be a plain name, got {self.fleet!r}")
        if self.rounds < 1:
            raise ConfigError(f"ServiceConfig.rounds must be at least 1, got {self.rounds}")
        if self.min_clients < 1:
            raise ConfigError(f"ServiceConfig.min_clients must be at least 1, got {self.min_clients}")
        if self.expected_clients is not None and self.expected_clients < self.min_clients:
            raise ConfigError("ServiceConfig.expected_clients must be at least min_clients")
        if self.head_init not in ("ncm", "random"):
            raise ConfigError(f"ServiceConfig.head_init must be ncm or random, got {self.head_init!r}")
        if not (math.isfinite(self.head_scale) and self.head_scale > 0):
            raise ConfigError(f"ServiceConfig.head_scale must be a positive number, got {self.head_scale!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"ServiceConfig.clip_norm must be positive, got {self.clip_norm}")
        if self.dp_noise_multiplier is not None:
            if self.dp_noise_multiplier < 0 or self.clip_norm is None:
                raise ConfigError("DP needs --clip-norm and a non-negative noise multiplier")
            if self.strategy not in ("fedit", "fedavg"):
                raise ConfigError(f"DP is defined for fedit/fedavg, not {self.strategy!r}")
            if not 0 < self.dp_delta < 1:
                raise ConfigError(f"ServiceConfig.dp_delta must be in (0, 1), got {self.dp_delta}")
            if not 0 < self.dp_sample_rate <= 1:
                raise ConfigError(
                    f"ServiceConfig.dp_sample_rate must be in (0, 1], got {self.dp_sample_rate}"
                )
        if self.personalize_epochs < 0:
            raise ConfigError(f"--personalize-epochs must be 0 or more, got {self.personalize_epochs}")
        if parse_clusters(self.clusters) != 0:
            if self.strategy in STATEFUL_STRATEGIES or self.dp_noise_multiplier is not None:
                raise ConfigError(
                    "--clusters works with the stateless rules (fedit, hetlora, layerwise, median, "
                    f"trimmed_mean) without DP, not {self.strategy!r}"
                    + (" with DP" if self.dp_noise_multiplier is not None else "")
                )
            if not -1.0 <= self.cluster_share <= 1.0:
                raise ConfigError(f"--cluster-share is a cosine in [-1, 1], got {self.cluster_share}")
        if self.distill_epochs < 0 or not 0 <= self.distill_alpha <= 1:
            raise ConfigError("--distill-epochs must be 0 or more and --distill-alpha in [0, 1]")
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"--mode must be sync or async, got {self.mode!r}")
        if self.mode == "async":
            parse_staleness(self.staleness)
            if self.buffer_size < 1 or self.max_staleness < 0 or not self.server_lr > 0:
                raise ConfigError("async needs --buffer-size >= 1, --max-staleness >= 0 and --server-lr > 0")
            if self.strategy not in ("fedit", "fedavg") or self.dp_noise_multiplier is not None:
                raise ConfigError("--mode async aggregates with its own rule (FedBuff): no --strategy, no DP")
            if parse_clusters(self.clusters) != 0 or self.personalize_epochs > 0 or self.distill_epochs > 0:
                raise ConfigError(
                    "--mode async works without --clusters, personalization or distillation for now"
                )
        if not self.server_lr > 0 or not 0 <= self.server_momentum < 1:
            raise ConfigError(
                f"--server-lr must be positive and --server-momentum in [0, 1); got {self.server_lr}, "
                f"{self.server_momentum}"
            )
        if self.server_momentum > 0 and (self.mode != "sync" or self.dp_noise_multiplier is not None):
            raise ConfigError("--server-momentum applies to synchronous rounds without DP")
        if self.dp_noise_multiplier is not None and self.server_lr != 1.0:
            raise ConfigError("DP-FedAvg publishes its noisy mean as is: no --server-lr with DP")
        if self.down_bits not in (32, 16):
            raise ConfigError("ServiceConfig.down_bits must be 32 or 16")
        check_strategy(self.strategy)
        if self.strategy == "exact" and not isinstance(self.train.peft, LoraSpec):
            raise ConfigError(
                f"--strategy exact averages LoRA products; the module is {self.train.peft.kind}"
            )
        if self.strategy == "ffa" and not (
            isinstance(self.train.peft, LoraSpec) and not self.train.peft.train_a
        ):
            raise ConfigError(
                "--strategy ffa (FFA-LoRA) needs a LoRA module with frozen A factors (train_a=False); "
                f"the module is {self.train.peft.to_dict()}"
            )

    def dp_mechanism(self) -> DPFedAvg | None:
        """DP-FedAvg as configured (None without DP); N is the fleet size fixed before any hello."""
        if self.dp_noise_multiplier is None:
            return None
        assert self.clip_norm is not None
        return DPFedAvg(
            clip_norm=self.clip_norm,
            noise_multiplier=self.dp_noise_multiplier,
            sample_rate=self.dp_sample_rate,
            fleet_size=self.expected_clients or self.min_clients,
        )


@dataclass
class DeviceRecord:
    """What the service knows of one device."""

    device_id: str
    hello: wire.Hello
    config: TrainConfig
    allocation: Allocation | None = None
    # the allocation's utility terms for the report; kept with the assignment across restarts
    allocation_terms: dict[str, float] | None = None
    excluded: str = ""  # why the allocator left this device out, if it did
    updates_received: int = 0
    updates_accepted: int = 0
    bytes_up: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    train_s: float = 0.0
    samples: int = 0
    online: bool = True

    def counters(self) -> dict[str, Any]:
        """What the report counts for this device, as the state store keeps it."""
        return {
            "updates_received": self.updates_received,
            "bytes_up": self.bytes_up,
            "last_metrics": dict(self.last_metrics),
            "train_s": self.train_s,
            "samples": self.samples,
        }

    def restore_counters(self, counters: dict[str, Any]) -> None:
        """Take back the counters a service counted before a restart (see :meth:`counters`)."""
        self.updates_received = int(counters.get("updates_received", 0))
        self.bytes_up = int(counters.get("bytes_up", 0))
        self.last_metrics = {str(k): float(v) for k, v in dict(counters.get("last_metrics", {})).items()}
        self.train_s = float(counters.get("train_s", 0.0))
        self.samples = int(counters.get("samples", 0))


@dataclass
class PendingUpdate:
    """An accepted update waiting for its round's aggregation."""

    update: wire.UpdateMessage
    content_id: str
    nbytes: int


@dataclass
class Group:
    """Devices that train the same configuration share one global topic and one module view."""

    config: TrainConfig
    config_id: str
    topic: str
    shapes: dict[str, tuple[int, ...]]
    global_id: str = ""


RoundCallback = Callable[[dict[str, Any]], None]


class EventClock(Protocol):
    """A simulated clock for asynchronous runs: when devices can start and when their work lands."""

    def start(self, device: str, t: float) -> float:
        """The first time at or after ``t`` at which ``device`` can start a job (it may be offline)."""
        ...

    def finish(self, device: str, start: float, train_s: float, bytes_up: int, bytes_down: int) -> float:
        """When a job started at ``start`` has arrived at the service, given what it measured."""
        ...


@dataclass
class Job:
    """One asynchronous assignment of the current global version to one device."""

    device: str
    version: int
    start: float
    content_id: str
    nbytes: int
    answered: bool = False  # not waited for any more: its update came, it failed, or it was replaced
    updated: bool = False  # its update was accepted (a replaced job still takes one)


def config_id(config: TrainConfig) -> str:
    """A short content address of a training configuration, used in the global topic."""
    blob = json.dumps(config.to_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


class AggregationService:
    """Runs the rounds of one fleet over a transport; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        config: ServiceConfig,
        evaluator: Evaluator,
        *,
        store: StateStore | None = None,
        on_round: RoundCallback | None = None,
        on_accept: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        allocator: Allocator | None = None,
        serve_artifacts: bool = True,
        artifacts_cache: Path | None = None,
        artifact_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        unlabeled: TextDataset | None = None,
        event_clock: EventClock | None = None,
    ) -> None:
        if config.mode == "async" and allocator is not None:
            raise ConfigError(
                "--mode async with a mixed fleet (--allocation utility/uniform, --profiles) is not "
                "supported yet: every device trains the one configured module"
            )
        # asynchronous mode: versions, jobs and the buffer in the store (None without one)
        self._ledger = AsyncLedger(store) if store is not None and config.mode == "async" else None
        self.event_clock = event_clock
        self._async_start = 0.0
        self._async_now = 0.0  # the asynchronous clock: the last arrival taken
        self._jobs: dict[int, Job] = {}
        self._job_seq = 0
        self._async_active = False
        # (arrival time, device, job id, update) of accepted updates not yet taken into the buffer
        self._arrivals: list[tuple[float, str, int, PendingUpdate]] = []
        self._buffer: list[tuple[int, StaleUpdate]] = []  # (job id, update), in order of arrival
        # accepted updates no version took in before the run ended (asynchronous mode)
        self.unaggregated: list[dict[str, Any]] = []
        if config.distill_epochs > 0 and (allocator is None or unlabeled is None or len(unlabeled) == 0):
            raise ConfigError(
                "distillation fuses the modules of different PEFT kinds: it needs a mixed fleet "
                "(allocation) and unlabeled server-side text"
            )
        self.unlabeled = unlabeled
        self.distilled: dict[str, dict[str, float]] = {}  # the last round's agreement, by kind
        self.transport = transport
        self.config = config
        self.evaluator = evaluator
        self.store = store
        self.on_round = on_round
        self.on_accept = on_accept
        self.clock = clock
        self.allocator = allocator
        if allocator is not None and (
            config.strategy not in ("fedit", "hetlora") or config.dp_noise_multiplier is not None
        ):
            raise ConfigError(
                "a mixed fleet (allocation) aggregates with fedit or hetlora, without DP, for now"
            )
        self.groups: dict[str, Group] = {}
        if allocator is not None and config.strategy in STATEFUL_STRATEGIES:
            raise ConfigError(
                f"--strategy {config.strategy} with a mixed fleet (allocation) is not supported yet"
            )
        self.strategy = get_strategy("fedit" if config.strategy in STATEFUL_STRATEGIES else config.strategy)
        self.clustered = config.clusters != "off"
        if allocator is not None and self.clustered:
            raise ConfigError("--clusters with a mixed fleet (allocation) is not supported yet")
        self.clustering: Clustering | None = None  # formed once the expected devices said hello
        self._base_shapes: dict[str, tuple[int, ...]] = {}  # one cluster's module
        self._shared: list[str] = []  # tensors the clusters shared in the last round
        self._by_cluster: dict[str, float] = {}
        self._residual: dict[str, np.ndarray] | None = None  # --strategy exact: the fed-back part
        self.devices: dict[str, DeviceRecord] = {}
        self.rejected: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self.final_eval: dict[str, float] = {}
        # device -> what its personalization phase measured on its own held-out samples
        self.personalization: dict[str, dict[str, float]] = {}
        self.bytes_up_total = 0
        self.bytes_down_reported = 0
        self.config_id = config_id(config.train)
        self.global_topic = wire.topic(config.fleet, "global", self.config_id)
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._state: dict[str, np.ndarray] = {}
        self._round = 0
        self._phase = TRAIN_PHASE
        self._global_id = ""
        self._pending: dict[str, PendingUpdate] = {}
        self._stale = 0
        self._round_bytes_up = 0
        self._round_bytes_down = 0
        # what a restarted service takes back from the store: each device's counters (applied when
        # its record is made) and the interrupted round's (stale updates, bytes up)
        self._stored_device_counters: dict[str, dict[str, Any]] = {}
        self._resumed_round_counters = (0, 0)
        self._stopped = False
        self._started = False
        self._resumed_payload = b""
        self._resumed_shared: bytes | None = None
        self._prepared: tuple[int, str, bytes] | None = None
        self._server_m: dict[str, np.ndarray] = {}  # FedAvgM's momentum (sync rounds)
        self.resyncs: list[dict[str, Any]] = []  # devices that asked for the whole module
        self._resync_waiting: set[str] = set()
        # the downlink's encoder, where deltas apply (one module shared by every device, sync)
        self._downlink: DownlinkEncoder | None = (
            DownlinkEncoder(config.train.bits, full_bits=16)
            if config.delta_downlink
            and config.mode == "sync"
            and allocator is None
            and parse_clusters(config.clusters) == 0
            else None
        )
        # DP-FedAvg (broker_server.privacy): the mechanism, its sampler (keyed once the store is
        # open), the releases made so far and this round's sample
        self._dp = config.dp_mechanism()
        self._sampler: PoissonSampler | None = None
        self._dp_rounds = 0
        self._sampled: set[str] = set()
        self._answered: set[str] = set()
        # (device, round) -> content id of every accepted update, to re-acknowledge redeliveries
        self._accepted_ids: dict[tuple[str, int], str] = {}
        self._chunks = ChunkAssembler(max_bytes=config.max_payload_bytes)
        # ORT training artifacts: whether devices fetch them from here (the simulator hands its
        # workers a local folder instead), where they are built, and what this process published
        self.serve_artifacts = serve_artifacts
        self.artifacts_cache = artifacts_cache  # None: broker_server.artifacts.default_cache_dir()
        self.artifact_chunk_bytes = artifact_chunk_bytes
        self.artifacts_published: dict[str, ArtifactInfo] = {}  # by artifact key
        self._artifact_of: dict[str, str] = {}  # config id -> artifact key

    # --- inbound -----------------------------------------------------------------------------

    def privacy_spent(self) -> float | None:
        """Epsilon spent so far at ``dp_delta`` (None without DP): one sampled Gaussian mechanism at
        rate q per release made, round 0's class statistics included."""
        if self._dp is None:
            return None
        return self._dp.epsilon(self._dp_rounds, self.config.dp_delta)

    def privacy_report(self) -> dict[str, Any] | None:
        """What the DP guarantee is and covers, for the report (None without DP)."""
        if self._dp is None:
            return None
        return {
            "epsilon": self.privacy_spent(),
            "delta": self.config.dp_delta,
            "noise_multiplier": self._dp.noise_multiplier,
            "sample_rate": self._dp.sample_rate,
            "clip_norm": self._dp.clip_norm,
            "fleet_size": self._dp.fleet_size,
            "denominator": self._dp.denominator,
            "releases": self._dp_rounds,
            "accountant": "dp-accounting RDP, Poisson-sampled Gaussian, composed once per release",
            "unit": "user: one device with all its data (add/remove)",
            "covers": "the global modules published each round, the class-mean head of round 0 "
            "included, and what is computed from them alone; not the report's per-device records",
        }

    def _dp_key(self) -> bytes:
        """The secret key of the sampling and noise draws, kept in the store across restarts."""
        if self.store is None:
            return new_key()
        stored = self.store.get_meta("dp_key")
        if stored is None:
            key = new_key()
            self.store.set_meta("dp_key", key.hex())
            return key
        return bytes.fromhex(str(stored))

    def final_state(self) -> dict[str, np.ndarray]:
        """The current global module (the final one once :meth:`run` has returned); with clusters,
        every cluster's module under ``cluster{k}/`` names (see :meth:`cluster_states`)."""
        return dict(self._state)

    def cluster_states(self) -> dict[int, dict[str, np.ndarray]]:
        """Every cluster's current module (one entry, cluster 0, without clusters)."""
        if self.clustering is None:
            return {0: dict(self._state)}
        return split_state(self._state, self.clustering.k)

    def start(self) -> None:
        """Subscribe to the fleet's hello, update and status topics (once)."""
        if self._started:
            return
        self._started = True
        fleet = self.config.fleet
        for kind in ("hello", "update", "status"):
            self.transport.subscribe(f"fl/{fleet}/{kind}/+", self._enqueue, qos=1)

    def _enqueue(self, topic: str, payload: bytes) -> None:
        # Runs on the network thread: only queue, never decode or write here.
        self._inbox.put((topic, payload))

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current step."""
        self._stopped = True
        self._inbox.put(("", b""))

    def _reject(self, exc: UpdateRejected, device: str | None, round_: int | None) -> None:
        reason = f"{exc.code}: {exc.reason}"
        if device is not None and round_ is not None and device in self.devices:
            if round_ == self._round:
                self._answered.add(device)  # a rejected update still ends that device's turn
            if not isinstance(exc, DuplicateUpdate):  # a duplicate was acknowledged as accepted
                # tell the device, so it stops resending what will never be accepted
                self._ack(device, round_, "", False, reason)
        log.warning("rejected update from %s (round %s): %s", device, round_, reason)
        self._record_rejection(device, round_, reason)

    def _record_rejection(self, client: str | None, round_: object, reason: str) -> None:
        """Add a rejection to the report and, with a state store, durably with the counters it
        changed, so that the report written after a crash still holds it."""
        # the report's round is an integer or null; a device's status may carry anything there
        reported = round_ if isinstance(round_, int) and not isinstance(round_, bool) else None
        self.rejected.append({"client": client, "round": reported, "reason": reason})
        if self.store is not None:
            record = None if client is None else self.devices.get(client)
            self.store.add_rejection(
                client,
                reported,
                reason,
                time.time(),
                counters=self._counters(),
                device_counters=None if record is None else record.counters(),
            )

    def _counters(self) -> dict[str, Any]:
        """The service's counters for the state store: bytes up, all and in the current round."""
        return {
            "bytes_up_total": self.bytes_up_total,
            "round": self._round,
            "round_bytes_up": self._round_bytes_up,
            "round_stale": self._stale,
        }

    def _pump(self, until: float) -> bool:
        """Handle queued messages until ``until``; True if a message was handled."""
        timeout = max(0.0, until - self.clock())
        try:
            topic, payload = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return False
        if not topic:
            return False
        try:
            _, kind, device = wire.parse_topic(topic)
        except UpdateRejected as exc:
            self._reject(exc, None, None)
            return True
        try:
            if kind == "hello":
                self._on_hello(device, payload)
            elif kind == "update":
                self._on_update(device, payload)
            elif kind == "status":
                self._on_status(device, payload)
        except UpdateRejected as exc:
            self._reject(exc, device, exc.round)
        except FedPeftError as exc:  # a bad config in a hello, say: log and go on
            self._reject(UpdateRejected(str(exc)), device, None)
        return True

    def _on_hello(self, device: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained hello
        hello = wire.decode_hello(payload, max_bytes=self.config.max_payload_bytes)
        if hello.device_id != device:
            raise UnknownDevice(f"hello for {hello.device_id!r} published under {device!r}")
        record = self.devices.get(device)
        returning = record is not None and not record.online
        if record is None:
            record = self._register(device, hello)
            log.info("device %s registered (%d samples)", device, hello.num_samples)
        else:
            record.hello = hello
            record.online = True
        if self.store is not None:
            self.store.save_device(device, payload, time.time())
        if not record.excluded:
            self._assign(record)
            if self._async_active:  # back (or new): the newest version, unless it is busy
                self._offer(device, returning=returning)

    def _register(self, device: str, hello: wire.Hello) -> DeviceRecord:
        """A new record for ``device``, configured, with what was counted for it before a restart."""
        record = DeviceRecord(device_id=device, hello=hello, config=self.config.train)
        self._configure(record)
        stored = self._stored_device_counters.pop(device, None)
        if stored is not None:
            record.restore_counters(stored)
        self.devices[device] = record
        return record

    def _servable(self, record: DeviceRecord) -> tuple[str, ...]:
        """The device's engines that this service can serve, in the device's order.

        ``ort`` trains from onnxruntime-training artifacts, which this service builds only where
        onnxruntime-training is installed (Linux x86_64, CPython <= 3.11); without it the device
        gets its next engine, or is left out naming the package if ``ort`` was its only one.
        """
        engines = tuple(record.hello.engines)
        if "ort" not in engines or not self.serve_artifacts:
            return engines
        from edge_runtime.engines.ort_engine import ORT_TRAINING_INSTALL, ort_available

        if ort_available():
            return engines
        rest = tuple(e for e in engines if e != "ort")
        if not rest:
            raise NoFeasibleConfig(
                f"device {record.device_id} offers only engine ort, whose training artifacts this "
                f"service builds with {ORT_TRAINING_INSTALL}, not installed here"
            )
        log.info("device %s offers ort; without onnxruntime-training here it gets %s", record.device_id, rest)
        return rest

    def _configure(self, record: DeviceRecord) -> None:
        """Choose the device's configuration: the allocator's pick for its profile, or the fleet's."""
        if self.allocator is None:
            return
        stored = None if self.store is None else self.store.get_meta(ASSIGNMENT_KEY + record.device_id)
        if stored is not None:  # assigned before a restart: keep it, its updates depend on it
            record.config = TrainConfig.from_dict(stored["config"])
            record.excluded = str(stored.get("excluded", ""))
            record.allocation_terms = stored.get("terms")
            return
        try:
            profile = DeviceProfile.from_dict(dict(record.hello.profile))
            record.config, record.allocation = self.allocator.assign(
                self.config.train, profile, record.hello.num_samples, engines=self._servable(record)
            )
        except (NoFeasibleConfig, ProfileError) as exc:
            record.excluded = str(exc)
            log.warning("device %s left out: %s", record.device_id, exc)
        else:
            record.allocation_terms = None if record.allocation is None else record.allocation.terms()
            log.info(
                "device %s assigned %s on %s, batch %d, %d bits (U=%.3f)",
                record.device_id,
                peft_key(record.config.peft),
                record.config.engine,
                record.config.batch_size,
                record.config.bits,
                record.allocation.utility if record.allocation else float("nan"),
            )
        if self.store is not None:
            self.store.set_meta(
                ASSIGNMENT_KEY + record.device_id,
                {
                    "config": record.config.to_dict(),
                    "excluded": record.excluded,
                    "terms": record.allocation_terms,
                },
            )

    def _group(self, config: TrainConfig) -> Group:
        cid = config_id(config)
        group = self.groups.get(cid)
        if group is None:
            shapes = self._shapes_for(config)
            group = Group(config, cid, wire.topic(self.config.fleet, "global", cid), shapes)
            self.groups[cid] = group
            if self.allocator is not None and self._global_id:  # a newcomer joins the current round
                payload = self._encode_global(self._phase, cid, view(self._state, shapes))
                group.global_id = wire.content_id(payload)
                self.transport.publish(group.topic, payload, qos=1, retain=True)
        return group

    def module_params(self, config: TrainConfig) -> int:
        """Trainable parameters of ``config``'s module (its view of the global state)."""
        if not self._state:
            return 0
        return int(sum(int(np.prod(shape)) for shape in self._shapes_for(config).values()))

    def _shapes_for(self, config: TrainConfig) -> dict[str, tuple[int, ...]]:
        if self.clustered and self._base_shapes:
            return dict(self._base_shapes)
        group = self.groups.get(config_id(config))
        if group is not None:
            return group.shapes
        if self.allocator is None:
            return {k: tuple(v.shape) for k, v in self._state.items()}
        return self.evaluator.shapes(config)

    # --- clusters ----------------------------------------------------------------------------

    def cluster_of(self, device: str) -> int | None:
        """The device's cluster; a device that joins after clustering goes to the nearest one."""
        if self.clustering is None:
            return None
        cluster = self.clustering.members.get(device)
        record = self.devices.get(device)
        if cluster is None and record is not None:
            cluster = nearest_cluster(self._histogram(record), self.clustering.centroids)
            self.clustering.members[device] = cluster
            self._save_clustering()
            log.info("device %s joins cluster %d", device, cluster)
        return cluster

    def _histogram(self, record: DeviceRecord) -> np.ndarray:
        classes = int(self._base_shapes["head.weight"][0])
        hist = np.zeros(classes)
        given = np.asarray(record.hello.label_histogram[:classes], dtype=np.float64)
        hist[: len(given)] = given
        return hist

    def _form_clusters(self) -> None:
        """Group the devices that said hello by their label histograms; one module per cluster."""
        self._base_shapes = {n: tuple(v.shape) for n, v in self._state.items()}
        able = {d: self._histogram(r) for d, r in self.devices.items() if not r.excluded}
        self.clustering = cluster_clients(able, parse_clusters(self.config.clusters), seed=self.config.seed)
        self._state = join_states({c: dict(self._state) for c in range(self.clustering.k)})
        self._save_clustering()
        log.info(
            "%d clusters of %s devices (silhouette %.2f)",
            self.clustering.k,
            self.clustering.sizes(),
            self.clustering.silhouette,
        )
        for record in self.devices.values():
            if not record.excluded:
                self._assign(record)

    def _save_clustering(self) -> None:
        if self.store is None or self.clustering is None:
            return
        self.store.set_meta(
            "clusters",
            {
                "members": self.clustering.members,
                "centroids": self.clustering.centroids.tolist(),
                "silhouette": self.clustering.silhouette,
            },
        )

    def _group_of(self, record: DeviceRecord) -> Group:
        """The group whose global module this device trains: its configuration's, its cluster's, or
        (asynchronous mode) its own job topic's."""
        if self.config.mode == "async":
            key = f"{self.config_id}-{record.device_id}"
            group = self.groups.get(key)
            if group is None:
                shapes = {k: tuple(v.shape) for k, v in self._state.items()}
                group = Group(self.config.train, key, wire.topic(self.config.fleet, "global", key), shapes)
                self.groups[key] = group
            return group
        if not self.clustered:
            return self._group(record.config)
        cluster = self.cluster_of(record.device_id)
        if cluster is None:
            raise UnknownDevice(f"{record.device_id!r} has no cluster yet")
        return self._cluster_group(cluster)

    def _cluster_group(self, cluster: int) -> Group:
        key = f"{self.config_id}-k{cluster}"
        group = self.groups.get(key)
        if group is None:
            topic = wire.topic(self.config.fleet, "global", key)
            group = Group(self.config.train, key, topic, dict(self._base_shapes))
            self.groups[key] = group
        return group

    def cluster_summary(self) -> dict[str, Any] | None:
        """Clusters for the report: how many, their sizes and the silhouette (None when off)."""
        if self.clustering is None:
            return None
        return {
            "k": self.clustering.k,
            "sizes": self.clustering.sizes(),
            "silhouette": self.clustering.silhouette,
            "share_cosine": self.config.cluster_share,
        }

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
                self.transport.publish(
                    wire.artifact_topic(self.config.fleet, key, index), chunk, qos=1, retain=True
                )
        self.artifacts_published[key] = info
        return info

    def _assign(self, record: DeviceRecord) -> None:
        if self.clustered and self.cluster_of(record.device_id) is None:
            return  # assigned once the clusters are formed: the assignment names its cluster's topic
        artifact = None
        if self.serve_artifacts and artifact_flavour(record.config.engine) is not None:
            try:
                artifact = self.artifact_for(record.config)
            except (FedPeftError, ImportError, OSError) as exc:
                # no artifacts, no training: leave the device out with the reason, keep serving
                record.excluded = f"cannot serve ORT artifacts: {exc}"
                log.error("device %s left out: %s", record.device_id, record.excluded)
                return
        msg = wire.Assignment(
            device_id=record.device_id,
            round=self._round,
            config=record.config.to_dict(),
            global_topic=self._group_of(record).topic,
            artifact=None if artifact is None else artifact.to_dict(),
        )
        self.transport.publish(
            wire.topic(self.config.fleet, "assign", record.device_id), wire.encode_assignment(msg), qos=1
        )

    def _on_status(self, device: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained status
        status = wire.decode_status(payload, max_bytes=self.config.max_payload_bytes)
        log.info("device %s is %s", device, status.state)
        record = self.devices.get(device)
        if record is not None:
            record.online = status.state != "offline"
        if record is not None and status.state == RESYNC_STATE:
            self._send_full(device)
        if record is not None and status.state == "failed":
            # the device could not train this round (over its memory cap, say): end its turn
            round_ = status.detail.get("round")
            reason = f"device_failed: {status.detail.get('reason', 'no reason given')}"
            if round_ == self._round:
                self._answered.add(device)
            job = self._jobs.get(round_) if isinstance(round_, int) else None
            if job is not None and job.device == device and isinstance(round_, int):
                job.answered = True  # asynchronous mode: do not wait for it, do not give it more
                record.excluded = f"failed job {round_}: {reason}"
                if self._ledger is not None:
                    self._ledger.close_job(round_)
            log.warning("device %s failed round %s: %s", device, round_, reason)
            self._record_rejection(device, round_, reason)

    def _on_update(self, device: str, payload: bytes) -> None:
        self.bytes_up_total += len(payload)
        self._round_bytes_up += len(payload)
        record = self.devices.get(device)
        if record is not None:
            record.bytes_up += len(payload)
        if is_chunk(payload):
            if record is None:
                raise UnknownDevice(f"{device!r} never said hello")
            whole = self._chunks.add(device, payload)
            if whole is None:
                return
            payload = whole
        update = wire.decode_update(payload, max_bytes=self.config.max_payload_bytes)
        if update.device_id != device:
            raise UnknownDevice(
                f"update for {update.device_id!r} published under {device!r}", round=update.round
            )
        if record is None:
            raise UnknownDevice(f"{device!r} never said hello", round=update.round)
        record.updates_received += 1
        cid = wire.content_id(payload)
        if self._accepted_ids.get((device, update.round)) == cid:
            # accepted before (perhaps before a crash that ate the ack): acknowledge it again
            self._ack(device, update.round, cid, True, "duplicate of an accepted update")
            raise DuplicateUpdate("redelivery of an accepted update, counted once", round=update.round)
        if self._async_active:
            self._on_async_update(record, update, payload, cid)
            return
        if self._sampler is not None and not self._sampler.includes(update.round, device):
            # DP-FedAvg uses sampled devices' updates only; every device trains (see README), so
            # this is expected, not a fault: it ends the device's turn, late or not
            if update.round == self._round:
                self._answered.add(device)
            self._ack(
                device, update.round, "", False, "not_sampled: DP-FedAvg did not sample it in that round"
            )
            return
        base_id = self._group_of(record).global_id
        if update.round < self._round or (update.round == self._round and update.base_id != base_id):
            self._stale += 1
            raise StaleRound(f"trained on round {update.round}, current is {self._round}", round=update.round)
        if update.round > self._round:
            raise StaleRound(
                f"round {update.round} is ahead of the current {self._round}", round=update.round
            )
        previous = self._pending.get(device)
        self._check_tensors(update)
        if previous is not None:
            raise UpdateRejected("a second, different update for the round", round=update.round)
        if update.num_samples > record.hello.num_samples:
            raise UpdateRejected(
                f"claims {update.num_samples} samples, hello said {record.hello.num_samples}",
                round=update.round,
            )
        self._pending[device] = PendingUpdate(update, cid, len(payload))
        self._accepted_ids[(device, update.round)] = cid
        record.updates_accepted += 1
        record.last_metrics = dict(update.metrics)
        record.train_s += float(update.metrics.get("train_s", 0.0))
        record.samples = update.num_samples
        self._round_bytes_down += int(update.metrics.get("bytes_down", 0))
        if self.store is not None:  # before the ack: what is acknowledged survives a crash
            self.store.add_update(
                update.round,
                device,
                cid,
                payload,
                counters=self._counters(),
                device_counters=record.counters(),
            )
        self._ack(device, update.round, cid, True, "")
        if self.on_accept is not None:
            self.on_accept(device)

    def _on_async_update(
        self, record: DeviceRecord, update: wire.UpdateMessage, payload: bytes, cid: str
    ) -> None:
        """Accept an update for one of this device's jobs; it joins the buffer in arrival order."""
        device = record.device_id
        job = self._jobs.get(update.round)
        if job is None or job.device != device:
            raise StaleRound(f"{device} has no job {update.round}", round=update.round)
        if update.base_id != job.content_id:
            raise StaleRound(f"job {update.round} was trained on another module", round=update.round)
        if job.updated:
            raise UpdateRejected("a second, different update for the job", round=update.round)
        self._check_tensors(update)
        if update.num_samples > record.hello.num_samples:
            raise UpdateRejected(
                f"claims {update.num_samples} samples, hello said {record.hello.num_samples}",
                round=update.round,
            )
        job.answered = job.updated = True
        train_s = float(update.metrics.get("train_s", 0.0))
        if self.event_clock is not None:
            arrival = self.event_clock.finish(device, job.start, train_s, len(payload), job.nbytes)
        else:
            arrival = self.clock() - self._async_start
        self._accepted_ids[(device, update.round)] = cid
        record.updates_accepted += 1
        record.last_metrics = dict(update.metrics)
        record.train_s += train_s
        record.samples = update.num_samples
        self._round_bytes_up += len(payload)
        if self._ledger is not None:  # before the ack: what is acknowledged survives a crash
            self._ledger.accept(
                update.round,
                device,
                cid,
                payload,
                arrival,
                counters=self._counters(),
                device_counters=record.counters(),
            )
        heapq.heappush(
            self._arrivals, (arrival, device, update.round, PendingUpdate(update, cid, len(payload)))
        )
        self._ack(device, update.round, cid, True, "")
        if self.on_accept is not None:
            self.on_accept(device)

    def _check_tensors(self, update: wire.UpdateMessage) -> None:
        expected = self._expected_shapes(self.devices[update.device_id])
        got = {k: tuple(v.shape) for k, v in update.tensors.items()}
        if set(got) != set(expected):
            missing = sorted(set(expected) - set(got))[:3]
            extra = sorted(set(got) - set(expected))[:3]
            raise ShapeMismatch(f"tensors differ: missing {missing}, unexpected {extra}", round=update.round)
        for name, shape in expected.items():
            if got[name] != shape:
                raise ShapeMismatch(f"{name}: shape {got[name]} != {shape}", round=update.round)
        if self._phase == STATS_PHASE:
            self._check_statistics(update)
        if self._phase == PERSONALIZE_PHASE:
            m = update.metrics
            keys = ("global_own_accuracy", "personalized_accuracy")
            if (
                not m.get("holdout", -1) >= 0
                or (m["holdout"] > 0 and not all(0 <= m.get(k, -1) <= 1 for k in keys))
                or not 0 <= m.get("prior_accuracy", 0) <= 1
            ):
                raise UpdateRejected(
                    "personalization metrics need holdout >= 0 and, with held-out samples, "
                    "both accuracies in [0, 1]",
                    round=update.round,
                )
        if self._phase == TRAIN_PHASE:
            norm = float(
                np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.tensors.values()))
            )
            if norm > self.config.norm_bound:
                raise NormTooLarge(
                    f"update norm {norm:.3g} exceeds {self.config.norm_bound:.3g}", round=update.round
                )

    @staticmethod
    def _check_statistics(update: wire.UpdateMessage) -> None:
        """Class statistics must be consistent: features are unit vectors, counts add up."""
        sums = update.tensors["stats.class_sums"].astype(np.float64)
        counts = update.tensors["stats.class_counts"].astype(np.float64)
        if np.any(counts < 0) or np.any(counts != np.round(counts)):
            raise UpdateRejected("class counts must be non-negative integers", round=update.round)
        if int(counts.sum()) != update.num_samples:
            raise UpdateRejected(
                f"class counts add up to {int(counts.sum())}, the update claims {update.num_samples}",
                round=update.round,
            )
        # the sum of n unit vectors has a norm of at most n
        if np.any(np.linalg.norm(sums, axis=1) > counts * (1 + 1e-3) + 1e-3):
            raise NormTooLarge(
                "a class sum is longer than its count of unit features allows", round=update.round
            )

    def _expected_shapes(self, record: DeviceRecord) -> dict[str, tuple[int, ...]]:
        if self._phase == STATS_PHASE:
            c, h = self._group_of(record).shapes["head.weight"]
            return {"stats.class_sums": (c, h), "stats.class_counts": (c,)}
        if self._phase == PERSONALIZE_PHASE:
            return {}  # only measurements come back: the personal modules stay on the devices
        return dict(self._group_of(record).shapes)

    def _ack(self, device: str, round_: int, cid: str, accepted: bool, reason: str) -> None:
        ack = wire.Ack(device_id=device, round=round_, content_id=cid, accepted=accepted, reason=reason)
        self.transport.publish(wire.topic(self.config.fleet, "ack", device), wire.encode_ack(ack), qos=1)

    # --- rounds ------------------------------------------------------------------------------

    def _meta(self, phase: str) -> dict[str, Any]:
        return (
            {"phase": phase, "fleet": self.config.fleet, "rounds": self.config.rounds}
            | ({"epochs": self.config.personalize_epochs} if phase == PERSONALIZE_PHASE else {})
            # layer-wise weighting: devices measure each layer's effect on their held-out samples
            | ({"importance": 1} if phase == TRAIN_PHASE and self.config.strategy == "layerwise" else {})
        )

    def _encode_global(
        self, phase: str, cid: str, tensors: dict[str, np.ndarray], round_: int | None = None
    ) -> bytes:
        msg = wire.GlobalModule(
            round=self._round if round_ is None else round_,
            config_id=cid,
            tensors=tensors,
            meta=self._meta(phase),
        )
        return wire.encode_global(msg, bits=self.config.down_bits)

    def _encode_shared(self, phase: str, round_: int) -> bytes:
        """The downlink message of a version; the state becomes what devices rebuild from it."""
        assert self._downlink is not None
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[:2] == (round_, phase):
            return prepared[2]
        if phase == STATS_PHASE and self._downlink.held is None:
            # class statistics come from the frozen base: the round needs no tensors
            return self._encode_global(phase, self.config_id, {}, round_)
        payload, self._state = self._downlink.encode(
            self._state,
            round_=round_,
            config_id=self.config_id,
            meta=self._meta(phase),
            seed=self.config.seed,
        )
        return payload

    def _prepare_shared(self, round_: int) -> None:
        """Right after aggregating: encode the next version now, so that the evaluation (and the
        report) measure the module devices will hold, not the one before its quantization."""
        if self._downlink is None or self._stopped:
            return
        if round_ < self.config.rounds:
            nxt = (round_ + 1, TRAIN_PHASE)
        else:
            nxt = (
                self.config.rounds + 1,
                PERSONALIZE_PHASE if self.config.personalize_epochs > 0 else DONE_PHASE,
            )
        self._prepared = (*nxt, self._encode_shared(nxt[1], nxt[0]))

    def _send_full(self, device: str) -> None:
        """A device that cannot apply the shared delta gets the held module whole, on its own topic."""
        if self._downlink is None or self._downlink.held is None:
            return
        if self._prepared is not None:
            # the encoder already holds the next version, which devices get only when it is
            # published: answer once it is out, with that version
            self._resync_waiting.add(device)
            return
        self.resyncs.append({"client": device, "round": self._round})
        if self.store is not None:  # the round's record lists them, also after a restart
            self.store.set_meta("resyncs", self.resyncs)
        payload = self._downlink.full(
            round_=self._round, config_id=self.config_id, meta=self._meta(self._phase)
        )
        self.transport.publish(wire.topic(self.config.fleet, "global", device), payload, qos=1)
        log.info("device %s asked for the full module: sent %d bytes", device, len(payload))

    def _publish_global(self, phase: str, checkpoint: bytes | None = None) -> None:
        """Checkpoint the whole state, then publish every group's view of it (retained).

        ``checkpoint`` is the stored payload when resuming: published again byte for byte, so the
        content ids that devices trained on before a crash stay valid (views are re-encoded from
        it deterministically).
        """
        shared: bytes | None = None
        if self._downlink is not None:
            shared = self._encode_shared(phase, self._round) if checkpoint is None else self._resumed_shared
        if checkpoint is None:
            checkpoint = self._encode_global(phase, self.config_id, self._state)
            self._global_id = wire.content_id(checkpoint)
            if self.store is not None:
                stored: tuple[bytes, bytes] | None = None
                if shared is not None and self._downlink is not None:
                    residual = {k: v.astype(np.float32) for k, v in self._downlink.residual.items()}
                    module = wire.GlobalModule(self._round, "downlink-residual", residual)
                    stored = (shared, wire.encode_global(module, bits=32))
                self.store.save_global(self._round, self._global_id, checkpoint, downlink=stored)
        if self.config.mode == "async":  # every device on its own topic
            for device_record in self.devices.values():
                if not device_record.excluded:
                    self._group_of(device_record)
            for group in self.groups.values():
                payload = self._encode_global(phase, group.config_id, self._state)
                group.global_id = wire.content_id(payload)
                self.transport.publish(group.topic, payload, qos=1, retain=True)
            return
        if self.clustered:
            assert self.clustering is not None
            states = split_state(self._state, self.clustering.k)
            for cluster, state in states.items():
                group = self._cluster_group(cluster)
                payload = self._encode_global(phase, group.config_id, state)
                group.global_id = wire.content_id(payload)
                self.transport.publish(group.topic, payload, qos=1, retain=True)
            return
        if self.allocator is None:
            payload = checkpoint if shared is None else shared
            # messages on the shared topic never name another module: their id is their content's
            self._group(self.config.train).global_id = wire.content_id(payload)
            self.transport.publish(self.global_topic, payload, qos=1, retain=True)
            waiting, self._resync_waiting = self._resync_waiting, set()
            for device in sorted(waiting):
                self._send_full(device)
            return
        for group in self.groups.values():
            payload = self._encode_global(phase, group.config_id, view(self._state, group.shapes))
            group.global_id = wire.content_id(payload)
            self.transport.publish(group.topic, payload, qos=1, retain=True)

    def _wait_for_devices(self) -> None:
        want = self.config.expected_clients or self.config.min_clients
        deadline = self.clock() + self.config.hello_timeout_s
        # every device counts as here once it said hello, even one the allocator left out
        while sum(r.online for r in self.devices.values()) < want and not self._stopped:
            if self.clock() >= deadline:
                if sum(not r.excluded for r in self.devices.values()) >= self.config.min_clients:
                    break
                raise FedPeftError(
                    f"only {len(self.devices)} of {want} devices said hello within "
                    f"{self.config.hello_timeout_s:.0f} s"
                )
            self._pump(min(deadline, self.clock() + 0.5))
        able = [r for r in self.devices.values() if not r.excluded]
        if len(able) < self.config.min_clients and not self._stopped:
            left_out = "; ".join(f"{r.device_id}: {r.excluded}" for r in self.devices.values() if r.excluded)
            raise FedPeftError(
                f"only {len(able)} devices can train, {self.config.min_clients} needed (left out: {left_out})"
            )

    def _collect(self, participants: set[str], enough: int | None = None) -> bool:
        """Handle messages until every participant answered or the deadline; True if at least
        ``enough`` (default min_clients) updates came in. With ``enough`` 0 an empty round closes
        at once."""
        enough = self.config.min_clients if enough is None else enough
        for attempt in range(self.config.max_round_retries + 1):
            deadline = self.clock() + self.config.round_timeout_s
            while not self._stopped and self.clock() < deadline:
                if (participants or enough == 0) and participants <= set(self._pending) | self._answered:
                    return True
                self._pump(min(deadline, self.clock() + 0.5))
            if len(self._pending) >= enough:
                return True
            log.warning(
                "round %d: %d of %d updates by the deadline (attempt %d); keeping the global module",
                self._round,
                len(self._pending),
                self.config.min_clients,
                attempt + 1,
            )
            if self._stopped:
                return False
        return False

    def _head(self, updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
        """The class-mean head from a statistics round's updates (screened under robust rules)."""
        if self.config.strategy in ROBUST_STRATEGIES:
            return robust_head_from_statistics(updates, self.config.head_scale, self.config.strategy)
        sums, counts = sum_class_statistics(updates)
        return head_from_class_means(sums, counts, self.config.head_scale)

    def _aggregate_clusters(self, updates: list[ClientUpdate]) -> None:
        """Each cluster aggregates its own devices; tensors the clusters agree on are shared."""
        assert self.clustering is not None
        by_cluster: dict[int, list[ClientUpdate]] = {}
        for u in updates:
            by_cluster.setdefault(self.clustering.members[u.device_id], []).append(u)
        states = split_state(self._state, self.clustering.k)
        if self._phase == STATS_PHASE:
            heads = cluster_heads(
                self._head(updates), {c: self._head(us) for c, us in by_cluster.items()}, self.clustering.k
            )
            self._state = join_states({c: {**states[c], **heads[c]} for c in states})
            self._shared = []
            return
        if self.config.clip_norm is not None:
            by_cluster = {
                c: [clip_update(u, self.config.clip_norm) for u in us] for c, us in by_cluster.items()
            }
        new, self._shared = clustered_step(states, by_cluster, self.strategy, self.config.cluster_share)
        self._state = join_states(new)

    def _aggregate(self) -> None:
        updates = [
            ClientUpdate(p.update.device_id, p.update.num_samples, p.update.tensors, p.update.metrics)
            for _, p in sorted(self._pending.items())  # arrival order must not change the floats
        ]
        if self._dp is not None:
            self._aggregate_private(updates)
        elif self.clustered:
            self._aggregate_clusters(updates)
        elif self._phase == STATS_PHASE:
            self._state = {**self._state, **self._head(updates)}
        else:
            if self.config.clip_norm is not None:
                updates = [clip_update(u, self.config.clip_norm) for u in updates]
            if self.config.strategy == "exact":
                spec = self.config.train.peft
                assert isinstance(spec, LoraSpec)
                self._state, self._residual = exact_fedavg(
                    self._state, updates, spec.alpha / spec.rank, self._residual
                )
                if self.store is not None:
                    module = wire.GlobalModule(self._round, "residual", dict(self._residual))
                    self.store.save_residual(self._round, wire.encode_global(module, bits=32))
            elif self.config.strategy == "ffa":
                self._state = ffa_fedavg(self._state, updates)
            else:
                # a mixed fleet: zero-pad and average each element over the clients that trained it
                # (hetlora pads and weighs ranks itself)
                mixed = self.allocator is not None and self.config.strategy != "hetlora"
                rule = coverage_mean if mixed else self.strategy
                before = self._state
                self._state = rule(self._state, updates)
                self._server_step(before)
                if self.config.distill_epochs > 0:
                    self._distill()

    def _aggregate_private(self, updates: list[ClientUpdate]) -> None:
        """DP-FedAvg's release for this round: the class-mean head in round 0, else the module.
        Each release, even one with no sampled update, is one step of the accountant."""
        assert self._dp is not None and self._sampler is not None
        rng = self._sampler.noise_rng(self._round)
        if self._phase == STATS_PHASE:
            c, h = self._state["head.weight"].shape
            self._state = {
                **self._state,
                **self._dp.class_head(updates, (c, h), self.config.head_scale, rng),
            }
        else:
            self._state = self._dp.aggregate(self._state, updates, rng)
        self._dp_rounds += 1

    def _server_step(self, before: dict[str, np.ndarray]) -> None:
        """FedAvgM over the rule's step, with its momentum kept in the state store."""
        lr, beta = self.config.server_lr, self.config.server_momentum
        if lr == 1.0 and beta == 0.0:
            return
        self._state, self._server_m = server_momentum_step(
            before, self._state, self._server_m, lr=lr, beta=beta
        )
        if self.store is not None and beta > 0:
            module = wire.GlobalModule(
                self._round, "server-momentum", {k: v.astype(np.float32) for k, v in self._server_m.items()}
            )
            self.store.save_carry(self._round, "server_momentum", wire.encode_global(module, bits=32))

    def _distill(self) -> None:
        """Let knowledge flow across the PEFT kinds of the fleet (:mod:`broker_server.distillation`)."""
        assert self.allocator is not None and self.unlabeled is not None
        kinds = {rec.config.peft.kind for rec in self.devices.values() if not rec.excluded}
        configs = [c for c in self.allocator.largest(self.config.train) if c.peft.kind in kinds]
        result = fuse_kinds(
            self.evaluator,
            self._state,
            configs,
            self.unlabeled,
            alpha=self.config.distill_alpha,
            epochs=self.config.distill_epochs,
            seed=self.config.seed + self._round,
        )
        self._state = result.state
        self.distilled = {"before": result.agreement_before, "after": result.agreement_after}

    def _initial_state(self) -> dict[str, np.ndarray]:
        if self.allocator is None:
            return self.evaluator.initial_state()
        # the union of every kind's largest module, and one head
        state: dict[str, np.ndarray] = {}
        for cfg in self.allocator.largest(self.config.train):
            for name, value in self.evaluator.initial_state(cfg).items():
                state.setdefault(name, value)
        return state

    def _evaluate_clusters(self) -> tuple[EvalResult | None, dict[str, float]]:
        """Each cluster's module on the test set; the mean weighted by the clusters' devices."""
        assert self.clustering is not None
        states = split_state(self._state, self.clustering.k)
        results: list[tuple[int, EvalResult]] = []
        by_cluster: dict[str, float] = {}
        for cluster, size in enumerate(self.clustering.sizes()):
            if size == 0:
                continue
            res = self.evaluator.evaluate(states[cluster])
            if res is None:
                return None, {}
            results.append((size, res))
            by_cluster[str(cluster)] = res.accuracy
        return _weighted(results), by_cluster

    def _evaluate(self) -> tuple[EvalResult | None, dict[str, float]]:
        """The global model's test figures; in a mixed fleet, per kind, weighted by its devices."""
        if self.clustered:
            result, self._by_cluster = self._evaluate_clusters()
            return result, {}
        if self.allocator is None:
            return self.evaluator.evaluate(self._state), {}
        members: dict[str, int] = {}
        for rec in self.devices.values():
            if not rec.excluded:
                members[rec.config.peft.kind] = members.get(rec.config.peft.kind, 0) + 1
        results: list[tuple[int, EvalResult]] = []
        by_kind: dict[str, float] = {}
        for cfg in self.allocator.largest(self.config.train):
            if cfg.peft.kind not in members:
                continue
            res = self.evaluator.evaluate(view(self._state, self.evaluator.shapes(cfg)), cfg)
            if res is None:
                return None, {}
            results.append((members[cfg.peft.kind], res))
            by_kind[cfg.peft.kind] = res.accuracy
        return _weighted(results), by_kind

    def _learn_rewards(self, record: dict[str, Any]) -> None:
        """Credit this round's accuracy gain to the configurations that took part (train rounds)."""
        if self.allocator is None or record["phase"] != TRAIN_PHASE or record["accuracy"] is None:
            return
        before = [r["accuracy"] for r in self.rounds if r.get("accuracy") is not None]
        if not before:
            return
        keys = [peft_key(self.devices[d].config.peft) for d in record["clients"] if d in self.devices]
        self.allocator.rewards.observe(keys, float(record["accuracy"]) - float(before[-1]))
        if self.store is not None:
            self.store.set_meta("rewards", self.allocator.rewards.to_dict())

    def _resume(self) -> int | None:
        """Restore the last checkpoint from the store; the round to continue, or None if fresh.

        Everything acknowledged is in the store (it is written before the ack), so the restored
        pending updates are exactly the acknowledged ones of the interrupted round.
        """
        if self.store is None:
            return None
        counters = self._restore_report_inputs()
        latest = self.store.latest_global()
        if latest is None:
            return None
        round_, cid, payload = latest
        module = wire.decode_global(payload)
        self._state = dict(module.tensors)
        self._round = round_
        saved_clusters = self.store.get_meta("clusters") if self.clustered else None
        if saved_clusters is not None:
            centroids = np.asarray(saved_clusters["centroids"], dtype=np.float64)
            self.clustering = Clustering(
                {str(d): int(c) for d, c in saved_clusters["members"].items()},
                centroids,
                float(saved_clusters["silhouette"]),
            )
            first = split_state(self._state, len(centroids))[0]
            self._base_shapes = {n: tuple(v.shape) for n, v in first.items()}
        for device, hello_payload in self.store.devices().items():
            device_record = self._register(device, wire.decode_hello(hello_payload))
            if not device_record.excluded and not self.clustered and self.config.mode == "sync":
                self._group(device_record.config)
        if self.allocator is not None:
            self.allocator.rewards = RewardTable.from_dict(self.store.get_meta("rewards", {}))
        self._global_id = cid  # after the groups exist: they are published by run(), in the right phase
        for device, count in self.store.accepted_counts().items():
            if device in self.devices:
                self.devices[device].updates_accepted = count
        # A crash after a round's record was written but before the next global went out redoes
        # that round from the same stored updates (summed in device order: the same floats).
        self.rounds = [rec for rec in self.store.round_records() if int(rec["round"]) < round_]
        for record in self.rounds:
            if record.get("accuracy") is not None:
                self.final_eval = {"accuracy": record["accuracy"], "macro_f1": record["macro_f1"]}
        if counters is None:  # a state folder from before the counters were stored
            self.bytes_up_total = sum(int(r.get("bytes_up_all", 0)) for r in self.rounds)
        if self._dp is not None:  # the privacy budget spent before the crash: one step a release
            self._dp_rounds = sum(1 for rec in self.rounds if rec.get("phase") in (STATS_PHASE, TRAIN_PHASE))
        if self.config.strategy == "exact":  # the residual that aggregating this round starts from
            saved = self.store.residual_before(round_)
            if saved is not None:
                module = wire.decode_global(saved, max_bytes=max(len(saved), wire.DEFAULT_MAX_PAYLOAD))
                self._residual = {k: np.asarray(v, dtype=np.float64) for k, v in module.tensors.items()}
        if self.config.server_momentum > 0:  # the momentum that aggregating this round starts from
            carried = self.store.carry_before(round_, "server_momentum")
            if carried is not None:
                module = wire.decode_global(carried, max_bytes=max(len(carried), wire.DEFAULT_MAX_PAYLOAD))
                self._server_m = {k: np.asarray(v, dtype=np.float64) for k, v in module.tensors.items()}
        self._accepted_ids = self.store.accepted_ids()
        self._pending = {}
        for device, ucid, upayload in self.store.updates(round_):
            update = wire.decode_update(upayload)
            self._pending[device] = PendingUpdate(update, ucid, len(upayload))
            if counters is None:
                self.bytes_up_total += len(upayload)
        accepted_bytes = sum(p.nbytes for p in self._pending.values())
        if counters is not None and counters.get("round") == round_:
            self._resumed_round_counters = (int(counters["round_stale"]), int(counters["round_bytes_up"]))
        else:  # nothing counted in this round yet (or an older state folder)
            self._resumed_round_counters = (0, accepted_bytes)
        done = self.config.rounds + 1  # the personalization round, if there is one
        if self.config.personalize_epochs > 0 and round_ > done:
            for device, _, upayload in self.store.updates(done):
                self.personalization[device] = dict(wire.decode_update(upayload).metrics)
        self._resumed_payload = payload
        self._resumed_shared = None
        if self._downlink is not None:
            stored = self.store.downlink(round_)
            if stored is not None:
                shared, residual_payload = stored
                residual = wire.decode_global(
                    residual_payload, max_bytes=max(len(residual_payload), wire.DEFAULT_MAX_PAYLOAD)
                )
                sent = wire.decode_global(shared)
                if sent.tensors or "base" in sent.meta:  # not the statistics round's empty message
                    self._downlink.restore(self._state, wire.content_id(shared), residual.tensors)
                self._resumed_shared = shared
            # without a stored delta (a statistics round) devices get the checkpoint itself
        log.warning(
            "resumed round %d from %s with %d acknowledged updates",
            round_,
            self.store.path,
            len(self._pending),
        )
        return round_

    def _restore_report_inputs(self) -> dict[str, Any] | None:
        """Take back what the report counts from the store, fresh start or not: the rejections, the
        module resyncs, the bytes received and each device's counters. Returns the stored service
        counters (None if the store has none)."""
        assert self.store is not None
        self.rejected = self.store.rejections()
        self.resyncs = [dict(x) for x in self.store.get_meta("resyncs", [])]
        self._stored_device_counters = self.store.device_counters()
        counters = self.store.counters()
        if counters is not None:
            self.bytes_up_total = int(counters["bytes_up_total"])
        return counters

    def _turns_ended(self, round_: int) -> set[str]:
        """Devices whose turn in ``round_`` a recorded rejection ended (see :meth:`_reject`)."""
        return {
            str(x["client"]) for x in self.rejected if x["round"] == round_ and x["client"] in self.devices
        }

    def run(self) -> None:
        """Run every round; returns when the last global module is published or on stop."""
        self._state = self._initial_state()
        if self.store is not None:
            # what the checkpointed modules belong to: ``fedpeft export`` rebuilds them on this model
            self.store.set_meta(TRAIN_CONFIG_KEY, self.config.train.to_dict())
        if self._dp is not None:
            self._sampler = PoissonSampler(self._dp_key(), self._dp.sample_rate)
        resume_round = self._resume()
        snapshot = self._ledger.restore() if self._ledger is not None else None
        if snapshot is not None:  # asynchronous versions had begun: continue them
            self._take_back_versions(snapshot)
        self.start()
        if resume_round is None and snapshot is None:
            self._wait_for_devices()
            if self.clustered:
                self._form_clusters()
        start = self.clock() - (float(self.rounds[-1]["wall_s"]) if self.rounds else 0.0)
        first = 0 if self.config.head_init == "ncm" else 1
        if resume_round is not None:
            first = resume_round
        last_sync = self.config.rounds if self.config.mode == "sync" else 0
        if snapshot is not None:
            first = last_sync + 1
        for r in range(first, last_sync + 1):
            if self._stopped:
                break
            self._round = r
            self._phase = STATS_PHASE if (r == 0 and self.config.head_init == "ncm") else TRAIN_PHASE
            resuming = r == resume_round
            if resuming:
                # what the interrupted round had counted, and whose turn a rejection had ended
                self._answered = self._turns_ended(r)
                self._stale, self._round_bytes_up = self._resumed_round_counters
                self._round_bytes_down = sum(
                    int(p.update.metrics.get("bytes_down", 0)) for p in self._pending.values()
                )
            else:
                self._answered = set()
                self._pending = {}
                self._stale = 0
                self._round_bytes_up = 0
                self._round_bytes_down = 0
            participants = {d for d, rec in self.devices.items() if rec.online and not rec.excluded}
            if self._sampler is not None:
                # Poisson sampling over every registered device; an offline one sampled is a dropout
                self._sampled = self._sampler.sample(
                    r, (d for d, rec in self.devices.items() if not rec.excluded)
                )
                participants &= self._sampled
            round_start = self.clock()
            if resuming:
                # Publish exactly the checkpointed bytes again: same content id, so devices'
                # updates trained on it before the crash stay valid.
                self._publish_global(self._phase, checkpoint=self._resumed_payload)
                # The crash may have come between storing an update and acknowledging it.
                for device, pending in sorted(self._pending.items()):
                    self._ack(device, r, pending.content_id, True, "accepted before a restart")
            else:
                self._publish_global(self._phase)
            # DP: the fixed denominator makes any number of updates (none too) a valid release
            if not self._collect(participants, 0 if self._dp is not None else None):
                raise FedPeftError(f"round {r} got too few updates after every retry")
            server_start = self.clock()
            self._aggregate()
            self._prepare_shared(r)
            result, by_kind = self._evaluate()
            record: dict[str, Any] = {
                "round": r,
                "phase": self._phase,
                "wall_s": self.clock() - start,
                "round_wall_s": self.clock() - round_start,
                "virtual_s": self.clock() - start,
                "server_s": self.clock() - server_start,
                "accuracy": None if result is None else result.accuracy,
                "macro_f1": None if result is None else result.macro_f1,
                "loss": None if result is None else result.loss,
                "participants": len(self._pending),
                "stale_updates": self._stale,
                "bytes_up": sum(p.nbytes for p in self._pending.values()),
                "bytes_up_all": self._round_bytes_up,
                "bytes_down": self._round_bytes_down,
                "train_loss": _mean([p.update.metrics.get("loss") for p in self._pending.values()]),
                "clients": sorted(self._pending),
                "client_train_s": {
                    d: float(p.update.metrics.get("train_s", 0.0)) for d, p in self._pending.items()
                },
                "client_bytes": {d: p.nbytes for d, p in self._pending.items()},
                # devices that could not apply this round's delta and got the module whole
                "resyncs": sorted(x["client"] for x in self.resyncs if x["round"] == r),
            }
            if by_kind:
                record["accuracy_by_kind"] = by_kind
            if self.distilled and self._phase == TRAIN_PHASE:
                record["distill_agreement"] = dict(self.distilled)
            if self.clustered:
                record["accuracy_by_cluster"] = dict(self._by_cluster)
                record["shared_tensors"] = list(self._shared)
            if self._dp is not None:
                record["dp_epsilon"] = self.privacy_spent()
                record["dp_sampled"] = len(self._sampled)
            self._learn_rewards(record)
            if result is not None:
                self.final_eval = {"accuracy": result.accuracy, "macro_f1": result.macro_f1}
            self.rounds.append(record)
            if self.store is not None:
                self.store.save_round_record(r, record)
            if self.on_round is not None:
                self.on_round(record)
        if self.config.mode == "async" and not self._stopped:
            self._run_async(start, snapshot)
        if self._stopped:
            return
        if self.config.personalize_epochs > 0:
            self._personalize(resume_round)
            if self._stopped:
                return
        self._round = self.config.rounds + (2 if self.config.personalize_epochs > 0 else 1)
        self._publish_global(DONE_PHASE)

    # --- asynchronous mode --------------------------------------------------------------------

    def _in_flight(self) -> bool:
        return any(not job.answered for job in self._jobs.values())

    def _earliest_in_flight(self) -> float:
        """No job in flight can land before it started (a device offline until later cannot)."""
        return min((job.start for job in self._jobs.values() if not job.answered), default=float("inf"))

    def _open_jobs(self, device: str) -> list[tuple[int, Job]]:
        return [(i, j) for i, j in self._jobs.items() if j.device == device and not j.answered]

    def _offer(self, device: str, *, returning: bool = False) -> None:
        """Give ``device`` the newest version unless an update of its waits for the buffer or it
        has a job open; a device ``returning`` from offline has its jobs on older versions replaced
        (an update for a replaced job, should it still come, is taken within the staleness bound,
        but the service no longer waits for it)."""
        if any(d == device for _, d, _, _ in self._arrivals):
            return
        open_jobs = self._open_jobs(device)
        if open_jobs and not (returning and all(job.version < self._round for _, job in open_jobs)):
            return
        for job_id, job in open_jobs:
            job.answered = True
            if self._ledger is not None:
                self._ledger.close_job(job_id)
        self._dispatch(device, self._async_now)

    def _dispatch(self, device: str, t: float) -> None:
        """Give ``device`` a job: the current global version, on its own topic (retained); with a
        store, the job is recorded before its module goes out."""
        record = self.devices[device]
        if not record.online or record.excluded:
            return
        start = self.event_clock.start(device, t) if self.event_clock is not None else t
        self._job_seq += 1
        group = self._group_of(record)
        payload = self._encode_global(TRAIN_PHASE, group.config_id, self._state, self._job_seq)
        group.global_id = wire.content_id(payload)
        self._jobs[self._job_seq] = Job(device, self._round, start, group.global_id, len(payload))
        if self._ledger is not None:
            self._ledger.open_job(self._job_seq, device, self._round, group.global_id, len(payload), start)
        self.transport.publish(group.topic, payload, qos=1, retain=True)

    def _version_payload(self) -> bytes:
        """The current version's module as the ledger keeps it: fp32, exact."""
        return wire.encode_global(wire.GlobalModule(self._round, "async", self._state), bits=32)

    def _take_back_versions(self, snapshot: AsyncSnapshot) -> None:
        """From a restart's snapshot, what the report counts: the versions' records, the devices
        (registered from their stored hellos), their accepted updates and those updates' ids."""
        assert self.store is not None
        for device, hello_payload in self.store.devices().items():
            if device not in self.devices:
                self._register(device, wire.decode_hello(hello_payload))
        for device, count in snapshot.accepted_counts.items():
            if device in self.devices:
                self.devices[device].updates_accepted += count
        self._accepted_ids.update(snapshot.accepted_ids)
        # the class-mean round, if any, was over before version 0 was saved
        self.rounds = self.store.round_records() + snapshot.records
        for record in self.rounds:
            if record.get("accuracy") is not None:
                self.final_eval = {"accuracy": record["accuracy"], "macro_f1": record["macro_f1"]}

    def _restore_async(self, snapshot: AsyncSnapshot) -> float:
        """Continue from the newest stored version: its module, the jobs, the buffer (acknowledged
        again: a crash may have eaten those acks), and every open job's module published again,
        byte for byte, in case a crash came between recording the job and publishing it. Returns
        the asynchronous clock where the run before stopped."""
        assert self._ledger is not None
        big = max(len(snapshot.payload), wire.DEFAULT_MAX_PAYLOAD)
        self._state = dict(wire.decode_global(snapshot.payload, max_bytes=big).tensors)
        self._round = snapshot.version
        for j in snapshot.jobs:
            self._jobs[j.job] = Job(
                j.device, j.version, j.start, j.content_id, j.nbytes, j.answered, j.updated
            )
        self._job_seq = max(self._jobs, default=0)
        now = max((j.start for j in snapshot.jobs), default=0.0)
        for stored in snapshot.waiting:
            update = wire.decode_update(stored.payload, max_bytes=max(len(stored.payload), big))
            pending = PendingUpdate(update, stored.content_id, len(stored.payload))
            heapq.heappush(self._arrivals, (stored.arrival, stored.device, stored.job, pending))
            self._ack(stored.device, stored.job, stored.content_id, True, "accepted before a restart")
            now = max(now, stored.arrival)
        counters = self.store.counters() if self.store is not None else None
        if counters is not None and counters.get("round") == self._round:
            self._stale, self._round_bytes_up = int(counters["round_stale"]), int(counters["round_bytes_up"])
        for job_id, job in sorted(self._jobs.items()):
            if job.answered or job.device not in self.devices:
                continue
            stored_version = self._ledger.version_payload(job.version)
            group = self._group_of(self.devices[job.device])
            payload = b""
            if stored_version is not None:
                state = wire.decode_global(stored_version, max_bytes=big).tensors
                payload = self._encode_global(TRAIN_PHASE, group.config_id, dict(state), job_id)
            if wire.content_id(payload) == job.content_id:
                group.global_id = job.content_id
                self.transport.publish(group.topic, payload, qos=1, retain=True)
            else:  # cannot rebuild it: not waited for; the device gets a new job below
                job.answered = True
                self._ledger.close_job(job_id)
        log.warning(
            "resumed async version %d from %s: %d updates in the buffer, %d jobs open",
            self._round,
            self._ledger.store.path,
            len(self._arrivals),
            sum(not j.answered for j in self._jobs.values()),
        )
        return now

    def _run_async(self, wall_start: float, snapshot: AsyncSnapshot | None = None) -> None:
        """FedBuff: devices train the newest version whenever they are free; every K updates (in
        order of arrival, on the simulated clock if there is one) make a new version."""
        self._async_active = True
        self._phase = TRAIN_PHASE
        staleness = parse_staleness(self.config.staleness)
        self._stale = 0
        self._round_bytes_up = 0
        if snapshot is None:
            self._round = 0
            now = 0.0
            if self._ledger is not None:  # version 0, what the first jobs train on
                self._ledger.save_version(0, self._version_payload(), None, [], self._counters())
        else:
            now = self._restore_async(snapshot)
        self._async_now = now
        self._async_start = self.clock() - now
        round_start = self.clock()
        for device in sorted(self.devices):
            self._offer(device)
        while self._round < self.config.rounds and not self._stopped:
            # with a simulated clock an arrival is final only once no job in flight can land earlier
            if self._arrivals and (
                self.event_clock is None or self._arrivals[0][0] <= self._earliest_in_flight()
            ):
                arrival, device, job_id, pending = heapq.heappop(self._arrivals)
                now = self._async_now = max(now, arrival)
                job = self._jobs[job_id]
                tau = self._round - job.version
                if tau > self.config.max_staleness:
                    self._drop(device, job_id, job.version)
                else:
                    u = pending.update
                    update = ClientUpdate(device, u.num_samples, u.tensors, u.metrics)
                    self._buffer.append((job_id, StaleUpdate(update, tau)))
                if len(self._buffer) >= self.config.buffer_size:
                    self._async_aggregate(staleness, now, wall_start, round_start)
                    round_start = self.clock()
                self._offer(device)
                continue
            if not self._in_flight() and not self._arrivals:
                raise FedPeftError(
                    f"version {self._round}: no device is training and the buffer holds "
                    f"{len(self._buffer)} of {self.config.buffer_size} updates"
                )
            deadline = self.clock() + self.config.round_timeout_s
            while not self._stopped and self.clock() < deadline:
                if self._pump(min(deadline, self.clock() + 0.5)):
                    break
            else:
                if not self._stopped:
                    lost = [(i, j) for i, j in self._jobs.items() if not j.answered]
                    log.warning(
                        "%d jobs unanswered after %.0f s: given up", len(lost), self.config.round_timeout_s
                    )
                    for job_id, job in lost:
                        job.answered = True
                        if self._ledger is not None:
                            self._ledger.close_job(job_id)
                        self._record_rejection(job.device, self._round, "deadline: job unanswered")
        self._async_active = False
        self.unaggregated = [{"client": b.update.device_id, "job": j} for j, b in self._buffer] + [
            {"client": d, "job": j} for _, d, j, _ in sorted(self._arrivals)
        ]

    def _drop(self, device: str, job_id: int, version: int) -> None:
        """An update staler than the bound: rejected with the reason, durably marked dropped."""
        self._stale += 1
        reason = (
            f"stale_round: job {job_id} trained on version {version}, now {self._round} "
            f"(bound {self.config.max_staleness})"
        )
        log.warning("dropped update from %s: %s", device, reason)
        if self._ledger is None:
            self._record_rejection(device, self._round, reason)
            return
        self.rejected.append({"client": device, "round": self._round, "reason": reason})
        record = self.devices.get(device)
        self._ledger.drop(
            job_id,
            device,
            self._round,
            reason,
            time.time(),
            counters=self._counters(),
            device_counters=None if record is None else record.counters(),
        )

    def _async_aggregate(
        self, staleness: Staleness, now: float, wall_start: float, round_start: float
    ) -> None:
        server_start = self.clock()
        buffer, self._buffer = self._buffer, []
        ordered = sorted(buffer, key=lambda b: (b[1].update.device_id, b[1].staleness, b[0]))
        stale = [b for _, b in ordered]
        self._state = fedbuff_step(self._state, stale, staleness, self.config.server_lr)
        self._round += 1
        result, _ = self._evaluate()
        record: dict[str, Any] = {
            "round": self._round,
            "phase": TRAIN_PHASE,
            "mode": "async",
            "wall_s": self.clock() - wall_start,
            "round_wall_s": self.clock() - round_start,
            "virtual_s": now,
            "server_s": self.clock() - server_start,
            "accuracy": None if result is None else result.accuracy,
            "macro_f1": None if result is None else result.macro_f1,
            "loss": None if result is None else result.loss,
            "participants": len(buffer),
            "stale_updates": self._stale,
            "staleness": [b.staleness for b in stale],
            # s(tau) of each update, in the order of "clients"
            "staleness_weights": [staleness(b.staleness) for b in stale],
            "bytes_up": self._round_bytes_up,
            "bytes_up_all": self._round_bytes_up,
            # what the devices counted coming in since their previous update (the versions they got)
            "bytes_down": int(sum(b.update.metrics.get("bytes_down", 0.0) for b in stale)),
            "train_loss": _mean([b.update.metrics.get("loss") for b in stale]),
            "clients": [b.update.device_id for b in stale],
            "jobs": [job for job, _ in ordered],
            "client_train_s": {},
            "client_bytes": {},
        }
        self._stale = 0
        self._round_bytes_up = 0
        if self._ledger is not None:  # the version and the buffer it consumed, in one transaction
            self._ledger.save_version(
                self._round, self._version_payload(), record, record["jobs"], self._counters()
            )
        if result is not None:
            self.final_eval = {"accuracy": result.accuracy, "macro_f1": result.macro_f1}
        self.rounds.append(record)
        if self.on_round is not None:
            self.on_round(record)

    def _personalize(self, resume_round: int | None) -> None:
        """The personalization phase after the last round: devices fine-tune the final global module
        on their own data and report its accuracy, and the global module's, on their held-out
        samples. Nothing is aggregated; the personal modules stay on the devices."""
        r = self.config.rounds + 1
        if resume_round is not None and resume_round > r:
            return  # done before a restart
        self._round, self._phase = r, PERSONALIZE_PHASE
        self._answered = self._turns_ended(r) if resume_round == r else set()
        if resume_round == r:
            self._publish_global(self._phase, checkpoint=self._resumed_payload)
            for device, pending in sorted(self._pending.items()):
                self._ack(device, r, pending.content_id, True, "accepted before a restart")
        else:
            self._pending = {}
            self._publish_global(self._phase)
        participants = {d for d, rec in self.devices.items() if rec.online and not rec.excluded}
        if not self._collect(participants):
            log.warning("personalization: %d devices reported by the deadline", len(self._pending))
        for device, pending in sorted(self._pending.items()):
            self.personalization[device] = dict(pending.update.metrics)

    def personalization_summary(self) -> dict[str, float | None]:
        """Means over the devices that measured on held-out samples (None without any)."""
        measured = [m for m in self.personalization.values() if m.get("holdout", 0) > 0]
        keys = ("personalized_accuracy", "global_own_accuracy", "prior_accuracy")
        return {
            k: float(np.mean([m[k] for m in measured]))
            if measured and all(k in m for m in measured)
            else None
            for k in keys
        }


def _weighted(results: list[tuple[int, EvalResult]]) -> EvalResult | None:
    """Test figures of several modules, weighted by their devices (None without any)."""
    if not results:
        return None
    total = sum(n for n, _ in results)
    return EvalResult(
        accuracy=sum(n * r.accuracy for n, r in results) / total,
        macro_f1=sum(n * r.macro_f1 for n, r in results) / total,
        loss=sum(n * r.loss for n, r in results) / total,
        predictions=results[0][1].predictions,
    )


def _mean(values: list[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, (int, float))]
    return float(np.mean(nums)) if nums else None
