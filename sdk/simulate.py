"""The fleet simulator: a broker, the aggregation service and many virtual devices on one machine.

Devices run in a pool of worker processes no larger than the core count; the service runs in
this process. A virtual clock makes runs comparable across machines: a device's time for a round
is its measured training time scaled by its profile's speed relative to this host, plus its link
time (bytes over its profile's bandwidth); a round ends when its slowest participant is done.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from broker_server.allocation import ALLOCATIONS, AllocationConfig, Allocator, build_allocator, peft_key
from broker_server.asynchronous import OnOffTrace, compute_seconds, link_seconds, parse_staleness, trace_for
from broker_server.clustering import parse_clusters
from broker_server.distillation import unlabeled
from broker_server.evaluation import Evaluator, ModelEvaluator, OrtEvaluator
from broker_server.records import task_figures
from broker_server.report import build_report, communication, peft_entry, train_config_entry
from broker_server.service import AggregationService, ServiceConfig
from broker_server.strategies import check_strategy
from edge_runtime.config import DEFAULT_MICRO_BATCH, FROZEN_WEIGHTS, SUPPORTED_BITS, TrainConfig
from edge_runtime.data import Dataset, TextDataset, load_folder, resolve_data_dir
from edge_runtime.engines import artifact_flavour
from edge_runtime.engines.base import ORT_IMAGE_REFUSAL
from edge_runtime.errors import ConfigError, FedPeftError
from edge_runtime.families import (
    CLASSLESS_TASKS,
    TASK_NAMES,
    check_data_task,
    dims_of_dir,
    family_of_dir,
    lora_targets_for,
)
from edge_runtime.models import resolve_model
from edge_runtime.peft_specs import LoraSpec
from edge_runtime.transport import MqttTransport, parse_broker_url
from hw_profiles import DeviceProfile, ProfileError, load_profile, measure
from sdk.attacks import parse_attack
from sdk.fleet_worker import VirtualDevice, WorkerJob, artifact_slot, worker_main
from sdk.partition import parse_partition, partition

log = logging.getLogger("fedpeft.simulate")


ENGINE_CHOICES = ("auto", "torch", "ort", "ort-plain", "mixed")


@dataclass(frozen=True)
class SimulationConfig:
    """Everything ``fedpeft simulate`` needs; validated on construction."""

    data: str
    clients: int = 8
    rounds: int = 5
    partition: str = "dirichlet:0.5"
    samples_per_client: int | None = 150
    test_samples: int | None = 1000
    seq_len: int = 128
    local_epochs: int = 1
    bits: int = 4
    seed: int = 0
    profiles: str | None = None
    allocation: str = field(
        default="auto", metadata={"help": "fixed | utility | uniform; auto = utility with --profiles"}
    )
    alpha: float = field(default=1.0, metadata={"help": "utility weight of the expected gain R"})
    beta: float = field(default=0.5, metadata={"help": "utility weight of the resource cost C"})
    gamma: float = field(default=0.2, metadata={"help": "utility weight of the parameter economy E"})
    strategy: str = "fedit"
    clip_norm: float | None = None
    dp_noise: float | None = None
    dp_delta: float = 1e-5
    dp_sample_rate: float = field(
        default=1.0, metadata={"help": "DP: probability q that a device is sampled in a round"}
    )
    attack: str | None = field(default=None, metadata={"help": "flip:COUNT or scale=FACTOR:COUNT"})
    norm_bound: float = 1e3
    max_message_bytes: int | None = field(default=None, metadata={"help": "split larger updates into chunks"})
    mode: str = field(default="sync", metadata={"help": "sync rounds or async (FedBuff) aggregation"})
    buffer_size: int = 4
    staleness: str = "poly:0.5"
    max_staleness: int = 8
    server_lr: float = 1.0
    server_momentum: float = 0.0
    delta_downlink: bool = True
    test_during_next_round: bool = field(
        default=True,
        metadata={
            "help": "test each round's module while the devices train the next (the service's "
            "evaluate_during_next_round); False: in between, as a service with a state store does"
        },
    )
    stragglers: str | None = field(
        default=None, metadata={"help": "FRACTION:SLOWDOWN:AVAILABILITY, e.g. 0.3:5:0.5"}
    )
    availability_period: float = field(
        default=600.0, metadata={"help": "seconds of one on/off cycle of a device's availability trace"}
    )
    engine: str = field(
        default="torch",
        metadata={"help": "auto, torch, ort, ort-plain or mixed (half the workers on ort, half on torch)"},
    )
    frozen_weights: str = field(
        default="fp32",
        metadata={
            "help": "fp32, or with --engine ort int8: the devices' forward multiplies by int8 copies "
            "of the frozen linear weights, or int8-grad: the input gradients too "
            "(broker_server.int8_weights; not exact, faster)"
        },
    )
    model: str = "all-MiniLM-L6-v2"
    broker: str | None = None
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = field(
        default=("attention",),
        metadata={"help": "LoRA modules; 'attention': every attention projection of the model's family"},
    )
    lr: float = 3e-3
    head_lr: float = 2e-3
    batch_size: int = 16
    micro_batch: int = DEFAULT_MICRO_BATCH
    prox_mu: float = 0.0
    logit_adjust: float = 1.0
    head_init: str = "ncm"
    head_scale: float = 16.0
    personalize_epochs: int = field(
        default=0, metadata={"help": "after the last round, each device fine-tunes the global module"}
    )
    clusters: str = field(default="off", metadata={"help": "off, auto or K clusters of devices"})
    distill_epochs: int = field(
        default=0, metadata={"help": "mixed kinds: distill each kind toward the others each round"}
    )
    distill_alpha: float = 0.5
    distill_samples: int = field(
        default=256, metadata={"help": "unlabeled server-side texts: training texts no device holds"}
    )
    cluster_share: float = 0.5
    holdout: float = field(
        default=0.2,
        metadata={"help": "share of each device's samples held out (personalization, layer-wise weights)"},
    )
    workers: int | None = None
    round_timeout_s: float = 900.0
    clean: str = "auto"
    fleet: str = field(default="sim", metadata={"help": "fleet name in the MQTT topics"})

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ConfigError(f"--clients must be at least 1, got {self.clients}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.samples_per_client is not None and self.samples_per_client < 1:
            raise ConfigError("--samples-per-client must be at least 1")
        if self.test_samples is not None and self.test_samples < 1:
            raise ConfigError("--test-samples must be at least 1")
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"--bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"--mode must be sync or async, got {self.mode!r}")
        if self.mode == "async":
            parse_staleness(self.staleness)
            if self.allocation_mode != "fixed":
                raise ConfigError("--mode async with --profiles/--allocation is not supported yet")
        if self.stragglers is not None:
            parse_stragglers(self.stragglers)
        if not self.availability_period > 0:
            raise ConfigError("--availability-period must be positive")
        if self.engine not in ENGINE_CHOICES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINE_CHOICES)}, got {self.engine!r}")
        if self.frozen_weights not in FROZEN_WEIGHTS:
            raise ConfigError(
                f"--frozen-weights must be one of {', '.join(FROZEN_WEIGHTS)}, got {self.frozen_weights!r}"
            )
        if self.frozen_weights != "fp32" and (self.engine != "ort" or self.distill_epochs > 0):
            raise ConfigError(
                f"--frozen-weights {self.frozen_weights} is an option of the ort engine's artifacts: it "
                "needs --engine ort, and no --distill-epochs (distillation trains with torch on the server)"
            )
        if self.personalize_epochs < 0:
            raise ConfigError(f"--personalize-epochs must be 0 or more, got {self.personalize_epochs}")
        if self.distill_epochs > 0 and self.allocation_mode == "fixed":
            raise ConfigError(
                "--distill-epochs fuses the modules of different PEFT kinds: it needs --profiles "
                "(or --allocation utility|uniform)"
            )
        if self.distill_samples < 1:
            raise ConfigError(f"--distill-samples must be at least 1, got {self.distill_samples}")
        if self.clusters != "off":
            parse_clusters(self.clusters)
            if self.allocation_mode != "fixed":
                raise ConfigError("--clusters with --profiles/--allocation is not supported yet")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"--holdout must be a fraction in (0, 1), got {self.holdout}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        parse_partition(self.partition)
        if self.attack is not None and parse_attack(self.attack).count > self.clients:
            raise ConfigError("--attack names more attackers than there are clients")
        check_strategy(self.strategy)
        if self.broker is not None:
            parse_broker_url(self.broker)
        if not 0 < self.dp_sample_rate <= 1:
            raise ConfigError(f"--dp-sample-rate must be in (0, 1], got {self.dp_sample_rate}")
        if self.profiles is not None:
            parse_profile_mix(self.profiles)
        if self.allocation != "auto" and self.allocation not in ALLOCATIONS:
            raise ConfigError(
                f"--allocation must be auto or one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}"
            )
        AllocationConfig(alpha=self.alpha, beta=self.beta, gamma=self.gamma)
        if self.allocation_mode != "fixed" and (
            self.strategy not in ("fedit", "hetlora") or self.dp_noise is not None
        ):
            raise ConfigError(
                "--allocation utility/uniform aggregates with fedit or hetlora, without DP, for now"
            )

    def worker_engines(self, train_cfg: TrainConfig, workers: int) -> list[str]:
        """The engine of each worker process: every device of a worker trains with the same one.

        ``auto`` is ORT where onnxruntime-training is installed and the fleet's one module is one
        it trains (LoRA without dropout), else torch; under allocation it keeps torch, so that
        adapters and prompts stay on offer. Where onnxruntime-training is missing but plain
        onnxruntime is there, ``auto`` is ``ort-plain`` for a fleet with one module it trains.
        ``ort-plain``: every worker on the plain-onnxruntime engine, as devices without
        onnxruntime-training (any PEFT kind; under allocation the allocator gives them what it
        trains). ``mixed`` alternates ort and torch; the allocator gives devices on ORT only what
        ORT trains.
        """
        from edge_runtime.engines.ort_engine import ORT_TRAINING_INSTALL, check_ort_support, ort_available
        from edge_runtime.engines.ort_step_engine import check_step_support, plain_ort_available

        if self.engine == "torch":
            return ["torch"] * workers
        fixed = self.allocation_mode == "fixed"
        if self.engine == "ort-plain":
            if not plain_ort_available():
                raise ConfigError("--engine ort-plain needs onnxruntime (pip install 'fedpeft[edge]')")
            if fixed:
                check_step_support(replace(train_cfg, engine="ort-plain"))
            return ["ort-plain"] * workers
        if self.engine == "auto" and not ort_available() and plain_ort_available() and fixed:
            try:
                check_step_support(replace(train_cfg, engine="ort-plain"))
            except ConfigError:
                return ["torch"] * workers
            return ["ort-plain"] * workers
        # under allocation, the allocator gives ORT devices only what ORT trains
        supported = ort_available()
        if supported and self.allocation_mode == "fixed":
            try:
                check_ort_support(replace(train_cfg, engine="ort"))
            except ConfigError:
                supported = False
        if self.engine == "auto":  # a mixed fleet keeps torch: adapters and prompts are on offer
            return ["ort" if supported and self.allocation_mode == "fixed" else "torch"] * workers
        if not ort_available():
            raise ConfigError(f"--engine {self.engine} needs {ORT_TRAINING_INSTALL}")
        if self.allocation_mode == "fixed":
            check_ort_support(replace(train_cfg, engine="ort"))
        if self.engine == "ort":
            return ["ort"] * workers
        if workers < 2:
            raise ConfigError("--engine mixed needs at least 2 worker processes (--workers 2, and 2 cores)")
        return ["ort" if w % 2 == 0 else "torch" for w in range(workers)]

    @property
    def allocation_mode(self) -> str:
        """The allocation in effect: ``auto`` is ``utility`` for a profile mix, else ``fixed``."""
        if self.allocation == "auto":
            return "utility" if self.profiles else "fixed"
        return self.allocation

    def train_config(self, num_labels: int, task: str = "classification") -> TrainConfig:
        """The training configuration every device is assigned; for the tasks without classes
        (question answering, image-text matching, causal LM) ``num_labels`` is 2 (question
        answering's start and end outputs) and logit adjustment, a label prior, is off."""
        qa = task in CLASSLESS_TASKS
        return TrainConfig(
            peft=LoraSpec(
                rank=self.lora_rank,
                alpha=self.lora_alpha,
                target_modules=lora_targets_for(self.model, self.lora_targets),
                train_a=self.strategy != "ffa",  # FFA-LoRA: A stays at its shared initialisation
            ),
            model=self.model,
            num_labels=2 if qa else num_labels,
            bits=self.bits,
            batch_size=self.batch_size,
            micro_batch=self.micro_batch,
            seq_len=self.seq_len,
            local_epochs=self.local_epochs,
            lr=self.lr,
            head_lr=self.head_lr,
            prox_mu=self.prox_mu,
            logit_adjust=0.0 if qa else self.logit_adjust,
            engine="torch",
            frozen_weights=self.frozen_weights,
            task=task if qa else "classification",
        )


def parse_stragglers(text: str) -> tuple[float, float, float]:
    """``FRACTION:SLOWDOWN:AVAILABILITY`` (e.g. ``0.3:5:0.5``): the share of devices that compute
    SLOWDOWN times slower and are online AVAILABILITY of the time."""
    try:
        fraction, slowdown, availability = (float(x) for x in text.split(":"))
    except ValueError:
        fraction = slowdown = availability = -1.0
    if not (0 <= fraction <= 1 and slowdown >= 1 and 0 < availability <= 1):
        raise ConfigError(
            f"--stragglers takes FRACTION:SLOWDOWN:AVAILABILITY with a fraction in [0, 1], a slowdown "
            f">= 1 and an availability in (0, 1], e.g. 0.3:5:0.5; got {text!r}"
        )
    return fraction, slowdown, availability


class FleetClock:
    """The simulated clock of a fleet (both modes): devices compute at their profile's speed, move
    bytes at their link's, and pause while their availability trace says they are offline."""

    def __init__(
        self, host: DeviceProfile, profiles: dict[str, DeviceProfile], traces: dict[str, OnOffTrace]
    ) -> None:
        self.host = host
        self.profiles = profiles
        self.traces = traces

    def start(self, device: str, t: float) -> float:
        """When the device is next online."""
        return self.traces[device].next_on(t)

    def work(self, device: str, train_s: float, bytes_up: float, bytes_down: float) -> float:
        """Seconds of online time a job takes: compute scaled by speed, plus both transfers."""
        p = self.profiles[device]
        return (
            compute_seconds(train_s, self.host.gflops, p.gflops)
            + link_seconds(bytes_up, p.uplink_mbps)
            + link_seconds(bytes_down, p.downlink_mbps)
        )

    def finish(self, device: str, start: float, train_s: float, bytes_up: int, bytes_down: int) -> float:
        """When a job started at ``start`` lands, pausing while the device is offline."""
        return self.traces[device].advance(start, self.work(device, train_s, bytes_up, bytes_down))


def parse_profile_mix(text: str) -> list[tuple[str, float]]:
    """Parse ``TIER=FRACTION,...`` into (profile name, fraction) pairs summing to 1."""
    pairs: list[tuple[str, float]] = []
    for part in text.split(","):
        name, sep, frac = part.strip().partition("=")
        try:
            value = float(frac)
        except ValueError:
            value = -1.0
        if not sep or not name or not value > 0:
            raise ConfigError(f"--profiles expects NAME=FRACTION,... (e.g. low=0.3,high=0.7), got {text!r}")
        try:
            load_profile(name)
        except ProfileError as exc:
            raise ConfigError(f"--profiles: {exc}") from None
        pairs.append((name, value))
    total = sum(f for _, f in pairs)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"--profiles fractions must sum to 1, got {total:g}")
    return pairs


