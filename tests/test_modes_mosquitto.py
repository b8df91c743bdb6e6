"""Every user-facing federation mode over a real Mosquitto (issue 12).

Async (``--mode async``), clusters (``--clusters``), distillation (``--distill-epochs`` over a
fleet of mixed PEFT kinds), layer-wise (``--strategy layerwise``), personalization
(``--personalize-epochs``), FFA (``--strategy ffa``) and exact (``--strategy exact``) each have an
in-memory test beside their unit tests; here each runs again with the in-memory broker swapped for
a mosquitto of its own (the ``mosquitto`` fixture: a free port, its own config, stopped afterwards;
a missing binary fails the test, see ``tests/brokers.py``). The real aggregation service and real
device agents, each on its own MQTT connection, train a tiny random BERT on a few dozen texts, and
the assertions are what the mode promises, the in-memory tests' where they exist.

The devices of a test take turns on one training thread, as a simulator worker's devices do; the
service runs in its own thread with a real clock (no event clock: the deployment's case).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import broker_server.strategies as strategies_module
from broker_server.aggregation import ClientUpdate, fedit, layer_group, layerwise
from broker_server.allocation import AllocationConfig, Allocator
from broker_server.distillation import unlabeled
from broker_server.evaluation import Evaluator
from broker_server.exact import exact_fedavg, lora_pairs
from broker_server.service import AggregationService, ServiceConfig
from edge_runtime import wire
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset, load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.peft_specs import LoraSpec
from edge_runtime.transport import MqttTransport, parse_broker_url
from hw_profiles import DeviceProfile
from tests.brokers import Mosquitto
from tests.helpers import write_text_folder
from tests.test_mixed_fleet import KIND_GRID, predict_by_kind
from tests.tiny_model import make_tiny_bert

LORA = LoraSpec(rank=2, alpha=4.0)
KIND_OF_NAME = {"lora": "lora_", "adapter": ".adapter.", "prompt": "prompt."}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("modes")
    return make_tiny_bert(root / "model"), write_text_folder(root / "data", per_class_train=24)


@dataclass
class Device:
    """One device of a test fleet: its id, training data, held-out samples and profile."""

    name: str
    data: TextDataset
    holdout: TextDataset | None = None
    profile: dict[str, Any] | None = None


def _torch_engine(config: TrainConfig) -> TorchEngine:
    return TorchEngine(config, seed=0, threads=1)


def federate(
    broker: Mosquitto,
    make_service: Callable[[MqttTransport], AggregationService],
    devices: Sequence[Device],
    *,
    timeout_s: float = 90.0,
) -> tuple[AggregationService, list[DeviceAgent]]:
    """Run one federation over ``broker`` until the service returns and every device heard "done".

    ``make_service`` builds the service on the server's transport (a test can wrap its methods
    there, before it runs). Fails the test if the service raised or did not finish in time.
    """
    url = parse_broker_url(broker.url)
    opened: list[MqttTransport] = []

    def connect(client_id: str, will: tuple[str, bytes, bool] | None = None) -> MqttTransport:
        transport = MqttTransport(url, client_id=client_id, clean_start=True, will=will)
        transport.connect()
        opened.append(transport)
        return transport

    try:
        service = make_service(connect("server"))
        fleet = service.config.fleet
        service.start()
        wake = threading.Event()
        agents = []
        for d in devices:
            offline = wire.encode_status(wire.Status(device_id=d.name, state="offline", detail={}))
            will = (wire.topic(fleet, "status", d.name), offline, False)
            agents.append(
                DeviceAgent(
                    d.name,
                    fleet,
                    connect(f"{fleet}-{d.name}", will),
                    d.data,
                    _torch_engine,
                    profile=d.profile,
                    holdout=d.holdout,
                    on_ready=lambda _agent: wake.set(),
                )
            )
        failures: list[BaseException] = []

        def serve() -> None:
            try:
                service.run()
            except BaseException as exc:
                failures.append(exc)

        stop = threading.Event()

        def train() -> None:
            try:
                while not stop.is_set() and not all(a.done.is_set() for a in agents):
                    worked = [a.run_pending() for a in agents]
                    if not any(worked):
                        wake.wait(0.1)
                        wake.clear()
            except BaseException as exc:
                failures.append(exc)

        server = threading.Thread(target=serve, name="service", daemon=True)
        trainer = threading.Thread(target=train, name="devices", daemon=True)
        server.start()
        for agent in agents:
            agent.start()
        trainer.start()
        server.join(timeout_s)
        finished = not server.is_alive()
        if not finished:
            service.stop()
            server.join(10)
        deadline = time.monotonic() + 15
        while finished and time.monotonic() < deadline and not all(a.done.is_set() for a in agents):
            time.sleep(0.05)  # "done" is on its way to the devices over the broker
        stop.set()
        trainer.join(30)
    finally:
        for transport in opened:
            transport.close()
    if failures:
        raise failures[0]
    assert finished, f"the service did not finish within {timeout_s:g} s; broker log:\n{broker.log_text()}"
    assert all(a.done.is_set() for a in agents), [a.device_id for a in agents if not a.done.is_set()]
    return service, agents


def retained_modules(broker: Mosquitto, topic_filter: str, count: int) -> dict[str, wire.GlobalModule]:
    """The retained global modules under ``topic_filter``, as a newcomer would get them from the broker."""
    got: dict[str, wire.GlobalModule] = {}
    arrived = threading.Event()

    def on_module(topic: str, payload: bytes) -> None:
        got[topic] = wire.decode_global(payload)
        if len(got) >= count:
            arrived.set()

    transport = MqttTransport(parse_broker_url(broker.url), client_id="late-reader", clean_start=True)
    transport.connect()
    try:
        transport.subscribe(topic_filter, on_module)
        arrived.wait(10)
        time.sleep(0.2)  # more than ``count`` would fail the caller's check, not hide here
    finally:
        transport.close()
    return got


def _ends_on(agent: DeviceAgent, state: dict[str, np.ndarray]) -> None:
    assert agent.final_state is not None, agent.device_id
    assert set(agent.final_state) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(agent.final_state[name], value, err_msg=f"{agent.device_id}: {name}")


def _lora_cfg(tiny: tuple[Path, Path], **kw: Any) -> TrainConfig:
    values: dict[str, Any] = dict(
        model=str(tiny[0]), num_labels=3, seq_len=16, bits=32, batch_size=8, peft=LORA
    )
    values.update(kw)
    return TrainConfig(**values)


def test_async_versions_advance_and_stale_updates_stay_within_the_bound(
    tiny: tuple[Path, Path], mosquitto: Mosquitto
) -> None:
    train, test = load_folder(tiny[1])
    cfg = _lora_cfg(tiny)
    config = ServiceConfig(
        fleet="as", rounds=4, train=cfg, min_clients=3, expected_clients=3, round_timeout_s=30,
        mode="async", buffer_size=2, staleness="poly:1", max_staleness=2,
    )  # fmt: skip
    initial: dict[str, np.ndarray] = {}

    def make(transport: MqttTransport) -> AggregationService:
        evaluator = Evaluator(cfg, test, seed=0, threads=1)
        initial.update(evaluator.initial_state())
        return AggregationService(transport, config, evaluator)

    devices = [Device(f"d{i}", train.subset(np.arange(i, len(train), 3)[:12])) for i in range(3)]
    service, agents = federate(mosquitto, make, devices)

    # the class-mean round is synchronous; then every K = 2 updates in order of arrival make a version
    assert service.rounds[0]["phase"] == "stats" and "mode" not in service.rounds[0]
    versions = [r for r in service.rounds if r.get("mode") == "async"]
    assert [r["round"] for r in versions] == [1, 2, 3, 4]
    assert all(r["participants"] == 2 and len(r["staleness"]) == 2 for r in versions)
    assert all(set(r["clients"]) <= {"d0", "d1", "d2"} for r in versions)
    walls = [r["wall_s"] for r in versions]
    assert walls == sorted(walls)
    # every device got version 0's job: two of them make version 1, so the third device's update
    # is at least one version old when it lands; it is aggregated (weighted down) or dropped
    aggregated = [s for r in versions for s in r["staleness"]]
    dropped = [r["reason"] for r in service.rejected]
    assert all(0 <= s <= config.max_staleness for s in aggregated), aggregated
    assert all(reason.startswith("stale_round") and "(bound 2)" in reason for reason in dropped), dropped
    assert any(s >= 1 for s in aggregated) or dropped, (aggregated, dropped)
    assert sum(r["stale_updates"] for r in versions) == len(dropped)
    final = service.final_state()
    assert any(not np.allclose(final[k], initial[k]) for k in initial if k.endswith("lora_B"))
    for agent in agents:  # "done" reached every device, on its own job topic, with the last version
        _ends_on(agent, final)


def test_clusters_by_label_distribution_each_with_its_own_published_module(
    tiny: tuple[Path, Path], mosquitto: Mosquitto
) -> None:
    train, test = load_folder(tiny[1])
    cfg = _lora_cfg(tiny)
    config = ServiceConfig(
        fleet="clu", rounds=2, train=cfg, min_clients=6, expected_clients=6, round_timeout_s=30,
        clusters="auto", personalize_epochs=1,
    )  # fmt: skip
    devices = []
    for i in range(6):  # two devices for each class
        half = np.flatnonzero(train.labels == i // 2)[(i % 2) :: 2]
        devices.append(Device(f"d{i}", train.subset(half[:8]), holdout=train.subset(half[8:])))
    service, agents = federate(
        mosquitto, lambda t: AggregationService(t, config, Evaluator(cfg, test, seed=0, threads=1)), devices
    )

    clustering = service.clustering
    assert clustering is not None and clustering.k == 3
    assert [clustering.members[f"d{i}"] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    states = service.cluster_states()
    for agent in agents:  # every device ends on its own cluster's module
        _ends_on(agent, states[clustering.members[agent.device_id]])
    # each cluster's head learned its own class: its class-mean row comes from its devices
    assert not np.allclose(states[0]["head.weight"], states[1]["head.weight"])
    train_rounds = [r for r in service.rounds if r["phase"] == "train"]
    assert len(train_rounds) == 2
    for record in train_rounds:
        assert set(record["accuracy_by_cluster"]) == {"0", "1", "2"}
        assert set(record["shared_tensors"]) <= set(states[0])
        assert record["participants"] == 6
    summary = service.cluster_summary()
    assert summary is not None and summary["sizes"] == [2, 2, 2]
    assert set(service.personalization) == {f"d{i}" for i in range(6)}
    # the broker holds one retained module per cluster, on the cluster's own topic: the final one
    published = retained_modules(mosquitto, "fl/clu/global/+", 3)
    assert sorted(published) == sorted(service.broadcast.cluster_group(c).topic for c in range(3))
    for c in range(3):
        module = published[service.broadcast.cluster_group(c).topic]
        assert module.meta["phase"] == "done"
        for name, value in states[c].items():
            np.testing.assert_array_equal(module.tensors[name], value)


def test_distillation_moves_every_kinds_module_in_a_mixed_fleet(
    tiny: tuple[Path, Path], mosquitto: Mosquitto
) -> None:
    train, test = load_folder(tiny[1])
    base = TrainConfig(model=str(tiny[0]), num_labels=3, seq_len=16, bits=8)
    config = ServiceConfig(
        fleet="fuse", rounds=2, train=base, min_clients=3, expected_clients=3, round_timeout_s=30,
        distill_epochs=1,
    )  # fmt: skip
    # beta = 0: each device takes the most rewarding kind under its cap (LoRA > adapter > prompt)
    allocator = Allocator(KIND_GRID, predict_by_kind, AllocationConfig(beta=0.0, gamma=0.0))
    fused: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []

    def make(transport: MqttTransport) -> AggregationService:
        service = AggregationService(
            transport,
            config,
            Evaluator(base, test, seed=0, threads=1),
            allocator=allocator,
            unlabeled=unlabeled(train.texts[:24], train.label_names),
        )
        assert service.distillation is not None
        distill = service.distillation.fuse

        def watched(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            fused_state = distill(state)  # each round's aggregate, distilled across kinds
            fused.append((dict(state), dict(fused_state)))
            return fused_state

        service.distillation.fuse = watched  # type: ignore[method-assign]
        return service

    subset = train.subset(np.arange(0, len(train), 3))
    devices = [
        Device(name, subset, profile=DeviceProfile(name=name, ram_mb=ram, cores=1, gflops=5.0).to_dict())
        for name, ram in (("phone", 8192.0), ("pi", 3000.0), ("watch", 1800.0))
    ]
    service, agents = federate(mosquitto, make, devices)

    kinds = {d: rec.config.peft.kind for d, rec in service.devices.items()}
    assert kinds == {"phone": "lora", "pi": "adapter", "watch": "prompt"}, kinds
    train_rounds = [r for r in service.rounds if r["phase"] == "train"]
    assert len(train_rounds) == 2 and all(r["participants"] == 3 for r in train_rounds)
    for record in train_rounds:
        assert set(record["distill_agreement"]["after"]) == {"lora", "adapter", "prompt"}
    # every round's distillation moved each kind's module toward the others, and left the head
    assert len(fused) == 2
    for before, after in fused:
        for kind, marker in KIND_OF_NAME.items():
            names = [n for n in before if marker in n]
            assert names and any(not np.array_equal(after[n], before[n]) for n in names), kind
        for name in ("head.weight", "head.bias"):
            np.testing.assert_array_equal(after[name], before[name])
    state = service.final_state()
    for agent in agents:  # each device ends on its view of the distilled global module
        assert agent.final_state is not None
        for name, value in agent.final_state.items():
            np.testing.assert_array_equal(value, state[name][tuple(slice(0, n) for n in value.shape)])


def test_layerwise_weights_layers_by_measured_importance_not_by_samples(
    tiny: tuple[Path, Path], mosquitto: Mosquitto
) -> None:
    train, test = load_folder(tiny[1])
    cfg = _lora_cfg(tiny, lr=5e-3, head_lr=1e-2)
    config = ServiceConfig(
        fleet="lw", rounds=2, train=cfg, min_clients=3, expected_clients=3, round_timeout_s=30,
        strategy="layerwise", head_init="random",
    )  # fmt: skip
    steps: list[tuple[dict[str, np.ndarray], list[ClientUpdate], dict[str, np.ndarray]]] = []

    def make(transport: MqttTransport) -> AggregationService:
        service = AggregationService(transport, config, Evaluator(cfg, test, seed=0, threads=1))
        aggregate = service.aggregation.train

        def watched(
            state: dict[str, np.ndarray], updates: list[ClientUpdate], round_: int
        ) -> dict[str, np.ndarray]:
            after = aggregate(state, updates, round_)  # each training round's step
            steps.append((dict(state), list(updates), dict(after)))
            return after

        service.aggregation.train = watched  # type: ignore[method-assign,assignment]
        return service

    devices = []
    for i in range(3):
        part = np.arange(i, len(train), 3)
        # d2 has nothing held out: it measures nothing and counts with the others' mean importance
        devices.append(Device(f"d{i}", train.subset(part[:18]), train.subset(part[18:]) if i < 2 else None))
    service, agents = federate(mosquitto, make, devices)

    assert [r["participants"] for r in service.rounds] == [3, 3]  # no statistics round
    assert len(steps) == 2
    for before, updates, after in steps:
        measured = [u for u in updates if "importance.loss" in u.metrics]
        assert sorted(u.device_id for u in measured) == ["d0", "d1"]
        for u in measured:
            assert {f"importance.{g}" for g in ("layer0", "layer1", "head")} <= set(u.metrics)
            assert all(u.metrics[k] >= 0 for k in u.metrics if k.startswith("importance."))
        # the published step is the layer-wise rule over the updates that came over the broker ...
        expected = layerwise(before, updates)
        for name, value in after.items():
            np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
        # ... and not plain sample-weighted averaging: a layer's weights follow what it saved
        plain = fedit(before, updates)
        gaps = {
            name: float(np.max(np.abs(after[name] - plain[name])))
            for name in after
            if layer_group(name).startswith("layer")
        }
        assert max(gaps.values()) > 1e-4, gaps
    for agent in agents:
        _ends_on(agent, service.final_state())


def test_personalized_devices_report_both_accuracies(tiny: tuple[Path, Path], mosquitto: Mosquitto) -> None:
    train, test = load_folder(tiny[1])
    cfg = _lora_cfg(tiny, head_lr=5e-2)
    config = ServiceConfig(
        fleet="personal", rounds=1, train=cfg, min_clients=3, expected_clients=3, round_timeout_s=30,
        head_init="random", personalize_epochs=3,
    )  # fmt: skip
    devices = []
    for label in range(3):  # one class a device: the strongest label skew
        mine = np.flatnonzero(train.labels == label)
        devices.append(Device(f"d{label}", train.subset(mine[:16]), holdout=train.subset(mine[16:])))
    service, agents = federate(
        mosquitto, lambda t: AggregationService(t, config, Evaluator(cfg, test, seed=0, threads=1)), devices
    )

    # the personalization phase is not a training round: no record, nothing aggregated
    assert [r["round"] for r in service.rounds] == [1]
    final = service.final_state()
    assert set(service.personalization) == {"d0", "d1", "d2"}
    for agent in agents:
        _ends_on(agent, final)  # the global module is untouched by the personal fine-tunes
        assert agent.personal_state is not None
        moved = [k for k in final if not np.array_equal(agent.personal_state[k], final[k])]
        assert "head.weight" in moved
        reported = service.personalization[agent.device_id]
        assert reported["holdout"] == 8.0 and reported["personal_epochs"] == 3.0
        assert 0 <= reported["prior_accuracy"] <= 1
        # what the device measured is what reached the service over the broker
        assert {k: reported[k] for k in agent.personalization} == pytest.approx(agent.personalization)
    # one class a device: its own fine-tune predicts it, the shared model of three skewed devices
    # does not (a random head after one round)
    own = [m["personalized_accuracy"] for m in service.personalization.values()]
    shared = [m["global_own_accuracy"] for m in service.personalization.values()]
    assert min(own) >= 0.99
    assert np.mean(shared) < 0.9
    summary = service.personalization_summary()
    assert summary["personalized_accuracy"] == pytest.approx(np.mean(own))
    assert summary["global_own_accuracy"] == pytest.approx(np.mean(shared))


def test_ffa_keeps_the_shared_initial_a_exactly(tiny: tuple[Path, Path], mosquitto: Mosquitto) -> None:
    train, test = load_folder(tiny[1])
    cfg = _lora_cfg(tiny, peft=LoraSpec(rank=2, alpha=4.0, train_a=False))
    config = ServiceConfig(
        fleet="ffa", rounds=2, train=cfg, min_clients=3, expected_clients=3, round_timeout_s=30,
        strategy="ffa",
    )  # fmt: skip
    initial: dict[str, np.ndarray] = {}

    def make(transport: MqttTransport) -> AggregationService:
        evaluator = Evaluator(cfg, test, seed=0, threads=1)
        initial.update(evaluator.initial_state())
        return AggregationService(transport, config, evaluator)

    devices = [Device(f"d{i}", train.subset(np.arange(i, len(train), 3)[:16])) for i in range(3)]
    service, agents = federate(mosquitto, make, devices)

    assert [r["participants"] for r in service.rounds][-2:] == [3, 3]
    final = service.final_state()
    a_names = [k for k in final if k.endswith(".lora_A")]
    b_names = [k for k in final if k.endswith(".lora_B")]
    assert a_names and b_names
    for name in a_names:
        # the shared start is the first module devices get: the initial one, sent at 16 bits
        np.testing.assert_array_equal(final[name], initial[name].astype(np.float16).astype(np.float32))
    assert all(not np.array_equal(final[k], initial[k]) for k in b_names)
    for agent in agents:  # every device ends on the published module
        _ends_on(agent, final)


def _full(state: dict[str, np.ndarray], name: str, update: ClientUpdate) -> np.ndarray:
    """A device's whole factor: the global one it started from plus its delta, in float64."""
    return state[name].astype(np.float64) + update.delta[name].astype(np.float64)


