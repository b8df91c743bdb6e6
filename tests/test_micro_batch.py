"""Micro-batches: a batch runs in sorted micro-batches whose weighted gradients sum to the batch's.

The torch checks use a tiny random BERT saved with dropout 0, so that a micro-batched pass and the
whole batch compute the same function and their gradients can be compared one to one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.config import DEFAULT_MICRO_BATCH, TrainConfig
from edge_runtime.data import TextDataset
from edge_runtime.engines.base import micro_batches, row_shares
from edge_runtime.engines.numpy_state import micro_batch_step
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, ModelDims, PromptSpec
from tests.tiny_model import make_tiny_bert

MINILM = ModelDims(hidden=384, layers=6, intermediate=1536, vocab=30522, heads=12, total_params=22_713_216)
WORDS = "the of and to in is was for on as with by he at from his an were are which".split()


# --- splitting a batch ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 200), min_size=1, max_size=70),
    size=st.integers(1, 40),
    sort=st.booleans(),
)
def test_micro_batches_partition_the_rows_sorted_by_length(lengths: list[int], size: int, sort: bool) -> None:
    rows = np.random.default_rng(len(lengths)).permutation(1000)[: len(lengths)]
    by_row = dict(zip(rows.tolist(), lengths, strict=True))
    chunks = micro_batches(rows, size, lengths if sort else None)
    flat = np.concatenate(chunks)
    assert sorted(flat.tolist()) == sorted(rows.tolist())  # every row once
    assert all(1 <= len(c) <= size for c in chunks)
    assert all(len(c) == size for c in chunks[:-1])  # only the last one is short
    if sort and len(rows) > size:
        got = [by_row[int(r)] for r in flat]
        assert got == sorted(got)  # each micro-batch pads only to its own longest
    elif not sort:
        assert flat.tolist() == rows.tolist()  # images: the batch's own order
    shares = row_shares(chunks)
    assert sum(shares) == pytest.approx(1.0)
    assert shares == pytest.approx([len(c) / len(rows) for c in chunks])


def test_bad_micro_batches_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least one row"):
        micro_batches(np.arange(4), 0)
    with pytest.raises(ConfigError, match="3 lengths for 4 rows"):
        micro_batches(np.arange(4), 2, [1, 2, 3])


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=30),
    size=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_weighted_micro_batch_gradients_are_the_whole_batch_gradients(
    lengths: list[int], size: int, seed: int
) -> None:
    """A linear model's mean squared loss over padded rows: micro-batches sum to the whole batch."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, 50, size=n).tolist() for n in lengths]
    labels = rng.normal(size=len(ids)).astype(np.float32)
    weight = rng.normal(size=50).astype(np.float32)

    def run(
        input_ids: np.ndarray, mask: np.ndarray, target: np.ndarray
    ) -> tuple[float, np.ndarray, list[np.ndarray]]:
        counts = np.zeros((len(input_ids), 50), dtype=np.float32)
        for r in range(len(input_ids)):
            np.add.at(counts[r], input_ids[r][mask[r] == 1], 1.0)
        err = counts @ weight - target
        logits = np.stack([err, -err], axis=1)
        return float(np.mean(err**2)), logits, [2.0 * counts.T @ err / len(err)]

    rows = rng.permutation(len(ids))
    whole = micro_batch_step(run, ids, labels, rows, micro_rows=len(rows), pad_id=0, names=["w"])
    parts = micro_batch_step(run, ids, labels, rows, micro_rows=size, pad_id=0, names=["w"])
    assert parts[0] == pytest.approx(whole[0], rel=1e-5, abs=1e-6)
    assert parts[1] == whole[1]
    np.testing.assert_allclose(parts[2]["w"], whole[2]["w"], rtol=1e-4, atol=1e-4)


# --- configuration and cost model ---------------------------------------------------------------


def test_the_micro_batch_travels_only_when_it_is_not_the_default() -> None:
    config = TrainConfig(batch_size=32)
    assert config.micro_batch == DEFAULT_MICRO_BATCH == 8
    assert "micro_batch" not in config.to_dict()  # an older runtime still reads the assignment
    assert config.micro_rows() == 8
    for micro, rows in ((0, 32), (4, 4), (64, 32)):
        other = TrainConfig(batch_size=32, micro_batch=micro)
        assert other.to_dict()["micro_batch"] == micro
        assert TrainConfig.from_dict(other.to_dict()) == other
        assert other.micro_rows() == rows
    assert TrainConfig(batch_size=4).micro_rows() == 4
    with pytest.raises(ConfigError, match="micro_batch"):
        TrainConfig(micro_batch=-1)


