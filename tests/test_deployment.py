"""The deployment path: `fedpeft serve` and `fedpeft edge` as separate processes over Mosquitto,
and `fedpeft centralized` as the reference."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from broker_server.report import validate_report
from tests.cli_processes import cli, start_edge
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("deploy")
    return make_tiny_bert(root / "model"), write_text_folder(root / "data", per_class_train=10)


def test_serve_and_two_edge_devices_as_processes(
    tiny: tuple[Path, Path], mosquitto: Any, tmp_path: Path
) -> None:
    model, data = tiny
    common = ["--model", str(model), "--seq-len", "16"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    report = tmp_path / "serve.json"
    server = subprocess.Popen(
        cli(
            "serve",
            "--broker",
            mosquitto.url,
            "--fleet",
            "lab",
            "--state",
            str(tmp_path / "state"),
            "--data",
            str(data),
            "--rounds",
            "2",
            "--min-clients",
            "2",
            "--report",
            str(report),
            "--round-timeout",
            "60",
            "--hello-timeout",
            "60",
            *common,
        ),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    devices = [
        start_edge(
            mosquitto.url,
            "lab",
            f"pi-{i}",
            data,
            tmp_path / f"edge{i}",
            seed=i,
            max_samples=15,
            cwd=tmp_path,
            env=env,
        )
        for i in range(2)
    ]
    try:
        out, _ = server.communicate(timeout=150)
        device_out = [d.communicate(timeout=30)[0] for d in devices]
    finally:
        for p in (server, *devices):
            if p.poll() is None:
                p.kill()
    assert server.returncode == 0, out
    assert all(d.returncode == 0 for d in devices), device_out
    data_out = json.loads(report.read_text())
    validate_report(data_out)
    assert [r["round"] for r in data_out["rounds"]] == [0, 1, 2]
    assert {c["id"] for c in data_out["clients"]} == {"pi-0", "pi-1"}
    assert all(c["updates_accepted"] == 3 for c in data_out["clients"])
    assert "3 accepted" in device_out[0]
    assert (tmp_path / "state" / "state.sqlite").exists()
    assert not any((tmp_path / "edge0" / "outbox").glob("update-*"))  # every update was acknowledged


def test_centralized_reference(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny
    report = tmp_path / "c.json"
    subprocess.run(
        cli(
            "centralized",
            "--data",
            str(data),
            "--model",
            str(model),
            "--seq-len",
            "16",
            "--clients",
            "3",
            "--samples-per-client",
            "8",
            "--partition",
            "iid",
            "--rounds",
            "2",
            "--report",
            str(report),
        ),
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = json.loads(report.read_text())
    validate_report(out)
    assert out["kind"] == "centralized" and out["config"]["train_samples"] == 24
    assert [r["round"] for r in out["rounds"]] == [0, 1, 2]
