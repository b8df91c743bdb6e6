"""The lowering of each aten operator to ONNX opset 17 nodes, in one table (:data:`LOWERINGS`).

Each entry takes the walk (:class:`~broker_server.onnx_graph.LoweringContext`), the FX node and its
arguments, and returns the lowered value: a tensor name, a size, or a list of them. An operator
missing here is refused by the walk (:class:`~broker_server.onnx_lowering.Lowering`) by name.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from onnx import TensorProto, numpy_helper

from broker_server.onnx_graph import INT64_MAX, NUMPY, Dyn, LoweringContext, Size, node_elem_type, node_rank
from edge_runtime.errors import EngineError

# lowerings -------------------------------------------------------------------------------------
Lower = Callable[..., Any]
LOWERINGS: dict[Any, Lower] = {}
aten = torch.ops.aten


def lowers(*targets: Any) -> Callable[[Lower], Lower]:
    """Register a lowering for one or more FX targets."""

    def register(fn: Lower) -> Lower:
        for t in targets:
            LOWERINGS[t] = fn
        return fn

    return register


@lowers(aten.alias.default, aten.clone.default, aten.detach.default, aten.lift_fresh_copy.default)
def _identity(lo: LoweringContext, node: torch.fx.Node, x: Any, *args: Any, **kwargs: Any) -> Any:
    return lo.value(x)


def _binary(op_type: str) -> Lower:
    def lower(lo: LoweringContext, node: torch.fx.Node, a: Any, b: Any, *, alpha: Any = 1) -> str:
        t = node_elem_type(node)
        x, y = lo.tensor_of(a, t), lo.tensor_of(b, t)
        if alpha != 1:
            y = lo.b.op("Mul", [y, lo.b.const(alpha, t)])
        return str(lo.b.op(op_type, [x, y]))

    return lower


LOWERINGS[aten.add.Tensor] = _binary("Add")
LOWERINGS[aten.add_.Tensor] = _binary("Add")
LOWERINGS[aten.sub.Tensor] = _binary("Sub")
LOWERINGS[aten.mul.Tensor] = _binary("Mul")


@lowers(aten.div.Tensor)
def _div(
    lo: LoweringContext, node: torch.fx.Node, a: Any, b: Any, *, rounding_mode: str | None = None
) -> str:
    t = node_elem_type(node)
    if rounding_mode is not None or t != TensorProto.FLOAT:
        raise EngineError(f"{node.name}: only true division of floats is lowered")
    return str(lo.b.op("Div", [lo.tensor_of(a, t), lo.tensor_of(b, t)]))


def _compare(op_type: str, negate: bool = False) -> Lower:
    def lower(lo: LoweringContext, node: torch.fx.Node, a: Any, b: Any) -> str:
        left = a if isinstance(a, torch.fx.Node) else b
        assert isinstance(left, torch.fx.Node)
        t = node_elem_type(left)
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and node_elem_type(b) != t:
            t = TensorProto.FLOAT
        out = str(lo.b.op(op_type, [lo.tensor_of(a, t), lo.tensor_of(b, t)]))
        return str(lo.b.op("Not", [out])) if negate else out

    return lower


for _target, _spec in {
    aten.eq.Scalar: ("Equal", False),
    aten.eq.Tensor: ("Equal", False),
    aten.ne.Scalar: ("Equal", True),
    aten.ne.Tensor: ("Equal", True),
    aten.ge.Scalar: ("GreaterOrEqual", False),
    aten.gt.Scalar: ("Greater", False),
    aten.le.Scalar: ("LessOrEqual", False),
    aten.lt.Scalar: ("Less", False),
}.items():
    LOWERINGS[_target] = _compare(*_spec)


def _unary(op_type: str) -> Lower:
    def lower(lo: LoweringContext, node: torch.fx.Node, x: Any) -> str:
        return str(lo.b.op(op_type, [lo.tensor_of(x, node_elem_type(node))]))

    return lower


for _target, _op in {
    aten.neg.default: "Neg",
    aten.exp.default: "Exp",
    aten.erf.default: "Erf",
    aten.tanh.default: "Tanh",
    aten.sqrt.default: "Sqrt",
    aten.log.default: "Log",
    aten.reciprocal.default: "Reciprocal",
    aten.relu.default: "Relu",
}.items():
    LOWERINGS[_target] = _unary(_op)


@lowers(aten.rsqrt.default)
def _rsqrt(lo: LoweringContext, node: torch.fx.Node, x: Any) -> str:
    return str(lo.b.op("Reciprocal", [lo.b.op("Sqrt", [lo.tensor_of(x, TensorProto.FLOAT)])]))


@lowers(aten.gelu.default)
def _gelu(lo: LoweringContext, node: torch.fx.Node, x: Any, *, approximate: str = "none") -> str:
    if approximate != "none":
        raise EngineError(f"{node.name}: only the exact (erf) GELU is lowered")
    f = TensorProto.FLOAT
    v = lo.tensor_of(x, f)
    erf = lo.b.op("Erf", [lo.b.op("Mul", [v, lo.b.const(0.7071067811865476, f)])])
    half = lo.b.op("Mul", [lo.b.op("Add", [erf, lo.b.const(1.0, f)]), lo.b.const(0.5, f)])
    return str(lo.b.op("Mul", [v, half]))


@lowers(aten.clamp.default)
def _clamp(lo: LoweringContext, node: torch.fx.Node, x: Any, lo_v: Any = None, hi_v: Any = None) -> str:
    t = node_elem_type(node)
    out = lo.tensor_of(x, t)
    if lo_v is not None:
        out = str(lo.b.op("Max", [out, lo.b.const(lo_v, t)]))
    if hi_v is not None:
        out = str(lo.b.op("Min", [out, lo.b.const(hi_v, t)]))
    return out


@lowers(aten.where.self)
def _where(lo: LoweringContext, node: torch.fx.Node, cond: Any, a: Any, b: Any) -> str:
    t = node_elem_type(node)
    return str(
        lo.b.op("Where", [lo.tensor_of(cond, TensorProto.BOOL), lo.tensor_of(a, t), lo.tensor_of(b, t)])
    )


@lowers(aten._to_copy.default)
def _to_copy(lo: LoweringContext, node: torch.fx.Node, x: Any, **kwargs: Any) -> str:
    return lo.tensor_of(x, node_elem_type(node))


@lowers(aten.copy_.default)
def _copy(lo: LoweringContext, node: torch.fx.Node, dst: Any, src: Any, non_blocking: bool = False) -> str:
    t = node_elem_type(node)
    value = lo.tensor_of(src, t)
    if tuple(dst.meta["val"].shape) == tuple(src.meta["val"].shape):
        return value
    return str(lo.b.op("Expand", [value, lo.b.op("Shape", [lo.value(dst)])]))


@lowers(aten.scalar_tensor.default)
def _scalar_tensor(lo: LoweringContext, node: torch.fx.Node, value: Any, **kwargs: Any) -> str:
    return lo.b.const(value, node_elem_type(node))


@lowers(aten.full.default)
def _full(lo: LoweringContext, node: torch.fx.Node, size: Any, value: Any, **kwargs: Any) -> str:
    t = node_elem_type(node)
    fill = numpy_helper.from_array(np.asarray([value], dtype=NUMPY[t]))
    return str(lo.b.op("ConstantOfShape", [lo.b.shape_vector(lo.sizes(size))], value=fill))


@lowers(aten.full_like.default)
def _full_like(lo: LoweringContext, node: torch.fx.Node, x: Any, value: Any, **kwargs: Any) -> str:
    t = node_elem_type(node)
    fill = numpy_helper.from_array(np.asarray([value], dtype=NUMPY[t]))
    return str(lo.b.op("ConstantOfShape", [lo.b.op("Shape", [lo.value(x)])], value=fill))


@lowers(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(lo: LoweringContext, node: torch.fx.Node, x: Any, size: Any) -> str:
    return str(lo.b.op("Reshape", [lo.value(x), lo.b.shape_vector(lo.sizes(size))]))


@lowers(aten.permute.default)
def _permute(lo: LoweringContext, node: torch.fx.Node, x: Any, dims: Sequence[int]) -> str:
    rank = node_rank(node)
    return str(lo.b.op("Transpose", [lo.value(x)], perm=[d % rank for d in dims]))


@lowers(aten.t.default)
def _t(lo: LoweringContext, node: torch.fx.Node, x: Any) -> str:
    return str(lo.b.op("Transpose", [lo.value(x)], perm=[1, 0]))


@lowers(aten.expand.default)
def _expand(lo: LoweringContext, node: torch.fx.Node, x: Any, size: Any, *, implicit: bool = False) -> str:
    # ONNX Expand broadcasts both ways, so 1 keeps an input dimension as aten's -1 does
    sizes = [1 if s == -1 else s for s in lo.sizes(size)]
    return str(lo.b.op("Expand", [lo.value(x), lo.b.shape_vector(sizes)]))


@lowers(aten.unsqueeze.default)
def _unsqueeze(lo: LoweringContext, node: torch.fx.Node, x: Any, dim: int) -> str:
    rank = node_rank(node)
    return str(lo.b.op("Unsqueeze", [lo.value(x), lo.b.const([dim % rank], TensorProto.INT64)]))


@lowers(aten.squeeze.dims, aten.squeeze.dim)
def _squeeze(lo: LoweringContext, node: torch.fx.Node, x: Any, dims: Any) -> Any:
    shape = x.meta["val"].shape
    dims = [dims] if isinstance(dims, int) else list(dims)
    rank = len(shape)
    keep = [d % rank for d in dims if isinstance(shape[d], int) and shape[d] == 1]
    if not keep:
        return lo.value(x)
    return lo.b.op("Squeeze", [lo.value(x), lo.b.const(keep, TensorProto.INT64)])


@lowers(aten.select.int)
def _select(lo: LoweringContext, node: torch.fx.Node, x: Any, dim: int, index: Any) -> str:
    rank = int(x.meta["val"].dim())
    idx = lo.b.const(lo.size(lo.value(index)), TensorProto.INT64)
    return str(lo.b.op("Gather", [lo.value(x), idx], axis=dim % rank))


def _slice(lo: LoweringContext, x: str, dim: int, start: Size, end: Size, step: int = 1) -> str:
    ends = end if isinstance(end, Dyn) else min(end, INT64_MAX)
    return str(
        lo.b.op(
            "Slice",
            [
                x,
                lo.b.size_1d(start),
                lo.b.size_1d(ends),
                lo.b.const([dim], TensorProto.INT64),
                lo.b.const([step], TensorProto.INT64),
            ],
        )
    )


@lowers(aten.slice.Tensor)
def _slice_tensor(
    lo: LoweringContext,
    node: torch.fx.Node,
    x: Any,
    dim: int = 0,
    start: Any = None,
    end: Any = None,
    step: int = 1,
) -> Any:
    rank = int(x.meta["val"].dim())
    s = 0 if start is None else lo.size(lo.value(start))
    e = INT64_MAX if end is None else lo.size(lo.value(end))
    if s == 0 and e == INT64_MAX and step == 1:
        return lo.value(x)
    return _slice(lo, lo.value(x), dim % rank, s, e, step)


@lowers(aten.slice_scatter.default)
def _slice_scatter(
    lo: LoweringContext,
    node: torch.fx.Node,
    base: Any,
    src: Any,
    dim: int = 0,
    start: Any = None,
    end: Any = None,
    step: int = 1,
) -> str:
    if step != 1:
        raise EngineError(f"{node.name}: slice_scatter with a step is not lowered")
    rank = int(base.meta["val"].dim())
    d = dim % rank
    s = 0 if start is None else lo.size(lo.value(start))
    base_v, src_v = lo.value(base), lo.tensor_of(src, node_elem_type(node))
    e = INT64_MAX if end is None else lo.size(lo.value(end))
    if s == 0 and e == INT64_MAX:
        return src_v
    # base[:start] ++ src ++ base[start + len(src):], along dim
    length = Dyn(lo.b.op("Shape", [src_v], start=d, end=d + 1))
    after = Dyn(lo.b.op("Add", [lo.b.size_1d(s), length.name]))
    parts = [_slice(lo, base_v, d, 0, s), src_v, _slice(lo, base_v, d, after, INT64_MAX)]
    return str(lo.b.op("Concat", parts, axis=d))


@lowers(aten.cat.default)
def _cat(lo: LoweringContext, node: torch.fx.Node, tensors: Sequence[Any], dim: int = 0) -> str:
    t = node_elem_type(node)
    rank = node_rank(node)
    return str(lo.b.op("Concat", [lo.tensor_of(x, t) for x in tensors], axis=dim % rank))


@lowers(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(lo: LoweringContext, node: torch.fx.Node, a: Any, b: Any) -> str:
    return str(lo.b.op("MatMul", [lo.value(a), lo.value(b)]))


@lowers(aten.addmm.default)
def _addmm(
    lo: LoweringContext, node: torch.fx.Node, bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1
) -> str:
    return str(
        lo.b.op("Gemm", [lo.value(a), lo.value(b), lo.value(bias)], alpha=float(alpha), beta=float(beta))
    )


@lowers(aten.embedding.default)
def _embedding(lo: LoweringContext, node: torch.fx.Node, weight: Any, indices: Any, *args: Any) -> str:
    return str(lo.b.op("Gather", [lo.value(weight), lo.tensor_of(indices, TensorProto.INT64)], axis=0))


@lowers(aten.native_layer_norm.default)
def _layer_norm(
    lo: LoweringContext, node: torch.fx.Node, x: Any, shape: Sequence[int], weight: Any, bias: Any, eps: float
) -> list[str]:
    if weight is None or bias is None:
        raise EngineError(f"{node.name}: LayerNorm without weight or bias is not lowered")
    return list(
        lo.b.op(
            "LayerNormalization",
            [lo.value(x), lo.value(weight), lo.value(bias)],
            outputs=3,
            axis=-len(shape),
            epsilon=float(eps),
            stash_type=1,
        )
    )


@lowers(aten._softmax.default)
def _softmax(lo: LoweringContext, node: torch.fx.Node, x: Any, dim: int, half_to_float: bool) -> str:
    return str(lo.b.op("Softmax", [lo.value(x)], axis=dim))


@lowers(aten._log_softmax.default)
def _log_softmax(lo: LoweringContext, node: torch.fx.Node, x: Any, dim: int, half_to_float: bool) -> str:
    return str(lo.b.op("LogSoftmax", [lo.value(x)], axis=dim))


@lowers(aten.sum.dim_IntList)
def _sum(
    lo: LoweringContext,
    node: torch.fx.Node,
    x: Any,
    dims: Any = None,
    keepdim: bool = False,
    *,
    dtype: Any = None,
) -> str:
    t = node_elem_type(node)
    inputs = [lo.tensor_of(x, t)]
    if dims:
        inputs.append(lo.b.const(list(dims), TensorProto.INT64))
    return str(lo.b.op("ReduceSum", inputs, keepdims=int(keepdim)))


@lowers(aten.sum.default)
def _sum_all(lo: LoweringContext, node: torch.fx.Node, x: Any, *, dtype: Any = None) -> str:
    return str(lo.b.op("ReduceSum", [lo.tensor_of(x, node_elem_type(node))], keepdims=0))


@lowers(aten.linalg_vector_norm.default)
def _vector_norm(
    lo: LoweringContext,
    node: torch.fx.Node,
    x: Any,
    ord: float = 2.0,
    dims: Any = None,
    keepdim: bool = False,
    **kw: Any,
) -> str:
    if ord != 2:
        raise EngineError(f"{node.name}: only the 2-norm is lowered")
    rank = int(x.meta["val"].dim())
    axes = [d % rank for d in (dims if dims else range(rank))]
    square = lo.b.op("ReduceSumSquare", [lo.value(x)], axes=axes, keepdims=int(keepdim))
    return str(lo.b.op("Sqrt", [square]))


@lowers(aten.gather.default)
def _gather(lo: LoweringContext, node: torch.fx.Node, x: Any, dim: int, index: Any, **kwargs: Any) -> str:
    return str(lo.b.op("GatherElements", [lo.value(x), lo.value(index)], axis=dim))


@lowers(aten.scatter.value)
def _scatter_value(lo: LoweringContext, node: torch.fx.Node, x: Any, dim: int, index: Any, value: Any) -> str:
    t = node_elem_type(node)
    updates = lo.b.op("Expand", [lo.b.const(value, t), lo.b.op("Shape", [lo.value(index)])])
    return str(lo.b.op("ScatterElements", [lo.value(x), lo.value(index), updates], axis=dim))


@lowers(aten.sym_size.int)
def _sym_size(lo: LoweringContext, node: torch.fx.Node, x: Any, dim: int) -> Dyn:
    return Dyn(lo.b.op("Shape", [lo.value(x)], start=dim, end=dim + 1))


@lowers(operator.getitem)
def _getitem(lo: LoweringContext, node: torch.fx.Node, seq: Any, index: int) -> Any:
    return lo.value(seq)[index]


def _size_arith(op_type: str, fold: Callable[[int, int], int]) -> Lower:
    def lower(lo: LoweringContext, node: torch.fx.Node, a: Any, b: Any) -> Size:
        x, y = lo.size(lo.value(a)), lo.size(lo.value(b))
        if isinstance(x, int) and isinstance(y, int):
            return fold(x, y)
        return Dyn(lo.b.op(op_type, [lo.b.size_1d(x), lo.b.size_1d(y)]))

    return lower


LOWERINGS[operator.add] = _size_arith("Add", operator.add)
LOWERINGS[operator.sub] = _size_arith("Sub", operator.sub)
LOWERINGS[operator.mul] = _size_arith("Mul", operator.mul)
LOWERINGS[operator.floordiv] = _size_arith("Div", operator.floordiv)  # sizes are non-negative
