"""Asynchronous aggregation (FedBuff-style) and the pieces of its virtual clock; pure functions.

The service hands each device a job (the current global version), buffers the updates as they
arrive and, every ``K`` updates, applies

    theta_t = theta_{t-1} + eta * sum_c (n_c s(tau_c) / sum_k n_k) * delta_c

where delta_c is device c's update trained on version t - tau_c and s is a staleness function
(constant, polynomial (1 + tau)^-a, or hinge: 1 up to b, then 1 / (a (tau - b) + 1)). Updates
staler than a bound are dropped with a reason. Device availability follows on/off traces; work
pauses while a device is off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from broker_server.aggregation import ClientUpdate, State
from edge_runtime.errors import ConfigError

Staleness = Callable[[int], float]


def parse_staleness(text: str) -> Staleness:
    """``constant``, ``poly:A`` ((1 + tau)^-A) or ``hinge:A:B`` (1 up to B, then 1/(A (tau - B) + 1))."""
    name, _, rest = text.partition(":")
    try:
        args = [float(x) for x in rest.split(":")] if rest else []
    except ValueError:
        args = [-1.0]
    if name == "constant" and not args:
        return lambda tau: 1.0
    if name == "poly" and len(args) == 1 and args[0] >= 0:
        a = args[0]
        return lambda tau: float((1.0 + tau) ** -a)
    if name == "hinge" and len(args) == 2 and args[0] >= 0 and args[1] >= 0:
        a, b = args
        return lambda tau: 1.0 if tau <= b else float(1.0 / (a * (tau - b) + 1.0))
    raise ConfigError(f"--staleness must be constant, poly:A or hinge:A:B with A, B >= 0, got {text!r}")


@dataclass(frozen=True)
class StaleUpdate:
    """A buffered update and how many versions the global module moved since its base."""

    update: ClientUpdate
    staleness: int


def fedbuff_step(
    state: State, buffer: Sequence[StaleUpdate], staleness: Staleness, server_lr: float = 1.0
) -> State:
    """One asynchronous aggregation: the buffer's deltas, weighted by samples and staleness.

    Weights are n_c s(tau_c) / sum_k n_k: stale updates count less in absolute terms (the step
    shrinks), not only relative to fresh ones. With s = 1, eta = 1 and no staleness this is FedIT
    over the buffer; the order of the buffer does not matter (up to float rounding).
    """
    if not buffer:
        raise ConfigError("cannot aggregate an empty buffer")
    if any(b.staleness < 0 for b in buffer):
        raise ConfigError("staleness cannot be negative")
    n = np.array([max(b.update.num_samples, 0) for b in buffer], dtype=np.float64)
    if n.sum() <= 0:
        n = np.ones(len(buffer))
    s = np.array([staleness(b.staleness) for b in buffer], dtype=np.float64)
    weights = server_lr * n * s / n.sum()
    new: State = {}
    for name, value in state.items():
        acc = np.zeros(value.shape, dtype=np.float64)
        for w, b in zip(weights, buffer, strict=True):
            acc += w * np.asarray(b.update.delta[name], dtype=np.float64)
        new[name] = (np.asarray(value, dtype=np.float64) + acc).astype(np.float32)
    return new


@dataclass(frozen=True)
class OnOffTrace:
    """A device online for ``availability * period`` seconds, then offline for the rest, repeating;
    ``phase`` shifts where in the cycle time 0 falls. Availability 1 is always online."""

    availability: float
    period: float = 600.0
    phase: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.availability <= 1:
            raise ConfigError(f"availability must be in (0, 1], got {self.availability}")
        if not self.period > 0:
            raise ConfigError(f"the availability period must be positive, got {self.period}")

    def _cycle_start(self, t: float) -> float:
        """Start of the cycle that ``t`` falls in (cycles start online)."""
        c = math.floor((t + self.phase) / self.period) * self.period - self.phase
        if t - c < 0:  # float rounding at a cycle's edge
            c -= self.period
        elif t - c >= self.period:
            c += self.period
        return c

    def is_on(self, t: float) -> bool:
        """Whether the device is online at time ``t``."""
        return self.availability >= 1 or t - self._cycle_start(t) < self.availability * self.period

    def next_on(self, t: float) -> float:
        """The first time at or after ``t`` when the device is online."""
        if self.is_on(t):
            return t
        return self._cycle_start(t) + self.period

    def advance(self, t: float, work: float) -> float:
        """When ``work`` seconds of online time, starting at ``t``, are done (work pauses offline)."""
        if work < 0:
            raise ConfigError("work cannot be negative")
        if self.availability >= 1:
            return t + work
        on = self.availability * self.period
        c = self._cycle_start(t)
        if t - c >= on:  # offline: start when the next window opens (same arithmetic as is_on)
            c += self.period
            t = c
        left = c + on - t  # online time left in this window, > 0
        if work <= left:
            return t + work
        full, rest = divmod(work - left, on)  # whole windows after this one, and the remainder
        if rest == 0:
            return c + full * self.period + on
        return c + (full + 1) * self.period + rest


def trace_for(availability: float, period: float, seed: int, index: int) -> OnOffTrace:
    """The seeded trace of one simulated device (its phase is random, so devices are not in step)."""
    phase = float(np.random.default_rng([seed, index, 13]).uniform(0, period))
    return OnOffTrace(availability, period, phase)


def compute_seconds(train_s: float, host_gflops: float, device_gflops: float) -> float:
    """A device's compute time for work measured on this host, scaled by their speeds."""
    return train_s * host_gflops / max(device_gflops, 1e-9)


def link_seconds(nbytes: float, mbps: float) -> float:
    """Time to move ``nbytes`` over a link of ``mbps`` Mbit/s."""
    return nbytes * 8 / max(mbps * 1e6, 1e-9)


def first_time_reaching(times: Sequence[float], accuracies: Sequence[float | None], target: float) -> float:
    """The first time at which accuracy reached ``target`` (inf if never)."""
    for t, acc in zip(times, accuracies, strict=True):
        if acc is not None and acc >= target - 1e-12:
            return float(t)
    return math.inf
