"""Frozen linear weights in int8 in the ORT training artifacts (``TrainConfig.frozen_weights``).

In the graphs :func:`onnxruntime.training.artifacts.generate_artifacts` writes, every frozen
linear weight ``W`` (``[out, in]``, a graph input bound from the checkpoint) is used through
``Transpose(W)``: ``MatMul(X, W^T)`` in the forward and ``FusedMatMul(dY, W^T, transB=1)`` (that
is ``dY @ W``) for the gradient of the layer's input. Those products are most of a device's
training step (``bench/results/step_profile-packed/``: 73% of a round).

:func:`quantize_frozen_linears` replaces each forward product with ONNX Runtime's
``com.microsoft.DynamicQuantizeMatMul``: ``W^T`` is stored as int8 with one scale per output
feature (symmetric, zero point 0), the activation is quantized to uint8 per tensor when the node
runs, and the product runs on the CPU's integer kernels (VNNI where there is one: 3.1-4.1x the
fp32 matmul on the graph's shapes, ``bench/results/int8_matmul/``). The eval graph's products
are rewritten the same way, so a device evaluates the model it trains.

The input gradients stay fp32 (``dY @ W`` reads the fp32 weight). Quantizing them the same way
was tried and does not train: per-tensor quantization of ``dY``, whose rows differ in size by
orders of magnitude, left a LoRA run on 300 20 Newsgroups texts at chance (train accuracy 0.085
against 0.308 in fp32). A weight no input gradient reads (the first layer's query, key and value:
nothing below them trains) leaves the graphs and the checkpoint.

With ``gradients`` (``frozen_weights="int8-grad"``) the input gradients' products are quantized
per row instead: row scales of ``dY`` at run time, ``QuantizeLinear`` to uint8 (ONNX Runtime's
fast integer path), ``MatMulIntegerToFloat`` against ``W`` in int8 per column, times the row
scales (``bench/int8_matmul.py``'s ``int8_per_row``: about 1% relative error, 2.2-3.6x the fp32
matmul on an Intel Xeon with AMX). No fp32 linear weight is read any more, so all of them leave.

Not exact: the forward's outputs differ from fp32 by the quantization error (about 1% relative
per product on Gaussian data); the trainable LoRA factors, the head, embeddings, LayerNorms and
biases stay fp32. ``tests/test_int8_weights.py`` bounds the difference; the accuracy it costs on
the main job is in the README.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edge_runtime.errors import EngineError

MS_DOMAIN = "com.microsoft"


def quantize_columns(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per column of ``b`` (``[K, N]``): ``b[:, j] ~ q[:, j] * scale[j]``."""
    if b.ndim != 2:
        raise EngineError(f"per-column quantization needs a matrix, got shape {b.shape}")
    amax = np.abs(b).max(axis=0).astype(np.float32)
    # a column of zeros (or of values so small that amax / 127 underflows) gets the smallest
    # normal scale, never 0: its values round to 0, within half a step
    scale = np.maximum(amax / np.float32(127.0), np.finfo(np.float32).tiny).astype(np.float32)
    q = np.clip(np.rint(b / scale), -127, 127).astype(np.int8)
    return q, scale


@dataclass(frozen=True)
class Rewritten:
    """What :func:`quantize_graph` changed in one graph."""

    products: int  # MatMul(X, W^T) nodes now DynamicQuantizeMatMul
    weights: frozenset[str]  # frozen weights quantized
    dropped: frozenset[str]  # fp32 weight inputs no node reads any more, removed from the graph
    gradients: int = 0  # input-gradient products dY @ W now the per-row int8 chain


def _swaps_axes(transpose: onnx.NodeProto) -> bool:
    """A Transpose of a matrix: ``perm`` [1, 0], or no ``perm`` (reversed axes)."""
    perm = [list(helper.get_attribute_value(a)) for a in transpose.attribute if a.name == "perm"]
    return not perm or perm[0] == [1, 0]


_ROW = "int8_rows"  # the per-row chain's shared constants


