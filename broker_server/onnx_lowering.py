"""Lowering of an aten-level FX graph (forward and backward) to standard ONNX operators.

torch's TorchScript exporter has no symbolic functions for the aten operators that
``make_fx`` records when it traces through autograd (``_to_copy``, ``scatter.value`` with a
scalar, ``slice_scatter``, ``sym_size``...), and its dynamo exporter needs ``onnxscript``. The
graphs here are small in kind (a BERT-family encoder, a PEFT module, a linear head, the
cross-entropy, and the core-aten decompositions of their backward), so they are lowered here,
operator by operator, into ONNX opset 17 that every onnxruntime since 1.14 runs, the plain
inference-only package included (``LayerNormalization`` is the only operator newer than opset 13).

Sizes: dimensions that depend on the batch (symbolic in the traced graph) are computed in the
graph with ``Shape``; every other size is a constant. An operator outside :data:`LOWERINGS`
raises :class:`~edge_runtime.errors.EngineError` naming it: the exporter never guesses.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.errors import EngineError

OPSET = 17
_INT64_MAX = 2**63 - 1

_DTYPES: dict[torch.dtype, int] = {
    torch.float32: TensorProto.FLOAT,
    torch.int64: TensorProto.INT64,
    torch.int32: TensorProto.INT32,
    torch.bool: TensorProto.BOOL,
}
_NUMPY: dict[int, type] = {
    TensorProto.FLOAT: np.float32,
    TensorProto.INT64: np.int64,
    TensorProto.INT32: np.int32,
    TensorProto.BOOL: np.bool_,
}


@dataclass(frozen=True)
class Dyn:
    """A size known only when the graph runs: the name of a 1-element int64 tensor."""

    name: str


Size = int | Dyn


@dataclass
class OnnxGraphBuilder:
    """Nodes, initializers and unique names of the graph being built."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _count: int = 0
    _consts: dict[tuple[Any, ...], str] = field(default_factory=dict)

    def fresh(self, hint: str) -> str:
        """A new unique value name."""
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[str], *, outputs: int = 1, **attrs: Any) -> Any:
        """Add one node; its output name (or list of names when ``outputs`` > 1)."""
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value: Any, elem_type: int) -> str:
        """An initializer holding ``value`` (shared between equal small constants)."""
        array: np.ndarray = np.asarray(value, dtype=_NUMPY[elem_type])
        key = (elem_type, array.shape, array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        if key is not None:
            self._consts[key] = name
        return name

    def tensor(self, name: str, array: np.ndarray) -> str:
        """An initializer with a chosen name (a frozen weight)."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def size_1d(self, size: Size) -> str:
        """A size as a 1-element int64 tensor."""
        return size.name if isinstance(size, Dyn) else self.const([size], TensorProto.INT64)

    def shape_vector(self, sizes: Sequence[Size]) -> str:
        """A list of sizes as one int64 vector (constant if every size is)."""
        if all(isinstance(s, int) for s in sizes):
            return self.const(list(sizes), TensorProto.INT64)
        return str(self.op("Concat", [self.size_1d(s) for s in sizes], axis=0))


def _elem_type(node: torch.fx.Node) -> int:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise EngineError(f"node {node.name} has no tensor value to take its dtype from")
    if val.dtype not in _DTYPES:
        raise EngineError(f"node {node.name} has dtype {val.dtype}, which the lowering does not handle")
    return _DTYPES[val.dtype]


def _rank(node: torch.fx.Node) -> int:
    val = node.meta["val"]
    return int(val.dim())


class Lowering:
    """Walks an FX graph in order and emits ONNX nodes for each of its nodes."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        builder: OnnxGraphBuilder,
        inputs: dict[str, str],
        dynamic_symbols: set[Any],
        constant_names: Callable[[str, torch.Tensor], str],
    ) -> None:
        self.gm = gm
        self.b = builder
        self.env: dict[torch.fx.Node, Any] = {}
        self.inputs = inputs  # placeholder name -> ONNX input name
        self.dynamic = dynamic_symbols
        self.constant_names = constant_names
        self._attrs: dict[str, str] = {}

    # values ---------------------------------------------------------------------------------
    def value(self, arg: Any) -> Any:
        """The lowered value of an FX argument (nodes looked up, lists mapped, scalars kept)."""
        if isinstance(arg, torch.fx.Node):
            return self.env[arg]
        if isinstance(arg, (list, tuple)):
            return [self.value(a) for a in arg]
        return arg

    def tensor_of(self, arg: Any, elem_type: int) -> str:
        """``arg`` as an ONNX tensor of ``elem_type``: scalars become constants, others are cast."""
        if isinstance(arg, torch.fx.Node):
            name = self.env[arg]
            if isinstance(name, (Dyn, int)):
                raise EngineError(f"{arg.name} is a size, not a tensor")
            if _elem_type(arg) != elem_type:
                return str(self.b.op("Cast", [name], to=elem_type))
            return str(name)
        if isinstance(arg, (bool, int, float)):
            return self.b.const(arg, elem_type)
        raise EngineError(f"cannot use {arg!r} as a tensor")

    def size(self, value: Any) -> Size:
        """A lowered size argument: a python int or a :class:`Dyn`."""
        if isinstance(value, (int, Dyn)):
            return value
        raise EngineError(f"expected a size, got {value!r}")

    def sizes(self, values: Sequence[Any]) -> list[Size]:
        """Lowered size arguments."""
        return [self.size(self.value(v)) for v in values]

    def static_int(self, node: torch.fx.Node) -> int | None:
        """The value of a SymInt node whose symbols are all fixed (None if it depends on a batch)."""
        val = node.meta.get("val")
        if isinstance(val, int):
            return val
        if isinstance(val, torch.SymInt):
            expr = val.node.expr
            if not (expr.free_symbols & self.dynamic):
                return int(val.node.hint)
        return None

    # the walk -------------------------------------------------------------------------------
    def run(self) -> list[Any]:
        """Lower every node; returns the lowered outputs of the graph."""
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if node.name not in self.inputs:
                    raise EngineError(f"placeholder {node.name} is not a graph input")
                self.env[node] = self.inputs[node.name]
            elif node.op == "get_attr":
                self.env[node] = self._attr(node.target)
            elif node.op == "call_function":
                fixed = self.static_int(node) if not isinstance(node.meta.get("val"), torch.Tensor) else None
                if fixed is not None and node.target is not operator.getitem:
                    self.env[node] = fixed
                    continue
                self._check_in_place(node)
                lower = LOWERINGS.get(node.target)
                if lower is None:
                    raise EngineError(f"no ONNX lowering for operator {node.target} (node {node.name})")
                self.env[node] = lower(self, node, *node.args, **node.kwargs)
            elif node.op == "output":
                return list(self.value(node.args[0]))
            else:
                raise EngineError(f"unexpected FX node kind {node.op} ({node.name})")
        raise EngineError("the FX graph has no output")

    def _attr(self, target: str) -> str:
        if target not in self._attrs:
            value = getattr(self.gm, target)
            array = value.detach().cpu().numpy()
            if array.dtype == np.float64:
                array = array.astype(np.float32)
            self._attrs[target] = self.b.tensor(self.constant_names(target, value), array)
        return self._attrs[target]

    def _check_in_place(self, node: torch.fx.Node) -> None:
        """An in-place operator is lowered as out-of-place: refuse it if its target is read later."""
        target_op = node.target
        if not isinstance(target_op, torch._ops.OpOverload) or not target_op.__name__.split(".")[0].endswith(
            "_"
        ):
            return
        target = node.args[0]
        if not isinstance(target, torch.fx.Node):
            return
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        later = [u for u in target.users if u is not node and order[u] > order[node]]
        if later:
            raise EngineError(f"{node.name} writes {target.name} in place and {later[0].name} reads it after")


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
def _identity(lo: Lowering, node: torch.fx.Node, x: Any, *args: Any, **kwargs: Any) -> Any:
    return lo.value(x)


