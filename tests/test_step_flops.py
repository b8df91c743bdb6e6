"""The FLOP count of bench/step_speed.py against hand computations on a tiny encoder."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

from edge_runtime.config import TrainConfig
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import LoraSpec, ModelDims
from tests.tiny_model import make_tiny_bert

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """bench/step_speed.py, imported as its own folder's scripts import each other."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("step_speed")
    finally:
        sys.path.remove(str(BENCH))


# d = 4, f = 8, L = 2; batch 1, 2 tokens (T = 2), r = 1, c = 2
TINY = ModelDims(hidden=4, layers=2, intermediate=8, vocab=10, heads=2, total_params=1)
SHAPE = {"batch": 1, "seq_len": 2, "num_labels": 2}
MINILM = ModelDims.from_hf_config(
    {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "intermediate_size": 1536,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "num_attention_heads": 12,
    }
)


def test_lora_on_query_and_value_matches_the_hand_count(bench: ModuleType) -> None:
    flops = bench.step_flops(TINY, **SHAPE, mode="lora", rank=1, targets=("query", "value"))
    linear = 2 * 2 * (4 * 4 * 4 + 2 * 4 * 8)  # 2 T (4 d^2 + 2 d f) = 512
    attention = 2 * (2 * 1 * 2 * 2 * 4)  # Q K^T and P V, 2 b n^2 d each = 64
    lora = 2 * (2 * 2 * 1 * (4 + 4))  # two projections, 2 T r (d + d) = 64
    head, pooling = 2 * 1 * 4 * 2, 2 * 2 * 4  # 16, 16
    assert flops.forward == 2 * (linear + attention + lora) + head + pooling == 1312
    # top layer: every input gradient (512), all four attention matmuls (128), LoRA 2x (128)
    top = linear + 2 * attention + 2 * lora
    # bottom layer: no input gradient for query, key, value (they read the frozen input); the
    # attention output and feed-forward ones 2 T (d^2 + 2 d f) = 320; dP, dV, dQ but no dK (96);
    # per LoRA projection B's weight and input gradients and A's weight gradient, 3 x 2 T r d (48)
    bottom = 2 * 2 * (4 * 4 + 2 * 4 * 8) + 3 * (2 * 1 * 2 * 2 * 4) + 2 * 3 * (2 * 2 * 1 * 4)
    head_back, pooling_back = 2 * 2 * 1 * 4 * 2, 2 * 4  # weights and input 32; T d 8
    assert (top, bottom) == (768, 512)
    assert flops.backward == top + bottom + head_back + pooling_back == 1320
    assert flops.total == 2632
    assert flops.parts["linear_weight_grads"] == 0.0 and flops.parts["embedding_backward"] == 0.0


def test_full_fine_tuning_matches_the_hand_count(bench: ModuleType) -> None:
    flops = bench.step_flops(TINY, **SHAPE, mode="full")
    per_layer = 512 + 64  # six linear layers and attention, no LoRA
    assert flops.forward == 2 * per_layer + 16 + 16 == 1184
    # 2x every layer's forward (input and weight gradients, all four attention matmuls), the
    # embeddings' scatter-add into three tables 3 T d = 24, head 32, pooling 8
    assert flops.backward == 2 * 2 * per_layer + 24 + 32 + 8 == 2368
    assert flops.parts["lora_forward"] == 0.0 and flops.parts["linear_weight_grads"] == 2 * 512


def test_lora_on_the_top_layer_only_matches_the_hand_count(bench: ModuleType) -> None:
    flops = bench.step_flops(TINY, **SHAPE, mode="lora", rank=1, lora_layers=[1])
    assert flops.forward == (512 + 64) + (512 + 64 + 64) + 16 + 16 == 1248
    assert flops.backward == 512 + 32 + 8 == 552  # the top layer costs what the bottom did above


def test_full_costs_more_than_lora_and_fewer_adapted_layers_cost_less_backward(bench: ModuleType) -> None:
    shape = {"batch": 32, "seq_len": 64, "num_labels": 20}
    full = bench.step_flops(MINILM, **shape, mode="full")
    every = bench.step_flops(MINILM, **shape, mode="lora")
    top = bench.step_flops(MINILM, **shape, mode="lora", lora_layers=[5])
    assert full.total > every.total > top.total
    assert full.backward > every.backward > top.backward
    assert top.forward < every.forward  # only the LoRA of five layers less
    assert every.forward - top.forward == pytest.approx(5 * 2 * 2 * 2048 * 8 * (384 + 384))
    # LoRA's backward is about one forward (input gradients), full fine-tuning's about two
    assert every.backward / every.forward == pytest.approx(1.0, abs=0.05)
    assert full.backward / full.forward == pytest.approx(2.0, abs=0.01)


