"""Heterogeneity-aware allocation: which PEFT module each device trains, from what it measured.

For device c and candidate configuration p (PEFT kind and size, batch, sequence length) the
allocator scores

    U(c, p) = alpha * R(p) - beta * C(c, p) + gamma * E(p)

- ``R(p)``, reward: the expected accuracy gain of configuration p, in [0, 1]. It starts from a prior
  table (bigger modules are expected to learn more, with diminishing returns: a log curve per kind)
  and is updated online from the accuracy gains the server observes in rounds where p took part
  (:class:`RewardTable`).
- ``C(c, p)``, cost: the larger of predicted training memory over the device's memory cap and the
  predicted time of one round of local training over the round's time budget (both ratios in
  [0, 1] for feasible configurations). Memory above the cap is infeasible, never assigned.
- ``E(p)``, economy: 1 minus the log share of trainable parameters in the largest candidate's, so
  fewer parameters (less to send, less to store) scores higher.

The memory cap of a device is its RAM minus a reserve for the operating system and the app: a
quarter of it, at least 128 MiB and at most 512 MiB, and never more than the cap the device's operator
announced in its profile's ``extra["mem_cap_mb"]`` (:func:`memory_cap_mb`). The uplink bit width
comes from the link: the most bits whose update still goes up within the round's upload budget
(:func:`bits_for_link`).

Everything here is a pure function of its inputs; the cost of a candidate comes from a predictor
(``Predictor``) that the caller supplies, so the allocator knows nothing of engines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from edge_runtime.config import DEFAULT_MICRO_BATCH, FROZEN_WEIGHTS, TrainConfig
from edge_runtime.errors import ConfigError, FedPeftError
from edge_runtime.peft_specs import MIB, LoraSpec, ModelDims, PeftSpec, spec_from_dict
from hw_profiles import DeviceProfile

ALLOWED_BITS = (16, 8, 4, 2)


class NoFeasibleConfig(FedPeftError):
    """No candidate fits the device's memory cap; the device is left out, with this reason."""


@dataclass(frozen=True)
class Candidate:
    """One point of the allocation grid."""

    peft: PeftSpec
    batch_size: int
    seq_len: int

    @property
    def key(self) -> str:
        """A short stable name of the PEFT part, e.g. ``lora:r8`` (the reward table's key)."""
        return peft_key(self.peft)


def peft_key(spec: PeftSpec) -> str:
    """``lora:r8``, ``adapter:b16``, ``prompt:l16``: kind and size of a PEFT module."""
    d = spec.to_dict()
    size = {"lora": ("rank", "r"), "adapter": ("bottleneck", "b"), "prompt": ("length", "l")}.get(spec.kind)
    if size is None or size[0] not in d:
        return spec.kind
    return f"{spec.kind}:{size[1]}{d[size[0]]}"


@dataclass(frozen=True)
class CostEstimate:
    """Predicted training memory (MiB, peak resident) and seconds per step on the device."""

    memory_mb: float
    step_s: float
    trainable_params: int


Predictor = Callable[[Candidate, DeviceProfile], CostEstimate]


