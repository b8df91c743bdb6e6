"""User-level differential privacy for the aggregate (DP-FedAvg, McMahan et al. 2018).

Each client's update is clipped to L2 norm C, the clipped updates are averaged with a fixed
denominator, and Gaussian noise of standard deviation z * C / n is added to the average. The
privacy budget is tracked by the RDP accountant of Google's ``dp-accounting`` library: one
Poisson-sampled Gaussian mechanism per round with sampling rate q = participants / fleet size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from broker_server.aggregation import ClientUpdate, State, clip_update
from edge_runtime.errors import ConfigError


def dp_fedavg(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[ClientUpdate],
    *,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> State:
    """Clip every update to ``clip_norm``, average uniformly, add N(0, (z C / n)^2) noise."""
    if not updates:
        raise ConfigError("cannot aggregate zero updates")
    if not clip_norm > 0 or noise_multiplier < 0:
        raise ConfigError("DP needs clip_norm > 0 and noise_multiplier >= 0")
    clipped = [clip_update(u, clip_norm) for u in updates]
    n = len(clipped)
    sigma = noise_multiplier * clip_norm / n
    new: State = {}
    for name in sorted(global_state):  # fixed order: the same rng gives the same noise
        mean = sum(np.asarray(u.delta[name], dtype=np.float64) for u in clipped) / n
        noise = rng.normal(0.0, sigma, size=np.shape(global_state[name])) if sigma > 0 else 0.0
        new[name] = (np.asarray(global_state[name], dtype=np.float64) + mean + noise).astype(np.float32)
    return new


def dp_epsilon(*, noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` compositions of the sampled Gaussian mechanism at ``delta``."""
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
