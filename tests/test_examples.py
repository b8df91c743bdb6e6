"""The app-developer path: examples/embedded_client.py joins a federation over a real Mosquitto and
trains, as its own process, with its data held in memory and never sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from broker_server.evaluation import Evaluator
from broker_server.service import AggregationService, ServiceConfig
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.downlink import state_digest
from edge_runtime.transport import MqttTransport, parse_broker_url
from tests.helpers import WORDS, write_text_folder
from tests.tiny_model import make_tiny_bert

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "embedded_client.py"
LABELS = ["sport", "finance", "space"]


def _app_samples(path: Path, per_class: int = 8) -> Path:
    """What the app collected: texts with label names (not ids), as the example reads them."""
    rng = np.random.default_rng(1)
    with open(path, "w") as f:
        for label, words in WORDS.items():
            for _ in range(per_class):
                text = " ".join(rng.choice(words.split(), size=8))
                f.write(json.dumps({"text": text, "label": LABELS[label]}) + "\n")
    return path


def test_the_embedded_client_example_trains_in_a_federation_end_to_end(
    mosquitto: Any, tmp_path: Path
) -> None:
    start = time.monotonic()
    model = make_tiny_bert(tmp_path / "model")
    _, test = load_folder(write_text_folder(tmp_path / "server-data", per_class_train=2))
    cfg = TrainConfig(model=str(model), num_labels=3, seq_len=16, batch_size=8, bits=8, engine="torch")
    fleet = "shop"
    server_t = MqttTransport(parse_broker_url(mosquitto.url), client_id="shop-server", clean_start=True)
    server_t.connect()
    service = AggregationService(
        server_t,
        ServiceConfig(
            fleet=fleet, rounds=1, train=cfg, min_clients=1, expected_clients=1, round_timeout_s=60
        ),
        Evaluator(cfg, test, seed=0, threads=1),
    )
    service.start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    out = tmp_path / "module.npz"
    state = tmp_path / "till-3"
    argv = [
        *("--broker", mosquitto.url, "--fleet", fleet, "--device-id", "till-3"),
        *("--samples", str(_app_samples(tmp_path / "till3.jsonl")), "--labels", ",".join(LABELS)),
        *("--state", str(state), "--memory-cap-mb", "4096", "--out", str(out)),
    ]
    try:
        done = subprocess.run(
            [sys.executable, str(EXAMPLE), *argv],
            cwd=tmp_path,
            env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=90,
        )
        thread.join(timeout=30)
    finally:
        server_t.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert not thread.is_alive(), "the service did not finish"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    # the head round (class means) and one training round, each acknowledged
    assert [r["participants"] for r in service.rounds] == [1, 1]
    assert summary["finished"] is True and summary["device_id"] == "till-3"
    assert summary["updates_sent"] == summary["updates_accepted"] == 2
    assert service.devices["till-3"].updates_accepted == 2
    # the app's memory cap reached the service in its hello, for the allocator to size under
    assert service.devices["till-3"].hello.profile["extra"]["mem_cap_mb"] == 4096.0
    # the app ends on the service's final module, bit for bit, and saved it
    saved = dict(np.load(out))
    assert summary["tensors"] == len(saved) > 0
    assert state_digest(saved) == state_digest(service.final_state())
    assert not any((state / "outbox").glob("update-*"))  # nothing left unacknowledged
    assert time.monotonic() - start < 60