def _row_constants() -> list[onnx.TensorProto]:
    def f32(name: str, value: float) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(value, np.float32), f"{_ROW}/{name}")

    return [
        f32("inv127", 1 / 127),
        f32("tiny", float(np.finfo(np.float32).tiny)),
        f32("one", 1.0),
        numpy_helper.from_array(np.array(128, np.uint8), f"{_ROW}/zero_point"),
    ]


def _per_row_product(x: str, q_name: str, scale_name: str, out: str, name: str) -> list[onnx.NodeProto]:
    """``x @ W`` with ``x`` quantized per row (last axis) to uint8 at run time and ``W`` int8 per
    column: row scales, ``QuantizeLinear``, ``MatMulIntegerToFloat`` (the column scales in its
    epilogue), times the row scales. ``bench/int8_matmul.py``'s ``int8_per_row``."""
    k = f"{name}/rows"  # every node of the chain is named under it (profiles: bench/step_profile.py)
    c = f"{_ROW}/"
    return [
        helper.make_node("Abs", [x], [f"{k}/abs"], name=f"{k}/abs"),
        helper.make_node("ReduceMax", [f"{k}/abs"], [f"{k}/amax"], name=f"{k}/amax", axes=[-1], keepdims=1),
        helper.make_node("Mul", [f"{k}/amax", c + "inv127"], [f"{k}/scale0"], name=f"{k}/scale0"),
        helper.make_node("Max", [f"{k}/scale0", c + "tiny"], [f"{k}/scale"], name=f"{k}/scale"),
        helper.make_node("Div", [x, f"{k}/scale"], [f"{k}/scaled"], name=f"{k}/scaled"),
        helper.make_node(
            "QuantizeLinear", [f"{k}/scaled", c + "one", c + "zero_point"], [f"{k}/uint8"], name=f"{k}/uint8"
        ),
        helper.make_node(
            "MatMulIntegerToFloat",
            [f"{k}/uint8", q_name, c + "one", scale_name, c + "zero_point"],
            [f"{k}/product"],
            name=f"{k}/product",
            domain=MS_DOMAIN,
        ),
        helper.make_node("Mul", [f"{k}/product", f"{k}/scale"], [out], name=name),
    ]


def _input_gradient(node: onnx.NodeProto, transposed: str) -> bool:
    """``FusedMatMul(dY, W^T, transB=1)`` (``dY @ W``), plain otherwise."""
    if node.op_type != "FusedMatMul" or node.domain != MS_DOMAIN or node.input[1] != transposed:
        return False
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (
        at.get("transA", 0) == 0
        and at.get("transB", 0) == 1
        and at.get("alpha", 1.0) == 1.0
        and not at.get("transBatchA", 0)
        and not at.get("transBatchB", 0)
    )


