"""The torch engine on a tiny random BERT: state by name, training, evaluation, statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ShapeMismatch
from edge_runtime.peft_specs import LoraSpec
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_bert(root / "model"), write_text_folder(root / "data")


def _engine(model: Path, **kw: object) -> TorchEngine:
    cfg = TrainConfig(model=str(model), num_labels=3, seq_len=16, batch_size=8, lr=5e-3, head_lr=5e-2, **kw)
    return TorchEngine(cfg, seed=0, threads=1)


def test_trainable_state_names_are_engine_neutral(tiny: tuple[Path, Path]) -> None:
    engine = _engine(tiny[0], peft=LoraSpec(rank=4, target_modules=("query", "value")))
    state = engine.trainable_state()
    lora = [k for k in state if "lora_" in k]
    assert len(lora) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)
    assert all(k.endswith((".lora_A", ".lora_B")) and ".default" not in k for k in lora)
    assert state["encoder.encoder.layer.0.attention.self.query.lora_A"].shape == (4, 32)
    assert state["head.weight"].shape == (3, 32)


def test_state_round_trip_and_shape_checks(tiny: tuple[Path, Path]) -> None:
    engine = _engine(tiny[0])
    state = {k: v + 1.0 for k, v in engine.trainable_state().items()}
    engine.load_trainable_state(state)
    for k, v in engine.trainable_state().items():
        np.testing.assert_array_equal(v, state[k])
    bad = dict(state)
    bad["head.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ShapeMismatch, match=r"head\.bias"):
        engine.load_trainable_state(bad)
    with pytest.raises(ShapeMismatch, match="missing"):
        engine.load_trainable_state({"head.bias": state["head.bias"]})


def test_training_lowers_the_loss_and_moves_only_trainable_params(tiny: tuple[Path, Path]) -> None:
    train, test = load_folder(tiny[1])
    engine = _engine(tiny[0])
    frozen = engine.model.encoder.embeddings.word_embeddings.weight.detach().clone()
    before = engine.evaluate(train).loss
    result = engine.train(train, epochs=4, seed=0)
    after = engine.evaluate(train).loss
    assert result.steps == 4 * int(np.ceil(len(train) / 8))
    assert after < before
    assert np.array_equal(
        frozen.numpy(), engine.model.encoder.embeddings.word_embeddings.weight.detach().numpy()
    )
    ev = engine.evaluate(test)
    assert 0.0 <= ev.accuracy <= 1.0 and ev.predictions.shape == (len(test),)


def test_proximal_term_keeps_the_module_closer_to_its_start(tiny: tuple[Path, Path]) -> None:
    train, _ = load_folder(tiny[1])
    distances = []
    for mu in (0.0, 10.0):
        engine = _engine(tiny[0], prox_mu=mu)
        start = engine.trainable_state()
        engine.train(train, epochs=2, seed=1)
        end = engine.trainable_state()
        distances.append(sum(float(np.sum((end[k] - start[k]) ** 2)) for k in start))
    assert distances[1] < distances[0]


def test_class_feature_sums_count_every_sample(tiny: tuple[Path, Path]) -> None:
    train, _ = load_folder(tiny[1])
    sums, counts = _engine(tiny[0]).class_feature_sums(train)
    assert sums.shape == (3, 32)
    np.testing.assert_array_equal(counts, train.label_histogram())
    # features are unit vectors, so each class sum's norm is at most its count
    assert np.all(np.linalg.norm(sums, axis=1) <= counts + 1e-4)