@pytest.mark.parametrize("spec", [LoraSpec(), AdapterSpec(), PromptSpec()], ids=["lora", "adapter", "prompt"])
def test_the_cost_model_keeps_one_micro_batch_of_activations(spec: object) -> None:
    whole = spec.predict_cost(MINILM, 32, 128, 20, micro_batch=0)  # type: ignore[attr-defined]
    micro = spec.predict_cost(MINILM, 32, 128, 20, micro_batch=8)  # type: ignore[attr-defined]
    eight = spec.predict_cost(MINILM, 8, 128, 20, micro_batch=0)  # type: ignore[attr-defined]
    assert micro.activation_mb == pytest.approx(whole.activation_mb / 4)
    assert micro.activation_mb == pytest.approx(eight.activation_mb)
    assert micro.step_flops == whole.step_flops  # the arithmetic is the whole batch's
    assert spec.predict_cost(MINILM, 32, 128, 20) == micro  # type: ignore[attr-defined]  # the default
    with pytest.raises(ConfigError, match="micro_batch"):
        spec.predict_cost(MINILM, 32, 128, 20, micro_batch=-1)  # type: ignore[attr-defined]


# --- the torch engine ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dropout_free_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_bert(tmp_path_factory.mktemp("micro") / "model")
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path.write_text(json.dumps(config))
    return folder


def _texts(n: int, seed: int = 0) -> TextDataset:
    """``n`` texts of 2 to 30 words, so padding to a batch's longest differs from a micro-batch's."""
    rng = np.random.default_rng(seed)
    texts = tuple(" ".join(rng.choice(WORDS, size=int(rng.integers(2, 30)))) for _ in range(n))
    return TextDataset(texts, np.arange(n) % 3, ("a", "b", "c"))


def _engine(model: Path, **kw: Any) -> Any:
    """A torch engine on the dropout-free tiny BERT: 3 labels, 32 tokens, and ``kw``."""
    from edge_runtime.engines.torch_engine import TorchEngine

    return TorchEngine(TrainConfig(model=str(model), num_labels=3, seq_len=32, **kw), seed=0, threads=1)


def _grads(engine: object) -> dict[str, np.ndarray]:
    return {
        n: p.grad.detach().numpy().copy()  # type: ignore[attr-defined]
        for n, p in engine._params.items()  # type: ignore[attr-defined]
        if p.grad is not None
    }


@pytest.mark.parametrize(
    "peft",
    [LoraSpec(rank=4), AdapterSpec(bottleneck=4), PromptSpec(length=4)],
    ids=["lora", "adapter", "prompt"],
)
def test_torch_micro_batches_give_the_whole_batch_gradients(dropout_free_bert: Path, peft: object) -> None:
    import torch

    data = _texts(11)
    rows = np.random.default_rng(1).permutation(11)
    grads = []
    losses = []
    for micro in (0, 3):
        engine = _engine(dropout_free_bert, batch_size=11, micro_batch=micro, peft=peft)
        inputs = engine._inputs(data)
        labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
        engine.model.train()
        loss, hits = engine._backward(inputs, labels, rows)
        grads.append(_grads(engine))
        losses.append((loss, hits))
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)
    assert losses[1][1] == losses[0][1]
    assert set(grads[0]) == set(grads[1]) and grads[0]
    # LoRA's A and an adapter's down projection start with no gradient (B and up start at zero)
    assert sum(float(np.abs(g).max()) > 0 for g in grads[0].values()) >= len(grads[0]) // 2
    for name, whole in grads[0].items():
        np.testing.assert_allclose(grads[1][name], whole, rtol=1e-4, atol=1e-6, err_msg=name)


def test_torch_training_runs_sorted_micro_batches(
    dropout_free_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    data = _texts(20)
    engine = _engine(dropout_free_bert, batch_size=10, micro_batch=4)
    widths: list[list[int]] = []
    real = engine._batch_loss

    def spy(inputs: object, labels: object, rows: np.ndarray) -> object:
        widths.append([len(inputs[int(i)]) for i in rows])  # type: ignore[index]
        return real(inputs, labels, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "_batch_loss", spy)
    result = engine.train(data, epochs=2, seed=0)
    assert result.steps == 4 and result.samples == 40
    assert [len(w) for w in widths] == [4, 4, 2] * 4  # 3 passes a step of 10 rows
    for step in range(4):
        passes = widths[3 * step : 3 * step + 3]
        flat = [n for w in passes for n in w]
        assert flat == sorted(flat)  # shortest first: each pass pads to its own longest
    assert max(widths[0]) < max(widths[2])  # so the first pass of a step is narrower


def _same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> Iterator[float]:
    for name, value in a.items():
        yield float(np.abs(value - b[name]).max())


def test_torch_training_with_micro_batches_matches_whole_batches(dropout_free_bert: Path) -> None:

    data = _texts(24, seed=2)
    states = []
    for micro in (0, 5):
        engine = _engine(dropout_free_bert, batch_size=12, micro_batch=micro, lr=5e-3, peft=LoraSpec(rank=4))
        start = engine.trainable_state()
        engine.train(data, epochs=2, seed=4)
        states.append(engine.trainable_state())
    assert max(_same_state(states[0], start)) > 1e-3  # training moved the module
    assert max(_same_state(states[1], states[0])) < 1e-5
