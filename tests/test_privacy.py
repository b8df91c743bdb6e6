"""DP-FedAvg: clipping, calibrated noise, and an epsilon that behaves as privacy budgets must."""

from __future__ import annotations

import numpy as np
import pytest

from broker_server.aggregation import ClientUpdate
from broker_server.privacy import dp_epsilon, dp_fedavg
from broker_server.service import ServiceConfig
from edge_runtime.config import TrainConfig
from edge_runtime.errors import ConfigError


def _updates(n: int, scale: float) -> list[ClientUpdate]:
    rng = np.random.default_rng(0)
    return [
        ClientUpdate(f"d{i}", 10, {"w": scale * rng.standard_normal(50).astype(np.float32)}) for i in range(n)
    ]


def test_without_noise_it_is_the_uniform_mean_of_clipped_updates() -> None:
    ups = _updates(4, scale=10.0)  # norms ~70, far above the clip
    out = dp_fedavg(
        {"w": np.zeros(50, np.float32)},
        ups,
        clip_norm=1.0,
        noise_multiplier=0.0,
        rng=np.random.default_rng(0),
    )
    clipped = [u.delta["w"] / np.linalg.norm(u.delta["w"]) for u in ups]
    np.testing.assert_allclose(out["w"], np.mean(clipped, axis=0), rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(out["w"]) <= 1.0 + 1e-5  # one attacker can move the mean by at most C/n each


def test_noise_has_the_calibrated_standard_deviation() -> None:
    g = {"w": np.zeros(20_000, np.float32)}
    ups = [ClientUpdate(f"d{i}", 1, {"w": np.zeros(20_000, np.float32)}) for i in range(8)]
    out = dp_fedavg(g, ups, clip_norm=2.0, noise_multiplier=1.5, rng=np.random.default_rng(1))
    assert np.std(out["w"]) == pytest.approx(1.5 * 2.0 / 8, rel=0.03)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    eps = [dp_epsilon(noise_multiplier=1.0, sampling_rate=1.0, rounds=r, delta=1e-5) for r in (1, 5, 20)]
    assert eps[0] < eps[1] < eps[2]
    assert dp_epsilon(noise_multiplier=4.0, sampling_rate=1.0, rounds=5, delta=1e-5) < eps[1]
    assert dp_epsilon(noise_multiplier=1.0, sampling_rate=0.1, rounds=5, delta=1e-5) < eps[1]
    assert dp_epsilon(noise_multiplier=0.0, sampling_rate=1.0, rounds=5, delta=1e-5) == float("inf")


def test_dp_needs_clipping_and_an_averaging_strategy() -> None:
    train = TrainConfig(num_labels=2)
    with pytest.raises(ConfigError, match="clip-norm"):
        ServiceConfig(fleet="f", rounds=1, train=train, dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="median"):
        ServiceConfig(
            fleet="f", rounds=1, train=train, dp_noise_multiplier=1.0, clip_norm=1.0, strategy="median"
        )
    ServiceConfig(fleet="f", rounds=1, train=train, dp_noise_multiplier=1.0, clip_norm=1.0)