def test_exact_publishes_the_average_of_the_lora_products(
    tiny: tuple[Path, Path], mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, test = load_folder(tiny[1])
    cfg = _lora_cfg(tiny)
    config = ServiceConfig(
        fleet="ex", rounds=2, train=cfg, min_clients=3, expected_clients=3, round_timeout_s=30,
        strategy="exact",
    )  # fmt: skip
    calls: list[tuple[dict[str, np.ndarray], list[ClientUpdate], float, dict[str, np.ndarray], Any]] = []

    def recorded(
        state: dict[str, np.ndarray],
        updates: list[ClientUpdate],
        scale: float,
        residual: dict[str, np.ndarray] | None = None,
    ) -> Any:
        out = exact_fedavg(state, updates, scale, residual)
        calls.append((dict(state), list(updates), scale, dict(residual or {}), out))
        return out

    monkeypatch.setattr(strategies_module, "exact_fedavg", recorded)
    devices = [Device(f"d{i}", train.subset(np.arange(i, len(train), 3)[:12])) for i in range(3)]
    service, agents = federate(
        mosquitto, lambda t: AggregationService(t, config, Evaluator(cfg, test, seed=0, threads=1)), devices
    )

    assert [r["participants"] for r in service.rounds] == [3, 3, 3]
    assert len(calls) == 2  # the two training rounds (round 0 is the class means)
    scale = LORA.alpha / LORA.rank
    for state, updates, got_scale, previous, (new, residual) in calls:
        assert got_scale == scale and sorted(u.device_id for u in updates) == ["d0", "d1", "d2"]
        pairs = lora_pairs(state)
        assert pairs and set(residual) == set(pairs)
        weights = np.array([u.num_samples for u in updates], dtype=np.float64)
        weights /= weights.sum()
        for prefix, (a, b) in pairs.items():
            mean = sum(
                w * scale * _full(state, b, u) @ _full(state, a, u)
                for w, u in zip(weights, updates, strict=True)
            )
            published = scale * new[b].astype(np.float64) @ new[a].astype(np.float64)
            # the published product is the exact mean up to the rank-2 truncation, which the
            # residual carries into the next round
            np.testing.assert_allclose(
                published + residual[prefix], mean + previous.get(prefix, 0.0), atol=1e-9, err_msg=prefix
            )
        # three rank-2 devices' products do not fit in rank 2: the truncation is real
        assert any(np.linalg.norm(r) > 0 for r in residual.values())
    # what the devices hold at the end is the last round's factors as the broker delivered them,
    # up to the rounding of the first module devices got (sent at 16 bits, ``first``), which the
    # downlink's error feedback carries into later versions
    final, first = service.final_state(), calls[0][0]
    for name, value in calls[-1][4][0].items():
        gap = np.abs(final[name].astype(np.float64) - value)
        assert np.all(gap <= 2**-10 * np.abs(first[name]) + 1e-7), (name, float(gap.max()))
    for agent in agents:
        _ends_on(agent, final)