@dataclass(frozen=True)
class AllocationConfig:
    """The utility's weights and the budgets costs are measured against."""

    alpha: float = field(default=1.0, metadata={"help": "weight of the expected accuracy gain R"})
    beta: float = field(default=0.5, metadata={"help": "weight of the resource cost C"})
    gamma: float = field(default=0.2, metadata={"help": "weight of the parameter economy E"})
    round_budget_s: float = field(
        default=120.0, metadata={"help": "local training time per round a device should stay within"}
    )
    upload_budget_s: float = field(default=30.0, metadata={"help": "seconds an update may take to go up"})
    reserve_fraction: float = field(default=0.25, metadata={"help": "share of RAM kept for the OS and app"})
    reserve_min_mb: float = field(default=128.0, metadata={"help": "the reserve is at least this"})
    reserve_mb: float = field(default=512.0, metadata={"help": "and at most this"})

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "reserve_mb", "reserve_min_mb"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"AllocationConfig.{name} must be a non-negative number, got {value!r}")
        for name in ("round_budget_s", "upload_budget_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"AllocationConfig.{name} must be positive, got {value!r}")
        if not 0 <= self.reserve_fraction < 1:
            raise ConfigError(
                f"AllocationConfig.reserve_fraction must be in [0, 1), got {self.reserve_fraction}"
            )


def memory_cap_mb(profile: DeviceProfile, config: AllocationConfig) -> float:
    """The profile's RAM minus a reserve, and at most the cap its operator set (``extra["mem_cap_mb"]``)."""
    reserve = min(max(config.reserve_fraction * profile.ram_mb, config.reserve_min_mb), config.reserve_mb)
    own = profile.extra.get("mem_cap_mb")  # `fedpeft edge --memory-cap-mb`, or memory_cap_mb in its TOML
    return profile.ram_mb - reserve if own is None else min(profile.ram_mb - reserve, float(own))


def bits_for_link(trainable_params: int, uplink_mbps: float, budget_s: float) -> int:
    """The most bits per value (16, 8, 4, 2) whose update goes up within ``budget_s``."""
    for bits in ALLOWED_BITS:
        seconds = trainable_params * bits / (uplink_mbps * 1e6)
        if seconds <= budget_s:
            return bits
    return ALLOWED_BITS[-1]


# Prior expected gains: a log curve in the module's size per kind, in [0, 1]. LoRA learns most per
# parameter on encoders, adapters next, prompts least (Hu et al. 2021; He et al. 2022, "Towards a
# unified view of parameter-efficient transfer learning"); the server corrects them online.
PRIOR_SCALE = {"lora": (0.55, 0.08), "adapter": (0.45, 0.08), "prompt": (0.25, 0.06)}


def prior_reward(spec: PeftSpec) -> float:
    """The prior expected gain of a PEFT module, before any observation."""
    base, slope = PRIOR_SCALE.get(spec.kind, (0.3, 0.05))
    d = spec.to_dict()
    size = float(d.get("rank", d.get("bottleneck", d.get("length", 1))))
    layers = d.get("layers")
    if layers:  # adapters in the top layers only: scaled by their share of the layers up to the top one
        size *= len(layers) / (max(layers) + 1)
    return min(1.0, max(0.0, base + slope * math.log2(max(size, 1.0))))


@dataclass
class RewardTable:
    """R(p): the prior, moved toward observed accuracy gains (a running mean with prior weight)."""

    prior_weight: float = 3.0
    gain_scale: float = 0.05  # an accuracy gain of this size in one round counts as reward 1
    observations: dict[str, list[float]] = field(default_factory=dict)

    def reward(self, spec: PeftSpec) -> float:
        """The current estimate for ``spec``'s kind and size."""
        prior = prior_reward(spec)
        seen = self.observations.get(peft_key(spec), [])
        if not seen:
            return prior
        total = self.prior_weight * prior + sum(seen)
        return total / (self.prior_weight + len(seen))

    def observe(self, keys: Iterable[str], accuracy_gain: float) -> None:
        """Credit a round's accuracy gain to every configuration that took part in it."""
        value = min(1.0, max(0.0, 0.5 + accuracy_gain / (2 * self.gain_scale)))
        for key in set(keys):
            self.observations.setdefault(key, []).append(value)

    def to_dict(self) -> dict[str, list[float]]:
        """The observations, for the service's state."""
        return {k: list(v) for k, v in self.observations.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]]) -> RewardTable:
        """Rebuild from :meth:`to_dict`."""
        return cls(observations={str(k): [float(x) for x in v] for k, v in data.items()})


@dataclass(frozen=True)
class Allocation:
    """What a device was assigned and why: its candidate, bit width and utility terms."""

    candidate: Candidate
    bits: int
    mem_cap_mb: float
    cost: CostEstimate
    reward: float
    resource_cost: float
    economy: float
    utility: float

    def terms(self) -> dict[str, float]:
        """The utility's terms for the report."""
        return {
            "R": round(self.reward, 4),
            "C": round(self.resource_cost, 4),
            "E": round(self.economy, 4),
            "U": round(self.utility, 4),
            "predicted_memory_mb": round(self.cost.memory_mb, 1),
            "predicted_step_s": round(self.cost.step_s, 4),
        }


