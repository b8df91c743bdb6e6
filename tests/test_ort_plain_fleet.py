"""A device with plain onnxruntime only gets work and trains in a federation over Mosquitto.

The device is a separate process running ``fedpeft edge --engine ort-plain`` with torch,
transformers, peft and ``onnxruntime.training`` unimportable, as on a Raspberry Pi with the edge
extra. The aggregation service runs here, over a real broker on a free port: it assigns the device
a bottleneck adapter (which the onnxruntime-training engine could not train), builds the step graph
for it, sends it over MQTT in chunks, and accepts the device's updates for two rounds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from broker_server.allocation import AllocationConfig, Allocator, Candidate, ort_predictor
from broker_server.evaluation import Evaluator
from broker_server.service import AggregationService, ServiceConfig
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, ModelDims
from edge_runtime.transport import MqttTransport, parse_broker_url
from hw_profiles import DeviceProfile
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("torch", "transformers", "peft", "onnxruntime.training")

DEVICE = textwrap.dedent(
    """
    import json, sys
    for name in {blocked!r}:
        sys.modules[name] = None  # an import of any of these now fails, as on a Pi
    from sdk.cli import main
    code = main(sys.argv[1:])
    print("BLOCKED-STILL", json.dumps([n for n in {blocked!r} if sys.modules.get(n) is not None]))
    sys.exit(code)
    """
).format(blocked=BLOCKED)


def test_a_plain_onnxruntime_device_trains_an_adapter_for_two_rounds(
    tmp_path: Path, mosquitto: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnx", reason="the server needs onnx to build the step graph")
    monkeypatch.setenv("FEDPEFT_ARTIFACTS", str(tmp_path / "server-artifacts"))
    model = make_tiny_bert(tmp_path / "model")
    data = write_text_folder(tmp_path / "data", per_class_train=8, per_class_test=4)
    _, test = load_folder(data)
    base = TrainConfig(model=str(model), num_labels=3, seq_len=16, batch_size=8, bits=8)
    dims = ModelDims.from_model_dir(model)
    predict = ort_predictor(dims, base.num_labels)
    # an adapter is the better module here, but only the step graph trains one on ONNX Runtime;
    # the LoRA with dropout is left for torch devices: the allocator must skip it for ort-plain
    grid = [
        Candidate(AdapterSpec(bottleneck=8), 8, 16),
        Candidate(LoraSpec(rank=4, alpha=8.0, dropout=0.1), 8, 16),
    ]
    allocator = Allocator(grid, predict, AllocationConfig(gamma=0.0), adapt_bits=False, predict_ort=predict)
    url = mosquitto.url
    server = MqttTransport(parse_broker_url(url), client_id="server", clean_start=True)
    server.connect()
    service = AggregationService(
        server,
        ServiceConfig(
            fleet="plain",
            rounds=2,
            train=base,
            min_clients=1,
            expected_clients=1,
            round_timeout_s=60,
            hello_timeout_s=60,
        ),
        Evaluator(base, test, seed=0, threads=1),
        allocator=allocator,
        artifacts_cache=tmp_path / "server-artifacts",
        artifact_chunk_bytes=64 * 1024,
    )
    service.start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    cache = tmp_path / "device-artifacts"
    device = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DEVICE,
            "edge",
            "--broker",
            url,
            "--fleet",
            "plain",
            "--device-id",
            "pi",
            "--data",
            str(data),
            "--engine",
            "ort-plain",
            "--state",
            str(tmp_path / "state"),
            "--artifacts-cache",
            str(cache),
            "--resend-after",
            "5",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        thread.join(timeout=90)
        out, _ = device.communicate(timeout=30)
    finally:
        if device.poll() is None:
            device.kill()
        service.stop()
        server.close()
    assert not thread.is_alive(), "the service did not finish its rounds"
    assert device.returncode == 0, out[-3000:]
    assert "BLOCKED-STILL []" in out, out[-3000:]  # nothing it must not have was ever imported
    assert "engines ort-plain" in out

    record = service.devices["pi"]
    assert not record.excluded, record.excluded
    assert record.config.engine == "ort-plain"
    assert record.config.peft == AdapterSpec(bottleneck=8)
    assert record.allocation is not None
    profile = DeviceProfile.from_dict(dict(record.hello.profile))
    assert record.allocation.cost == predict(record.allocation.candidate, profile)  # ORT's model
    # the class-mean round and two training rounds, each with the device's accepted update
    assert [(r["round"], r["participants"]) for r in service.rounds] == [(0, 1), (1, 1), (2, 1)]
    assert record.updates_accepted == 3 and service.rejected == []
    assert "pi: 3 updates sent, 3 accepted" in out
    assert all(r["accuracy"] is not None for r in service.rounds[1:])
    # the step graph went over the broker in chunks and is what the device trained from
    assert len(service.artifacts_published) == 1
    key, info = next(iter(service.artifacts_published.items()))
    assert info.chunks > 1
    manifest = json.loads((cache / key / "manifest.json").read_text())
    assert manifest["flavour"] == "step" and manifest["peft"] == AdapterSpec(bottleneck=8).to_dict()
    assert (cache / key / "step_model.onnx").is_file()
