"""ONNX export beyond text classification: a tiny random ViT's image classifier and a tiny random
BERT's question answering model, each with a LoRA module whose B factors and head are random (so
the merged update matters), run in an onnxruntime ``InferenceSession`` and compared with the
unmerged torch model on inputs the export neither traced nor checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ConfigError
from edge_runtime.image_data import ImageDataset
from edge_runtime.peft_specs import LoraSpec
from edge_runtime.qa_eval import best_span
from sdk.export import (
    MANIFEST_NAME,
    ONNX_NAME,
    ONNX_TOLERANCE,
    ModuleSource,
    encode_pairs,
    export_onnx,
    export_peft,
    load_exported,
)
from tests.helpers import write_qa_folder
from tests.tiny_model import make_tiny_bert, make_tiny_vit

TARGETS = ("query", "key", "value", "attention.output.dense")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: keep to one core
    yield
    torch.set_num_threads(before)


def _randomised(engine: TorchEngine, seed: int = 7) -> dict[str, np.ndarray]:
    """The engine's module with random B factors and head (B is zero at initialisation)."""
    rng = np.random.default_rng(seed)
    state = engine.trainable_state()
    for name, value in state.items():
        if name.endswith("lora_B"):
            state[name] = rng.normal(0.0, 0.2, value.shape).astype(np.float32)
    state["head.weight"] = rng.normal(0.0, 4.0, state["head.weight"].shape).astype(np.float32)
    state["head.bias"] = rng.normal(0.0, 1.0, state["head.bias"].shape).astype(np.float32)
    engine.load_trainable_state(state)
    return state


def _session(folder: Path) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(folder / ONNX_NAME), providers=["CPUExecutionProvider"])


# --- ViT ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("vit-export")
    vit = make_tiny_vit(root / "vit")
    cfg = TrainConfig(peft=LoraSpec(rank=4, target_modules=TARGETS), model=str(vit), num_labels=3)
    engine = TorchEngine(cfg, seed=0, threads=1)
    state = _randomised(engine)
    result = export_onnx(ModuleSource(state, cfg, "a random module on a tiny ViT"), root / "onnx", threads=1)
    return {"engine": engine, "state": state, "cfg": cfg, "result": result, "root": root}


def test_a_vit_with_its_merged_module_runs_in_onnxruntime_with_torch_s_logits(
    vit_export: dict[str, Any],
) -> None:
    engine: TorchEngine = vit_export["engine"]
    folder = vit_export["result"].out
    session = _session(folder)
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    # seven new images (another batch size than traced or checked), some at other sizes
    rng = np.random.default_rng(123)
    sizes = [(16, 16), (8, 8), (30, 20), (16, 16), (5, 9), (40, 40), (16, 17)]
    images = ImageDataset(
        tuple(rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes), np.zeros(7), ("a", "b", "c")
    )
    pixels = engine._pixels(images)
    with torch.no_grad():
        reference = engine.model(pixels).numpy()
        with engine._frozen_base():
            base = engine.model(pixels).numpy()
    assert np.abs(reference - base).max() > 0.1  # the module changes the model: the merge matters
    logits, features = session.run(None, {"pixel_values": pixels.numpy()})
    diff = float(np.abs(logits - reference).max())
    assert diff <= ONNX_TOLERANCE, diff
    assert (logits.argmax(-1) == reference.argmax(-1)).all()
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["onnx"]["max_abs_diff"] == vit_export["result"].max_abs_diff <= ONNX_TOLERANCE
    assert manifest["onnx"]["lora"] == "merged into the base weights"
    assert manifest["preprocessing"]["image_size"] == 16
    assert manifest["preprocessing"]["image_mean"] == [0.5, 0.5, 0.5]
    # the service's evaluation of the module agrees with the graph's predictions
    assert (engine.evaluate(images).predictions == logits.argmax(-1)).all()


