"""bench/step_profile.py's reading of ONNX Runtime profiles, and OrtEngine's profiler switch.

FLOPs from recorded shapes are checked against hand counts; on a tiny random BERT the profiled
matmul FLOPs of a real training run must equal bench/step_speed.py's formula for the same
micro-batches, so the two counts check each other.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset, load_folder
from edge_runtime.peft_specs import LoraSpec, ModelDims
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def prof() -> ModuleType:
    return _bench("step_profile")


def test_matmul_flops_from_shapes(prof: ModuleType) -> None:
    f = prof.matmul_flops
    assert f([3, 4], [4, 5], [3, 5]) == 2 * 3 * 4 * 5
    # activations (b, n, d) times a weight (d, d'): 2 b n d d'
    assert f([2, 7, 4], [4, 6], [2, 7, 6]) == 2 * 2 * 7 * 4 * 6
    # a transposed weight stored (d', d): the same count
    assert f([2, 7, 4], [6, 4], [2, 7, 6]) == 2 * 2 * 7 * 4 * 6
    # attention scores, batch x heads: (b, h, n, dh) x (b, h, dh, n) -> (b, h, n, n)
    assert f([2, 3, 5, 8], [2, 3, 8, 5], [2, 3, 5, 5]) == 2 * (2 * 3) * 5 * 8 * 5
    # the same with the key in (b, n, h, dh) order, as a FusedMatMul with transposed batches reads it
    assert f([2, 3, 5, 8], [2, 5, 3, 8], [2, 3, 5, 5]) == 2 * (2 * 3) * 5 * 8 * 5
    # a weight gradient: (b, n, d')^T x (b, n, r) summed over b n -> (d', r): k = b n
    assert f([2, 7, 6], [2, 7, 3], [6, 3]) == 2 * 6 * 3 * (2 * 7)
    assert f([0, 4], [4, 5], [0, 5]) == 0


def test_matmul_kinds_from_node_names(prof: ModuleType) -> None:
    kind = prof.matmul_kind
    layer = "/encoder/encoder/layer.3"
    assert kind(f"{layer}/intermediate/dense/MatMul/MatmulTransposeFusion/_kernel_time") == "frozen linear"
    assert kind(f"{layer}/attention/self/query/base_layer/MatMul_Grad/FusedMatMul_0_kernel_time") == (
        "frozen linear"
    )
    assert kind(f"{layer}/attention/self/value/default_1/MatMul/MatmulTransposeFusion/_kernel_time") == "lora"
    assert kind(f"{layer}/attention/self/MatMul_1_Grad/FusedMatMul_1_kernel_time") == "attention"
    assert kind("/classifier/MatMul_kernel_time") == "other"


def test_matmul_kinds_from_the_packed_graphs_node_names(prof: ModuleType) -> None:
    kind = prof.matmul_kind  # broker_server.packed_encoder: named by the projection, not the layer
    assert kind("/key_1/MatMul/MatmulTransposeFusion/_kernel_time") == "frozen linear"
    assert kind("/query/base_layer_3/MatMul_Grad/FusedMatMul_0/MatmulTransposeFusion/_kernel_time") == (
        "frozen linear"
    )
    assert kind("/output/dense_5/MatMul/MatmulTransposeFusion/_kernel_time") == "frozen linear"
    assert kind("/value/default_3/MatMul/MatmulTransposeFusion//MatMulScaleFusion/_kernel_time") == "lora"
    assert kind("/MatMul_1_kernel_time") == "attention"
    assert kind("/MatMul_2_Grad/FusedMatMul_1/MatMulScaleFusion/_kernel_time") == "attention"
    assert kind("/MatMul/MatMulScaleFusion/_kernel_time") == "attention"
    assert kind("/head/Gemm_kernel_time") == "other"
    # --frozen-weights int8: broker_server.int8_weights names a product's replacement NAME_int8
    assert kind("/query/base_layer_1/MatMul_int8_kernel_time") == "frozen linear int8"
    assert kind("/output/dense_2/MatMul_int8_kernel_time") == "frozen linear int8"
    assert kind("/query/base_layer_1/MatMul_Grad/FusedMatMul_0_kernel_time") == "frozen linear"
    # int8-grad: the input gradients' per-row chain is named NAME_int8/rows/...
    grad = "/query/base_layer_1/MatMul_Grad/FusedMatMul_0_int8/rows"
    assert kind(f"{grad}/product_kernel_time") == "input gradients int8"


def _node(name: str, op: str, dur: int, shapes: list[list[int]] | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"op_name": op}
    if shapes is not None:
        args["input_type_shape"] = [{"float": s} for s in shapes[:-1]]
        args["output_type_shape"] = [{"float": shapes[-1]}]
    return {"cat": "Node", "name": f"{name}_kernel_time", "dur": dur, "args": args}


def test_summarize_profile_adds_kernels_by_op_and_matmuls_by_kind(prof: ModuleType) -> None:
    layer = "/encoder/encoder/layer.0"
    events = [
        {"cat": "Session", "name": "model_run", "dur": 5_000_000},
        {"cat": "Node", "name": "x_fence_before", "dur": 99, "args": {"op_name": "Add"}},  # not a kernel
        _node(
            f"{layer}/intermediate/dense/MatMul", "FusedMatMul", 2_000_000, [[2, 8, 4], [4, 16], [2, 8, 16]]
        ),
        _node(f"{layer}/output/dense/MatMul", "MatMul", 1_000_000, [[2, 8, 16], [16, 4], [2, 8, 4]]),
        _node(
            f"{layer}/attention/self/MatMul",
            "FusedMatMul",
            500_000,
            [[2, 1, 8, 4], [2, 1, 4, 8], [2, 1, 8, 8]],
        ),
        _node(
            f"{layer}/attention/self/query/default/MatMul", "MatMul", 250_000, [[2, 8, 4], [4, 2], [2, 8, 2]]
        ),
        _node(f"{layer}/intermediate/BiasGelu", "BiasGelu", 1_250_000),
    ]
    s = prof.summarize_profile(events)
    assert s["runs"] == 1 and s["run_s"] == 5.0
    assert s["kernel_s"] == pytest.approx(5.0)
    assert s["by_op"]["FusedMatMul"]["s"] == pytest.approx(2.5) and s["by_op"]["FusedMatMul"]["calls"] == 2
    assert s["by_op"]["BiasGelu"]["share"] == pytest.approx(0.25)
    assert "Add" not in s["by_op"]
    mm = s["matmul"]
    assert mm["frozen linear"]["s"] == pytest.approx(3.0)
    assert mm["frozen linear"]["gflop"] * 1e9 == pytest.approx(2 * (2 * 2 * 8 * 4 * 16))
    assert mm["attention"]["gflop"] * 1e9 == pytest.approx(2 * 2 * 8 * 4 * 8)
    assert mm["lora"]["gflop"] * 1e9 == pytest.approx(2 * 2 * 8 * 4 * 2)
    both = prof.merge([s, s])
    assert both["kernel_s"] == pytest.approx(10.0) and both["runs"] == 2
    assert both["matmul"]["lora"]["gflop"] == pytest.approx(2 * mm["lora"]["gflop"])
    rated = prof.with_rates(both, peak_gflops=1.0)
    assert rated["matmul_s"] == pytest.approx(7.5)
    assert rated["other_kernels_s"] == pytest.approx(2.5)
    assert rated["at_peak_s"] == pytest.approx(rated["matmul_gflop"])


def test_token_counts_and_the_training_batches(prof: ModuleType) -> None:
    ids = [[1] * n for n in (3, 9, 4, 9, 2, 7, 5)]
    config = TrainConfig(num_labels=2, batch_size=4, micro_batch=2)
    batches = prof.training_batches(ids, config, seed=3, epochs=2)
    assert sorted(i for b in batches for i in b) == sorted(list(range(7)) * 2)
    assert all(len(b) <= 2 for b in batches)
    for b in batches:  # sorted by length within each micro-batch, as the engines sort them
        assert [len(ids[i]) for i in b] == sorted(len(ids[i]) for i in b)
    real, slots = prof.token_counts(ids, [[0, 2], [1, 3], [4]])
    assert real == 3 + 4 + 9 + 9 + 2
    assert slots == 2 * 4 + 2 * 9 + 2


def test_the_ort_engine_profile_counts_what_the_formula_counts(prof: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime.training.api", reason="the ORT engine needs onnxruntime-training")
    pytest.importorskip("onnx", reason="onnx is needed to build ORT training artifacts")
    from broker_server.artifacts import build_artifacts
    from edge_runtime.engines.ort_engine import OrtEngine

    step_speed = _bench("step_speed")
    model = make_tiny_bert(tmp_path / "model", dropout=0.0)
    data = write_text_folder(tmp_path / "data", per_class_train=5, per_class_test=2)
    train, _ = load_folder(data)
    assert isinstance(train, TextDataset)
    config = TrainConfig(
        model=str(model), num_labels=3, seq_len=16, batch_size=4, micro_batch=2, peft=LoraSpec(rank=4)
    )
    folder = build_artifacts(config, seed=0, cache_dir=tmp_path / "artifacts", threads=1).folder
    engine = OrtEngine(config, artifacts=folder, threads=1, profile_prefix=tmp_path / "prof" / "run")
    engine.train(train, epochs=1, seed=5)
    ids = engine._tokens(train)
    engine.close()
    files = list((tmp_path / "prof").glob("run*.json"))
    assert len(files) == 1
    summary = prof.summarize_profile(json.loads(files[0].read_text()))
    batches = prof.training_batches(ids, config, seed=5, epochs=1)
    assert summary["runs"] == len(batches)
    dims = ModelDims.from_model_dir(model)
    counted = 0.0
    for rows in batches:
        n = max(len(ids[i]) for i in rows)
        f = step_speed.step_flops(dims, batch=len(rows), seq_len=n, num_labels=3, mode="lora", rank=4)
        counted += f.forward + f.backward
    profiled = sum(v["gflop"] for v in summary["matmul"].values()) * 1e9
    # the formula counts the masked-mean pooling as 2 T d of matmul; the graph does it with
    # elementwise kernels, so the two may differ by that much (0.13% here), no more
    assert profiled == pytest.approx(counted, rel=0.005)
    assert profiled <= counted
    assert summary["matmul"]["frozen linear"]["gflop"] > summary["matmul"]["lora"]["gflop"] > 0
