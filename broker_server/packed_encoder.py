"""The unpadded ("packed") forward of a BERT encoder, for the exported ONNX Runtime graphs.

A batch is padded to its longest text, and in the padded layout every linear layer, LayerNorm and
GELU also computes the padding's rows, whose results the attention mask and the mean pooling then
throw away: 12% of the token slots of the Flower comparison's workload (``bench/step_profile.py``). This
forward gathers the real tokens into one ``[1, N, H]`` sequence after the embeddings and runs every
per-token operation on it; only the attention scores need the ``[batch, heads, T, T]`` layout, so
each layer spreads its query, key and value rows back into the padded slots and gathers the
context back. A padding slot gets a copy of a real token's row: as today's padding rows, the
additive mask gives its key a probability of exactly 0 (so its value and its gradients add
nothing), its query's context is never read, and the pooling multiplies it by 0.

Only real tokens' values reach the features, and each real token sees exactly what it sees in the
padded forward (the same keys, the same mask), so the features equal
:meth:`~edge_runtime.engines.torch_engine.TextClassifier.features`' up to float rounding
(``tests/test_packed_encoder.py``). Both index maps come from the attention mask inside the graph
(NonZero, CumSum), so the exported graphs keep their inputs; both directions are row gathers,
rewritten after the export as GatherND (:func:`gathers_as_gather_nd`), whose gradient ONNX
Runtime computes far faster than a Gather's.

It applies to BERT encoders (MiniLM) with absolute positions, mean pooling and no soft prompt;
LoRA and bottleneck adapters ride along, as they live inside (or hook onto) the projections it
calls. Anything else exports the padded forward as before.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def packable(classifier: Any) -> bool:
    """Whether :func:`packed_features` computes ``classifier.features`` for this model."""
    encoder = getattr(classifier, "encoder", None)
    config = getattr(encoder, "config", None)
    prompt = getattr(classifier, "prompt", None)
    return (
        getattr(config, "model_type", None) == "bert"
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and not getattr(config, "is_decoder", False)
        and getattr(classifier, "pooling", None) == "mean"
        and (prompt is None or not prompt.active)
        and hasattr(encoder, "embeddings")
        and hasattr(getattr(encoder, "encoder", None), "layer")
    )


def packed_features(classifier: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Unit-norm mean-pooled features of a BERT classifier, computed on the real tokens only."""
    encoder = classifier.encoder
    batch, length = input_ids.shape
    hidden = encoder.embeddings(input_ids=input_ids)  # [B, T, H]: cheap, and positions need T
    width = hidden.shape[-1]
    flat_mask = attention_mask.reshape(-1)
    real = torch.nonzero(flat_mask).reshape(-1)  # slot of each real token, in order
    # the packed row each slot reads: a real token's own; a padding slot's is the real token
    # before it, whose copy the mask then hides (no constant rows: ORT's gradient builder names a
    # shared constant's gradient once per use, and refuses the graph)
    slot = (torch.cumsum(flat_mask, 0) - 1).clamp_min(0)
    x = hidden.reshape(-1, width).index_select(0, real).unsqueeze(0)  # [1, N, H]
    dtype = x.dtype
    additive = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    for layer in encoder.encoder.layer:
        x = _layer(layer, x, real, slot, additive, batch, length)
    padded = x.reshape(-1, width).index_select(0, slot).view(batch, length, width)
    mask = attention_mask.unsqueeze(-1).to(dtype)
    pooled = (padded * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return nn.functional.normalize(pooled, dim=-1)


def _layer(
    layer: Any,
    x: torch.Tensor,
    real: torch.Tensor,
    slot: torch.Tensor,
    additive: torch.Tensor,
    batch: int,
    length: int,
) -> torch.Tensor:
    """One BertLayer (eager attention, eval mode) on packed tokens ``x`` of shape [1, N, H]."""
    attention = layer.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size
    width = heads * size
    # (reshapes, not [0]: that exports as a Gather whose gradient is ORT's slow GatherGrad)
    # one Gather each, not one for the three concatenated: where the key needs no gradient (the
    # lowest layer's, below every trainable tensor) the gradient builder then computes none
    query, key, value = (
        projection(x)
        .reshape(-1, width)
        .index_select(0, slot)
        .view(batch, length, heads, size)
        .transpose(1, 2)
        for projection in (attention.query, attention.key, attention.value)
    )
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(size) + additive
    probs = nn.functional.softmax(scores, dim=-1)
    context = torch.matmul(probs, value).permute(0, 2, 1, 3).reshape(-1, width)
    context = context.index_select(0, real).unsqueeze(0)  # [1, N, H]
    after_attention = layer.attention.output(context, x)
    return layer.output(layer.intermediate(after_attention), after_attention)


_INDEX_SOURCES = {"NonZero", "CumSum"}
_INDEX_PASSING = {"Transpose", "Reshape", "Sub", "Clip", "Max", "Squeeze", "Cast", "Add", "Flatten"}


def gathers_as_gather_nd(model: Any) -> int:
    """Rewrite the packed forward's row Gathers (indices from NonZero or CumSum) as GatherND.

    Both compute the same rows; the difference is the backward. In a trial profile of two MiniLM
    devices' rounds (``bench/step_profile.py --devices 2``, not kept) ONNX Runtime's CPU
    ``GatherGrad`` took 13 of 54 s, 4 ms a call, more than the padding saved; ``GatherNDGrad``,
    which adds whole rows, took 6.3 of 201 s for all eight (``bench/results/step_profile-packed``).
    Returns how many were rewritten.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    derived: set[str] = set()
    for node in graph.node:  # the exporter writes nodes in topological order
        if node.op_type in _INDEX_SOURCES or (
            node.op_type in _INDEX_PASSING and any(i in derived for i in node.input)
        ):
            derived.update(node.output)
    nodes = []
    rewritten = 0
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type == "Gather" and axis == 0 and node.input[1] in derived:
            column = f"{node.name or node.output[0]}/rows_as_column"
            axes = f"{column}/axes"
            nodes.append(
                helper.make_node(
                    "Constant", [], [axes], value=helper.make_tensor(axes, TensorProto.INT64, [1], [1])
                )
            )
            nodes.append(helper.make_node("Unsqueeze", [node.input[1], axes], [column]))
            nodes.append(
                helper.make_node("GatherND", [node.input[0], column], list(node.output), name=node.name)
            )
            rewritten += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def _row_kinds(graph: Any) -> dict[str, str]:
    """The packed forward's GatherND index columns (``.../rows_as_column``), each ``real`` (rows
    from NonZero: packed <- padded) or ``slot`` (rows from CumSum: padded <- packed)."""
    producers = {out: node for node in graph.node for out in node.output}
    kinds: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "GatherND" or not node.input[1].endswith("/rows_as_column"):
            continue
        seen, todo, kind = set(), [node.input[1]], None
        while todo and kind is None:
            name = todo.pop()
            producer = producers.get(name)
            if producer is None or name in seen:
                continue
            seen.add(name)
            if producer.op_type == "NonZero":
                kind = "real"
            elif producer.op_type == "CumSum":
                kind = "slot"
            else:
                todo.extend(producer.input)
        if kind is not None:
            kinds[node.input[1]] = kind
    return kinds


def row_gradients_as_gathers(model: Any, mask_input: str = "attention_mask") -> int:
    """Rewrite the training graph's ``GatherNDGrad`` nodes of the packed row gathers as gathers.

    ``GatherNDGrad`` scatter-adds rows into zeros, far slower on ONNX Runtime's CPU than a
    ``GatherND`` of the same rows (``bench/row_gradients.py`` times a device's round with and
    without this). Both of the packed forward's maps are gathers whose gradient is itself a
    gather, exactly:

    - ``slot`` (padded <- packed: a padding slot copies the real row before it): every padding
      slot's gradient is exactly 0 (its key has probability exactly 0, so its key and value rows
      get none; its query's context is never read; the pooling multiplies it by 0), so the
      scatter-add of a real row is its own slot's row plus zeros: ``GatherND(dY, real)``.
    - ``real`` (packed <- padded): each real slot takes its packed row, a padding slot 0:
      ``GatherND(dY, slot) * mask``.

    Returns how many were rewritten (none where the graph has no packed gathers).
    """
    from onnx import TensorProto, helper

    graph = model.graph
    kinds = _row_kinds(graph)
    columns = {kind: next((c for c, k in kinds.items() if k == kind), None) for kind in ("real", "slot")}
    if columns["real"] is None or columns["slot"] is None:
        return 0
    mask_column = f"/{mask_input}/as_row_weights"
    prelude = [
        helper.make_node("Cast", [mask_input], [f"{mask_column}/float"], to=TensorProto.FLOAT),
        helper.make_node(
            "Constant",
            [],
            [f"{mask_column}/shape"],
            value=helper.make_tensor(f"{mask_column}/shape", TensorProto.INT64, [2], [-1, 1]),
        ),
        helper.make_node("Reshape", [f"{mask_column}/float", f"{mask_column}/shape"], [mask_column]),
    ]
    nodes = []
    rewritten = 0
    for node in graph.node:
        kind = kinds.get(node.input[1]) if node.op_type == "GatherNDGrad" and len(node.input) == 3 else None
        if kind == "slot":
            nodes.append(
                helper.make_node(
                    "GatherND", [node.input[2], columns["real"]], list(node.output), name=node.name
                )
            )
        elif kind == "real":
            gathered = f"{node.name or node.output[0]}/gathered"
            nodes.append(helper.make_node("GatherND", [node.input[2], columns["slot"]], [gathered]))
            nodes.append(helper.make_node("Mul", [gathered, mask_column], list(node.output), name=node.name))
        else:
            nodes.append(node)
            continue
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(prelude + nodes)
    return rewritten