def _binary(op_type: str) -> Lower:
    def lower(lo: Lowering, node: torch.fx.Node, a: Any, b: Any, *, alpha: Any = 1) -> str:
        t = _elem_type(node)
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
def _div(lo: Lowering, node: torch.fx.Node, a: Any, b: Any, *, rounding_mode: str | None = None) -> str:
    t = _elem_type(node)
    if rounding_mode is not None or t != TensorProto.FLOAT:
        raise EngineError(f"{node.name}: only true division of floats is lowered")
    return str(lo.b.op("Div", [lo.tensor_of(a, t), lo.tensor_of(b, t)]))


def _compare(op_type: str, negate: bool = False) -> Lower:
    def lower(lo: Lowering, node: torch.fx.Node, a: Any, b: Any) -> str:
        left = a if isinstance(a, torch.fx.Node) else b
        assert isinstance(left, torch.fx.Node)
        t = _elem_type(left)
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and _elem_type(b) != t:
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
    def lower(lo: Lowering, node: torch.fx.Node, x: Any) -> str:
        return str(lo.b.op(op_type, [lo.tensor_of(x, _elem_type(node))]))

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
def _rsqrt(lo: Lowering, node: torch.fx.Node, x: Any) -> str:
    return str(lo.b.op("Reciprocal", [lo.b.op("Sqrt", [lo.tensor_of(x, TensorProto.FLOAT)])]))