def assign_profiles(mix: list[tuple[str, float]], clients: int, seed: int) -> list[str]:
    """Profile names for each client, in proportion to the mix (largest remainders), shuffled."""
    raw = [f * clients for _, f in mix]
    counts = [int(np.floor(r)) for r in raw]
    for i in sorted(range(len(mix)), key=lambda i: raw[i] - counts[i], reverse=True)[: clients - sum(counts)]:
        counts[i] += 1
    names = [name for (name, _), n in zip(mix, counts, strict=True) for _ in range(n)]
    order = np.random.default_rng(seed).permutation(clients)
    return [names[i] for i in order]


RoundHook = Callable[[dict[str, Any]], None]


class Simulation:
    """One simulated federation; :meth:`run` returns the report dict."""

    def __init__(
        self,
        config: SimulationConfig,
        *,
        on_round: RoundHook | None = None,
        on_update: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.on_round = on_round
        self.on_update = on_update
        self.host = measure()
        self.server_texts: tuple[str, ...] = ()
        self.broker_kind = "external"
        self.data_task = "classification"  # the data's task, read when the data loads

    def _load(self) -> tuple[Dataset, Dataset]:
        cfg = self.config
        folder = resolve_data_dir(cfg.data)
        return load_folder(folder, test_limit=cfg.test_samples, seed=cfg.seed, clean=cfg.clean)

    def _devices(self, train: Dataset) -> list[VirtualDevice]:
        cfg = self.config
        parts = partition(
            train.labels,
            cfg.clients,
            parse_partition(cfg.partition),
            seed=cfg.seed,
            samples_per_client=cfg.samples_per_client,
        )
        if cfg.profiles:
            names = assign_profiles(parse_profile_mix(cfg.profiles), cfg.clients, cfg.seed)
        else:
            names = ["host"] * cfg.clients
        used = np.zeros(len(train), dtype=bool)
        for idx in parts:
            used[np.asarray(idx, dtype=np.int64)] = True
        spare = np.flatnonzero(~used)
        pick = np.random.default_rng([cfg.seed, 11]).permutation(len(spare))[: cfg.distill_samples]
        if isinstance(train, TextDataset):
            self.server_texts = tuple(train.texts[i] for i in np.sort(spare[pick]))  # labels stay unread
        slow: set[int] = set()
        if cfg.stragglers:
            fraction, slowdown, availability = parse_stragglers(cfg.stragglers)
            order = np.random.default_rng([cfg.seed, 17]).permutation(cfg.clients)
            slow = {int(i) for i in order[: round(fraction * cfg.clients)]}
        devices = []
        for i, idx in enumerate(parts):
            idx, held = self._hold_out(np.asarray(idx), i)
            sub = train.subset(idx)
            hold = train.subset(held)
            profile = self.host if names[i] == "host" else load_profile(names[i])
            if i in slow:
                profile = replace(
                    profile,
                    name=f"{profile.name}-straggler",
                    gflops=profile.gflops / slowdown,
                    availability=availability,
                )
            devices.append(
                VirtualDevice(
                    device_id=f"dev{i:03d}",
                    data=sub,
                    profile=profile.to_dict(),
                    attack=cfg.attack if cfg.attack and i < parse_attack(cfg.attack).count else None,
                    holdout=hold,
                )
            )
        return devices

    def _check_task(self, train: Dataset, train_cfg: TrainConfig) -> TrainConfig:
        """Refuse a model, engine or option that cannot train the data's task, before anything
        starts; for images, the training configuration's ``seq_len`` becomes the model's token
        count (patches and class token), which the allocator's cost model reads."""
        cfg = self.config
        model = Path(resolve_model(cfg.model))
        if model.is_dir():
            check_data_task(family_of_dir(model), train.task, cfg.model)
        if train.task in CLASSLESS_TASKS:
            self._check_classless(train.task)
            return train_cfg
        if train.task != "image-classification":
            return train_cfg
        if cfg.engine in ("ort", "ort-plain", "mixed"):
            raise ConfigError(f"--engine {cfg.engine}: {ORT_IMAGE_REFUSAL}")
        if cfg.distill_epochs > 0:
            raise ConfigError(
                "--distill-epochs distills on unlabeled server-side texts; image data is not supported"
            )
        if not model.is_dir():
            return train_cfg
        positions = dims_of_dir(model).max_positions
        return replace(train_cfg, seq_len=max(8, positions))

    def _check_classless(self, task: str) -> None:
        """Refuse the options that exist for classification only, naming each with the task."""
        cfg = self.config
        name = TASK_NAMES[task]
        refused = [
            (
                cfg.engine in ("ort", "ort-plain", "mixed"),
                f"--engine {cfg.engine}: the ONNX Runtime "
                f"engines train classification only; {name} trains with --engine torch",
            ),
            (cfg.distill_epochs > 0, "--distill-epochs distills toward class probabilities"),
            (
                parse_partition(cfg.partition).kind != "iid",
                f"--partition {cfg.partition} skews labels; {name} has none: use --partition iid",
            ),
            (cfg.clusters != "off", "--clusters groups devices by their label histograms"),
            (cfg.personalize_epochs > 0, "--personalize-epochs starts from the device's label prior"),
            (
                cfg.allocation_mode != "fixed",
                f"--profiles/--allocation utility|uniform is not supported for {name} yet",
            ),
        ]
        for bad, reason in refused:
            if bad:
                raise ConfigError(f"{reason} (the data folder holds {name} data)")

    def _hold_out(self, idx: np.ndarray, client: int) -> tuple[np.ndarray, np.ndarray]:
        """Split a client's samples into training and held-out ones (for personalization and
        layer-wise weighting, which measure on them)."""
        cfg = self.config
        if (cfg.personalize_epochs == 0 and cfg.strategy != "layerwise") or len(idx) < 2:
            return idx, idx[:0]
        n_hold = min(len(idx) - 1, max(1, round(cfg.holdout * len(idx))))
        order = np.random.default_rng([cfg.seed, client, 7]).permutation(len(idx))
        return np.sort(idx[order[n_hold:]]), np.sort(idx[order[:n_hold]])

    def run(self) -> dict[str, Any]:
        """Run the federation end to end and return its report."""
        cfg = self.config
        train, test = self._load()
        self.data_task = train.task
        train_cfg = self._check_task(train, cfg.train_config(len(train.label_names), train.task))
        devices = self._devices(train)
        cores = len(os.sched_getaffinity(0))
        workers = min(cfg.workers or cores, cores, len(devices))
        if cfg.broker is None:
            from sdk.embedded_broker import BrokerProcess

            broker: Any = BrokerProcess()
            broker.start()
            url = broker.url
            self.broker_kind = broker.kind
        else:
            broker, url = None, cfg.broker
        try:
            return self._run_with_broker(url, devices, train_cfg, test, workers, cores)
        finally:
            if broker is not None:
                broker.stop()

    def _run_with_broker(
        self,
        url: str,
        devices: list[VirtualDevice],
        train_cfg: TrainConfig,
        test: Dataset,
        workers: int,
        cores: int,
    ) -> dict[str, Any]:
        cfg = self.config
        fleet = f"{cfg.fleet}-{os.getpid()}-{int(time.time())}"  # never see another run's retained modules
        # fixed allocation has no allocator, and needs no shape numbers (CLIP's two towers have
        # no single-tower cost model)
        allocator = (
            None
            if cfg.allocation_mode == "fixed"
            else build_allocator(
                cfg.allocation_mode,
                train_cfg,
                dims_of_dir(resolve_model(train_cfg.model)),
                AllocationConfig(alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma),
            )
        )
        # images and the tasks without classes train on torch only (explicit ORT engines are
        # refused in _check_task): auto means torch for them
        if test.task == "classification":
            engines = cfg.worker_engines(train_cfg, workers)
        else:
            engines = ["torch"] * workers
            if cfg.engine == "auto":
                log.info(
                    "--engine auto trains %s data with torch: the ORT engines train text classification only",
                    test.task,
                )
        artifacts = {
            engine: self._ort_artifacts(train_cfg, allocator, cores, engine)
            for engine in sorted(set(engines))
            if artifact_flavour(engine) is not None
        }
        evaluator = self._evaluator(train_cfg, test, engines, artifacts, cores)
        service_cfg = ServiceConfig(
            fleet=fleet,
            rounds=cfg.rounds,
            train=train_cfg,
            min_clients=max(1, len(devices) // 2),  # rejected updates must not stall a round
            expected_clients=len(devices),
            strategy=cfg.strategy,
            clip_norm=cfg.clip_norm,
            dp_noise_multiplier=cfg.dp_noise,
            dp_delta=cfg.dp_delta,
            dp_sample_rate=cfg.dp_sample_rate,
            norm_bound=cfg.norm_bound,
            # question answering has no classes to take means of: its head starts random
            head_init="random" if train_cfg.task in CLASSLESS_TASKS else cfg.head_init,
            head_scale=cfg.head_scale,
            personalize_epochs=cfg.personalize_epochs,
            clusters=cfg.clusters,
            cluster_share=cfg.cluster_share,
            distill_epochs=cfg.distill_epochs,
            distill_alpha=cfg.distill_alpha,
            mode=cfg.mode,
            buffer_size=cfg.buffer_size,
            staleness=cfg.staleness,
            max_staleness=cfg.max_staleness,
            server_lr=cfg.server_lr,
            server_momentum=cfg.server_momentum,
            delta_downlink=cfg.delta_downlink,
            evaluate_during_next_round=cfg.test_during_next_round,
            round_timeout_s=cfg.round_timeout_s,
            seed=cfg.seed,
        )
        server_transport = MqttTransport(
            parse_broker_url(url), client_id=f"fedpeft-server-{fleet}", clean_start=False
        )
        server_transport.connect()
        service = AggregationService(
            server_transport,
            service_cfg,
            evaluator,
            on_round=self.on_round,
            on_accept=self.on_update,
            allocator=allocator,
            serve_artifacts=False,  # workers get the artifact folders from _ort_artifacts below
            unlabeled=unlabeled(self.server_texts, test.label_names) if cfg.distill_epochs > 0 else None,
            event_clock=self.fleet_clock(devices) if cfg.mode == "async" else None,
        )
        service.start()
        placed = self._place(devices, engines)
        ctx = mp.get_context("spawn")
        results: Any = ctx.Queue()
        stop = ctx.Event()
        jobs = [
            WorkerJob(
                index=w,
                broker_url=url,
                fleet=fleet,
                devices=placed[w],
                seed=cfg.seed,
                threads=max(1, cores // workers),
                max_message_bytes=cfg.max_message_bytes,
                engine=engines[w],
                artifacts=tuple((artifact_slot(c), str(f)) for c, f in artifacts.get(engines[w], ())),
            )
            for w in range(workers)
        ]
        procs = [ctx.Process(target=worker_main, args=(job, results, stop), daemon=True) for job in jobs]
        for p in procs:
            p.start()
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                service.run()
            except BaseException as exc:
                failure.append(exc)

        server_thread = threading.Thread(target=serve, name="aggregation-service", daemon=True)
        wall_start = time.monotonic()
        server_thread.start()
        stats: dict[str, dict[str, Any]] = {}
        exited: set[int] = set()
        errors: list[str] = []
        wind_down: float | None = None  # when the service finished: workers then report and exit
        while len(exited) < workers:
            if not server_thread.is_alive() and wind_down is None:
                # devices the allocator left out never hear "done": tell every worker to stop
                stop.set()
                wind_down = time.monotonic() + 60.0
            try:
                kind, index, payload = results.get(timeout=1.0)
            except queue.Empty:
                if not server_thread.is_alive() and (failure or errors):
                    break
                if wind_down is not None and time.monotonic() > wind_down:
                    break
                continue
            if kind == "stats":
                stats[payload["device_id"]] = payload
            elif kind == "error":
                errors.append(payload)
                log.error("worker %d failed: %s", index, payload)
                service.stop()
            elif kind == "exit":
                exited.add(index)
        server_thread.join(timeout=30)
        stop.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        server_transport.close()
        if failure:
            raise failure[0]
        if errors:
            raise FedPeftError("a device worker failed: " + errors[0].splitlines()[0])
        wall_s = time.monotonic() - wall_start
        return self._report(service, devices, stats, train_cfg, evaluator.total_params, wall_s, url)

    def _evaluator(
        self,
        train_cfg: TrainConfig,
        test: Dataset,
        engines: list[str],
        artifacts: dict[str, list[tuple[TrainConfig, Path]]],
        cores: int,
    ) -> ModelEvaluator:
        """The server-side model: a fleet whose workers all train on one ORT engine is evaluated
        on that engine, from the same artifact folders (so this process imports no torch); any
        other fleet, and distillation (it trains on the server), with torch."""
        cfg = self.config
        if len(set(engines)) == 1 and artifacts.get(engines[0]) and cfg.distill_epochs == 0:
            return OrtEvaluator(
                train_cfg,
                test,
                engine=engines[0],
                artifacts=artifacts[engines[0]],
                seed=cfg.seed,
                threads=cores,
            )
        return Evaluator(train_cfg, test, seed=cfg.seed, threads=cores)

    def _ort_artifacts(
        self, train_cfg: TrainConfig, allocator: Allocator | None, cores: int, engine: str
    ) -> list[tuple[TrainConfig, Path]]:
        """Build (or find cached) the artifacts of ``engine``'s flavour for every module a device
        on that ORT engine may be assigned; a missing folder is exported in a child process
        (:func:`~broker_server.artifacts.build_artifacts_apart`), so torch stays out of this one."""
        from broker_server.allocation import ORT_ENGINES
        from broker_server.artifacts import build_artifacts_apart

        flavour = artifact_flavour(engine)
        assert flavour is not None, engine
        if allocator is None:
            configs = [replace(train_cfg, engine=engine)]
        else:
            trains = ORT_ENGINES[engine]
            specs = {json.dumps(c.peft.to_dict(), sort_keys=True): c.peft for c in allocator.grid}
            configs = [replace(train_cfg, peft=p, engine=engine) for p in specs.values() if trains(p)]
        out: list[tuple[TrainConfig, Path]] = []
        for i, config in enumerate(configs, 1):
            print(
                f"ONNX Runtime artifacts ({flavour}) {i}/{len(configs)}: {peft_key(config.peft)} "
                "(built once, then cached) ...",
                file=sys.stderr,
                flush=True,
            )
            start = time.monotonic()
            folder = build_artifacts_apart(
                config, seed=self.config.seed, threads=cores, flavour=flavour
            ).folder
            print(f"  ready in {time.monotonic() - start:.1f} s: {folder}", file=sys.stderr, flush=True)
            out.append((config, folder))
        return out

    @staticmethod
    def _place(devices: list[VirtualDevice], engines: list[str]) -> list[tuple[VirtualDevice, ...]]:
        """Devices per worker: round robin, except that in a mixed fleet the devices with the least
        RAM go to the ORT workers (the engine that fits them)."""
        workers = len(engines)
        if len(set(engines)) == 1:
            return [tuple(devices[w::workers]) for w in range(workers)]
        ort = [w for w, e in enumerate(engines) if e == "ort"]
        rest = [w for w, e in enumerate(engines) if e != "ort"]
        by_ram = sorted(devices, key=lambda d: float(d.profile.get("ram_mb", 0.0)))
        share = round(len(devices) * len(ort) / workers)
        placed: list[list[VirtualDevice]] = [[] for _ in range(workers)]
        for i, dev in enumerate(by_ram[:share]):
            placed[ort[i % len(ort)]].append(dev)
        for i, dev in enumerate(by_ram[share:]):
            placed[rest[i % len(rest)]].append(dev)
        return [tuple(sorted(p, key=lambda d: d.device_id)) for p in placed]

    def fleet_clock(self, devices: list[VirtualDevice]) -> FleetClock:
        """The simulated clock of this fleet: profiles and seeded availability traces."""
        profiles = {d.device_id: DeviceProfile.from_dict(d.profile) for d in devices}
        traces = {
            d.device_id: trace_for(
                profiles[d.device_id].availability, self.config.availability_period, self.config.seed, i
            )
            for i, d in enumerate(devices)
        }
        return FleetClock(self.host, profiles, traces)

    def _virtual_round_end(self, record: dict[str, Any], clock: FleetClock, start: float) -> float:
        """When a synchronous round that starts at ``start`` ends: its slowest participant, which
        waits to be online and pauses while offline, then the server's time."""
        end = start
        share_down = record["bytes_down"] / max(record["participants"], 1)
        for device, train_s in record["client_train_s"].items():
            work = clock.work(device, train_s, record["client_bytes"][device], share_down)
            end = max(end, clock.traces[device].advance(clock.start(device, start), work))
        return end + float(record.get("server_s", 0.0))

    def _report(
        self,
        service: AggregationService,
        devices: list[VirtualDevice],
        stats: dict[str, dict[str, Any]],
        train_cfg: TrainConfig,
        total_params: int,
        wall_s: float,
        url: str,
    ) -> dict[str, Any]:
        cfg = self.config
        summary = service.fleet_summary()
        fleet_clock = self.fleet_clock(devices)
        clock = 0.0
        rounds = []
        for record, reported in zip(summary.rounds, summary.reported_rounds(), strict=True):
            if record.get("mode") == "async":  # the service ran the clock, from the end of round 0
                virtual = clock + float(record["virtual_s"])
            else:
                clock = virtual = self._virtual_round_end(dict(record), fleet_clock, clock)
            rounds.append(reported | {"virtual_s": virtual})
        bytes_up = sum(int(s["bytes_up"]) for s in stats.values())
        bytes_down = sum(int(s["bytes_down"]) for s in stats.values())
        participations = summary.participations
        clients = []
        for dev in devices:
            s = stats.get(dev.device_id, {})
            known = summary.devices.get(dev.device_id)
            personal = {} if known is None else known.personalization
            dev_cfg = train_cfg if known is None else known.config
            params = summary.fleet_params if known is None else known.trainable_params
            clients.append(
                {
                    "id": dev.device_id,
                    "profile": dev.profile.get("name", "host"),
                    "peft": peft_entry(dev_cfg, params),
                    "bits": dev_cfg.bits,
                    "engine": str(s.get("engine", dev_cfg.engine)),
                    "mem_cap_mb": dev_cfg.mem_cap_mb,
                    "batch_size": dev_cfg.batch_size,
                    "allocation": None if known is None else known.allocation,
                    "peak_rss_mb": float(s.get("peak_rss_mb", 0.0)),
                    "train_s": float(s.get("train_s", 0.0)),
                    "samples": len(dev.data),
                    "label_histogram": dev.data.label_histogram().tolist(),
                    "cluster": None if known is None else known.cluster,
                    "updates_sent": int(s.get("updates_sent", 0)),
                    "updates_accepted": 0 if known is None else known.updates_accepted,
                    "worker": s.get("worker"),
                    "attacker": dev.attack is not None,
                    "holdout": 0 if dev.holdout is None else len(dev.holdout),
                    "global_own_accuracy": personal.get("global_own_accuracy"),
                    "prior_accuracy": personal.get("prior_accuracy"),
                    "personalized_accuracy": personal.get("personalized_accuracy"),
                }
            )
        run_config = asdict(cfg) | {
            "data": str(resolve_data_dir(cfg.data)),
            "broker": "embedded" if cfg.broker is None else str(parse_broker_url(url)),
            "broker_kind": "external" if cfg.broker is not None else self.broker_kind,
            "train": train_config_entry(train_cfg.to_dict(), clients),
            "lora_targets": list(getattr(train_cfg.peft, "target_modules", cfg.lora_targets)),
            "host": self.host.to_dict(),
        }
        return build_report(
            kind="simulate",
            config=run_config,
            rounds=rounds,
            final=task_figures(summary.final, self.data_task, rounds),
            communication=communication(bytes_up, bytes_down, total_params, participations)
            | {"bytes_up_received_by_server": summary.bytes_up_total},
            clients=clients,
            rejected=summary.rejected,
            extra={"wall_s": wall_s},
        )
