"""`fedpeft serve` killed with SIGKILL mid-round three times: every acknowledged update counts once,
and the report written at the end holds what was rejected before a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from broker_server.evaluation import Evaluator
from broker_server.report import validate_report
from broker_server.service import AggregationService, ServiceConfig
from broker_server.state import StateStore
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.transport import InMemoryBroker, InMemoryTransport, MqttTransport, parse_broker_url
from tests.cli_processes import cli, start_edge
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 5


def _wait_for(log_path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        time.sleep(0.2)


def test_service_survives_three_sigkills(mosquitto: Any, tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    data = write_text_folder(tmp_path / "data", per_class_train=10)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    report = tmp_path / "serve.json"
    serve = cli(
        "serve",
        "--broker",
        mosquitto.url,
        "--fleet",
        "crash",
        "--state",
        str(tmp_path / "state"),
        "--data",
        str(data),
        "--rounds",
        str(ROUNDS),
        "--min-clients",
        "2",
        "--report",
        str(report),
        "--round-timeout",
        "120",
        "--hello-timeout",
        "60",
        "--model",
        str(model),
        "--seq-len",
        "16",
    )
    logs = [open(tmp_path / f"serve{i}.log", "w") for i in range(4)]
    devices = [
        start_edge(
            mosquitto.url,
            "crash",
            f"d{i}",
            data,
            tmp_path / f"edge{i}",
            seed=i,
            max_samples=12,
            cwd=tmp_path,
            env=env,
            extra=("--resend-after", "3"),
        )
        for i in range(2)
    ]
    try:
        for kill in range(3):
            proc = subprocess.Popen(serve, cwd=tmp_path, env=env, stdout=logs[kill], stderr=subprocess.STDOUT)
            # wait until this incarnation finished a round, then kill it in the middle of the next one
            log_path = tmp_path / f"serve{kill}.log"
            _wait_for(log_path, "round ", proc)
            if kill == 0:  # junk that only this incarnation sees (QoS 0: never delivered again)
                intruder = MqttTransport(parse_broker_url(mosquitto.url), "junk", clean_start=True).connect()
                intruder.publish("fl/crash/update/junk", b"not an update", qos=0)
                intruder.close()
                _wait_for(log_path, "rejected update from junk", proc)
            time.sleep(0.3 + 0.4 * kill)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        final = subprocess.run(
            serve, cwd=tmp_path, env=env, stdout=logs[3], stderr=subprocess.STDOUT, timeout=240
        )
        outputs = [d.communicate(timeout=60)[0] for d in devices]
    finally:
        for p in devices:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    assert final.returncode == 0, (tmp_path / "serve3.log").read_text()
    assert all(d.returncode == 0 for d in devices), outputs
    out = json.loads(report.read_text())
    validate_report(out)
    assert [r["round"] for r in out["rounds"]] == list(range(ROUNDS + 1))
    assert all(r["participants"] == 2 for r in out["rounds"])  # nothing lost, nothing twice
    for client in out["clients"]:
        assert client["updates_accepted"] == ROUNDS + 1, client
    junk = [r for r in out["rejected"] if r["client"] == "junk"]  # rejected before the first kill
    assert len(junk) == 1 and junk[0]["reason"].startswith("malformed"), out["rejected"]
    assert out["communication"]["bytes_up_total"] >= len(b"not an update") + sum(
        r["bytes_up"] for r in out["rounds"]
    )
    for i, text in enumerate(outputs):
        assert f"{ROUNDS + 1} accepted" in text, text
        assert not any((tmp_path / f"edge{i}" / "outbox").glob("update-*.bin"))
    assert "resumed round" in "".join((tmp_path / f"serve{i}.log").read_text() for i in range(1, 4))


class _Crash(BaseException):
    """Stands in for SIGKILL inside one process: nothing in the service catches it."""


def _train(agent: DeviceAgent) -> None:
    agent.run_pending()


@pytest.mark.parametrize("crash", ["between storing and acknowledging", "after the round, ack lost"])
def test_an_acknowledgement_lost_in_a_crash_is_sent_again(tmp_path: Path, crash: str) -> None:
    model = make_tiny_bert(tmp_path / "model")
    train, test = load_folder(write_text_folder(tmp_path / "data", per_class_train=6))
    cfg = TrainConfig(model=str(model), num_labels=3, seq_len=16)
    config = ServiceConfig(
        fleet="f", rounds=1, train=cfg, min_clients=1, expected_clients=1, round_timeout_s=5
    )
    broker = InMemoryBroker()
    evaluator = Evaluator(cfg, test, seed=0, threads=1)
    engine = TorchEngine(cfg, seed=0, threads=1)
    agent = DeviceAgent("d", "f", InMemoryTransport(broker, "d"), train, lambda c: engine)

    first = AggregationService(
        InMemoryTransport(broker, "server-1"), config, evaluator, store=StateStore(tmp_path / "a.db")
    )
    first.publisher.ack = lambda *args: None  # type: ignore[method-assign]  # the ack never leaves

    def on_accept(device: str) -> None:
        if crash.startswith("between"):
            raise _Crash
        first.stop()  # finishes round 0, publishes round 1, then returns

    first.on_accept = on_accept
    first.start()
    agent.on_ready = _train  # in-memory delivery is synchronous
    agent.start()
    if crash.startswith("between"):
        with pytest.raises(_Crash):
            first.run()
    else:
        first.run()
    first.transport.close()
    assert agent.stats.updates_accepted == 0 and len(agent.outbox.pending()) == 1

    second = AggregationService(
        InMemoryTransport(broker, "server-2"), config, evaluator, store=StateStore(tmp_path / "a.db")
    )

    def resend_then_train(a: DeviceAgent) -> None:
        a.resend_unacknowledged(0.0)  # what a device does when no ack came for a while
        a.run_pending()

    agent.on_ready = resend_then_train
    second.run()
    assert agent.stats.updates_accepted == 2, agent.stats
    assert agent.outbox.pending() == [] and agent.stats.updates_rejected == 0
    assert [r["participants"] for r in second.rounds] == [1, 1]  # counted once
    assert second.devices["d"].updates_accepted == 2


def test_rejections_and_counters_survive_a_crash(tmp_path: Path) -> None:
    """Junk rejected before a crash, and the bytes and per-device figures counted with it, are
    back in a service restarted on the same state folder."""
    model = make_tiny_bert(tmp_path / "model")
    train, test = load_folder(write_text_folder(tmp_path / "data", per_class_train=6))
    cfg = TrainConfig(model=str(model), num_labels=3, seq_len=16)
    config = ServiceConfig(
        fleet="f", rounds=2, train=cfg, min_clients=1, expected_clients=1, round_timeout_s=5
    )
    state = tmp_path / "state" / "state.sqlite"
    broker = InMemoryBroker()
    evaluator = Evaluator(cfg, test, seed=0, threads=1)
    engine = TorchEngine(cfg, seed=0, threads=1)
    agent = DeviceAgent("d", "f", InMemoryTransport(broker, "d"), train, lambda c: engine)
    first = AggregationService(
        InMemoryTransport(broker, "server-1"), config, evaluator, store=StateStore(state)
    )
    junk = InMemoryTransport(broker, "junk")

    def on_accept(device: str) -> None:
        if first.round == 1:
            raise _Crash  # kill -9 right after round 1's update was stored: never acknowledged
        # queued now, handled in round 1 before the device's update for it
        accepted = first.store.updates(0)[0][2] if first.store is not None else b""
        junk.publish("fl/f/update/d", b"not an update")  # malformed
        junk.publish("fl/f/update/d", accepted)  # a redelivery: duplicate
        junk.publish("fl/f/update/ghost", accepted)  # d's update under another id: unknown device

    first.on_accept = on_accept
    first.start()
    agent.on_ready = _train  # in-memory delivery is synchronous
    agent.start()
    with pytest.raises(_Crash):
        first.run()
    first.transport.close()  # off the broker, as a killed process is; nothing else is shut down
    rejected = [dict(x) for x in first.rejected]
    assert [(x["client"], x["round"], x["reason"].split(":")[0]) for x in rejected] == [
        ("d", None, "malformed"),
        ("d", 0, "duplicate"),
        ("ghost", 0, "unknown_device"),
    ]
    device = first.devices["d"]
    assert device.updates_received == 3 and device.updates_accepted == 2  # the duplicate counts once

    def restarted(name: str) -> AggregationService:
        transport = InMemoryTransport(broker, name)
        return AggregationService(transport, config, evaluator, store=StateStore(state))

    second = restarted("server-2")
    assert second.restore() == 1  # what run() does first
    assert second.rejected == rejected
    assert second.bytes_up_total == first.bytes_up_total > 0
    assert second.rounds_loop.resumed_round_counters == (first.sync.stale, first.journal.round_bytes_up)
    assert second.devices["d"].counters() == device.counters()
    assert second.devices["d"].updates_accepted == device.updates_accepted
    assert second.rounds == first.rounds
    # a rejection for a round ends that device's turn in it, also after a restart (ghost is unknown)
    assert second.journal.turns_ended(0) == {"d"} and second.journal.turns_ended(1) == set()

    # run on to the end: the report's inputs keep what came before the crash
    third = restarted("server-3")

    def resend_then_train(a: DeviceAgent) -> None:
        a.resend_unacknowledged(0.0)  # what a device does when no ack came for a while
        a.run_pending()

    agent.on_ready = resend_then_train
    third.run()
    assert third.rejected[: len(rejected)] == rejected
    assert [r["round"] for r in third.rounds] == [0, 1, 2]
    assert third.rounds[1]["bytes_up_all"] >= first.journal.round_bytes_up  # junk of round 1 included
    assert third.bytes_up_total >= first.bytes_up_total
    assert third.devices["d"].updates_accepted == 3