@lowers(aten.gelu.default)
def _gelu(lo: Lowering, node: torch.fx.Node, x: Any, *, approximate: str = "none") -> str:
    if approximate != "none":
        raise EngineError(f"{node.name}: only the exact (erf) GELU is lowered")
    f = TensorProto.FLOAT
    v = lo.tensor_of(x, f)
    erf = lo.b.op("Erf", [lo.b.op("Mul", [v, lo.b.const(0.7071067811865476, f)])])
    half = lo.b.op("Mul", [lo.b.op("Add", [erf, lo.b.const(1.0, f)]), lo.b.const(0.5, f)])
    return str(lo.b.op("Mul", [v, half]))


@lowers(aten.clamp.default)
def _clamp(lo: Lowering, node: torch.fx.Node, x: Any, lo_v: Any = None, hi_v: Any = None) -> str:
    t = _elem_type(node)
    out = lo.tensor_of(x, t)
    if lo_v is not None:
        out = str(lo.b.op("Max", [out, lo.b.const(lo_v, t)]))
    if hi_v is not None:
        out = str(lo.b.op("Min", [out, lo.b.const(hi_v, t)]))
    return out


@lowers(aten.where.self)
def _where(lo: Lowering, node: torch.fx.Node, cond: Any, a: Any, b: Any) -> str:
    t = _elem_type(node)
    return str(
        lo.b.op("Where", [lo.tensor_of(cond, TensorProto.BOOL), lo.tensor_of(a, t), lo.tensor_of(b, t)])
    )


@lowers(aten._to_copy.default)
def _to_copy(lo: Lowering, node: torch.fx.Node, x: Any, **kwargs: Any) -> str:
    return lo.tensor_of(x, _elem_type(node))


@lowers(aten.copy_.default)
def _copy(lo: Lowering, node: torch.fx.Node, dst: Any, src: Any, non_blocking: bool = False) -> str:
    t = _elem_type(node)
    value = lo.tensor_of(src, t)
    if tuple(dst.meta["val"].shape) == tuple(src.meta["val"].shape):
        return value
    return str(lo.b.op("Expand", [value, lo.b.op("Shape", [lo.value(dst)])]))


@lowers(aten.scalar_tensor.default)
def _scalar_tensor(lo: Lowering, node: torch.fx.Node, value: Any, **kwargs: Any) -> str:
    return lo.b.const(value, _elem_type(node))


@lowers(aten.full.default)
def _full(lo: Lowering, node: torch.fx.Node, size: Any, value: Any, **kwargs: Any) -> str:
    t = _elem_type(node)
    fill = numpy_helper.from_array(np.asarray([value], dtype=_NUMPY[t]))
    return str(lo.b.op("ConstantOfShape", [lo.b.shape_vector(lo.sizes(size))], value=fill))


@lowers(aten.full_like.default)
def _full_like(lo: Lowering, node: torch.fx.Node, x: Any, value: Any, **kwargs: Any) -> str:
    t = _elem_type(node)
    fill = numpy_helper.from_array(np.asarray([value], dtype=_NUMPY[t]))
    return str(lo.b.op("ConstantOfShape", [lo.b.op("Shape", [lo.value(x)])], value=fill))