def test_the_count_agrees_with_the_allocators_cost_model(bench: ModuleType) -> None:
    # peft_specs' simpler estimate (1x attention backward, query/key/value input gradients in
    # the bottom layer) differs by about 1% at the configuration
    flops = bench.step_flops(MINILM, batch=32, seq_len=64, num_labels=20, mode="lora")
    predicted = LoraSpec(rank=8).predict_cost(MINILM, 32, 64, 20).step_flops
    assert flops.total == pytest.approx(predicted, rel=0.03)


def test_targets_follow_peft_suffix_matching(bench: ModuleType) -> None:
    assert bench.adapted_sites(["dense"]) == {
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    }
    assert bench.adapted_sites(["output.dense"]) == {"attention.output.dense", "output.dense"}
    assert bench.adapted_sites(["query", "value"]) == {"attention.self.query", "attention.self.value"}
    # LoRA on the top layer's intermediate projection: no gradient reaches any attention, and
    # the only frozen input gradient is that of the top layer's output projection, 2 T f d
    ffn = bench.step_flops(
        TINY, **SHAPE, mode="lora", rank=1, targets=["intermediate.dense"], lora_layers=[1]
    )
    assert ffn.parts["attention_backward"] == 0.0
    assert ffn.parts["linear_input_grads"] == 2 * 2 * 8 * 4
    with pytest.raises(ConfigError, match="matches no linear layer"):
        bench.adapted_sites(["nonexistent"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "prefix"},
        {"mode": "lora", "lora_layers": [2]},
        {"mode": "lora", "lora_layers": []},
        {"mode": "lora", "rank": 0},
    ],
)
def test_bad_arguments_are_refused(bench: ModuleType, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        bench.step_flops(TINY, **SHAPE, **kwargs)


@pytest.mark.parametrize("dims", [TINY, MINILM])
@pytest.mark.parametrize(("b", "n", "r", "c"), [(1, 2, 1, 2), (32, 64, 8, 20), (3, 17, 4, 5)])
def test_the_docstrings_closed_form_is_what_step_flops_counts(
    bench: ModuleType, dims: ModelDims, b: int, n: int, r: int, c: int
) -> None:
    d, f, L, T = dims.hidden, dims.intermediate, dims.layers, b * n
    lora = bench.step_flops(dims, batch=b, seq_len=n, num_labels=c, mode="lora", rank=r)
    full = bench.step_flops(dims, batch=b, seq_len=n, num_labels=c, mode="full")
    linear = 2 * T * (4 * d**2 + 2 * d * f)
    assert lora.forward == L * (linear + 4 * b * n**2 * d + 8 * T * r * d) + 2 * T * d + 2 * b * d * c
    assert lora.backward == (
        (L - 1) * (linear + 8 * b * n**2 * d + 16 * T * r * d)
        + (2 * T * (d**2 + 2 * d * f) + 6 * b * n**2 * d + 12 * T * r * d)
        + T * d
        + 4 * b * d * c
    )
    assert full.forward == L * (linear + 4 * b * n**2 * d) + 2 * T * d + 2 * b * d * c
    assert full.backward == 2 * L * (linear + 4 * b * n**2 * d) + 3 * T * d + T * d + 4 * b * d * c
    assert set(bench.FORMULA) >= {"lora_forward", "lora_backward", "full_forward", "full_backward"}


def test_the_full_fine_tuning_engine_trains_every_weight_but_the_pooler(
    bench: ModuleType, tmp_path: Path
) -> None:
    model = make_tiny_bert(tmp_path / "tiny", hidden=16, layers=1)
    config = TrainConfig(model=str(model), num_labels=3, batch_size=2, seq_len=16)
    engine = bench.full_fine_tuning_engine(config)
    names = set(engine.trainable_state())
    everything = {n for n, _ in engine.model.named_parameters()}
    assert names == {n for n in everything if ".pooler." not in n}
    assert not any("lora" in n for n in everything)  # config.peft is not attached
    assert "encoder.embeddings.word_embeddings.weight" in names and "head.weight" in names
    assert sum(v.size for v in engine.trainable_state().values()) < engine.total_params