def quantize_graph(
    model: onnx.ModelProto,
    frozen: Mapping[str, np.ndarray],
    *,
    keep: frozenset[str] = frozenset(),
    gradients: bool = False,
) -> Rewritten:
    """Rewrite ``model`` in place: every ``MatMul(X, Transpose(W))`` whose ``W`` is a 2-D graph
    input named in ``frozen`` becomes ``DynamicQuantizeMatMul(X, int8 W^T, scales)``; with
    ``gradients`` every input-gradient product ``FusedMatMul(dY, Transpose(W), transB=1)`` also
    becomes the per-row int8 chain (:func:`_per_row_product`) against an int8 ``W``.

    A weight read only by such products leaves the graph's inputs, unless ``keep`` names it.
    Everything else (embeddings read by Gather, LayerNorm weights, biases, and without
    ``gradients`` the input gradients' products) is left as it is.
    """
    graph = model.graph
    inputs = {i.name for i in graph.input}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(old node) -> its replacement
    dead: set[int] = set()
    added: list[onnx.TensorProto] = []
    quantized: set[str] = set()
    dropped: set[str] = set()
    gradient_products = 0
    for name in sorted(frozen):
        weight = frozen[name]
        if name not in inputs or weight.ndim != 2:
            continue
        transposes = [u for u in consumers[name] if u.op_type == "Transpose" and _swaps_axes(u)]
        products = [
            c
            for t in transposes
            for c in consumers[t.output[0]]
            if c.op_type == "MatMul" and c.domain in ("", "ai.onnx") and c.input[1] == t.output[0]
        ]
        if not products:
            continue
        q, scale = quantize_columns(np.ascontiguousarray(weight.T))  # X @ W^T: per output feature
        q_name, scale_name = f"{name}.int8_t", f"{name}.scale_t"
        added += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, scale_name)]
        for c in products:
            replaced[id(c)] = [
                helper.make_node(
                    "DynamicQuantizeMatMul",
                    [c.input[0], q_name, scale_name],
                    list(c.output),
                    name=(c.name or c.output[0]) + "_int8",
                    domain=MS_DOMAIN,
                )
            ]
        grads = (
            [c for t in transposes for c in consumers[t.output[0]] if _input_gradient(c, t.output[0])]
            if gradients
            else []
        )
        if grads:
            g, g_scale = quantize_columns(np.ascontiguousarray(weight))  # dY @ W: per input feature
            g_name, g_scale_name = f"{name}.int8", f"{name}.scale"
            added += [numpy_helper.from_array(g, g_name), numpy_helper.from_array(g_scale, g_scale_name)]
            for c in grads:
                replaced[id(c)] = _per_row_product(
                    c.input[0], g_name, g_scale_name, c.output[0], (c.name or c.output[0]) + "_int8"
                )
            gradient_products += len(grads)
        quantized.add(name)
        readers = {id(c) for t in transposes for c in consumers[t.output[0]]}
        if len(consumers[name]) == len(transposes) and readers <= {id(c) for c in [*products, *grads]}:
            dead.update(id(t) for t in transposes)  # the transposes feed nothing any more
            dropped.add(name)
    if not quantized:
        return Rewritten(0, frozenset(), frozenset())
    nodes = [m for n in graph.node if id(n) not in dead for m in replaced.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added + (_row_constants() if gradient_products else []))
    removed = dropped - keep
    kept = [i for i in graph.input if i.name not in removed]
    del graph.input[:]
    graph.input.extend(kept)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return Rewritten(
        len(replaced) - gradient_products, frozenset(quantized), frozenset(removed), gradient_products
    )


def quantize_frozen_linears(folder: Path, trainable: set[str], *, gradients: bool = False) -> Rewritten:
    """Rewrite an artifact folder's training and eval graphs (:func:`quantize_graph`) and write
    its checkpoint again without the fp32 weights that left the training graph.

    ``trainable``: the ONNX names of the trained parameters (never quantized); ``gradients``: the
    input gradients' products too (``frozen_weights="int8-grad"``). Returns the training graph's
    rewrite.
    """
    from onnxruntime.training import onnxblock
    from onnxruntime.training.api import CheckpointState

    state = CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    params = {name: (np.array(p.data), bool(p.requires_grad)) for name, p in iter(state.parameters)}
    del state
    frozen = {n: v for n, (v, grad) in params.items() if not grad and n not in trainable}
    training = onnx.load(str(folder / "training_model.onnx"))
    evaluation = onnx.load(str(folder / "eval_model.onnx"))
    done = quantize_graph(training, frozen, gradients=gradients)
    # ORT's Module feeds the eval graph every parameter of the checkpoint the training graph reads
    evaluated = quantize_graph(evaluation, frozen, keep=frozenset(frozen) - done.dropped)
    if (
        done.products == 0
        or (gradients and done.gradients == 0)
        or done.weights != evaluated.weights
        or done.dropped != evaluated.dropped
    ):
        raise EngineError(
            f"int8 frozen weights: the training graph quantized {len(done.weights)} weights and "
            f"dropped {len(done.dropped)}, the eval graph {len(evaluated.weights)} and "
            f"{len(evaluated.dropped)}; these graphs are not laid out as this rewrite expects"
        )
    onnx.save(training, str(folder / "training_model.onnx"))
    onnx.save(evaluation, str(folder / "eval_model.onnx"))
    kept = [(n, v, grad) for n, (v, grad) in params.items() if n not in done.dropped]
    checkpoint = folder / "checkpoint"
    checkpoint.unlink()
    onnxblock.save_checkpoint(
        (
            [numpy_helper.from_array(v, n) for n, v, grad in kept if grad],
            [numpy_helper.from_array(v, n) for n, v, grad in kept if not grad],
        ),
        checkpoint,
    )
    return done