def allocate(
    profile: DeviceProfile,
    candidates: Sequence[Candidate],
    predict: Predictor,
    rewards: RewardTable,
    config: AllocationConfig,
    *,
    steps_per_round: int,
) -> Allocation:
    """The feasible candidate of highest utility for ``profile``; ties go to the earlier candidate.

    ``steps_per_round`` is how many training steps a round takes at batch size 1 worth of samples
    (samples x epochs); a candidate's round time is its step time x ceil(samples / batch).
    """
    if not candidates:
        raise ConfigError("the allocation grid is empty")
    cap = memory_cap_mb(profile, config)
    costs = [predict(c, profile) for c in candidates]
    largest = max(cost.trainable_params for cost in costs)
    best: Allocation | None = None
    smallest_need = math.inf
    for cand, cost in zip(candidates, costs, strict=True):
        smallest_need = min(smallest_need, cost.memory_mb)
        if cap <= 0 or cost.memory_mb > cap:
            continue
        steps = math.ceil(steps_per_round / cand.batch_size)
        round_s = cost.step_s * steps
        resource = max(cost.memory_mb / cap, min(round_s / config.round_budget_s, 2.0))
        economy = 1.0 - math.log1p(cost.trainable_params) / math.log1p(largest) if largest > 0 else 0.0
        reward = rewards.reward(cand.peft)
        utility = config.alpha * reward - config.beta * resource + config.gamma * economy
        if best is None or utility > best.utility + 1e-12:
            bits = bits_for_link(cost.trainable_params, profile.uplink_mbps, config.upload_budget_s)
            best = Allocation(cand, bits, cap, cost, reward, resource, economy, utility)
    if best is None:
        raise NoFeasibleConfig(
            f"device profile {profile.name!r}: memory cap {cap:.0f} MiB "
            f"(RAM {profile.ram_mb:.0f} MiB minus reserve) is below the smallest candidate's "
            f"predicted {smallest_need:.0f} MiB"
        )
    return best


