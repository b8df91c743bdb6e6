"""Asynchronous aggregation (FedBuff): staleness weights, availability traces, the service's mode."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.aggregation import ClientUpdate, fedit
from broker_server.asynchronous import (
    OnOffTrace,
    StaleUpdate,
    fedbuff_step,
    first_time_reaching,
    parse_staleness,
)
from broker_server.evaluation import Evaluator
from broker_server.report import validate_report
from broker_server.service import AggregationService, ServiceConfig
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import LoraSpec
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from sdk.simulate import Simulation, SimulationConfig, parse_stragglers
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

RULES = ["constant", "poly:0.5", "poly:2", "hinge:1:2", "hinge:0.5:0"]


@pytest.mark.parametrize("text", RULES)
def test_staleness_weights_start_at_one_and_never_grow(text: str) -> None:
    s = parse_staleness(text)
    values = [s(tau) for tau in range(50)]
    assert values[0] == 1.0
    assert all(b <= a for a, b in itertools.pairwise(values))
    assert all(0 < v <= 1 for v in values)


def test_staleness_rules_have_their_shapes_and_bad_ones_are_refused() -> None:
    assert parse_staleness("poly:1")(3) == pytest.approx(0.25)
    hinge = parse_staleness("hinge:1:2")
    assert hinge(2) == 1.0 and hinge(4) == pytest.approx(1 / 3)
    for bad in ("poly", "poly:-1", "hinge:1", "linear:2", "poly:x"):
        with pytest.raises(ConfigError, match="--staleness"):
            parse_staleness(bad)


SHAPES = {"a": (3, 2), "head.weight": (2, 2)}


@st.composite
def buffers(draw: Any) -> list[StaleUpdate]:
    rng = np.random.default_rng(draw(st.integers(0, 10_000)))
    return [
        StaleUpdate(
            ClientUpdate(
                f"c{i}", draw(st.integers(1, 40)), {k: rng.normal(size=s) for k, s in SHAPES.items()}
            ),
            draw(st.integers(0, 6)),
        )
        for i in range(draw(st.integers(1, 5)))
    ]


@settings(max_examples=60, deadline=None)
@given(buffers(), st.sampled_from(RULES), st.randoms())
def test_fedbuff_step_properties(buffer: list[StaleUpdate], rule: str, rnd: Any) -> None:
    state = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    s = parse_staleness(rule)
    shuffled = list(buffer)
    rnd.shuffle(shuffled)
    a, b = fedbuff_step(state, buffer, s), fedbuff_step(state, shuffled, s)
    for k in SHAPES:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    # fresh updates, constant weights, eta = 1: FedIT over the buffer
    fresh = [StaleUpdate(x.update, 0) for x in buffer]
    plain = fedit(state, [x.update for x in buffer])
    got = fedbuff_step(state, fresh, parse_staleness("constant"))
    for k in SHAPES:
        np.testing.assert_allclose(got[k], plain[k], rtol=1e-5, atol=1e-6)
    # one update of weight 1 returns its own module
    solo = fedbuff_step(state, [StaleUpdate(buffer[0].update, 0)], s)
    for k in SHAPES:
        np.testing.assert_allclose(solo[k], state[k] + buffer[0].update.delta[k], rtol=1e-5, atol=1e-6)


def test_a_stale_update_moves_the_module_less() -> None:
    state = {"a": np.zeros(2, np.float32)}
    up = ClientUpdate("c", 10, {"a": np.ones(2)})
    s = parse_staleness("poly:1")
    fresh, stale = fedbuff_step(state, [StaleUpdate(up, 0)], s), fedbuff_step(state, [StaleUpdate(up, 3)], s)
    np.testing.assert_allclose(fresh["a"], 1.0)
    np.testing.assert_allclose(stale["a"], 0.25)
    np.testing.assert_allclose(fedbuff_step(state, [StaleUpdate(up, 0)], s, server_lr=0.5)["a"], 0.5)
    with pytest.raises(ConfigError):
        fedbuff_step(state, [], s)


def _online_time(trace: OnOffTrace, a: float, b: float) -> float:
    """Seconds online in [a, b]: the overlap with every window [k P - phase, k P - phase + on)."""
    p, on = trace.period, trace.availability * trace.period
    if trace.availability >= 1:
        return b - a
    first, last = int(np.floor((a + trace.phase) / p)) - 1, int(np.floor((b + trace.phase) / p)) + 1
    return sum(
        max(0.0, min(b, k * p - trace.phase + on) - max(a, k * p - trace.phase))
        for k in range(first, last + 1)
    )


@settings(max_examples=80, deadline=None)
@given(st.floats(0.05, 1.0), st.floats(10, 1000), st.floats(0, 1000), st.floats(0, 5000), st.floats(0, 3000))
def test_traces_pause_work_while_offline(
    availability: float, period: float, phase: float, t: float, work: float
) -> None:
    trace = OnOffTrace(availability, period, phase)
    start = trace.next_on(t)
    assert start >= t and (trace.is_on(start + 1e-6 * period) or availability >= 1)
    end = trace.advance(t, work)
    assert end >= t + work - 1e-6
    # the online time between t and end is the work (windows counted exactly)
    assert _online_time(trace, t, end) == pytest.approx(work, abs=1e-6 * (1 + end))
    # over many cycles a device is online its availability share of the time
    if availability < 1:
        assert trace.advance(0.0, 100 * availability * period) == pytest.approx(100 * period, rel=0.02)


def test_an_always_online_trace_is_the_identity() -> None:
    trace = OnOffTrace(1.0)
    assert trace.next_on(12.5) == 12.5 and trace.advance(3.0, 4.0) == 7.0
    assert first_time_reaching([1, 2, 3], [0.1, None, 0.5], 0.4) == 3
    assert first_time_reaching([1], [0.1], 0.4) == float("inf")
    with pytest.raises(ConfigError):
        OnOffTrace(0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("async")
    return make_tiny_bert(root / "model"), write_text_folder(root / "data", per_class_train=16)


class StubClock:
    """Fast devices take 1 s a job, "slow" 2.5 s and "snail" 10 s."""

    def __init__(self) -> None:
        self.finishes: list[tuple[str, float]] = []

    def start(self, device: str, t: float) -> float:
        return t

    def finish(self, device: str, start: float, train_s: float, bytes_up: int, bytes_down: int) -> float:
        end = start + {"slow": 2.5, "snail": 10.0}.get(device, 1.0)
        self.finishes.append((device, end))
        return end


def test_the_service_aggregates_every_k_updates_in_simulated_order(tiny: tuple[Path, Path]) -> None:
    train, test = load_folder(tiny[1])
    cfg = TrainConfig(
        model=str(tiny[0]), num_labels=3, seq_len=16, bits=32, batch_size=8, peft=LoraSpec(rank=2, alpha=4.0)
    )
    broker = InMemoryBroker()
    config = ServiceConfig(
        fleet="as", rounds=12, train=cfg, min_clients=4, expected_clients=4, round_timeout_s=30,
        mode="async", buffer_size=2, staleness="poly:1", max_staleness=2,
    )  # fmt: skip
    clock = StubClock()
    service = AggregationService(
        InMemoryTransport(broker, "server"), config, Evaluator(cfg, test, seed=0), event_clock=clock
    )
    service.start()
    agents = []
    for i, name in enumerate(("fast1", "fast2", "slow", "snail")):
        agent = DeviceAgent(
            name,
            "as",
            InMemoryTransport(broker, name),
            train.subset(np.arange(i, len(train), 4)),
            lambda c: TorchEngine(c, seed=0, threads=1),
        )
        agent.on_ready = lambda a: a.run_pending()
        agents.append(agent)
    for a in agents:
        a.start()
    service.run()

    versions = [r for r in service.rounds if r.get("mode") == "async"]
    assert [r["round"] for r in versions] == list(range(1, 13))
    assert all(r["participants"] == 2 for r in versions)
    times = [r["virtual_s"] for r in versions]
    assert times == sorted(times)
    # the fast pair lands every simulated second: versions 1 and 2 at t = 1 and 2
    assert times[:2] == [1.0, 2.0] and versions[0]["clients"] == ["fast1", "fast2"]
    # "slow" lands at t = 2.5 with an update of version 0, two versions old: it counts, weighted
    with_slow = [r for r in versions if "slow" in r["clients"]]
    assert with_slow and with_slow[0]["round"] == 3
    assert with_slow[0]["staleness"][with_slow[0]["clients"].index("slow")] == 2
    # "snail" lands at t = 10, ten versions late: dropped with a reason, never aggregated
    assert "snail" not in [d for r in versions for d in r["clients"]]
    dropped = [r for r in service.rejected if r["client"] == "snail"]
    assert dropped and dropped[0]["reason"].startswith("stale_round")
    assert all(s <= 2 for r in versions for s in r["staleness"])
    assert all(a.done.is_set() for a in agents)  # everyone heard "done" on its own topic


def test_async_settings_that_cannot_work_are_refused(tiny: tuple[Path, Path]) -> None:
    cfg = TrainConfig(model=str(tiny[0]), num_labels=3)
    for kw, match in (
        ({"staleness": "weird"}, "--staleness"),
        ({"buffer_size": 0}, "--buffer-size"),
        ({"strategy": "median"}, "FedBuff"),
        ({"clusters": "auto"}, "--clusters"),
    ):
        with pytest.raises(ConfigError, match=match):
            ServiceConfig(fleet="f", rounds=1, train=cfg, mode="async", **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--mode"):
        ServiceConfig(fleet="f", rounds=1, train=cfg, mode="later")
    with pytest.raises(ConfigError, match="--stragglers"):
        parse_stragglers("0.3:0.5:0.5")
    assert parse_stragglers("0.3:5:0.5") == (0.3, 5.0, 0.5)


def test_simulate_async_with_stragglers_reports_versions_on_the_simulated_clock(
    tiny: tuple[Path, Path],
) -> None:
    config = SimulationConfig(
        data=str(tiny[1]), model=str(tiny[0]), clients=3, rounds=4, partition="iid", samples_per_client=12,
        test_samples=15, seq_len=16, bits=8, workers=2, round_timeout_s=60.0, engine="torch",
        mode="async", buffer_size=2, stragglers="0.34:5:0.5", availability_period=60.0,
    )  # fmt: skip
    report = Simulation(config).run()
    validate_report(report)
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    assert rounds[0]["phase"] == "stats" and all(r["mode"] == "async" for r in rounds[1:])
    times = [r["virtual_s"] for r in rounds]
    assert times == sorted(times) and times[0] > 0
    profiles = sorted(c["profile"] for c in report["clients"])
    assert sum(p.endswith("-straggler") for p in profiles) == 1
    assert report["config"]["mode"] == "async"


def test_a_device_that_comes_back_gets_the_newest_version_at_once(tiny: tuple[Path, Path]) -> None:
    from edge_runtime import wire

    _, test = load_folder(tiny[1])
    cfg = TrainConfig(model=str(tiny[0]), num_labels=3, seq_len=16, peft=LoraSpec(rank=2, alpha=4.0))
    broker = InMemoryBroker()
    config = ServiceConfig(fleet="back", rounds=3, train=cfg, mode="async", buffer_size=2)
    service = AggregationService(InMemoryTransport(broker, "server"), config, Evaluator(cfg, test, seed=0))
    assert service.restore() is None  # the first global state; no store, nothing to take back
    hello = wire.encode_hello(
        wire.Hello(device_id="pi", profile={}, num_samples=5, label_histogram=(5, 0, 0))
    )
    service.inbound.handle("fl/back/hello/pi", hello)  # registered and assigned its own job topic
    topic = f"fl/back/global/{service.config_id}-pi"
    assert topic not in broker.retained  # no job before the asynchronous phase
    service.versions.active, service.buffered.now = True, 42.0  # the asynchronous phase, at t = 42
    service.devices["pi"].online = False  # its last will said offline
    service.inbound.handle("fl/back/hello/pi", hello)  # ... and it is back
    job = wire.decode_global(broker.retained[topic])
    assert job.meta["phase"] == "train" and service.jobs.jobs[job.round].device == "pi"
    assert service.jobs.jobs[job.round].start == 42.0 and service.devices["pi"].online
    service.inbound.handle("fl/back/hello/pi", hello)  # a repeated hello while it trains: no second job
    assert sum(1 for j in service.jobs.jobs.values() if j.device == "pi") == 1


def test_async_versions_count_each_accepted_update_s_bytes_once(tiny: tuple[Path, Path]) -> None:
    """Each version's ``bytes_up`` is what its updates weighed on the wire: received once, counted
    once (an accepted update used to be added a second time when it joined the buffer)."""
    train, test = load_folder(tiny[1])
    cfg = TrainConfig(
        model=str(tiny[0]), num_labels=3, seq_len=16, bits=32, batch_size=8, peft=LoraSpec(rank=2, alpha=4.0)
    )
    broker = InMemoryBroker()
    config = ServiceConfig(
        fleet="bytes", rounds=3, train=cfg, head_init="random", round_timeout_s=30, mode="async",
        buffer_size=1,
    )  # fmt: skip
    service = AggregationService(
        InMemoryTransport(broker, "server"), config, Evaluator(cfg, test, seed=0), event_clock=StubClock()
    )
    sizes: list[int] = []
    spy = InMemoryTransport(broker, "spy")
    spy.subscribe("fl/bytes/update/+", lambda _t, p: sizes.append(len(p)), qos=1)
    service.start()
    agent = DeviceAgent(
        "pi", "bytes", InMemoryTransport(broker, "pi"), train, lambda c: TorchEngine(c, seed=0, threads=1)
    )
    agent.on_ready = lambda a: a.run_pending()
    agent.start()
    service.run()

    versions = [r for r in service.rounds if r.get("mode") == "async"]
    assert [r["participants"] for r in versions] == [1, 1, 1]
    # one device, one update a version, every one taken in: the versions hold every byte received
    assert service.bytes_up_total == service.devices["pi"].bytes_up == sum(sizes[:3])
    assert [r["bytes_up"] for r in versions] == sizes[:3]
    assert sum(r["bytes_up_all"] for r in versions) == service.bytes_up_total
