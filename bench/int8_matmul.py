"""Benchmark: fp32 MatMul against int8 DynamicQuantizeMatMul in ONNX Runtime, one thread.

The frozen linear layers of a LoRA training step (forward and input gradient) are 73% of a
training round (bench/results/step_profile-packed). This measures what int8 frozen weights would
buy on the training graph's matmul shapes before anything is built on it: ``MatMul`` (fp32) and
``com.microsoft.DynamicQuantizeMatMul`` (activations quantized per tensor at run time, weights
int8 per column or per tensor), each a one-node session on the CPU provider at one thread.
FLOPs = 2 M K N per matmul; relative error = ||Y - X W|| / ||X W|| on Gaussian data (real
activations have heavier tails, so their error is likely larger). ``broker_server/int8_weights.py``
(``--frozen-weights int8``) is built on this for the forward products only: quantizing activation
gradients per tensor the same way did not train (its module docstring says how that was measured).

``int8_per_row`` is the candidate for those input gradients: X quantized per row at run time to
uint8 with zero point 128 (Abs, ReduceMax and a Div for the row scales, then ``QuantizeLinear``:
ONNX Runtime's fast integer path takes a uint8 A), ``com.microsoft.MatMulIntegerToFloat`` against
W in int8 per column (the cast and the column scales in the kernel), then the row scales. Every
variant's ``rel_error_rows`` is its error on the same X with each row scaled by 10^u, u uniform in
[-3, 0]: rows of sizes three orders of magnitude apart, as activation gradients' are, which
per-tensor quantization handles badly.

    .venv/bin/python bench/int8_matmul.py --out bench/results/int8_matmul
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper, numpy_helper
from runner import main_guard
from step_speed import machine_info

SHAPES = ((800, 384, 384), (800, 384, 1536), (800, 1536, 384), (3000, 384, 1536))


def _session(model: ModelProto) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _model(nodes: list[Any], inits: list[Any], k: int, n: int) -> ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def fp32_matmul(w: np.ndarray) -> ModelProto:
    k, n = w.shape
    return _model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [numpy_helper.from_array(w, "W")], k, n)


def int8_matmul(w: np.ndarray, *, per_column: bool) -> ModelProto:
    k, n = w.shape
    amax = np.abs(w).max(axis=0) if per_column else np.array(np.abs(w).max())
    scale = (amax / 127).astype(np.float32)
    quantized = np.round(w / scale).astype(np.int8)
    inits = [
        numpy_helper.from_array(quantized, "Wq"),
        numpy_helper.from_array(scale, "s"),
        numpy_helper.from_array(np.zeros(scale.shape, np.int8), "zp"),
    ]
    node = helper.make_node("DynamicQuantizeMatMul", ["X", "Wq", "s", "zp"], ["Y"], domain="com.microsoft")
    return _model([node], inits, k, n)


def int8_per_row_matmul(w: np.ndarray) -> ModelProto:
    k, n = w.shape
    scale = (np.maximum(np.abs(w).max(axis=0), np.finfo(np.float32).tiny) / 127).astype(np.float32)
    quantized = np.round(w / scale).astype(np.int8)
    f32 = lambda name, value: numpy_helper.from_array(np.array(value, np.float32), name)  # noqa: E731
    inits = [
        numpy_helper.from_array(quantized, "Wq"),
        numpy_helper.from_array(scale, "ws"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp"),
        f32("inv127", 1 / 127),
        f32("tiny", np.finfo(np.float32).tiny),
        f32("one", 1.0),
    ]
    nodes = [
        helper.make_node("Abs", ["X"], ["abs"]),
        helper.make_node("ReduceMax", ["abs"], ["amax"], axes=[-1], keepdims=1),
        helper.make_node("Mul", ["amax", "inv127"], ["rs0"]),
        helper.make_node("Max", ["rs0", "tiny"], ["rs"]),  # one scale a row
        helper.make_node("Div", ["X", "rs"], ["xs"]),
        # rounds half to even, adds the zero point and saturates, in one pass
        helper.make_node("QuantizeLinear", ["xs", "one", "zp"], ["xq"]),
        # the int8 product, cast and times the weights' column scales in the kernel's epilogue
        helper.make_node(
            "MatMulIntegerToFloat", ["xq", "Wq", "one", "ws", "zp"], ["y0"], domain="com.microsoft"
        ),
        helper.make_node("Mul", ["y0", "rs"], ["Y"]),
    ]
    return _model(nodes, inits, k, n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in SHAPES:
        w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        x = rng.standard_normal((m, k)).astype(np.float32)
        x_rows = (x * 10.0 ** rng.uniform(-3, 0, (m, 1))).astype(np.float32)
        exact, exact_rows = x @ w, x_rows @ w
        row: dict[str, Any] = {"m": m, "k": k, "n": n}
        for name, model in (
            ("fp32", fp32_matmul(w)),
            ("int8_per_column", int8_matmul(w, per_column=True)),
            ("int8_per_tensor", int8_matmul(w, per_column=False)),
            ("int8_per_row", int8_per_row_matmul(w)),
        ):
            session = _session(model)
            for _ in range(3):
                y = session.run(None, {"X": x})[0]
            start = time.perf_counter()
            for _ in range(a.repeats):
                session.run(None, {"X": x})
            seconds = (time.perf_counter() - start) / a.repeats
            y_rows = session.run(None, {"X": x_rows})[0]
            row[name] = {
                "gflops": round(2 * m * k * n / seconds / 1e9, 1),
                "rel_error": float(np.linalg.norm(y - exact) / np.linalg.norm(exact)),
                "rel_error_rows": float(np.linalg.norm(y_rows - exact_rows) / np.linalg.norm(exact_rows)),
            }
        row["speedup_per_column"] = round(row["int8_per_column"]["gflops"] / row["fp32"]["gflops"], 2)
        row["speedup_per_row"] = round(row["int8_per_row"]["gflops"] / row["fp32"]["gflops"], 2)
        print(json.dumps(row))
        rows.append(row)
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "int8_matmul", "machine": machine_info(1), "shapes": rows}
    (a.out / "summary.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    main_guard(main)
