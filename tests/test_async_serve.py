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
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

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
from edge_runtime.errors import ConfigError
from edge_runtime.outbox import Outbox
from edge_runtime.peft_specs import LoraSpec
from edge_runtime.transport import MqttTransport, parse_broker_url
from tests.brokers import Mosquitto
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = 8
MAX_STALENESS = 2


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdk.cli", *args]


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
    serve = _cli(
        "serve", "--broker", mosquitto.url, "--fleet", "acrash", "--state", str(tmp_path / "state"),
        "--data", str(data), "--rounds", str(VERSIONS), "--min-clients", "3", "--report", str(report),
        "--round-timeout", "120", "--hello-timeout", "60", "--model", str(model), "--seq-len", "16",
        "--mode", "async", "--buffer-size", "2", "--staleness", "poly:1",
        "--max-staleness", str(MAX_STALENESS), "--server-lr", "0.8",
    )  # fmt: skip
    kills = 2
    logs = [open(tmp_path / f"serve{i}.log", "w") for i in range(kills + 1)]
    devices = [
        subprocess.Popen(
            _cli(
                "edge",
                "--broker",
                mosquitto.url,
                "--fleet",
                "acrash",
                "--device-id",
                f"d{i}",
                "--data",
                str(data),
                "--state",
                str(tmp_path / f"edge{i}"),
                "--max-samples",
                "12",
                "--seed",
                str(i),
                "--resend-after",
                "2",
            ),  # fmt: skip
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
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
            _cli(*base, *extra),
            cwd=tmp_path,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "error" in lines[0], run.stderr
