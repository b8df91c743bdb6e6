"""`fedpeft serve --mode async` over a real Mosquitto (issue 12): killed with SIGKILL mid-run and
restarted on its state folder, it counts every acknowledged update exactly once and its versions
keep increasing; devices that go offline and come back get the newest version, and their updates
are aggregated with their staleness weights within the bound."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from broker_server.async_ledger import AsyncLedger
from broker_server.evaluation import Evaluator
from broker_server.report import validate_report
from broker_server.service import AggregationService, ServiceConfig
from broker_server.state import StateStore
from edge_runtime import wire
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.outbox import Outbox
from edge_runtime.peft_specs import LoraSpec
from edge_runtime.transport import MqttTransport, parse_broker_url
from tests.brokers import Mosquitto
from tests.cli_processes import cli, start_edge
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = 8
MAX_STALENESS = 2


def _wait_for(log_path: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log_path.read_text(), re.MULTILINE):
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)


def _jobs_of(reason: str) -> int:
    found = re.search(r"job (\d+)", reason)
    assert found, reason
    return int(found.group(1))


def test_async_serve_survives_sigkills_and_counts_every_acknowledged_update_once(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    model = make_tiny_bert(tmp_path / "model")
    data = write_text_folder(tmp_path / "data", per_class_train=10)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    report = tmp_path / "serve.json"
    serve = cli(
        "serve", "--broker", mosquitto.url, "--fleet", "acrash", "--state", str(tmp_path / "state"),
        "--data", str(data), "--rounds", str(VERSIONS), "--min-clients", "3", "--report", str(report),
        "--round-timeout", "120", "--hello-timeout", "60", "--model", str(model), "--seq-len", "16",
        "--mode", "async", "--buffer-size", "2", "--staleness", "poly:1",
        "--max-staleness", str(MAX_STALENESS), "--server-lr", "0.8",
    )  # fmt: skip
    kills = 2
    logs = [open(tmp_path / f"serve{i}.log", "w") for i in range(kills + 1)]
    devices = [
        start_edge(
            mosquitto.url,
            "acrash",
            f"d{i}",
            data,
            tmp_path / f"edge{i}",
            seed=i,
            max_samples=12,
            cwd=tmp_path,
            env=env,
            extra=("--resend-after", "2"),
        )
        for i in range(3)
    ]
    try:
        for kill in range(kills):
            proc = subprocess.Popen(serve, cwd=tmp_path, env=env, stdout=logs[kill], stderr=subprocess.STDOUT)
            # this incarnation made an asynchronous version: kill it a moment later, mid-version
            _wait_for(tmp_path / f"serve{kill}.log", r"^round [1-9]\d*:", proc)
            time.sleep(0.4 + 0.7 * kill)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        final = subprocess.run(
            serve, cwd=tmp_path, env=env, stdout=logs[kills], stderr=subprocess.STDOUT, timeout=240
        )
        outputs = [d.communicate(timeout=60)[0] for d in devices]
    finally:
        for p in devices:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    serve_logs = [(tmp_path / f"serve{i}.log").read_text() for i in range(kills + 1)]
    assert final.returncode == 0, serve_logs[-1]
    assert all(d.returncode == 0 for d in devices), outputs
    out = json.loads(report.read_text())
    validate_report(out)
    assert out["config"]["mode"] == "async"
    versions = [r for r in out["rounds"] if r.get("mode") == "async"]
    # the class-mean round, then versions 1..8: each made once, across the restarts
    assert [r["round"] for r in out["rounds"]] == list(range(VERSIONS + 1))
    assert [r["round"] for r in versions] == list(range(1, VERSIONS + 1))
    assert sum("resumed async version" in text for text in serve_logs[1:]) == kills, serve_logs
    for r in versions:
        assert r["participants"] == 2 == len(r["jobs"]) == len(r["clients"])
        assert all(0 <= tau <= MAX_STALENESS for tau in r["staleness"])
        assert r["staleness_weights"] == pytest.approx([1 / (1 + tau) for tau in r["staleness"]])
    # where each acknowledged update went: into exactly one version, dropped as too stale, or left
    # in the buffer when the run ended; the devices' own records of their acks must match it
    placed: dict[str, list[int]] = {c["id"]: [0] for c in out["clients"]}  # the class-mean round
    for r in versions:
        for device, job in zip(r["clients"], r["jobs"], strict=True):
            placed[device].append(job)
    for x in out["rejected"]:
        if x["reason"].startswith("stale_round"):
            placed[x["client"]].append(_jobs_of(x["reason"]))
    for x in out["final"]["unaggregated"]:
        placed[x["client"]].append(x["job"])
    jobs = [j for js in placed.values() for j in js if j > 0]
    assert len(jobs) == len(set(jobs)), placed  # no job counted twice
    for i, text in enumerate(outputs):
        acked = re.search(rf"device d{i}: accepted rounds ([\d,]*)", text)
        assert acked, text
        mine = [int(x) for x in acked.group(1).split(",") if x]
        assert len(mine) == len(set(mine)), text
        assert sorted(mine) == sorted(placed[f"d{i}"]), (i, mine, placed[f"d{i}"])
        client = next(c for c in out["clients"] if c["id"] == f"d{i}")
        assert client["updates_accepted"] == len(mine), client


def test_serve_refuses_async_with_what_it_cannot_combine(tmp_path: Path) -> None:
    data = write_text_folder(tmp_path / "data", per_class_train=4)
    base = ["serve", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--state", str(tmp_path / "s")]
    base += ["--data", str(data), "--mode", "async"]
    for extra, named in (
        (["--allocation", "utility"], "--allocation utility"),
        (["--clusters", "2"], "--clusters"),
        (["--clip-norm", "1", "--dp-noise", "1"], "DP"),
        (["--strategy", "median"], "--strategy"),
        (["--personalize-epochs", "1"], "personalization"),
        (["--server-momentum", "0.9"], "--server-momentum"),
        (["--staleness", "sometimes"], "--staleness"),
    ):
        run = subprocess.run(
            cli(*base, *extra),
            cwd=tmp_path,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "error" in lines[0], run.stderr


def test_a_device_that_goes_offline_comes_back_to_the_newest_version(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """d2 takes part in the class-mean round, gets version 0's job and drops off the network before
    training it; d0 and d1 move the versions on. Back, d2 gets the newest version (its old job is
    replaced, not trained), and its update goes in weighted by its staleness, within the bound."""
    model = make_tiny_bert(tmp_path / "model")
    train, test = load_folder(write_text_folder(tmp_path / "data", per_class_train=16))
    cfg = TrainConfig(
        model=str(model), num_labels=3, seq_len=16, bits=32, batch_size=8, peft=LoraSpec(rank=2, alpha=4.0)
    )
    config = ServiceConfig(
        fleet="away", rounds=6, train=cfg, min_clients=3, expected_clients=3, round_timeout_s=30,
        mode="async", buffer_size=2, staleness="poly:1", max_staleness=3,
    )  # fmt: skip
    url = parse_broker_url(mosquitto.url)
    opened: list[MqttTransport] = []

    def connect(client_id: str) -> MqttTransport:
        transport = MqttTransport(url, client_id=client_id, clean_start=True).connect()
        opened.append(transport)
        return transport

    back = threading.Event()
    service = AggregationService(
        connect("server"),
        config,
        Evaluator(cfg, test, seed=0, threads=1),
        store=StateStore(tmp_path / "state" / "state.sqlite"),
    )
    service.start()
    wake = threading.Event()
    outboxes = {f"d{i}": Outbox() for i in range(3)}

    def agent(name: str, client_id: str) -> DeviceAgent:
        return DeviceAgent(
            name,
            "away",
            connect(client_id),
            train.subset(np.arange(int(name[1]), len(train), 3)[:12]),
            lambda c: TorchEngine(c, seed=0, threads=1),
            outbox=outboxes[name],
            on_ready=lambda _a: wake.set(),
        )

    agents = {name: agent(name, name) for name in outboxes}
    failures: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        try:
            service.run()
        except BaseException as exc:
            failures.append(exc)

    def devices() -> None:
        try:
            while not stop.is_set():
                # once the jobs go out, d2 trains nothing until it is back (checked per device:
                # a job can arrive while another device trains)
                worked = [
                    a.run_pending()
                    for n, a in list(agents.items())
                    if a is agents[n]  # not d2's old agent, gone with its connection
                    and not (n == "d2" and service.versions.active and not back.is_set())
                ]
                if not any(worked):
                    wake.wait(0.1)
                    wake.clear()
        except BaseException as exc:
            failures.append(exc)

    server = threading.Thread(target=serve, daemon=True)
    trainer = threading.Thread(target=devices, daemon=True)
    try:
        server.start()
        for a in agents.values():
            a.start()
        trainer.start()
        deadline = time.monotonic() + 60
        while not [j for j in service.jobs.jobs.values() if j.device == "d2"] and time.monotonic() < deadline:
            time.sleep(0.05)
        # d2 drops off: its last will tells the service, and its connection is gone
        away = agents["d2"].transport
        offline = wire.encode_status(wire.Status(device_id="d2", state="offline", detail={}))
        away.publish(wire.topic("away", "status", "d2"), offline, qos=1)
        time.sleep(0.3)
        away.close()
        while sum(r.get("mode") == "async" for r in service.rounds) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        seen = service.round
        assert seen >= 2 and not service.devices["d2"].online
        agents["d2"] = agent("d2", "d2-back")  # the same device, reconnected: it says hello again
        back.set()
        agents["d2"].start()
        server.join(90)
        finished = not server.is_alive()
        done_by = time.monotonic() + 15
        while finished and time.monotonic() < done_by and not all(a.done.is_set() for a in agents.values()):
            time.sleep(0.05)
    finally:
        stop.set()
        service.stop()
        trainer.join(30)
        for transport in opened:
            transport.close()
    if failures:
        raise failures[0]
    assert finished and all(a.done.is_set() for a in agents.values())

    jobs = sorted((i, j) for i, j in service.jobs.jobs.items() if j.device == "d2")
    (first_id, first), (back_id, back) = jobs[0], jobs[1]
    assert first.version == 0 and not first.updated  # replaced, never trained
    assert back.version >= seen and back.updated  # the newest version when it came back
    versions = [r for r in service.rounds if r.get("mode") == "async"]
    assert [r["round"] for r in versions] == list(range(1, 7))
    taken = [(r, r["jobs"].index(back_id)) for r in versions if back_id in r["jobs"]]
    assert len(taken) == 1, versions
    record, at = taken[0]
    tau = record["staleness"][at]
    assert record["clients"][at] == "d2" and tau == record["round"] - 1 - back.version
    assert 0 <= tau <= config.max_staleness and record["staleness_weights"][at] == pytest.approx(
        1 / (1 + tau)
    )
    assert all(first_id not in r["jobs"] for r in versions)
    assert all(s <= config.max_staleness for r in versions for s in r["staleness"])
    # every device ends on the final version, d2 through its new connection
    final = service.final_state()
    for a in agents.values():
        assert a.final_state is not None
        for name, value in final.items():
            np.testing.assert_array_equal(a.final_state[name], value)
    # the store holds what the service did: the same versions and d2's replaced job closed
    assert service.store is not None
    snapshot = AsyncLedger(service.store).restore()
    assert snapshot is not None and snapshot.version == 6
    assert [r["jobs"] for r in snapshot.records] == [r["jobs"] for r in versions]
    stored = {j.job: j for j in snapshot.jobs}
    assert stored[first_id].answered and not stored[first_id].updated
    accepted = Counter(d for d, _ in snapshot.accepted_ids)
    assert accepted["d2"] == len(agents["d2"].stats.rounds_accepted)