@lowers(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(lo: Lowering, node: torch.fx.Node, x: Any, size: Any) -> str:
    return str(lo.b.op("Reshape", [lo.value(x), lo.b.shape_vector(lo.sizes(size))]))


@lowers(aten.permute.default)
def _permute(lo: Lowering, node: torch.fx.Node, x: Any, dims: Sequence[int]) -> str:
    rank = _rank(node)
    return str(lo.b.op("Transpose", [lo.value(x)], perm=[d % rank for d in dims]))


@lowers(aten.t.default)
def _t(lo: Lowering, node: torch.fx.Node, x: Any) -> str:
    return str(lo.b.op("Transpose", [lo.value(x)], perm=[1, 0]))


@lowers(aten.expand.default)
def _expand(lo: Lowering, node: torch.fx.Node, x: Any, size: Any, *, implicit: bool = False) -> str:
    # ONNX Expand broadcasts both ways, so 1 keeps an input dimension as aten's -1 does
    sizes = [1 if s == -1 else s for s in lo.sizes(size)]
    return str(lo.b.op("Expand", [lo.value(x), lo.b.shape_vector(sizes)]))


@lowers(aten.unsqueeze.default)
def _unsqueeze(lo: Lowering, node: torch.fx.Node, x: Any, dim: int) -> str:
    rank = _rank(node)
    return str(lo.b.op("Unsqueeze", [lo.value(x), lo.b.const([dim % rank], TensorProto.INT64)]))


@lowers(aten.squeeze.dims, aten.squeeze.dim)
def _squeeze(lo: Lowering, node: torch.fx.Node, x: Any, dims: Any) -> Any:
    shape = x.meta["val"].shape
    dims = [dims] if isinstance(dims, int) else list(dims)
    rank = len(shape)
    keep = [d % rank for d in dims if isinstance(shape[d], int) and shape[d] == 1]
    if not keep:
        return lo.value(x)
    return lo.b.op("Squeeze", [lo.value(x), lo.b.const(keep, TensorProto.INT64)])


@lowers(aten.select.int)
def _select(lo: Lowering, node: torch.fx.Node, x: Any, dim: int, index: Any) -> str:
    rank = int(x.meta["val"].dim())
    idx = lo.b.const(lo.size(lo.value(index)), TensorProto.INT64)
    return str(lo.b.op("Gather", [lo.value(x), idx], axis=dim % rank))


def _slice(lo: Lowering, x: str, dim: int, start: Size, end: Size, step: int = 1) -> str:
    ends = end if isinstance(end, Dyn) else min(end, _INT64_MAX)
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
    lo: Lowering, node: torch.fx.Node, x: Any, dim: int = 0, start: Any = None, end: Any = None, step: int = 1
) -> Any:
    rank = int(x.meta["val"].dim())
    s = 0 if start is None else lo.size(lo.value(start))
    e = _INT64_MAX if end is None else lo.size(lo.value(end))
    if s == 0 and e == _INT64_MAX and step == 1:
        return lo.value(x)
    return _slice(lo, lo.value(x), dim % rank, s, e, step)


