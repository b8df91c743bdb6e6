"""The training step as one ONNX graph of standard operators, for devices with plain onnxruntime.

onnxruntime-training (whose on-device API builds gradient graphs) ships wheels for x86_64 and
Python <= 3.11 only; plain ``onnxruntime`` runs everywhere (a Raspberry Pi's aarch64 included) but
only does inference. So the gradients are computed here, on the server, once: the torch engine's
classifier (the same :class:`~edge_runtime.engines.torch_engine.TorchEngine` model, with any PEFT
kind attached) is wrapped in a function of (trainable tensors, batch) whose outputs are the mean
cross-entropy, the logits, the pooled features and the gradient of the loss with respect to every
trainable tensor (``torch.autograd.grad``). ``make_fx`` traces that function through autograd
into aten operators, with the core-aten decompositions (so backward kernels such as
``native_layer_norm_backward`` or ``gelu_backward`` become elementwise arithmetic and
reductions), and :mod:`broker_server.onnx_lowering` writes that graph as ONNX opset 17.

The batch and sequence dimensions are traced symbolically (a fake-tensor ShapeEnv without duck
sizing, so no weight dimension can be mistaken for a batch size); everything else is static.
Frozen weights are initializers of the graph; trainable tensors are graph inputs, so the device
feeds its current module each step and takes the AdamW step itself.

The graph runs in eval mode: no dropout. LoRA dropout above 0 is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from broker_server.onnx_lowering import OPSET, Lowering, OnnxGraphBuilder
from edge_runtime.engines.ort_step_engine import GRAD_PREFIX, STEP_INPUTS, STEP_OUTPUTS
from edge_runtime.errors import EngineError

_TRACE_SIZES = (5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47)


class _Step(nn.Module):
    """The classifier's features and logits, as one module for ``functional_call``."""

    def __init__(self, classifier: Any) -> None:
        super().__init__()
        self.inner = classifier

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled unit-norm features and class logits."""
        features = self.inner.features(input_ids, attention_mask)
        return features, self.inner.head(features)


def _trace_sizes(classifier: nn.Module, num_labels: int) -> tuple[int, int]:
    """A batch size and a sequence length equal to no weight dimension, for a clean symbolic trace."""
    taken = {int(d) for t in [*classifier.parameters(), *classifier.buffers()] for d in t.shape}
    taken.add(num_labels)
    free = [s for s in _TRACE_SIZES if s not in taken]
    if len(free) < 2:
        raise EngineError("no free trace sizes: every candidate is a weight dimension")
    return free[0], free[1]


def trace_step(classifier: nn.Module, num_labels: int) -> tuple[torch.fx.GraphModule, list[str], set[Any]]:
    """The training step of ``classifier`` as an aten FX graph; its trainable names; its batch symbols.

    Placeholders: the trainable tensors (in ``named_parameters`` order), ``input_ids``,
    ``attention_mask``, ``labels``. Outputs: loss, logits, features, then one gradient per
    trainable tensor in the same order.
    """
    from torch._decomp import core_aten_decompositions
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    classifier.eval()
    wrapper = _Step(classifier)
    trainable = {n: p for n, p in classifier.named_parameters() if p.requires_grad}
    names = list(trainable)

    def step(
        params: list[torch.Tensor], input_ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> Any:
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in params]
            bound = {f"inner.{n}": leaf for n, leaf in zip(names, leaves, strict=True)}
            features, logits = torch.func.functional_call(wrapper, bound, (input_ids, mask))
            loss = nn.functional.cross_entropy(logits, labels)
            grads = torch.autograd.grad(loss, leaves)
        return (loss.detach(), logits.detach(), features.detach(), *grads)

    batch, seq = _trace_sizes(classifier, num_labels)
    shape_env = ShapeEnv(duck_shape=False)
    mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)

    def dynamic(t: torch.Tensor) -> torch.Tensor:
        context: Any = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * t.dim())
        return mode.from_tensor(t, symbolic_context=context)

    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2 :] = 0
    fake_batch = [
        dynamic(torch.randint(1000, (batch, seq))),
        dynamic(mask),
        dynamic(torch.arange(batch) % num_labels),
    ]
    fake_params = [mode.from_tensor(p.detach(), static_shapes=True) for p in trainable.values()]
    with mode:
        gm = make_fx(
            step,
            decomposition_table=dict(core_aten_decompositions()),
            tracing_mode="fake",
            _allow_non_fake_inputs=True,
        )(fake_params, *fake_batch)
    gm.graph.eliminate_dead_code()  # the pooler BERT computes and nobody reads
    gm.recompile()
    symbols = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val
    return gm, names, set(symbols)


def export_step_graph(
    classifier: nn.Module, num_labels: int, canonical: dict[str, str], path: Path
) -> list[dict[str, Any]]:
    """Write the training step of ``classifier`` to ``path`` as ONNX; the trainable table.

    ``canonical`` maps each trainable torch name to its engine-neutral name, which is the graph
    input's name; its gradient is the output ``grad.<name>``.
    """
    gm, names, symbols = trace_step(classifier, num_labels)
    frozen_names: dict[tuple[int, tuple[int, ...]], str] = {}
    for n, t in [*classifier.named_parameters(), *classifier.named_buffers()]:
        frozen_names.setdefault((t.data_ptr(), tuple(t.shape)), n)
    used: set[str] = set()

    def constant_name(target: str, value: torch.Tensor) -> str:
        name = frozen_names.get((value.data_ptr(), tuple(value.shape)), target)
        if name in used or name in canonical.values():
            name = target
        used.add(name)
        return name

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    onnx_inputs = [canonical[n] for n in names] + list(STEP_INPUTS)
    if len(placeholders) != len(onnx_inputs):
        raise EngineError(f"the traced step has {len(placeholders)} inputs, expected {len(onnx_inputs)}")
    builder = OnnxGraphBuilder()
    lowering = Lowering(
        gm,
        builder,
        {p.name: i for p, i in zip(placeholders, onnx_inputs, strict=True)},
        symbols,
        constant_name,
    )
    outputs = lowering.run()
    out_names = list(STEP_OUTPUTS) + [GRAD_PREFIX + canonical[n] for n in names]
    if len(outputs) != len(out_names):
        raise EngineError(f"the traced step has {len(outputs)} outputs, expected {len(out_names)}")
    for value, name in zip(outputs, out_names, strict=True):
        builder.nodes.append(helper.make_node("Identity", [value], [name]))
    trainable = dict(classifier.named_parameters())
    graph_inputs = [
        helper.make_tensor_value_info(canonical[n], TensorProto.FLOAT, list(trainable[n].shape))
        for n in names
    ] + [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch"]),
    ]
    graph_outputs = [
        helper.make_tensor_value_info("loss", TensorProto.FLOAT, []),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels]),
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", None]),
    ] + [
        helper.make_tensor_value_info(GRAD_PREFIX + canonical[n], TensorProto.FLOAT, list(trainable[n].shape))
        for n in names
    ]
    graph = helper.make_graph(
        builder.nodes, "fedpeft_training_step", graph_inputs, graph_outputs, builder.initializers
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fedpeft", ir_version=8
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return [
        {"name": canonical[n], "grad": GRAD_PREFIX + canonical[n], "shape": list(trainable[n].shape)}
        for n in names
    ]
