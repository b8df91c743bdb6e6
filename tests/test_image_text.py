"""Image-text matching with CLIP: the pair loader and its errors, folder_task, recall@k and the
symmetric InfoNCE against hand-computed values, LoRA on both towers of a tiny random CLIP, a
2-client 1-round federation (in memory and through ``fedpeft simulate``), ``fedpeft centralized``
and the refusals (ONNX Runtime engines, classification-only options, serve).

Every model here is random-initialised and every image is drawn with numpy: nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server.evaluation import Evaluator
from broker_server.report import validate_report
from broker_server.service import ServiceConfig
from edge_runtime.config import TrainConfig
from edge_runtime.data import PairDataset, folder_task, load_folder, load_labels, load_split
from edge_runtime.errors import ConfigError, DataFormatError
from edge_runtime.pair_data import read_pair_file
from edge_runtime.peft_specs import AdapterSpec, LoraSpec
from edge_runtime.task_metrics import match_ranks, recall_at_k, retrieval_figures
from sdk.simulate import Simulation, SimulationConfig
from tests.federations import federate_in_memory
from tests.helpers import COLOURS, write_lm_folder, write_pair_folder, write_qa_folder, write_text_folder
from tests.tiny_model import make_tiny_bert, make_tiny_clip

ITM = "image-text-matching"
CLIP_LORA = LoraSpec(rank=4, target_modules=("q_proj", "k_proj", "v_proj", "out_proj"))
RECALLS = (
    "text_to_image_recall@1",
    "image_to_text_recall@1",
    "text_to_image_recall@5",
    "image_to_text_recall@5",
)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pair_folder(tmp_path_factory.mktemp("pairs") / "data")


def _config(model: Path, spec: Any = CLIP_LORA, **kw: Any) -> TrainConfig:
    values: dict[str, Any] = {"batch_size": 6, "lr": 1e-2, "logit_adjust": 0.0}
    return TrainConfig(peft=spec, model=str(model), num_labels=2, task=ITM, **(values | kw))


# --- recall@k and InfoNCE, by hand ---------------------------------------------------------------


def test_recall_at_k_by_hand_both_ways() -> None:
    sim = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.3], [0.1, 0.7, 0.6]])
    # captions: 0 ranks its image first; 1 has 0.8 and 0.3 above its 0.2 (rank 2); 2 has 0.7 (rank 1)
    assert match_ranks(sim).tolist() == [0, 2, 1]
    assert recall_at_k(sim, 1) == pytest.approx(1 / 3)
    assert recall_at_k(sim, 2) == pytest.approx(2 / 3)
    # images (columns): 0 first; 1 has 0.7 above its 0.2 (rank 1); 2 first (0.6 over 0.5 and 0.3)
    assert match_ranks(sim.T).tolist() == [0, 1, 0]
    assert recall_at_k(sim.T, 1) == pytest.approx(2 / 3)
    # ties count against: a model that scores every image alike finds nothing at k=1
    assert recall_at_k(np.ones((4, 4)), 1) == 0.0
    assert recall_at_k(np.ones((4, 4)), 4) == 1.0
    with pytest.raises(ConfigError, match="must be square"):
        recall_at_k(np.ones((2, 3)), 1)


def test_retrieval_figures_name_both_directions_and_their_means() -> None:
    sim = -np.eye(7)  # every caption's own image scores lowest: rank 6 both ways
    figures = retrieval_figures(sim)
    assert all(figures[k] == 0.0 for k in (*RECALLS, "mean_recall@1", "mean_recall@5"))
    sim = np.eye(7)
    sim[0, 1] = 2.0  # caption 0 prefers image 1; image 1 prefers caption 0 over caption 1
    figures = retrieval_figures(sim)
    assert figures["text_to_image_recall@1"] == pytest.approx(6 / 7)
    assert figures["image_to_text_recall@1"] == pytest.approx(6 / 7)
    assert figures["mean_recall@5"] == 1.0


def test_symmetric_info_nce_by_hand() -> None:
    import torch

    from edge_runtime.engines.torch_engine import symmetric_info_nce

    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    # captions: -log softmax([2, 0])[0] = log(1 + e^-2), -log softmax([1, 1])[1] = log 2
    # images (columns [2, 1] and [0, 1]): log(1 + e^-1) each
    captions = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    images = math.log(1 + math.exp(-1))
    assert float(symmetric_info_nce(logits)) == pytest.approx((captions + images) / 2, rel=1e-6)
    assert float(symmetric_info_nce(torch.tensor([[50.0, 0.0], [0.0, 50.0]]))) == pytest.approx(0.0, abs=1e-6)


# --- the loader -----------------------------------------------------------------------------------


def test_a_pair_folder_loads_with_its_images(pairs: Path) -> None:
    assert folder_task(pairs) == ITM
    train, test = load_folder(pairs)
    assert isinstance(train, PairDataset) and isinstance(test, PairDataset)
    assert (len(train), len(test)) == (4 * len(COLOURS), len(COLOURS))
    assert train.task == ITM and train.texts[0] == "a red square"
    assert train.images[0].shape == (12, 12, 3) and train.images[0].dtype == np.uint8
    assert abs(int(train.images[0][..., 0].mean()) - COLOURS["red"][0]) <= 10
    assert train.paths[0] == "images/train-red-0.png"
    assert load_labels(pairs) == ("pair",) == train.label_names
    assert train.label_histogram().tolist() == [len(train)]
    sample = load_split(pairs, "train", limit=5, seed=1)
    assert isinstance(sample, PairDataset) and len(sample) == 5 and set(sample.texts) <= set(train.texts)


def test_folder_task_tells_every_layout_apart(tmp_path: Path, pairs: Path) -> None:
    assert folder_task(pairs) == ITM
    assert folder_task(write_lm_folder(tmp_path / "lm")) == "causal-lm"
    assert folder_task(write_text_folder(tmp_path / "texts")) == "classification"
    assert folder_task(write_qa_folder(tmp_path / "qa", train=2, test=1)) == "question-answering"
    (tmp_path / "imgs" / "train" / "a").mkdir(parents=True)
    np.save(tmp_path / "imgs" / "train" / "a" / "x.npy", np.zeros((2, 2), dtype=np.uint8))
    assert folder_task(tmp_path / "imgs") == "image-classification"
    with pytest.raises(DataFormatError, match="data folder not found"):
        folder_task(tmp_path / "nowhere")


GOOD = json.dumps({"image": "images/train-red-0.png", "text": "a red square"})
BAD_RECORDS = [
    ("{", "invalid JSON"),
    ('["a list"]', "expected a JSON object with 'image' and 'text', got list"),
    (json.dumps({"image": "images/train-red-0.png"}), "'text' is missing"),
    (json.dumps({"image": "images/train-red-0.png", "text": " "}), "'text' is empty"),
    (json.dumps({"text": "a cat", "caption": "x"}), "'image' is missing"),
    (json.dumps({"image": 3, "text": "a cat"}), "'image' must be a string, got int"),
    (json.dumps({"image": "images/none.png", "text": "a cat"}), "image 'images/none.png' not found"),
    (json.dumps({"image": "/etc/passwd", "text": "a cat"}), "must be a path relative to"),
    (json.dumps({"image": "../x.png", "text": "a cat"}), "leads out of the data folder"),
    (json.dumps({"image": "notes.txt", "text": "a cat"}), "image 'notes.txt': not an image file"),
    (json.dumps({"image": "broken.png", "text": "a cat"}), "image 'broken.png': not a readable image"),
]


@pytest.mark.parametrize(("line", "message"), BAD_RECORDS)
def test_a_bad_pair_names_its_file_line_and_fault(tmp_path: Path, line: str, message: str) -> None:
    folder = write_pair_folder(tmp_path / "data", train_per_colour=1)
    (folder / "notes.txt").write_text("hello")
    (folder / "broken.png").write_bytes(b"not a png")
    path = folder / "test.jsonl"
    path.write_text(GOOD + "\n\n" + line + "\n")  # the blank line still counts
    with pytest.raises(DataFormatError) as caught:
        load_folder(folder)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert message in str(caught.value)
    assert (caught.value.path, caught.value.line) == (str(path), 3)


def test_an_empty_split_and_a_missing_split_are_errors(tmp_path: Path) -> None:
    folder = write_pair_folder(tmp_path / "data", train_per_colour=1)
    (folder / "test.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match=r"test\.jsonl: the file holds no image-text pairs"):
        load_folder(folder)
    (folder / "test.jsonl").unlink()
    with pytest.raises(DataFormatError, match=r"no test\.jsonl in this image-text folder"):
        load_folder(folder)
    assert len(read_pair_file(folder / "train.jsonl")) == len(COLOURS)


# --- CLIP in the torch engine ---------------------------------------------------------------------


def test_lora_goes_into_both_towers_and_the_base_stays_frozen(clip: Path, pairs: Path) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    engine = TorchEngine(_config(clip), seed=0, threads=1)
    assert engine.task == ITM and engine.model.pooling == "projection"
    state = engine.trainable_state()
    towers = {name.split(".")[1] for name in state}
    assert towers == {"text_model", "vision_model"}
    # 2 towers x 2 layers x 4 projections x (A and B); no head
    assert len(state) == 2 * 2 * 4 * 2 and not any(n.startswith("head.") for n in state)
    frozen = {n: p.detach().clone() for n, p in engine.model.named_parameters() if not p.requires_grad}
    train, _ = load_folder(pairs)
    engine.train(train, epochs=1, seed=0)
    after = engine.trainable_state()
    assert all(not np.array_equal(state[n], after[n]) for n in state if n.endswith("lora_B"))
    assert all(bool((p == frozen[n]).all()) for n, p in engine.model.named_parameters() if n in frozen)


def test_the_engine_loss_and_recalls_are_the_formulas_on_its_own_embeddings(clip: Path, pairs: Path) -> None:
    import torch

    from edge_runtime.engines.torch_engine import TorchEngine, symmetric_info_nce

    engine = TorchEngine(_config(clip), seed=0, threads=1)
    _, test = load_folder(pairs)
    result = engine.evaluate(test)
    inputs = engine._inputs(test)
    with torch.no_grad():
        ids, mask = engine._batch(inputs.input_ids, np.arange(len(test)))
        texts = engine.model.text_embeddings(ids, mask)
        images = engine.model.image_embeddings(inputs.pixels)
    sim = (texts @ images.T).numpy()
    np.testing.assert_allclose(np.linalg.norm(texts.numpy(), axis=1), 1.0, rtol=1e-5)
    scale = math.exp(float(engine.model.encoder.logit_scale))  # CLIP's init: 1 / 0.07
    assert scale == pytest.approx(1 / 0.07, rel=1e-4)
    assert result.loss == pytest.approx(float(symmetric_info_nce(torch.from_numpy(sim * scale))), rel=1e-4)
    assert result.extra["text_to_image_recall@1"] == recall_at_k(sim, 1)
    assert result.extra["image_to_text_recall@5"] == recall_at_k(sim.T, 5)
    assert result.accuracy == (recall_at_k(sim, 1) + recall_at_k(sim.T, 1)) / 2
    assert result.macro_f1 == (recall_at_k(sim, 5) + recall_at_k(sim.T, 5)) / 2
    assert result.predictions.tolist() == sim.argmax(1).tolist()


def test_training_lowers_the_loss_and_finds_the_matches(clip: Path, pairs: Path) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    engine = TorchEngine(_config(clip), seed=0, threads=1)
    train, test = load_folder(pairs)
    before = engine.evaluate(test)
    engine.train(train, epochs=6, seed=0)
    after = engine.evaluate(test)
    assert after.loss < before.loss - 0.5
    assert after.accuracy > before.accuracy
    assert after.accuracy >= 0.5  # mean recall@1 over 6 colours; chance is 1/6


def test_clip_refuses_adapters_classification_and_the_classifier_statistics(
    clip: Path, pairs: Path, tmp_path: Path
) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    with pytest.raises(ConfigError, match="PEFT kind 'adapter' is not supported for it"):
        TorchEngine(_config(clip, AdapterSpec(bottleneck=4)), seed=0, threads=1)
    with pytest.raises(
        ConfigError, match=r"it does not train classification \(it trains image-text matching\)"
    ):
        TorchEngine(TrainConfig(peft=CLIP_LORA, model=str(clip)), seed=0, threads=1)
    engine = TorchEngine(_config(clip), seed=0, threads=1)
    train, _ = load_folder(pairs)
    with pytest.raises(Exception, match="is for classification; this engine trains image-text-matching"):
        engine.class_feature_sums(train)
    texts, _ = load_folder(write_text_folder(tmp_path / "texts", per_class_train=2))
    with pytest.raises(ConfigError, match=r"clip model: it does not train classification"):
        engine.evaluate(texts)
    with pytest.raises(ConfigError, match=r"clip model: it does not train classification"):
        engine.train(texts, epochs=1, seed=0)
    bert = make_tiny_bert(tmp_path / "bert")
    with pytest.raises(ConfigError, match="image-text matching trains CLIP models"):
        TorchEngine(_config(bert, LoraSpec(rank=2, target_modules=("query",))), seed=0, threads=1)


@pytest.mark.parametrize("engine", ["ort", "ort-plain"])
def test_the_onnx_runtime_engines_refuse_image_text_matching(clip: Path, engine: str) -> None:
    from edge_runtime.engines import create_engine
    from edge_runtime.engines.ort_engine import check_ort_support
    from edge_runtime.engines.ort_step_engine import check_step_support

    cfg = _config(clip, engine=engine)
    with pytest.raises(ConfigError, match=f"the {engine} engine trains classification only; {ITM}"):
        create_engine(cfg, artifacts="unused")
    check = check_ort_support if engine == "ort" else check_step_support
    with pytest.raises(ConfigError, match="image-text matching trains with --engine torch"):
        check(cfg)


# --- federated: 2 clients, 1 round ----------------------------------------------------------------


def test_two_clients_one_round_over_the_in_memory_transport(clip: Path, pairs: Path, tmp_path: Path) -> None:
    train, test = load_folder(pairs)
    cfg = _config(clip, bits=32)
    with pytest.raises(ConfigError, match="head_init 'ncm' builds the head from class means"):
        ServiceConfig(fleet="f", rounds=1, train=cfg, min_clients=2)
    service_cfg = ServiceConfig(
        fleet="itm",
        rounds=1,
        train=cfg,
        min_clients=2,
        expected_clients=2,
        round_timeout_s=60,
        head_init="random",
    )
    evaluator = Evaluator(cfg, test, seed=0, threads=1)
    initial = evaluator.initial_state()
    before = evaluator.evaluate(initial)
    assert before is not None
    service, agents = federate_in_memory(service_cfg, train, evaluator)

    assert [r["round"] for r in service.rounds] == [1]
    record = service.rounds[0]
    assert record["participants"] == 2 and service.rejected == []
    assert all(record[k] is not None for k in RECALLS)
    assert record["accuracy"] == (record["text_to_image_recall@1"] + record["image_to_text_recall@1"]) / 2
    final = service.final_state()
    assert set(final) == set(initial)
    assert all(not np.array_equal(final[k], initial[k]) for k in final if k.endswith(".lora_B"))
    assert record["loss"] < before.loss  # one round of both devices lowered the test InfoNCE
    for agent in agents:
        assert agent.final_state is not None
        for k, v in final.items():
            np.testing.assert_array_equal(agent.final_state[k], v)
    _exports_match_the_engine(cfg, final, tmp_path)


def _exports_match_the_engine(cfg: TrainConfig, state: dict[str, np.ndarray], root: Path) -> None:
    """The federated module exported as peft loads back with the engine's embeddings (within 1e-6), and as
    two ONNX towers gives them within the export's tolerance, on captions and images it never saw."""
    import onnxruntime
    import torch

    from edge_runtime.engines.torch_engine import TorchEngine, pixel_values
    from sdk.export import (
        IMAGE_TOWER_NAME,
        MANIFEST_NAME,
        ONNX_TOLERANCE,
        TEXT_TOWER_NAME,
        ModuleSource,
        _encode,
        export_module,
        load_exported,
    )

    engine = TorchEngine(cfg, seed=0, threads=1)
    engine.load_trainable_state(state)
    texts = ["a red square", "a blue square with noise on a grey ground", "green", "a yellow one"]
    rng = np.random.default_rng(11)
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in [(12, 12), (30, 20), (16, 16)]]
    ids, mask = _encode(engine.tokenizer, texts, engine.max_tokens)
    pixels = pixel_values(images, engine.image_size, engine.channels, engine._mean, engine._std)
    with torch.no_grad():
        text_ref = engine.model.text_embeddings(ids, mask)
        image_ref = engine.model.image_embeddings(pixels)
        with engine._frozen_base():
            text_base = engine.model.text_embeddings(ids, mask)
    assert float((text_ref - text_base).abs().max()) > 1e-4  # the round's module changes the model
    source = ModuleSource(state, cfg, "a federated CLIP module")

    exported = load_exported(export_module(source, root / "peft", "peft").out, threads=1)
    assert exported.task == ITM and exported.manifest["logit_scale"] == pytest.approx(
        float(engine.model.scale())
    )
    assert torch.equal(exported.pixels(images), pixels)
    # peft's PeftModel around CLIPModel sums in another order than the engine's injected layers
    torch.testing.assert_close(exported.text_embeddings(texts), text_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(exported.image_embeddings(images), image_ref, rtol=0, atol=1e-6)

    folder = export_module(source, root / "onnx", "onnx").out
    text_tower = onnxruntime.InferenceSession(
        str(folder / TEXT_TOWER_NAME), providers=["CPUExecutionProvider"]
    )
    image_tower = onnxruntime.InferenceSession(
        str(folder / IMAGE_TOWER_NAME), providers=["CPUExecutionProvider"]
    )
    (text_got,) = text_tower.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    (image_got,) = image_tower.run(None, {"pixel_values": pixels.numpy()})
    assert float(np.abs(text_got - text_ref.numpy()).max()) <= ONNX_TOLERANCE
    assert float(np.abs(image_got - image_ref.numpy()).max()) <= ONNX_TOLERANCE
    # the retrieval the graphs give is the engine's
    assert ((text_got @ image_got.T).argmax(1) == (text_ref @ image_ref.T).numpy().argmax(1)).all()
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["task"] == ITM and manifest["onnx"]["max_abs_diff"] <= ONNX_TOLERANCE


def test_the_fedpeft_simulate_command_trains_clip_and_reports_recalls(
    clip: Path,
    pairs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sdk.cli import main

    caplog.set_level(logging.INFO, logger="fedpeft.simulate")
    argv = ["simulate", "--data", str(pairs), "--model", str(clip), "--clients", "2", "--rounds", "1"]
    argv += ["--partition", "iid", "--samples-per-client", "12", "--test-samples", "6", "--workers", "1"]
    argv += ["--batch-size", "6", "--lr", "0.01", "--engine", "auto"]
    assert main([*argv, "--report", str(tmp_path / "itm.json")]) == 0
    report = json.loads((tmp_path / "itm.json").read_text())
    validate_report(report)
    assert report["rejected"] == []
    assert [r["round"] for r in report["rounds"]] == [1] and report["rounds"][0]["participants"] == 2
    assert all(c["engine"] == "torch" and c["updates_accepted"] == 1 for c in report["clients"])
    assert sum(c["samples"] for c in report["clients"]) == 24
    final, last = report["final"], report["rounds"][-1]
    assert final["task"] == ITM
    assert final["accuracy"] == final["mean_recall@1"] == last["mean_recall@1"]
    assert final["macro_f1"] == final["mean_recall@5"] == last["mean_recall@5"]
    assert all(final[k] == last[k] for k in RECALLS)
    train = report["config"]["train"]
    assert (train["task"], train["logit_adjust"]) == (ITM, 0.0)
    assert train["peft"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "out_proj"]
    # --engine auto falls back to torch and says why
    assert "--engine auto trains image-text-matching data with torch: the ORT engines train" in caplog.text
    out = capsys.readouterr()
    assert f"final mean recall@1 {final['accuracy']:.3f}, mean recall@5 {final['macro_f1']:.3f}" in out.out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"engine": "ort"}, "--engine ort: the ONNX Runtime engines train classification only"),
        ({"engine": "ort-plain"}, "--engine ort-plain: the ONNX Runtime engines train classification only"),
        ({"partition": "dirichlet:0.5"}, "--partition dirichlet:0.5 skews labels; .* use --partition iid"),
        ({"personalize_epochs": 1}, "--personalize-epochs starts from the device's label prior"),
        ({"profiles": "low=0.5,high=0.5"}, "--profiles/--allocation utility\\|uniform is not supported"),
    ],
)
def test_simulate_refuses_classification_only_options_for_pairs(
    clip: Path, pairs: Path, options: dict[str, Any], message: str
) -> None:
    options = {"partition": "iid"} | options
    config = SimulationConfig(data=str(pairs), model=str(clip), clients=2, rounds=1, **options)
    with pytest.raises(ConfigError, match=message + r".*\(the data folder holds image-text matching data\)"):
        Simulation(config).run()