@lowers(aten.slice_scatter.default)
def _slice_scatter(
    lo: Lowering,
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
    base_v, src_v = lo.value(base), lo.tensor_of(src, _elem_type(node))
    e = _INT64_MAX if end is None else lo.size(lo.value(end))
    if s == 0 and e == _INT64_MAX:
        return src_v
    # base[:start] ++ src ++ base[start + len(src):], along dim
    length = Dyn(lo.b.op("Shape", [src_v], start=d, end=d + 1))
    after = Dyn(lo.b.op("Add", [lo.b.size_1d(s), length.name]))
    parts = [_slice(lo, base_v, d, 0, s), src_v, _slice(lo, base_v, d, after, _INT64_MAX)]
    return str(lo.b.op("Concat", parts, axis=d))


@lowers(aten.cat.default)
def _cat(lo: Lowering, node: torch.fx.Node, tensors: Sequence[Any], dim: int = 0) -> str:
    t = _elem_type(node)
    rank = _rank(node)
    return str(lo.b.op("Concat", [lo.tensor_of(x, t) for x in tensors], axis=dim % rank))


@lowers(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(lo: Lowering, node: torch.fx.Node, a: Any, b: Any) -> str:
    return str(lo.b.op("MatMul", [lo.value(a), lo.value(b)]))


@lowers(aten.addmm.default)
def _addmm(
    lo: Lowering, node: torch.fx.Node, bias: Any, a: Any, b: Any, *, beta: Any = 1, alpha: Any = 1
) -> str:
    return str(
        lo.b.op("Gemm", [lo.value(a), lo.value(b), lo.value(bias)], alpha=float(alpha), beta=float(beta))
    )


@lowers(aten.embedding.default)
def _embedding(lo: Lowering, node: torch.fx.Node, weight: Any, indices: Any, *args: Any) -> str:
    return str(lo.b.op("Gather", [lo.value(weight), lo.tensor_of(indices, TensorProto.INT64)], axis=0))


@lowers(aten.native_layer_norm.default)
def _layer_norm(
    lo: Lowering, node: torch.fx.Node, x: Any, shape: Sequence[int], weight: Any, bias: Any, eps: float
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
def _softmax(lo: Lowering, node: torch.fx.Node, x: Any, dim: int, half_to_float: bool) -> str:
    return str(lo.b.op("Softmax", [lo.value(x)], axis=dim))


@lowers(aten._log_softmax.default)
def _log_softmax(lo: Lowering, node: torch.fx.Node, x: Any, dim: int, half_to_float: bool) -> str:
    return str(lo.b.op("LogSoftmax", [lo.value(x)], axis=dim))


@lowers(aten.sum.dim_IntList)
def _sum(
    lo: Lowering, node: torch.fx.Node, x: Any, dims: Any = None, keepdim: bool = False, *, dtype: Any = None
) -> str:
    t = _elem_type(node)
    inputs = [lo.tensor_of(x, t)]
    if dims:
        inputs.append(lo.b.const(list(dims), TensorProto.INT64))
    return str(lo.b.op("ReduceSum", inputs, keepdims=int(keepdim)))


@lowers(aten.sum.default)
def _sum_all(lo: Lowering, node: torch.fx.Node, x: Any, *, dtype: Any = None) -> str:
    return str(lo.b.op("ReduceSum", [lo.tensor_of(x, _elem_type(node))], keepdims=0))


@lowers(aten.linalg_vector_norm.default)
def _vector_norm(
    lo: Lowering,
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
def _gather(lo: Lowering, node: torch.fx.Node, x: Any, dim: int, index: Any, **kwargs: Any) -> str:
    return str(lo.b.op("GatherElements", [lo.value(x), lo.value(index)], axis=dim))


@lowers(aten.scatter.value)
def _scatter_value(lo: Lowering, node: torch.fx.Node, x: Any, dim: int, index: Any, value: Any) -> str:
    t = _elem_type(node)
    updates = lo.b.op("Expand", [lo.b.const(value, t), lo.b.op("Shape", [lo.value(index)])])
    return str(lo.b.op("ScatterElements", [lo.value(x), lo.value(index), updates], axis=dim))


@lowers(aten.sym_size.int)
def _sym_size(lo: Lowering, node: torch.fx.Node, x: Any, dim: int) -> Dyn:
    return Dyn(lo.b.op("Shape", [lo.value(x)], start=dim, end=dim + 1))


@lowers(operator.getitem)
def _getitem(lo: Lowering, node: torch.fx.Node, seq: Any, index: int) -> Any:
    return lo.value(seq)[index]


def _size_arith(op_type: str, fold: Callable[[int, int], int]) -> Lower:
    def lower(lo: Lowering, node: torch.fx.Node, a: Any, b: Any) -> Size:
        x, y = lo.size(lo.value(a)), lo.size(lo.value(b))
        if isinstance(x, int) and isinstance(y, int):
            return fold(x, y)
        return Dyn(lo.b.op(op_type, [lo.b.size_1d(x), lo.b.size_1d(y)]))

    return lower


LOWERINGS[operator.add] = _size_arith("Add", operator.add)
LOWERINGS[operator.sub] = _size_arith("Sub", operator.sub)
LOWERINGS[operator.mul] = _size_arith("Mul", operator.mul)
LOWERINGS[operator.floordiv] = _size_arith("Div", operator.floordiv)  # sizes are non-negative
