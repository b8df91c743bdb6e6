"""DP-FedAvg: Poisson sampling, a fixed denominator, noise on every release (round 0's class
statistics too), and an epsilon that is dp-accounting's figure for exactly that mechanism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.aggregation import ClientUpdate
from broker_server.evaluation import Evaluator
from broker_server.privacy import DPFedAvg, PoissonSampler, dp_epsilon
from broker_server.service import AggregationService, ServiceConfig
from broker_server.state import StateStore
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ConfigError
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

KEY = bytes(range(32))


def _updates(n: int, scale: float, dim: int = 50, seed: int = 0) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(f"d{i}", 10 * (i + 1), {"w": scale * rng.standard_normal(dim).astype(np.float32)})
        for i in range(n)
    ]


def test_without_noise_it_is_the_sum_of_clipped_updates_over_q_times_n() -> None:
    mech = DPFedAvg(clip_norm=1.0, noise_multiplier=0.0, sample_rate=0.5, fleet_size=8)
    ups = _updates(3, scale=10.0)  # norms ~70, far above the clip
    out = mech.aggregate({"w": np.zeros(50, np.float32)}, ups, np.random.default_rng(0))
    clipped = [u.delta["w"] / np.linalg.norm(u.delta["w"]) for u in ups]
    # 3 sampled, but the denominator is q N = 4, not 3, and no device is weighted by its samples
    np.testing.assert_allclose(out["w"], np.sum(clipped, axis=0) / 4.0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("q", "n", "sampled"), [(1.0, 8, 8), (0.25, 40, 3), (0.5, 10, 0)])
def test_noise_on_the_mean_has_std_z_c_over_q_n(q: float, n: int, sampled: int) -> None:
    mech = DPFedAvg(clip_norm=2.0, noise_multiplier=1.5, sample_rate=q, fleet_size=n)
    dim = 40_000
    zeros = [ClientUpdate(f"d{i}", 1, {"w": np.zeros(dim, np.float32)}) for i in range(sampled)]
    out = mech.aggregate({"w": np.zeros(dim, np.float32)}, zeros, np.random.default_rng(1))
    assert mech.noise_std == pytest.approx(1.5 * 2.0 / (q * n))
    assert np.std(out["w"]) == pytest.approx(mech.noise_std, rel=0.02)
    assert abs(float(np.mean(out["w"]))) < 4 * mech.noise_std / np.sqrt(dim)


def test_the_noise_comes_from_the_generator_and_differs_between_draws() -> None:
    mech = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, sample_rate=1.0, fleet_size=2)
    g = {"w": np.zeros(100, np.float32)}
    a = mech.aggregate(g, [], np.random.default_rng(5))["w"]
    b = mech.aggregate(g, [], np.random.default_rng(5))["w"]
    c = mech.aggregate(g, [], np.random.default_rng(6))["w"]
    assert np.array_equal(a, b) and not np.allclose(a, c)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.floats(-1.0, 1.0, allow_nan=False, width=32), min_size=4, max_size=4),
            st.integers(0, 10_000),
        ),
        min_size=0,
        max_size=6,
    ),
    st.randoms(use_true_random=False),
)
def test_the_denominator_ignores_sample_counts_order_and_who_was_sampled(
    rows: list[tuple[list[float], int]], shuffle: object
) -> None:
    mech = DPFedAvg(clip_norm=2.0, noise_multiplier=0.0, sample_rate=0.3, fleet_size=10)
    g = {"w": np.zeros(4, np.float32)}
    ups = [ClientUpdate(f"d{i}", n, {"w": np.asarray(v, np.float32)}) for i, (v, n) in enumerate(rows)]
    out = mech.aggregate(g, ups, np.random.default_rng(0))["w"]
    expected = np.sum([np.asarray(v, np.float64) for v, _ in rows], axis=0) / 3.0 if rows else np.zeros(4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)  # norms <= 2: nothing clipped
    recounted = [ClientUpdate(u.device_id, 1, u.delta) for u in ups]
    reordered = list(ups)
    shuffle.shuffle(reordered)  # type: ignore[attr-defined]
    zero = ClientUpdate("idle", 999, {"w": np.zeros(4, np.float32)})
    for variant in (recounted, reordered, [*ups, zero]):
        np.testing.assert_allclose(mech.aggregate(g, variant, np.random.default_rng(0))["w"], out, atol=1e-6)


@pytest.mark.parametrize("scale", [1e2, 1e6])
def test_one_device_moves_the_mean_by_at_most_c_over_q_n(scale: float) -> None:
    mech = DPFedAvg(clip_norm=0.5, noise_multiplier=0.0, sample_rate=0.2, fleet_size=20)
    g = {"w": np.zeros(50, np.float32), "b": np.zeros(3, np.float32)}
    honest = [
        ClientUpdate(f"d{i}", 5, {"w": 0.01 * np.ones(50, np.float32), "b": np.zeros(3, np.float32)})
        for i in range(4)
    ]
    huge = ClientUpdate("evil", 5, {"w": np.full(50, scale, np.float32), "b": np.full(3, -scale, np.float32)})
    a = mech.aggregate(g, honest, np.random.default_rng(0))
    b = mech.aggregate(g, [*honest, huge], np.random.default_rng(0))
    moved = np.sqrt(sum(float(np.sum((b[k] - a[k]) ** 2)) for k in g))
    assert moved == pytest.approx(0.5 / (0.2 * 20), rel=1e-4)  # exactly the bound: it was clipped


def test_poisson_sampling_has_frequency_q_and_is_fixed_by_its_key() -> None:
    devices = [f"dev{i:03d}" for i in range(200)]
    sampler = PoissonSampler(KEY, 0.3)
    draws = np.array([[sampler.includes(r, d) for d in devices] for r in range(50)])
    n = draws.size
    assert abs(draws.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    per_device = draws.mean(axis=0)  # every device, not a fixed few, takes part about q of the time
    assert per_device.min() > 0.05 and per_device.max() < 0.6
    sizes = draws.sum(axis=1)
    assert sizes.std() > 0  # the number sampled varies: Poisson, not a fixed-size sample
    assert PoissonSampler(KEY, 0.3).sample(7, devices) == sampler.sample(7, reversed(devices))
    assert PoissonSampler(bytes(32), 0.3).sample(7, devices) != sampler.sample(7, devices)
    assert PoissonSampler(KEY, 1.0).sample(3, devices) == set(devices)
    a, b = sampler.noise_rng(4).standard_normal(5), sampler.noise_rng(4).standard_normal(5)
    assert np.array_equal(a, b) and not np.array_equal(a, sampler.noise_rng(5).standard_normal(5))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="rate"):
            PoissonSampler(KEY, bad)


def test_epsilon_is_dp_accountings_figure_and_grows_with_releases() -> None:
    from dp_accounting import dp_event, rdp

    mech = DPFedAvg(clip_norm=1.0, noise_multiplier=1.1, sample_rate=0.1, fleet_size=100)
    eps = [mech.epsilon(t, 1e-5) for t in (1, 5, 20)]
    assert eps[0] < eps[1] < eps[2]
    for t, e in zip((1, 5, 20), eps, strict=True):
        accountant = rdp.RdpAccountant()
        for _ in range(t):  # composed one release at a time
            accountant.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.1)))
        assert e == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert dp_epsilon(noise_multiplier=4.0, sampling_rate=0.1, rounds=5, delta=1e-5) < eps[1]
    assert dp_epsilon(noise_multiplier=1.1, sampling_rate=1.0, rounds=5, delta=1e-5) > eps[1]
    assert mech.epsilon(0, 1e-5) == 0.0
    assert DPFedAvg(1.0, 0.0, 0.1, 100).epsilon(5, 1e-5) == float("inf")


def test_round_zero_class_statistics_are_clipped_and_noised() -> None:
    mech = DPFedAvg(clip_norm=1.0, noise_multiplier=0.8, sample_rate=0.5, fleet_size=4)
    shape = (3, 2000)
    noise = mech.noisy_class_sums([], shape, np.random.default_rng(2))
    assert np.std(noise) == pytest.approx(0.8, rel=0.03)  # sensitivity 1, std z: nothing released bare

    def stats(device: str, sums: np.ndarray, counts: list[int]) -> ClientUpdate:
        delta = {"stats.class_sums": sums, "stats.class_counts": np.asarray(counts, np.float32)}
        return ClientUpdate(device, sum(counts), delta)

    rng = np.random.default_rng(3)
    unit = rng.standard_normal(shape)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    honest = stats("a", 5.0 * unit, [5, 5, 5])  # 15 unit features: contributes 5/15 per row
    exact = DPFedAvg(clip_norm=1.0, noise_multiplier=0.0, sample_rate=0.5, fleet_size=4)
    alone = exact.noisy_class_sums([honest], shape, np.random.default_rng(0))
    np.testing.assert_allclose(alone, unit / 3.0, atol=1e-12)
    liar = stats("b", np.full(shape, 1e6), [1, 0, 0])
    both = exact.noisy_class_sums([honest, liar], shape, np.random.default_rng(0))
    assert np.linalg.norm(both - alone) == pytest.approx(1.0)  # its influence is clipped to 1
    head = exact.class_head([honest], shape, 16.0, np.random.default_rng(0))
    np.testing.assert_allclose(np.linalg.norm(head["head.weight"], axis=1), 16.0, rtol=1e-5)
    cosine = np.sum(head["head.weight"] / 16.0 * unit, axis=1)
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)


def test_dp_config_needs_clipping_an_averaging_strategy_and_a_rate_in_0_1() -> None:
    train = TrainConfig(num_labels=2)
    with pytest.raises(ConfigError, match="clip-norm"):
        ServiceConfig(fleet="f", rounds=1, train=train, dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="median"):
        ServiceConfig(
            fleet="f", rounds=1, train=train, dp_noise_multiplier=1.0, clip_norm=1.0, strategy="median"
        )
    with pytest.raises(ConfigError, match="server-lr"):
        ServiceConfig(fleet="f", rounds=1, train=train, dp_noise_multiplier=1.0, clip_norm=1.0, server_lr=0.5)
    for bad in (0.0, 1.01):
        with pytest.raises(ConfigError, match="dp_sample_rate"):
            ServiceConfig(
                fleet="f", rounds=1, train=train, dp_noise_multiplier=1.0, clip_norm=1.0, dp_sample_rate=bad
            )
    config = ServiceConfig(
        fleet="f",
        rounds=1,
        train=train,
        dp_noise_multiplier=1.0,
        clip_norm=1.0,
        dp_sample_rate=0.25,
        min_clients=2,
        expected_clients=8,
    )
    mech = config.dp_mechanism()
    assert mech is not None and mech.denominator == 2.0  # q times the configured fleet, not the data


def test_a_sampled_federation_reports_epsilon_for_every_release_across_a_restart(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    train, test = load_folder(write_text_folder(tmp_path / "data", per_class_train=8))
    cfg = TrainConfig(model=str(model), num_labels=3, seq_len=16)
    names = [f"dev{i}" for i in range(5)]
    config = ServiceConfig(
        fleet="f",
        rounds=3,
        train=cfg,
        min_clients=5,
        expected_clients=5,
        clip_norm=1.0,
        dp_noise_multiplier=1.0,
        dp_sample_rate=0.5,
        round_timeout_s=5,
    )
    store_path = tmp_path / "state.db"
    StateStore(store_path).set_meta("dp_key", KEY.hex())  # a known key: the test knows the sample
    sampler = PoissonSampler(KEY, 0.5)
    broker = InMemoryBroker()
    evaluator = Evaluator(cfg, test, seed=0, threads=1)
    engine = TorchEngine(cfg, seed=0, threads=1)
    shards = [train.subset(list(range(i, len(train), 5))) for i in range(5)]
    agents = [
        DeviceAgent(n, "f", InMemoryTransport(broker, n), shard, lambda c: engine)
        for n, shard in zip(names, shards, strict=True)
    ]
    first = AggregationService(
        InMemoryTransport(broker, "server-1"), config, evaluator, store=StateStore(store_path)
    )
    first.on_round = lambda record: first.stop() if record["round"] == 1 else None
    first.start()
    for agent in agents:
        agent.on_ready = lambda a: a.run_pending()  # in-memory delivery is synchronous
        agent.start()
    first.run()
    first.transport.close()
    assert [r["round"] for r in first.rounds] == [0, 1]

    second = AggregationService(
        InMemoryTransport(broker, "server-2"), config, evaluator, store=StateStore(store_path)
    )
    second.run()
    mech = config.dp_mechanism()
    assert mech is not None
    assert [r["round"] for r in second.rounds] == [0, 1, 2, 3]
    for record in second.rounds:
        r = record["round"]
        assert record["clients"] == sorted(sampler.sample(r, names)), r  # the same sample after the restart
        assert record["dp_sampled"] == len(sampler.sample(r, names))
        assert record["dp_epsilon"] == pytest.approx(mech.epsilon(r + 1, 1e-5))  # round 0 counts
    assert first.rounds[1]["clients"] == second.rounds[1]["clients"]
    assert {r["phase"] for r in second.rounds} == {"stats", "train"}
    report = second.privacy_report()
    assert report is not None
    assert report["epsilon"] == pytest.approx(mech.epsilon(4, 1e-5)) and report["releases"] == 4
    assert (report["sample_rate"], report["noise_multiplier"], report["delta"]) == (0.5, 1.0, 1e-5)
    assert report["denominator"] == 2.5 and "round 0" in report["covers"]
    # every device was asked, but only a sampled device's update was used, and only then
    for agent in agents:
        times_sampled = sum(agent.device_id in r["clients"] for r in second.rounds)
        assert agent.stats.updates_accepted == times_sampled
    assert sum(a.stats.updates_rejected for a in agents) > 0
    assert second.rejected == []  # not being sampled is not a fault
