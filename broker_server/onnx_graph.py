"""The ONNX side of the lowering: the graph being built, its sizes, element types, and the walk's face.

Sizes are constant or computed in the graph (:class:`Dyn`); :class:`LoweringContext` is what each
operator's lowering (:mod:`broker_server.onnx_operators`) sees of the walk
(:class:`~broker_server.onnx_lowering.Lowering`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.errors import EngineError

OPSET = 17
INT64_MAX = 2**63 - 1

DTYPES: dict[torch.dtype, int] = {
    torch.float32: TensorProto.FLOAT,
    torch.int64: TensorProto.INT64,
    torch.int32: TensorProto.INT32,
    torch.bool: TensorProto.BOOL,
}
NUMPY: dict[int, type] = {
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
        array: np.ndarray = np.asarray(value, dtype=NUMPY[elem_type])
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


def node_elem_type(node: torch.fx.Node) -> int:
    """The ONNX element type of a node's tensor value (refused if it has none the lowering knows)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise EngineError(f"node {node.name} has no tensor value to take its dtype from")
    if val.dtype not in DTYPES:
        raise EngineError(f"node {node.name} has dtype {val.dtype}, which the lowering does not handle")
    return DTYPES[val.dtype]


def node_rank(node: torch.fx.Node) -> int:
    """The number of dimensions of a node's tensor value."""
    val = node.meta["val"]
    return int(val.dim())


class LoweringContext(Protocol):
    """What an operator's lowering uses of the walk (:class:`~broker_server.onnx_lowering.Lowering`)."""

    b: OnnxGraphBuilder

    def value(self, arg: Any) -> Any:
        """The lowered value of an FX argument."""
        ...

    def tensor_of(self, arg: Any, elem_type: int) -> str:
        """``arg`` as an ONNX tensor of ``elem_type``."""
        ...

    def size(self, value: Any) -> Size:
        """A lowered size argument."""
        ...

    def sizes(self, values: Sequence[Any]) -> list[Size]:
        """Lowered size arguments."""
        ...
