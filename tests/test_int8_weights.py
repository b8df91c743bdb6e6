"""Frozen linear weights in int8 in the ORT artifacts' forward (``broker_server.int8_weights``).

On a tiny random BERT (2 layers, dropout 0): the rewrite replaces exactly the forward products
of the frozen linear weights, keeps the fp32 weights the input gradients read, drops the ones no
gradient reads from the graphs and the checkpoint, and the rewritten artifacts train and test
close to the fp32 ones (within the tolerances below, which an untouched graph would meet exactly
and a wrong rewrite would not). The flag is refused where it does not apply, and a simulated
fleet over a real Mosquitto trains with it, with a fixed module and under the allocator.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from broker_server.int8_weights import quantize_columns
from edge_runtime.config import TrainConfig
from edge_runtime.engines.ort_engine import ORT_TRAINING_INSTALL
from edge_runtime.errors import ConfigError, EngineError
from edge_runtime.peft_specs import LoraSpec

LORA = LoraSpec(rank=4, target_modules=("query", "value"))
LAYERS = 2
LINEARS_PER_LAYER = 6  # query, key, value, attention output, intermediate, output


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
        elements=st.floats(-1e3, 1e3, width=32),
    )
)
@settings(max_examples=200, deadline=None)
def test_per_column_int8_is_within_half_a_step_of_each_value(b: np.ndarray) -> None:
    q, scale = quantize_columns(b)
    assert q.dtype == np.int8 and q.shape == b.shape and scale.shape == (b.shape[1],)
    assert int(np.abs(q.astype(np.int32)).max()) <= 127  # symmetric: -128 is never used
    assert np.all(scale > 0)
    error = np.abs(q.astype(np.float64) * scale - b)
    assert np.all(error <= scale.astype(np.float64) / 2 * (1 + 1e-5) + 1e-30)
    peak = np.abs(b).max(axis=0)
    used = peak / 127 >= np.finfo(np.float32).tiny
    # each column's largest value maps to +-127 (the whole int8 range is used), unless its scale
    # would underflow: then its values round to 0
    assert np.all(np.abs(q[:, used]).max(axis=0) == 127)


def test_per_column_quantization_needs_a_matrix() -> None:
    with pytest.raises(EngineError, match="matrix"):
        quantize_columns(np.ones(3, dtype=np.float32))


def test_frozen_weights_is_validated_and_travels_only_when_set() -> None:
    with pytest.raises(ConfigError, match="frozen_weights"):
        TrainConfig(frozen_weights="int4")
    plain = TrainConfig()
    assert "frozen_weights" not in plain.to_dict()  # fp32 configurations keep their content address
    int8 = dataclasses.replace(plain, frozen_weights="int8")
    assert int8.to_dict()["frozen_weights"] == "int8"
    assert TrainConfig.from_dict(int8.to_dict()) == int8


def test_engines_other_than_ort_refuse_int8_weights() -> None:
    from edge_runtime.engines import create_engine

    for engine in ("torch", "ort-plain"):
        with pytest.raises(ConfigError, match="ort engine"):
            create_engine(TrainConfig(engine=engine, frozen_weights="int8"), artifacts="/nowhere")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (dict(engine="auto"), "needs --engine ort"),
        (dict(engine="torch"), "needs --engine ort"),
        (dict(engine="mixed"), "needs --engine ort"),
        (dict(engine="ort", distill_epochs=1, profiles="low=0.5,high=0.5"), "distill"),
        (dict(engine="ort", frozen_weights="int4"), "must be one of fp32, int8"),
    ],
)
def test_the_simulator_refuses_int8_weights_off_the_ort_engine(flags: dict[str, Any], message: str) -> None:
    from sdk.simulate import SimulationConfig

    values: dict[str, Any] = {"data": "x", "frozen_weights": "int8", **flags}
    with pytest.raises(ConfigError, match=message):
        SimulationConfig(**values)


def test_the_command_line_offers_fp32_int8_and_int8_grad_only(capsys: pytest.CaptureFixture[str]) -> None:
    from sdk.cli import build_parser

    base = ["simulate", "--data", "x", "--engine", "ort"]
    assert build_parser().parse_args(base).frozen_weights == "fp32"
    assert build_parser().parse_args([*base, "--frozen-weights", "int8"]).frozen_weights == "int8"
    assert build_parser().parse_args([*base, "--frozen-weights", "int8-grad"]).frozen_weights == "int8-grad"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--frozen-weights", "int4"])
    assert "invalid choice" in capsys.readouterr().err


# ---- the rewritten artifacts (onnxruntime-training) -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Built:
    model: Path
    data: Path
    fp32: Path
    int8: Path
    cache: Path
    int8_grad: Path


def _config(model: Path, **kw: Any) -> TrainConfig:
    values: dict[str, Any] = dict(
        model=str(model),
        num_labels=3,
        seq_len=16,
        batch_size=8,
        lr=5e-3,
        head_lr=5e-2,
        peft=LORA,
        engine="ort",
    )
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    pytest.importorskip("onnxruntime.training.api", reason=f"engine ort needs {ORT_TRAINING_INSTALL}")
    from broker_server.artifacts import build_artifacts
    from tests.helpers import write_text_folder
    from tests.tiny_model import make_tiny_bert

    root = tmp_path_factory.mktemp("int8")
    model = make_tiny_bert(root / "model", layers=LAYERS, dropout=0.0)
    data = write_text_folder(root / "data", per_class_train=54, per_class_test=10)
    cache = root / "artifacts"
    fp32 = build_artifacts(_config(model), seed=0, cache_dir=cache, threads=1).folder
    int8 = build_artifacts(_config(model, frozen_weights="int8"), seed=0, cache_dir=cache, threads=1).folder
    int8_grad = build_artifacts(
        _config(model, frozen_weights="int8-grad"), seed=0, cache_dir=cache, threads=1
    ).folder
    return Built(model, data, fp32, int8, cache, int8_grad)


def _products(path: Path, trainable: set[str]) -> tuple[int, int, set[str]]:
    """(DynamicQuantizeMatMul nodes, forward MatMuls through a transposed frozen graph input, inputs)."""
    import onnx

    graph = onnx.load(str(path)).graph
    inputs = {i.name for i in graph.input}
    frozen = inputs - trainable
    transposed = {n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in frozen}
    quantized = sum(n.op_type == "DynamicQuantizeMatMul" for n in graph.node)
    fp32 = sum(n.op_type == "MatMul" and n.input[1] in transposed for n in graph.node)
    return quantized, fp32, inputs


def test_the_rewrite_replaces_every_frozen_forward_product_and_nothing_else(built: Built) -> None:
    from onnxruntime.training.api import CheckpointState

    from broker_server.artifacts import artifact_key

    linears = LAYERS * LINEARS_PER_LAYER
    manifest = json.loads((built.int8 / "manifest.json").read_text())
    assert manifest["frozen_weights"] == "int8"
    assert json.loads((built.fp32 / "manifest.json").read_text())["frozen_weights"] == "fp32"
    assert artifact_key(_config(built.model)) != artifact_key(_config(built.model, frozen_weights="int8"))

    trainable = {t["onnx"] for t in manifest["trainable"]}
    assert _products(built.fp32 / "training_model.onnx", trainable)[:2] == (0, linears)
    quantized, fp32_left, inputs = _products(built.int8 / "training_model.onnx", trainable)
    assert (quantized, fp32_left) == (linears, 0)
    eval_quantized, eval_left, eval_inputs = _products(built.int8 / "eval_model.onnx", trainable)
    assert (eval_quantized, eval_left) == (linears, 0)
    params = {
        name for name, _ in iter(CheckpointState.load_checkpoint(str(built.int8 / "checkpoint")).parameters)
    }
    first = {
        f"inner.encoder.encoder.layer.0.attention.self.{p}"
        for p in ("query.base_layer", "key", "value.base_layer")
    }
    for stem in first:
        assert f"{stem}.weight" not in params and f"{stem}.weight" not in inputs
    assert "inner.encoder.encoder.layer.1.attention.self.key.weight" in params
    assert "inner.encoder.encoder.layer.0.output.dense.weight" in params
    assert trainable <= params
    # ORT's Module feeds the eval graph every parameter of the checkpoint, as it feeds training
    assert eval_inputs - {"input_ids", "attention_mask", "labels"} == params
    assert params <= inputs


def test_int8_grad_also_rewrites_every_input_gradient_product_and_drops_the_fp32_weights(
    built: Built,
) -> None:
    import onnx
    from onnxruntime.training.api import CheckpointState

    manifest = json.loads((built.int8_grad / "manifest.json").read_text())
    assert manifest["frozen_weights"] == "int8-grad"
    trainable = {t["onnx"] for t in manifest["trainable"]}

    def input_gradients(path: Path) -> tuple[int, int]:
        """(FusedMatMul products through a transposed frozen input, per-row int8 products)."""
        graph = onnx.load(str(path)).graph
        frozen = {i.name for i in graph.input} - trainable
        transposed = {n.output[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in frozen}
        fused = sum(n.op_type == "FusedMatMul" and n.input[1] in transposed for n in graph.node)
        per_row = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
        # named for bench/step_profile.py's kind "input gradients int8"
        assert all(n.name.endswith("_int8/rows/product") for n in per_row)
        return fused, len(per_row)

    before = input_gradients(built.int8 / "training_model.onnx")
    assert before[0] > 0 and before[1] == 0
    assert input_gradients(built.int8_grad / "training_model.onnx") == (0, before[0])
    assert _products(built.int8_grad / "training_model.onnx", trainable)[:2] == (
        LAYERS * LINEARS_PER_LAYER,
        0,
    )
    params = {
        name
        for name, _ in iter(CheckpointState.load_checkpoint(str(built.int8_grad / "checkpoint")).parameters)
    }
    # no node reads a frozen linear weight in fp32 any more: they all left the checkpoint
    linear = [
        n for n in params if n.startswith("inner.encoder.encoder.layer.") and n.endswith("dense.weight")
    ]
    assert not linear and "inner.encoder.encoder.layer.1.attention.self.key.weight" not in params
    assert trainable <= params


def _engines(built: Built, fmt: str = "int8") -> tuple[Any, Any]:
    from edge_runtime.engines.ort_engine import OrtEngine

    fp32 = OrtEngine(_config(built.model), artifacts=built.fp32, threads=1)
    folder = built.int8 if fmt == "int8" else built.int8_grad
    int8 = OrtEngine(_config(built.model, frozen_weights=fmt), artifacts=folder, threads=1)
    return fp32, int8


def test_int8_artifacts_start_from_the_same_module_and_test_close_to_fp32(built: Built) -> None:
    from edge_runtime.data import load_folder

    _, test = load_folder(built.data)
    fp32, int8 = _engines(built)
    start = fp32.trainable_state()
    for name, value in int8.trainable_state().items():
        np.testing.assert_array_equal(value, start[name])
    a, b = fp32.evaluate(test), int8.evaluate(test)
    assert b.loss == pytest.approx(a.loss, rel=0.05)
    assert a.loss != b.loss  # the products are quantized, not the fp32 graph under another name
    agree = float(np.mean(np.asarray(a.predictions) == np.asarray(b.predictions)))
    assert agree >= 0.9, agree
    sums_a, counts = fp32.class_feature_sums(test)
    sums_b, counts_b = int8.class_feature_sums(test)
    np.testing.assert_array_equal(counts, counts_b)
    gap = np.linalg.norm(sums_b - sums_a) / np.linalg.norm(sums_a)
    assert 0 < gap < 0.05, gap


@pytest.mark.parametrize("fmt", ["int8", "int8-grad"])
def test_int8_artifacts_train_like_fp32_ones(built: Built, fmt: str) -> None:
    from edge_runtime.data import load_folder

    train, test = load_folder(built.data)
    rows = train.subset(np.arange(160))  # 20 steps at batch 8
    fp32, int8 = _engines(built, fmt)
    start = fp32.trainable_state()
    first = [e.train(rows, epochs=1, seed=3) for e in (fp32, int8)]
    assert first[1].loss == pytest.approx(first[0].loss, rel=0.05)
    after_a, after_b = fp32.trainable_state(), int8.trainable_state()
    for name, value in after_a.items():
        moved = float(np.linalg.norm(value - start[name]))
        assert moved > 0, name
        # the int8 run's step is close to the fp32 one's: within a fifth of how far fp32 moved
        assert float(np.linalg.norm(after_b[name] - value)) <= 0.2 * moved, name
    second = [e.train(rows, epochs=1, seed=4) for e in (fp32, int8)]
    assert second[1].loss < first[1].loss  # it learns
    assert second[1].loss == pytest.approx(second[0].loss, rel=0.1)
    a, b = fp32.evaluate(test), int8.evaluate(test)
    assert b.accuracy == pytest.approx(a.accuracy, abs=0.1)


def test_an_ort_engine_refuses_artifacts_of_the_other_weight_format(built: Built) -> None:
    from edge_runtime.engines.ort_engine import OrtEngine

    with pytest.raises(ConfigError, match="frozen_weights"):
        OrtEngine(_config(built.model, frozen_weights="int8"), artifacts=built.fp32)
    with pytest.raises(ConfigError, match="frozen_weights"):
        OrtEngine(_config(built.model), artifacts=built.int8)


def test_the_step_flavour_refuses_int8_weights(built: Built) -> None:
    from broker_server.artifacts import build_artifacts

    with pytest.raises(ConfigError, match="training flavour"):
        build_artifacts(
            _config(built.model, engine="ort-plain", frozen_weights="int8"),
            cache_dir=built.cache,
            flavour="step",
        )


def test_a_simulated_ort_fleet_trains_with_int8_weights_over_mosquitto(
    built: Built, mosquitto: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker_server.report import validate_report
    from sdk.simulate import Simulation, SimulationConfig

    monkeypatch.setenv("FEDPEFT_ARTIFACTS", str(tmp_path / "artifacts"))
    config = SimulationConfig(
        data=str(built.data),
        model=str(built.model),
        clients=3,
        rounds=2,
        partition="iid",
        samples_per_client=24,
        test_samples=30,
        seq_len=16,
        local_epochs=2,
        bits=4,
        workers=2,
        round_timeout_s=60.0,
        engine="ort",
        frozen_weights="int8",
        broker=mosquitto.url,
    )
    report = Simulation(config).run()
    validate_report(report)
    assert report["rejected"] == []
    assert report["config"]["frozen_weights"] == "int8"
    assert report["config"]["train"]["engine"] == "ort"  # not the base configuration's placeholder
    # class means, then 2 rounds each
    assert all(c["engine"] == "ort" and c["updates_accepted"] == 3 for c in report["clients"])
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "artifacts").glob("*/manifest.json")]
    assert [m["frozen_weights"] for m in manifests] == ["int8"]
    losses = [r["loss"] for r in report["rounds"]]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_an_allocated_fleet_gets_int8_artifacts_within_its_caps(
    built: Built, mosquitto: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --allocation utility every module on offer is built int8, and each device's predicted
    cost (int8 copies included) is within its cap."""
    from broker_server.report import validate_report
    from sdk.simulate import Simulation, SimulationConfig

    monkeypatch.setenv("FEDPEFT_ARTIFACTS", str(tmp_path / "artifacts"))
    config = SimulationConfig(
        data=str(built.data),
        model=str(built.model),
        clients=2,
        rounds=1,
        partition="iid",
        samples_per_client=16,
        test_samples=20,
        seq_len=16,
        workers=1,
        round_timeout_s=60.0,
        engine="ort",
        frozen_weights="int8",
        profiles="low=0.5,mid=0.5",
        allocation="utility",
        broker=mosquitto.url,
    )
    report = Simulation(config).run()
    validate_report(report)
    assert report["rejected"] == []
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "artifacts").glob("*/manifest.json")]
    assert len(manifests) > 1 and {m["frozen_weights"] for m in manifests} == {"int8"}
    for client in report["clients"]:
        assert client["engine"] == "ort" and client["updates_accepted"] == 2
        assert client["allocation"]["predicted_memory_mb"] <= client["mem_cap_mb"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), r"--allocation utility\|uniform"),
        (("--allocation", "uniform", "--distill-epochs", "1"), "distillation"),
    ],
)
def test_serve_refuses_int8_weights_where_no_device_would_train_them(
    flags: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    from sdk.cli import build_parser
    from sdk.commands import cmd_serve
    from tests.helpers import write_text_folder

    data = write_text_folder(tmp_path / "data", per_class_train=2)
    argv = ["serve", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--state", str(tmp_path / "s")]
    args = build_parser().parse_args([*argv, "--data", str(data), "--frozen-weights", "int8", *flags])
    with pytest.raises(ConfigError, match=message):
        cmd_serve(args)
    assert not (tmp_path / "s").exists()  # refused before it touched its state


@pytest.mark.parametrize("frozen", ["int8", "int8-grad"])
def test_serve_gives_ort_devices_int8_artifacts_over_mosquitto(
    built: Built, mosquitto: Any, tmp_path: Path, frozen: str
) -> None:
    """``fedpeft serve --allocation uniform --frozen-weights int8|int8-grad`` and two ``fedpeft edge
    --engine ort`` processes: the devices fetch artifacts of that format over MQTT and their updates
    are accepted."""
    import os
    import subprocess

    from broker_server.report import validate_report
    from tests.cli_processes import cli, start_edge

    root = Path(__file__).resolve().parent.parent
    env = os.environ | {"PYTHONPATH": str(root), "FEDPEFT_ARTIFACTS": str(tmp_path / "server-artifacts")}
    report = tmp_path / "serve.json"
    common = ["--model", str(built.model), "--seq-len", "16"]
    server = subprocess.Popen(
        cli(
            "serve",
            "--broker",
            mosquitto.url,
            "--fleet",
            "int8",
            "--state",
            str(tmp_path / "state"),
            "--data",
            str(built.data),
            "--rounds",
            "1",
            "--min-clients",
            "2",
            "--report",
            str(report),
            "--round-timeout",
            "90",
            "--hello-timeout",
            "90",
            "--allocation",
            "uniform",
            "--frozen-weights",
            frozen,
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
            "int8",
            f"box-{i}",
            built.data,
            tmp_path / f"edge{i}",
            seed=i,
            max_samples=20,
            cwd=tmp_path,
            env=env,
            extra=("--engine", "ort"),
        )
        for i in range(2)
    ]
    try:
        out, _ = server.communicate(timeout=240)
        device_out = [d.communicate(timeout=60)[0] for d in devices]
    finally:
        for p in (server, *devices):
            if p.poll() is None:
                p.kill()
    assert server.returncode == 0, out
    assert all(d.returncode == 0 for d in devices), device_out
    data_out = json.loads(report.read_text())
    validate_report(data_out)
    assert [r["round"] for r in data_out["rounds"]] == [0, 1]
    assert data_out["config"]["train"]["engine"] == "ort"
    for client in data_out["clients"]:
        assert client["engine"] == "ort" and client["updates_accepted"] == 2, client
    served = [json.loads(p.read_text()) for p in (tmp_path / "server-artifacts").glob("*/manifest.json")]
    fetched = [json.loads(p.read_text()) for p in tmp_path.glob("edge*/**/manifest.json")]
    assert [m["frozen_weights"] for m in served] == [frozen]
    assert len(fetched) == 2 and {m["frozen_weights"] for m in fetched} == {frozen}
