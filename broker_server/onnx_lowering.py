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

The walk is here (:class:`Lowering`); the graph builder, sizes and element types are in
:mod:`broker_server.onnx_graph`, and each operator's lowering in :mod:`broker_server.onnx_operators`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from broker_server.onnx_graph import OPSET, Dyn, OnnxGraphBuilder, Size, node_elem_type
from broker_server.onnx_operators import LOWERINGS
from edge_runtime.errors import EngineError

__all__ = ["LOWERINGS", "OPSET", "Dyn", "Lowering", "OnnxGraphBuilder"]


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
            if node_elem_type(arg) != elem_type:
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
