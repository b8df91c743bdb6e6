"""End to end over real brokers: a tiny federation, and corrupted updates rejected in flight."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server.evaluation import Evaluator
from broker_server.privacy import dp_epsilon
from broker_server.report import validate_report
from broker_server.service import AggregationService, ServiceConfig
from edge_runtime import wire
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.ort_engine import ORT_TRAINING_INSTALL, ort_available
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.transport import MqttTransport, parse_broker_url
from sdk.simulate import Simulation, SimulationConfig
from tests.helpers import replace_float, with_schema_version, write_text_folder
from tests.tiny_model import make_tiny_bert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fed")
    return make_tiny_bert(root / "model"), write_text_folder(root / "data", per_class_train=30)


def _sim_config(tiny: tuple[Path, Path], **kw: Any) -> SimulationConfig:
    base: dict[str, Any] = dict(
        data=str(tiny[1]),
        model=str(tiny[0]),
        clients=3,
        rounds=2,
        partition="iid",
        samples_per_client=20,
        test_samples=30,
        seq_len=16,
        local_epochs=1,
        bits=4,
        workers=2,
        round_timeout_s=60.0,
    )
    base.update(kw)
    return SimulationConfig(**base)


def test_three_clients_two_rounds_over_mosquitto(
    tiny: tuple[Path, Path], mosquitto: Any, tmp_path: Path
) -> None:
    start = time.monotonic()
    report = Simulation(_sim_config(tiny, broker=mosquitto.url)).run()
    assert time.monotonic() - start < 60
    validate_report(report)
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert all(r["participants"] == 3 for r in report["rounds"])
    assert report["rejected"] == []
    for client in report["clients"]:
        assert client["updates_sent"] == 3 and client["updates_accepted"] == 3
        assert client["peak_rss_mb"] > 50
    comm = report["communication"]
    # every byte a device published reached the server, and nothing else did
    assert comm["bytes_up_total"] == comm["bytes_up_received_by_server"]
    assert comm["bytes_up_total"] == sum(r["bytes_up"] for r in report["rounds"])
    assert comm["bytes_down_total"] > 0 and 0 < comm["reduction_vs_full"] < 1


def test_embedded_broker_gives_the_same_result_as_mosquitto(tiny: tuple[Path, Path], mosquitto: Any) -> None:
    a = Simulation(_sim_config(tiny, rounds=1)).run()
    b = Simulation(_sim_config(tiny, rounds=1, broker=mosquitto.url)).run()
    assert a["config"]["broker"] == "embedded"
    assert a["final"]["accuracy"] == pytest.approx(b["final"]["accuracy"], abs=1e-6)
    # sizes differ by a few bytes: the header carries measured timings
    assert [r["participants"] for r in a["rounds"]] == [r["participants"] for r in b["rounds"]]


def _corruptions(
    device: str, fleet_round: int, base_id: str, shapes: dict[str, tuple[int, ...]]
) -> dict[str, bytes]:
    def update(tensors: dict[str, np.ndarray], bits: int = 32) -> bytes:
        msg = wire.UpdateMessage(
            device_id=device,
            round=fleet_round,
            base_id=base_id,
            num_samples=5,
            metrics={},
            tensors=tensors,
            bits=bits,
        )
        return wire.encode_update(msg, rng=np.random.default_rng(0))

    good = update({k: np.zeros(s, np.float32) for k, s in shapes.items()})
    sentinel = {k: np.full(s, 1234.5, np.float32) for k, s in shapes.items()}
    wrong = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    name = sorted(wrong)[0]
    wrong[name] = np.zeros((3, 3, 3), np.float32)
    return {
        "bad magic": b"XXXX" + good[4:],
        "truncated": good[: len(good) // 2],
        "wrong shape": update(wrong),
        "NaN": replace_float(update(sentinel), 1234.5, float("nan")),
        "unknown schema version": with_schema_version(good, 99),
    }


def _engine_factory(engine: TorchEngine) -> Any:
    # each agent trains in its own thread here, so each gets its own engine
    return lambda _config: engine


def test_corrupted_updates_are_rejected_and_the_round_completes(
    tiny: tuple[Path, Path], mosquitto: Any
) -> None:
    train, test = load_folder(tiny[1])
    cfg = TrainConfig(model=str(tiny[0]), num_labels=3, seq_len=16, batch_size=8, bits=8)
    fleet = f"corrupt{int(time.time())}"
    url = parse_broker_url(mosquitto.url)
    server_t = MqttTransport(url, client_id="server", clean_start=True)
    server_t.connect()
    evaluator = Evaluator(cfg, test, seed=0, threads=1)
    service = AggregationService(
        server_t,
        ServiceConfig(
            fleet=fleet, rounds=1, train=cfg, min_clients=2, expected_clients=3, round_timeout_s=60
        ),
        evaluator,
    )
    # the module's shapes (a global message may carry a delta of some tensors, or none)
    shapes = {k: v.shape for k, v in evaluator.initial_state().items()}
    service.start()
    agents, transports = [], []
    for i in range(2):
        t = MqttTransport(url, client_id=f"dev{i}", clean_start=True)
        t.connect()
        transports.append(t)
        agents.append(
            DeviceAgent(
                f"dev{i}",
                fleet,
                t,
                train.subset(np.arange(i, len(train), 2)),
                _engine_factory(TorchEngine(cfg, seed=0, threads=1)),
            )
        )
    # "mallory" says hello like a device, then sends only garbage: its rejected updates end its
    # turn, and the honest devices' round completes without waiting for a deadline
    attacker = MqttTransport(url, client_id="attacker", clean_start=True)
    attacker.connect()
    hello = wire.Hello(device_id="mallory", profile={}, num_samples=5, label_histogram=(5, 0, 0))
    attacker.publish(wire.topic(fleet, "hello", "mallory"), wire.encode_hello(hello), qos=1)
    sent: list[str] = []

    def corrupt(topic: str, payload: bytes) -> None:
        module = wire.decode_global(payload)
        if module.round <= 1 and module.meta.get("phase") != "done":
            for label, bad in _corruptions("mallory", module.round, wire.content_id(payload), shapes).items():
                attacker.publish(wire.topic(fleet, "update", "mallory"), bad, qos=1)
                sent.append(label)

    attacker.subscribe(service.global_topic, corrupt)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    for a in agents:
        a.start()
    stop = threading.Event()
    runners = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
    for r in runners:
        r.start()
    thread.join(timeout=120)
    stop.set()
    for t in [*transports, attacker, server_t]:
        t.close()
    assert not thread.is_alive(), "the service did not finish its rounds"
    assert len(sent) == 10
    reasons = [r["reason"] for r in service.rejected]
    assert len(reasons) == 10, reasons
    assert {r["client"] for r in service.rejected} == {"mallory"}
    for code in ("malformed", "shape_mismatch", "non_finite", "schema_mismatch"):
        assert any(r.startswith(code) for r in reasons), (code, reasons)
    assert [(r["round"], r["participants"]) for r in service.rounds] == [(0, 2), (1, 2)]
    assert service.rounds[-1]["wall_s"] < 50  # nobody waited for mallory's deadline
    assert json.dumps(service.rejected)  # reasons are plain JSON for the report


def test_broker_restart_mid_run_loses_no_update(
    tiny: tuple[Path, Path], mosquitto_factory: Callable[..., Any], tmp_path: Path
) -> None:
    broker = mosquitto_factory(persistence=True)
    restarted = threading.Event()

    def restart_during_next_round(record: dict[str, Any]) -> None:
        if record["round"] == 1 and not restarted.is_set():
            restarted.set()
            threading.Thread(target=lambda: (time.sleep(0.2), broker.restart()), daemon=True).start()

    report = Simulation(
        _sim_config(tiny, broker=broker.url, rounds=3), on_round=restart_during_next_round
    ).run()
    assert restarted.is_set()
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2, 3]
    assert all(r["participants"] == 3 for r in report["rounds"])
    for client in report["clients"]:
        assert client["updates_accepted"] == 4, client
    assert report["rejected"] == [] or all(r["reason"].startswith("duplicate") for r in report["rejected"])


def test_differential_privacy_reports_its_budget(tiny: tuple[Path, Path]) -> None:
    report = Simulation(_sim_config(tiny, rounds=2, clip_norm=1.0, dp_noise=1.0, dp_sample_rate=0.7)).run()
    validate_report(report)
    # round 0's class statistics are a release too: three steps of the accountant
    eps = [r["dp_epsilon"] for r in report["rounds"]]
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert 0 < eps[0] < eps[1] < eps[2] == report["final"]["dp_epsilon"]
    assert eps[2] == pytest.approx(dp_epsilon(noise_multiplier=1.0, sampling_rate=0.7, rounds=3, delta=1e-5))
    assert report["final"]["dp_delta"] == 1e-5
    dp = report["final"]["dp"]
    assert (dp["sample_rate"], dp["fleet_size"], dp["releases"]) == (0.7, 3, 3)
    assert dp["denominator"] == pytest.approx(2.1)
    assert all(r["participants"] == r["dp_sampled"] <= 3 for r in report["rounds"])


def test_attackers_are_rejected_or_outvoted_and_rounds_complete(tiny: tuple[Path, Path]) -> None:
    scaled = Simulation(_sim_config(tiny, rounds=1, attack="scale=1e4:1", norm_bound=50.0)).run()
    assert [c["attacker"] for c in scaled["clients"]] == [True, False, False]
    reasons = [r["reason"] for r in scaled["rejected"] if r["client"] == "dev000"]
    assert len(reasons) == 2 and all(r.startswith("norm_too_large") for r in reasons)
    assert [r["participants"] for r in scaled["rounds"]] == [2, 2]
    flipped = Simulation(_sim_config(tiny, rounds=1, attack="flip:1", strategy="median")).run()
    assert flipped["rejected"] == [] and [r["participants"] for r in flipped["rounds"]] == [3, 3]


def test_a_mixed_fleet_of_ort_and_torch_devices_trains_together(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not ort_available():
        pytest.skip(f"engine ort (in --engine mixed) needs {ORT_TRAINING_INSTALL}")
    monkeypatch.setenv("FEDPEFT_ARTIFACTS", str(tmp_path / "artifacts"))
    report = Simulation(_sim_config(tiny, clients=4, engine="mixed")).run()
    validate_report(report)
    engines = {c["id"]: c["engine"] for c in report["clients"]}
    assert sorted(engines.values()) == ["ort", "ort", "torch", "torch"], engines
    assert all(c["updates_accepted"] == 3 for c in report["clients"])  # class means + 2 rounds each
    assert report["rejected"] == []
    assert all(r["participants"] == 4 for r in report["rounds"])
    peaks = {
        e: max(c["peak_rss_mb"] for c in report["clients"] if c["engine"] == e) for e in ("ort", "torch")
    }
    assert peaks["ort"] < peaks["torch"] - 100, peaks  # the ORT worker never imported torch
    assert any((tmp_path / "artifacts").iterdir())


def test_an_ort_fleet_is_evaluated_on_ort_with_the_torch_evaluators_figures(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same seeds, same training; only the server's evaluator differs: the figures agree."""
    if not ort_available():
        pytest.skip(f"engine ort needs {ORT_TRAINING_INSTALL}")
    from broker_server.evaluation import OrtEvaluator

    monkeypatch.setenv("FEDPEFT_ARTIFACTS", str(tmp_path / "artifacts"))
    chosen: list[object] = []
    pick = Simulation._evaluator

    def recording(self: Simulation, *args: Any) -> Any:
        chosen.append(pick(self, *args))
        return chosen[-1]

    monkeypatch.setattr(Simulation, "_evaluator", recording)
    config = _sim_config(tiny, engine="ort", rounds=2, local_epochs=2)
    on_ort = Simulation(config).run()
    assert isinstance(chosen[-1], OrtEvaluator)

    def torch_evaluator(self: Simulation, train_cfg: TrainConfig, test: Any, *args: Any) -> Evaluator:
        return Evaluator(train_cfg, test, seed=config.seed, threads=1)

    monkeypatch.setattr(Simulation, "_evaluator", torch_evaluator)
    on_torch = Simulation(config).run()
    for report in (on_ort, on_torch):
        validate_report(report)
        assert report["rejected"] == []
    assert [r["accuracy"] for r in on_ort["rounds"]] == [r["accuracy"] for r in on_torch["rounds"]]
    got = [r["loss"] for r in on_ort["rounds"]]
    want = [r["loss"] for r in on_torch["rounds"]]
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-4)
    assert got[-1] < got[0] - 1e-3  # training moved the figures: agreement is not a constant