def test_a_vit_module_round_trips_through_peft_with_the_engine_s_logits(
    vit_export: dict[str, Any], tmp_path: Path
) -> None:
    engine: TorchEngine = vit_export["engine"]
    source = ModuleSource(vit_export["state"], vit_export["cfg"], "a random module on a tiny ViT")
    out = export_peft(source, tmp_path / "out").out
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    exported = load_exported(out, threads=1)
    assert exported.task == "image-classification" and exported.tokenizer is None
    rng = np.random.default_rng(5)
    images = tuple(rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in [(16, 16), (9, 30), (40, 40)])
    expected_pixels = engine._pixels(ImageDataset(images, np.zeros(3), ("a", "b", "c")))
    torch.testing.assert_close(exported.pixels(images), expected_pixels, rtol=0, atol=0)
    with torch.no_grad():
        expected = engine.model(expected_pixels)
    assert torch.equal(exported.image_logits(images), expected)
    with pytest.raises(ConfigError, match="is for classification exports; this one is image-classification"):
        exported.logits(["a text"])


# --- question answering ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qa_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("qa-export")
    bert = make_tiny_bert(root / "bert")
    cfg = TrainConfig(
        peft=LoraSpec(rank=4, target_modules=TARGETS),
        model=str(bert),
        num_labels=2,
        task="question-answering",
        seq_len=48,
        logit_adjust=0.0,
    )
    engine = TorchEngine(cfg, seed=0, threads=1)
    state = _randomised(engine)
    result = export_onnx(
        ModuleSource(state, cfg, "a random QA module on a tiny BERT"), root / "onnx", threads=1
    )
    _, test = load_folder(write_qa_folder(root / "data", train=2, test=7))
    return {"engine": engine, "state": state, "cfg": cfg, "result": result, "test": test}


def test_a_question_answering_model_runs_in_onnxruntime_with_torch_s_span_logits(
    qa_export: dict[str, Any],
) -> None:
    engine: TorchEngine = qa_export["engine"]
    test = qa_export["test"]
    folder = qa_export["result"].out
    session = _session(folder)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in session.get_outputs()] == ["start_logits", "end_logits"]
    pairs = list(zip(test.questions, test.contexts, strict=True))
    feeds = encode_pairs(engine.tokenizer, pairs, 48, segments=True)
    with torch.no_grad():
        start, end = engine.model(*feeds.values())
        with engine._frozen_base():
            base_start, _ = engine.model(*feeds.values())
    assert (start - base_start).abs().max() > 0.1  # the module changes the model
    got_start, got_end = session.run(None, {n: t.numpy() for n, t in feeds.items()})
    diff = max(float(np.abs(got_start - start.numpy()).max()), float(np.abs(got_end - end.numpy()).max()))
    assert diff <= ONNX_TOLERANCE, diff
    # the answers read from the graph's logits are the torch engine's predictions
    inputs = engine._inputs(test)
    predictions = engine.evaluate(test).predictions
    for i in range(len(test)):
        width = len(inputs.input_ids[i])
        s, e = best_span(got_start[i, :width], got_end[i, :width], np.asarray(inputs.in_context[i]))
        assert test.contexts[i][inputs.offsets[i][s][0] : inputs.offsets[i][e][1]] == predictions[i]
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["task"] == "question-answering" and manifest["seq_len"] == 48
    assert manifest["onnx"]["max_abs_diff"] == qa_export["result"].max_abs_diff <= ONNX_TOLERANCE
    assert (folder / "tokenizer.json").is_file()


def test_a_question_answering_module_round_trips_through_peft_with_the_engine_s_span_logits(
    qa_export: dict[str, Any], tmp_path: Path
) -> None:
    engine: TorchEngine = qa_export["engine"]
    test = qa_export["test"]
    source = ModuleSource(qa_export["state"], qa_export["cfg"], "a random QA module")
    exported = load_exported(export_peft(source, tmp_path / "out").out, threads=1)
    assert exported.task == "question-answering" and exported.manifest["segments"] is True
    pairs = list(zip(test.questions, test.contexts, strict=True))
    feeds = encode_pairs(engine.tokenizer, pairs, 48, segments=True)
    with torch.no_grad():
        start, end = engine.model(*feeds.values())
    got_start, got_end = exported.span_logits(pairs)
    assert torch.equal(got_start, start) and torch.equal(got_end, end)
