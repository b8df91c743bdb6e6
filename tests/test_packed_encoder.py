"""The packed (unpadded) BERT forward of the exported ORT graphs: the padded forward's features and
gradients on batches of unequal lengths, where it applies, and in the graphs ONNX Runtime runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from broker_server.packed_encoder import packable, packed_features
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset
from edge_runtime.engines.torch_engine import TextClassifier, TorchEngine
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, PromptSpec
from tests.helpers import WORDS
from tests.tiny_model import make_tiny_bert, make_tiny_model

LORA = LoraSpec(rank=4, target_modules=("query", "value"))


def _uneven(n: int, seed: int = 0) -> TextDataset:
    """Texts of 1 to 14 words (so every batch pads), three classes by vocabulary."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 3
        texts.append(" ".join(rng.choice(WORDS[label].split(), size=int(rng.integers(1, 15)))))
        labels.append(label)
    return TextDataset(tuple(texts), np.array(labels), ("sport", "finance", "space"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_tiny_bert(tmp_path_factory.mktemp("packed") / "model")
    config_path = folder / "config.json"  # eval-mode graphs: a dropout-free base matches step for step
    hf = json.loads(config_path.read_text())
    hf.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config_path.write_text(json.dumps(hf))
    return folder


def _engine(model: Path, peft: object = LORA, **kw: object) -> TorchEngine:
    config = TrainConfig(model=str(model), num_labels=3, seq_len=16, peft=peft, **kw)  # type: ignore[arg-type]
    engine = TorchEngine(config, seed=0, threads=1)
    with torch.no_grad():  # LoRA's B and the adapters' up-projections start at 0: make them count
        for name, p in engine.model.named_parameters():
            if p.requires_grad and not name.startswith("head."):
                p.add_(torch.randn_like(p) * 0.05)
    engine.model.eval()
    return engine


def _batch(engine: TorchEngine, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    texts = list(_uneven(n).texts)
    enc = engine.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    mask = enc["attention_mask"]
    assert int(mask.sum()) < mask.numel()  # the batch does pad
    return enc["input_ids"], mask


@pytest.mark.parametrize("peft", [LORA, AdapterSpec(bottleneck=4)], ids=["lora", "adapter"])
def test_packed_features_and_gradients_equal_the_padded_ones(model: Path, peft: object) -> None:
    engine = _engine(model, peft)
    classifier = engine.model
    assert isinstance(classifier, TextClassifier) and packable(classifier)
    ids, mask = _batch(engine)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    grads = []
    for features_of in (classifier.features, lambda i, m: packed_features(classifier, i, m)):
        classifier.zero_grad()
        features = features_of(ids, mask)
        loss = torch.nn.functional.cross_entropy(classifier.head(features) * 10.0, labels)
        loss.backward()
        grads.append(
            (
                features.detach(),
                {n: p.grad.clone() for n, p in classifier.named_parameters() if p.grad is not None},
            )
        )
    (padded, g_padded), (packed, g_packed) = grads
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-6)
    assert set(g_packed) == set(g_padded) and any("lora" in n or "adapter" in n for n in g_packed)
    for name, grad in g_padded.items():
        assert float(grad.abs().max()) > 0.0, name
        torch.testing.assert_close(g_packed[name], grad, rtol=1e-4, atol=1e-7)


def test_only_models_it_computes_exactly_are_packed(model: Path, tmp_path: Path) -> None:
    assert packable(_engine(model).model)
    assert not packable(_engine(model, PromptSpec(length=2)).model)  # a soft prompt goes before the text
    last_token = _engine(model).model
    last_token.pooling = "last_token"  # as decoder families pool
    assert not packable(last_token)
    roberta = make_tiny_model(tmp_path / "roberta", "roberta")
    assert not packable(_engine(roberta).model)  # another family's layers: the padded forward


def test_the_exported_graphs_train_like_torch_on_uneven_batches(model: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime.training.api", reason="the ORT engine needs onnxruntime-training")
    pytest.importorskip("onnx", reason="onnx is needed to build ORT training artifacts")
    import onnx

    from broker_server.artifacts import build_artifacts
    from edge_runtime.engines.ort_engine import OrtEngine

    config = TrainConfig(
        model=str(model), num_labels=3, seq_len=16, batch_size=8, lr=5e-3, head_lr=5e-2, peft=LORA
    )
    paths = build_artifacts(dataclasses.replace(config, engine="ort"), seed=0, cache_dir=tmp_path, threads=1)
    assert json.loads(paths.manifest.read_text())["tokens"] == "packed"
    ops = {n.op_type for n in onnx.load(str(paths.training_model)).graph.node}
    assert {"NonZero", "GatherND"} <= ops
    # ORT's slow scatter-adds: every row gather is a GatherND, and so is every row gather's gradient
    assert "GatherGrad" not in ops and "GatherNDGrad" not in ops

    train, test = _uneven(96, seed=1), _uneven(30, seed=2)
    ort = OrtEngine(dataclasses.replace(config, engine="ort"), artifacts=paths.folder, threads=1)
    torch_engine = TorchEngine(config, seed=0, threads=1)
    results = [e.train(train, epochs=1, seed=3) for e in (ort, torch_engine)]
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-3)
    after_ort, after_torch = ort.trainable_state(), torch_engine.trainable_state()
    for name, value in after_torch.items():
        gap = float(np.linalg.norm(after_ort[name] - value))
        assert gap <= 1e-4 * max(float(np.linalg.norm(value)), 1e-6), name
    evals = [e.evaluate(test) for e in (ort, torch_engine)]
    assert evals[0].loss == pytest.approx(evals[1].loss, rel=1e-4)
    np.testing.assert_array_equal(evals[0].predictions, evals[1].predictions)


def test_the_row_gathers_gradients_as_gathers_change_no_bit(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training artifacts with the packed gathers' gradients rewritten as gathers train to the
    same tensors, bit for bit, as with ONNX Runtime's GatherNDGrad (uneven batches, 2 epochs)."""
    pytest.importorskip("onnxruntime.training.api", reason="the ORT engine needs onnxruntime-training")
    import onnx

    import broker_server.packed_encoder as packed_encoder
    from broker_server.artifacts import build_artifacts
    from edge_runtime.engines.ort_engine import OrtEngine

    config = TrainConfig(
        model=str(model),
        num_labels=3,
        seq_len=16,
        batch_size=8,
        lr=5e-3,
        head_lr=5e-2,
        peft=LORA,
        engine="ort",
    )
    rewritten = build_artifacts(config, seed=0, cache_dir=tmp_path / "rewritten", threads=1)
    monkeypatch.setattr(packed_encoder, "row_gradients_as_gathers", lambda model: 0)
    scatter = build_artifacts(config, seed=0, cache_dir=tmp_path / "scatter", threads=1)
    counts = [
        sum(n.op_type == "GatherNDGrad" for n in onnx.load(str(p.training_model)).graph.node)
        for p in (rewritten, scatter)
    ]
    assert counts[0] == 0 and counts[1] >= 2 * 2  # the tiny BERT's 2 layers: context and spreads
    train, test = _uneven(96, seed=1), _uneven(30, seed=2)
    engines = [OrtEngine(config, artifacts=p.folder, threads=1) for p in (rewritten, scatter)]
    results = [e.train(train, epochs=2, seed=3) for e in engines]
    assert results[0].loss == results[1].loss
    states = [e.trainable_state() for e in engines]
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        np.testing.assert_array_equal(states[0][name], states[1][name], err_msg=name)
    evals = [e.evaluate(test) for e in engines]
    assert evals[0].loss == evals[1].loss
