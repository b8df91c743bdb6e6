"""User-level differential privacy for the aggregate: DP-FedAvg (McMahan et al. 2018).

The mechanism, each release (round) r:

1. **Sampling.** Every registered device is included independently with probability q
   (:class:`PoissonSampler`). Its draws come from a secret key, not the public ``--seed``: who was
   sampled must stay hidden for the amplification by sampling the accountant counts on, and a
   restarted service (the key is kept in its SQLite store) samples the same devices again.
2. **Clipping.** Each sampled device's update is scaled to L2 norm at most C.
3. **Fixed denominator.** The clipped updates are *summed* with uniform weights, Gaussian noise of
   standard deviation z C is added to the sum, and the sum is divided by q N, the expected number of
   participants, where N is the fleet size configured before any device speaks. The denominator
   depends neither on who was sampled nor on sample counts, so one device moves the released mean
   by at most C / (q N) before noise (the paper's fixed-denominator estimator, f~_f).
4. **Round 0.** The class-mean head (FedNCM) is built from the sampled devices' class statistics:
   each device's per-class feature sums divided by its sample count (Frobenius norm at most 1, since
   features are unit vectors), clipped to 1, summed, plus Gaussian noise of standard deviation z.
   Only the directions of the noisy sums are used (the head's rows have a fixed norm), so the counts
   are never released. It is one more sampled Gaussian mechanism with the same q and z.

:func:`dp_epsilon` composes one Poisson-sampled Gaussian mechanism (rate q, noise multiplier z) per
release with the RDP accountant of Google's ``dp-accounting``. The guarantee is user-level
(adding or removing one device with all its data), for the sequence of global modules the service
publishes and anything computed from them alone. It does not cover what the service records about
devices for its operator (the report's per-round client lists, training losses, bytes).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker_server.aggregation import ClientUpdate, State, clip_update, head_from_class_means
from edge_runtime.errors import ConfigError

STATS_CLIP = 1.0
"""L2 bound of one device's normalised class sums in round 0 (features are unit vectors)."""


def new_key() -> bytes:
    """A fresh secret key for a run's sampling and noise draws."""
    return secrets.token_bytes(32)


def _draw(key: bytes, *parts: object) -> bytes:
    text = "/".join(str(p) for p in parts).encode()
    return hashlib.sha256(key + b"\x00" + text).digest()


@dataclass(frozen=True)
class PoissonSampler:
    """Which devices take part in a round: each one independently with probability ``rate``.

    A device's draw for a round is a hash of (key, round, device id), so the sample is the same for
    any order of registration and after a restart with the same key, and nobody without the key can
    tell who was sampled.
    """

    key: bytes = field(repr=False)
    rate: float

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise ConfigError(f"PoissonSampler.rate must be in (0, 1], got {self.rate}")
        if len(self.key) < 16:
            raise ConfigError("PoissonSampler.key must hold at least 16 bytes")

    def includes(self, round_: int, device: str) -> bool:
        """Whether ``device`` is sampled in ``round_``."""
        u = int.from_bytes(_draw(self.key, "sample", round_, device)[:8], "little") / 2.0**64
        return u < self.rate

    def sample(self, round_: int, devices: Iterable[str]) -> set[str]:
        """The devices among ``devices`` sampled in ``round_``."""
        return {d for d in devices if self.includes(round_, d)}

    def noise_rng(self, round_: int) -> np.random.Generator:
        """The generator of a round's noise: secret, and the same when a round is redone."""
        return np.random.default_rng(int.from_bytes(_draw(self.key, "noise", round_), "little"))