def test_simulate_refuses_a_text_model_for_pairs(tmp_path: Path, pairs: Path) -> None:
    bert = make_tiny_bert(tmp_path / "bert")
    config = SimulationConfig(data=str(pairs), model=str(bert), clients=2, rounds=1, partition="iid")
    with pytest.raises(ConfigError, match=r"holds image-text matching data, but model .* is a bert model"):
        Simulation(config).run()


def test_serve_refuses_pairs_and_centralized_trains_them(
    clip: Path, pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdk.cli import main

    argv = ["serve", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--rounds", "1", "--min-clients", "1"]
    argv += ["--data", str(pairs), "--model", str(clip), "--report", str(tmp_path / "r.json")]
    assert main([*argv, "--state", str(tmp_path / "state")]) == 2
    assert "fedpeft serve does not take image-text matching data yet" in capsys.readouterr().err

    common = ["centralized", "--data", str(pairs), "--model", str(clip), "--clients", "2", "--rounds", "2"]
    common += ["--samples-per-client", "12", "--test-samples", "6", "--lr", "0.01", "--batch-size", "6"]
    assert main([*common, "--partition", "iid", "--report", str(tmp_path / "c.json")]) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    validate_report(report)
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert report["final"]["task"] == ITM
    assert (
        report["final"]["mean_recall@1"]
        == report["rounds"][-1]["mean_recall@1"]
        == report["final"]["accuracy"]
    )
    assert report["rounds"][-1]["loss"] < report["rounds"][0]["loss"]  # it trained
    assert "centralized mean recall@1" in capsys.readouterr().out