def test_pi_zero_devices_train_on_ort_within_their_cap_beside_torch_devices(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not ort_available():
        pytest.skip(f"engine ort (in --engine mixed) needs {ORT_TRAINING_INSTALL}")
    monkeypatch.setenv("FEDPEFT_ARTIFACTS", str(tmp_path / "artifacts"))
    config = _sim_config(tiny, clients=4, engine="mixed", profiles="pi-zero-2w=0.5,high=0.5", rounds=1)
    report = Simulation(config).run()
    validate_report(report)
    by_profile: dict[str, list[dict[str, Any]]] = {}
    for c in report["clients"]:
        by_profile.setdefault(c["profile"], []).append(c)
    assert len(by_profile["pi-zero-2w"]) == 2
    for c in by_profile["pi-zero-2w"]:  # 512 MB: only ONNX Runtime fits, and the allocator knew
        assert c["engine"] == "ort" and c["peft"]["type"] == "lora", c
        assert 0 < c["peak_rss_mb"] <= c["mem_cap_mb"] == 384.0
        assert c["updates_accepted"] == 2
    for c in by_profile["high"]:
        assert c["engine"] == "torch" and c["updates_accepted"] == 2
    assert report["rejected"] == []


def test_a_device_that_lost_its_module_asks_for_it_whole_and_ends_on_the_services(
    tiny: tuple[Path, Path], mosquitto: Any
) -> None:
    # dev1 restarts between rounds with nothing held: the next delta cannot apply, so it asks for
    # the full module on its own topic, trains on it, and ends bit for bit on the service's module
    from edge_runtime.downlink import state_digest

    train, test = load_folder(tiny[1])
    cfg = TrainConfig(model=str(tiny[0]), num_labels=3, seq_len=16, batch_size=8, bits=4)
    fleet = f"resync{int(time.time())}"
    url = parse_broker_url(mosquitto.url)
    server_t = MqttTransport(url, client_id=f"{fleet}-server", clean_start=True)
    server_t.connect()
    restart = threading.Event()

    def stop_dev1_after_round_1(record: dict[str, Any]) -> None:
        # in the service's thread, before it publishes round 2: dev1 goes away holding round 1
        if record["round"] == 1:
            stops[1].set()
            runners[1].join(10)
            transports[1].close()
            restart.set()

    service = AggregationService(
        server_t,
        ServiceConfig(
            fleet=fleet, rounds=2, train=cfg, min_clients=2, expected_clients=2, round_timeout_s=60
        ),
        Evaluator(cfg, test, seed=0, threads=1),
        on_round=stop_dev1_after_round_1,
    )
    service.start()
    engines = [TorchEngine(cfg, seed=0, threads=1) for _ in range(2)]
    parts = [train.subset(np.arange(i, len(train), 2)) for i in range(2)]

    def device(i: int) -> tuple[DeviceAgent, MqttTransport]:
        t = MqttTransport(url, client_id=f"{fleet}-dev{i}", clean_start=False)
        t.connect()
        return DeviceAgent(f"dev{i}", fleet, t, parts[i], _engine_factory(engines[i])), t

    stops = [threading.Event(), threading.Event()]
    agents, transports = zip(*(device(i) for i in range(2)), strict=True)
    agents, transports = list(agents), list(transports)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    runners = []
    for i, a in enumerate(agents):
        a.start()
        runners.append(threading.Thread(target=a.run, args=(stops[i],), daemon=True))
        runners[-1].start()
    assert restart.wait(90), "round 1 did not finish"
    stops[1].clear()
    agents[1], transports[1] = device(1)  # the same device, back with an empty memory
    agents[1].start()
    threading.Thread(target=agents[1].run, args=(stops[1],), daemon=True).start()
    thread.join(timeout=120)
    for s in stops:
        s.set()
    time.sleep(0.5)
    for t in [*transports, server_t]:
        t.close()
    assert not thread.is_alive(), "the service did not finish its rounds"
    assert [r["participants"] for r in service.rounds] == [2, 2, 2]
    assert {r["client"] for r in service.resyncs} == {"dev1"}
    assert [r["resyncs"] for r in service.rounds] == [[], [], ["dev1"]]
    final = service.final_state()
    for agent in agents:
        assert agent.final_state is not None
        assert state_digest(agent.final_state) == state_digest(final)