def default_grid(
    *,
    lora_ranks: Sequence[int] = (2, 4, 8, 16),
    adapter_bottlenecks: Sequence[int] = (8, 32),
    prompt_lengths: Sequence[int] = (8, 16),
    batch_sizes: Sequence[int] = (8, 16, 4),  # ties go to the earlier: batch 4 only where it must
    seq_lens: Sequence[int] = (128,),
    lora_targets: Sequence[str] = ("query", "value"),
    num_layers: int | None = None,
) -> list[Candidate]:
    """The candidate grid: every (kind and size) x batch x sequence length.

    With ``num_layers``, adapters also come in the top half of the layers only: gradients then stop
    halfway down, which saves activation memory and backward time on small devices.
    """
    specs: list[PeftSpec] = [
        spec_from_dict({"kind": "lora", "rank": r, "alpha": 2.0 * r, "target_modules": list(lora_targets)})
        for r in lora_ranks
    ]
    specs += [spec_from_dict({"kind": "adapter", "bottleneck": b}) for b in adapter_bottlenecks]
    if num_layers is not None and num_layers >= 2:
        top = list(range(num_layers // 2, num_layers))
        specs += [
            spec_from_dict({"kind": "adapter", "bottleneck": b, "layers": top}) for b in adapter_bottlenecks
        ]
    specs += [spec_from_dict({"kind": "prompt", "length": n}) for n in prompt_lengths]
    return [Candidate(s, b, n) for s in specs for b in batch_sizes for n in seq_lens]


def _size(spec: PeftSpec) -> tuple[float, bool]:
    """Order within a kind: by size, then a module in every layer above one in some layers."""
    d = spec.to_dict()
    return float(d.get("rank", d.get("bottleneck", d.get("length", 0)))), not d.get("layers")


@dataclass
class Allocator:
    """The allocation grid, a cost predictor, the reward table and the utility's settings."""

    grid: Sequence[Candidate]
    predict: Predictor
    config: AllocationConfig = field(default_factory=AllocationConfig)
    rewards: RewardTable = field(default_factory=RewardTable)
    adapt_bits: bool = True  # False: every device keeps the fleet's bit width
    # the ONNX Runtime engines' costs (``ort`` and ``ort-plain``); None: no device trains with ORT
    predict_ort: Predictor | None = None

    def __post_init__(self) -> None:
        if not self.grid:
            raise ConfigError("the allocation grid is empty")

    def _for_engine(self, engine: str) -> tuple[list[Candidate], Predictor] | None:
        """The candidates an engine trains and its cost model (None: this allocator cannot use it)."""
        if engine == "torch":
            return list(self.grid), self.predict
        trains = ORT_ENGINES.get(engine)
        if trains is not None and self.predict_ort is not None:
            grid = [c for c in self.grid if trains(c.peft)]
            return (grid, self.predict_ort) if grid else None
        return None

    def assign(
        self,
        base: TrainConfig,
        profile: DeviceProfile,
        num_samples: int,
        engines: Sequence[str] = ("torch",),
    ) -> tuple[TrainConfig, Allocation]:
        """The configuration for this device (``base`` with the chosen module, batch, length, bits).

        ``engines`` are those the device has, in its order of preference (its hello says): the
        first one with a feasible candidate wins, so a 512 MB device that has ONNX Runtime gets a
        module ORT trains within its cap even where torch would not fit.
        """
        failure: NoFeasibleConfig | None = None
        for engine in engines:
            if base.frozen_weights != "fp32" and engine != "ort":
                continue  # int8 frozen weights are an option of the ort engine's artifacts only
            usable = self._for_engine(engine)
            if usable is None:
                continue
            grid, predict = usable
            try:
                chosen = allocate(
                    profile,
                    grid,
                    predict,
                    self.rewards,
                    self.config,
                    steps_per_round=max(1, num_samples) * base.local_epochs,
                )
            except NoFeasibleConfig as exc:
                failure = exc if failure is None else failure
                continue
            cfg = replace(
                base,
                peft=chosen.candidate.peft,
                batch_size=chosen.candidate.batch_size,
                seq_len=chosen.candidate.seq_len,
                bits=chosen.bits if self.adapt_bits else base.bits,
                mem_cap_mb=round(chosen.mem_cap_mb, 1),
                engine=engine,
            )
            return cfg, chosen
        if failure is not None:
            raise failure
        needs = (
            f" (frozen_weights {base.frozen_weights} trains on ort only)"
            if base.frozen_weights != "fp32"
            else ""
        )
        raise NoFeasibleConfig(
            f"device profile {profile.name!r}: none of its engines {list(engines)} is usable here{needs}"
        )

    def largest(self, base: TrainConfig) -> list[TrainConfig]:
        """Per PEFT kind in the grid, ``base`` with that kind's largest module (the super-state)."""
        best: dict[str, PeftSpec] = {}
        for cand in self.grid:
            kind = cand.peft.kind
            if kind not in best or _size(cand.peft) > _size(best[kind]):
                best[kind] = cand.peft
        return [replace(base, peft=spec) for _, spec in sorted(best.items())]


def ort_trains(spec: PeftSpec) -> bool:
    """Whether the ONNX Runtime engine trains this module (LoRA without dropout)."""
    return isinstance(spec, LoraSpec) and spec.dropout == 0


def plain_ort_trains(spec: PeftSpec) -> bool:
    """Whether the plain-onnxruntime engine (``ort-plain``) trains this module: every kind, but no
    LoRA dropout (its step graph is traced in eval mode)."""
    return not (isinstance(spec, LoraSpec) and spec.dropout > 0)


# The ONNX Runtime engines and the modules each trains. Both share ORT's cost model below: the one
# point measured for ort-plain (bench/results/ort_memory_plain: MiniLM, LoRA r8, batch 32, length
# 64) peaked at 578 MiB, against 605 MiB for ort and 568 MiB predicted, within the fit's 9%.
# Adapters and prompts on ort-plain are predicted by the same constants, not yet measured.
ORT_ENGINES: dict[str, Callable[[PeftSpec], bool]] = {"ort": ort_trains, "ort-plain": plain_ort_trains}


# The ORT engine's memory, fitted like the torch constants (see edge_runtime.peft_specs) to the peak
# resident memory (VmHWM) of fresh torch-free processes training MiniLM + LoRA with ORT 1.19.2, one
# thread, the lean allocator on, at (rank, batch, seq_len) = (8, 4, 32), (8, 8, 64), (8, 8, 128),
# (8, 16, 64), (8, 32, 64), (2, 4, 128), (16, 16, 128), (8, 4, 128): least squares gave 138 MiB
# and 0.49 of the torch activation estimate, within 9% of every point; rounded up to stay on the
# safe side. Far less runtime (no torch, no transformers) and fewer kept activations than torch.
ORT_RUNTIME_MB = 150.0
ORT_ACTIVATION_SCALE = 0.5  # relative to the torch model's activation estimate
# Artifacts built with frozen_weights="int8" hold, beside the fp32 weights the input gradients
# read, int8 copies of the linear weights as initializers of both the training and the eval graph
# (broker_server.int8_weights). bench/results/ort_memory_int8 (MiniLM, LoRA r8, one thread, the
# lean allocator on; rerun: bench/ort_memory.py --engines ort --int8 --threads 1) measured the
# peak 25.7 MiB above fp32's at (batch, seq_len) = (32, 64) and (8, 128) alike, 2.54 times the
# 10.1 MiB of one int8 copy: rounded up to 2.6 bytes per linear weight.
ORT_INT8_BYTES_PER_WEIGHT = 2.6
# Artifacts built with frozen_weights="int8-grad" hold the int8 copies and no fp32 linear weights.
# bench/results/ort_memory_int8_grad (same setup, AMD EPYC; rerun: bench/ort_memory.py --engines
# ort --frozen-weights int8 int8-grad --threads 1) measured the peak 5.1 MiB above fp32's at
# (batch, seq_len) = (32, 64) and 3.2 MiB above at (8, 128), 0.51 and 0.32 bytes per linear
# weight (and int8 again 24.7 and 26.2 MiB above): rounded up to 0.6.
ORT_INT8_GRAD_BYTES_PER_WEIGHT = 0.6
ORT_FROZEN_BYTES_PER_WEIGHT = {
    "fp32": 0.0,
    "int8": ORT_INT8_BYTES_PER_WEIGHT,
    "int8-grad": ORT_INT8_GRAD_BYTES_PER_WEIGHT,
}


def ort_predictor(
    dims: ModelDims,
    num_labels: int,
    micro_batch: int = DEFAULT_MICRO_BATCH,
    frozen_weights: str = "fp32",
) -> Predictor:
    """Costs on the ORT engine: the spec's model with ORT's runtime and activation constants, and
    with ``frozen_weights`` other than fp32 what its int8 linear weights add on top
    (:data:`ORT_FROZEN_BYTES_PER_WEIGHT`)."""
    if frozen_weights not in FROZEN_WEIGHTS:
        raise ConfigError(
            f"frozen_weights must be one of {', '.join(FROZEN_WEIGHTS)}, got {frozen_weights!r}"
        )
    int8_mb = ORT_FROZEN_BYTES_PER_WEIGHT[frozen_weights] * dims.linear_weights / MIB

    def predict(candidate: Candidate, profile: DeviceProfile) -> CostEstimate:
        cost = candidate.peft.predict_cost(
            dims, candidate.batch_size, candidate.seq_len, num_labels, micro_batch=micro_batch
        )
        memory = (
            ORT_RUNTIME_MB
            + cost.frozen_mb
            + int8_mb
            + cost.trainable_mb
            + ORT_ACTIVATION_SCALE * cost.activation_mb
        )
        return CostEstimate(
            memory_mb=memory, step_s=cost.step_s(profile.gflops), trainable_params=cost.trainable_params
        )

    return predict


def spec_predictor(dims: ModelDims, num_labels: int, micro_batch: int = DEFAULT_MICRO_BATCH) -> Predictor:
    """The specs' own cost model (:meth:`PeftSpec.predict_cost`) on an encoder of ``dims``, whose
    engines run a batch in micro-batches of ``micro_batch`` rows (``TrainConfig.micro_batch``)."""

    def predict(candidate: Candidate, profile: DeviceProfile) -> CostEstimate:
        cost = candidate.peft.predict_cost(
            dims, candidate.batch_size, candidate.seq_len, num_labels, micro_batch=micro_batch
        )
        return CostEstimate(
            memory_mb=cost.memory_mb,
            step_s=cost.step_s(profile.gflops),
            trainable_params=cost.trainable_params,
        )

    return predict


ALLOCATIONS = ("fixed", "utility", "uniform")


def build_allocator(
    mode: str,
    base: TrainConfig,
    dims: ModelDims,
    config: AllocationConfig | None = None,
    grid: Sequence[Candidate] | None = None,
) -> Allocator | None:
    """``fixed``: no allocator, every device gets ``base``. ``utility``: the grid, scored by U.
    ``uniform``: ``base`` for every device it fits, the others left out (plain FedAvg-LoRA).
    """
    if mode not in ALLOCATIONS:
        raise ConfigError(f"unknown allocation {mode!r}; use one of {', '.join(ALLOCATIONS)}")
    if mode == "fixed":
        return None
    if mode == "uniform":
        grid = [Candidate(base.peft, base.batch_size, base.seq_len)]
    elif grid is None:
        targets = getattr(base.peft, "target_modules", ("query", "value"))
        grid = default_grid(seq_lens=(base.seq_len,), lora_targets=tuple(targets), num_layers=dims.layers)
    return Allocator(
        grid,
        spec_predictor(dims, base.num_labels, base.micro_batch),
        config or AllocationConfig(),
        adapt_bits=mode == "utility",
        predict_ort=ort_predictor(dims, base.num_labels, base.micro_batch, base.frozen_weights),
    )