@dataclass(frozen=True)
class DPFedAvg:
    """DP-FedAvg around a uniform sum of clipped updates (see the module docstring).

    Pure: given the previous state, the sampled devices' updates and a generator, it returns the
    next state; the service samples, and draws the generator from :meth:`PoissonSampler.noise_rng`.
    """

    clip_norm: float
    noise_multiplier: float
    sample_rate: float
    fleet_size: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ConfigError(f"DPFedAvg.clip_norm must be positive, got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"DPFedAvg.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"DPFedAvg.sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.fleet_size < 1:
            raise ConfigError(f"DPFedAvg.fleet_size must be at least 1, got {self.fleet_size}")

    @property
    def denominator(self) -> float:
        """q N, the expected number of participants: the mean's fixed denominator."""
        return self.sample_rate * self.fleet_size

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on each coordinate of the released mean: z C / (q N)."""
        return self.noise_multiplier * self.clip_norm / self.denominator

    def aggregate(
        self,
        global_state: Mapping[str, np.ndarray],
        updates: Sequence[ClientUpdate],
        rng: np.random.Generator,
    ) -> State:
        """theta + (sum of clipped deltas + N(0, (z C)^2)) / (q N); no updates adds noise alone."""
        clipped = [clip_update(u, self.clip_norm) for u in updates]
        sigma = self.noise_multiplier * self.clip_norm
        new: State = {}
        for name in sorted(global_state):  # a fixed order: the same generator gives the same noise
            shape = np.shape(global_state[name])
            total = np.zeros(shape, dtype=np.float64)
            for u in clipped:
                total += np.asarray(u.delta[name], dtype=np.float64)
            if sigma > 0:
                total += rng.normal(0.0, sigma, size=shape)
            base = np.asarray(global_state[name], dtype=np.float64)
            new[name] = (base + total / self.denominator).astype(np.float32)
        return new

    def noisy_class_sums(
        self, updates: Sequence[ClientUpdate], shape: tuple[int, int], rng: np.random.Generator
    ) -> np.ndarray:
        """Round 0's release: the sum of per-device class sums over sample counts, each clipped to
        L2 norm 1, plus N(0, z^2) on every entry."""
        total = np.zeros(shape, dtype=np.float64)
        for u in updates:
            sums = np.asarray(u.delta["stats.class_sums"], dtype=np.float64)
            contribution = sums / max(u.num_samples, 1)
            norm = float(np.linalg.norm(contribution))
            if norm > STATS_CLIP:  # only a lying device gets here: honest ones are within 1
                contribution *= STATS_CLIP / norm
            total += contribution
        if self.noise_multiplier > 0:
            total += rng.normal(0.0, self.noise_multiplier * STATS_CLIP, size=shape)
        return total

    def class_head(
        self,
        updates: Sequence[ClientUpdate],
        shape: tuple[int, int],
        scale: float,
        rng: np.random.Generator,
    ) -> State:
        """Round 0: the class-mean head from :meth:`noisy_class_sums`. The rows' norm is fixed, so
        only the sums' directions matter and no class counts are released."""
        return head_from_class_means(self.noisy_class_sums(updates, shape, rng), np.ones(shape[0]), scale)

    def report(self, releases: int, delta: float) -> dict[str, Any]:
        """What the guarantee is and covers after ``releases`` releases, for the run's report."""
        return {
            "epsilon": self.epsilon(releases, delta),
            "delta": delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "clip_norm": self.clip_norm,
            "fleet_size": self.fleet_size,
            "denominator": self.denominator,
            "releases": releases,
            "accountant": "dp-accounting RDP, Poisson-sampled Gaussian, composed once per release",
            "unit": "user: one device with all its data (add/remove)",
            "covers": "the global modules published each round, the class-mean head of round 0 "
            "included, and what is computed from them alone; not the report's per-device records",
        }

    def epsilon(self, releases: int, delta: float) -> float:
        """Epsilon at ``delta`` after ``releases`` rounds of this mechanism."""
        return dp_epsilon(
            noise_multiplier=self.noise_multiplier,
            sampling_rate=self.sample_rate,
            rounds=releases,
            delta=delta,
        )


def dp_epsilon(*, noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` compositions of the Poisson-sampled Gaussian mechanism at ``delta``."""
    if noise_multiplier <= 0:
        return float("inf")
    if rounds <= 0:
        return 0.0
    if not 0 < sampling_rate <= 1 or not 0 < delta < 1:
        raise ConfigError("sampling_rate must be in (0, 1] and delta in (0, 1)")
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier))
    accountant.compose(dp_event.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))
