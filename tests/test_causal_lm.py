"""Causal-LM fine-tuning of LLaMA-style decoders: the loader of unlabelled texts and its errors, the
next-token targets and scores against hand-computed values, LoRA on a tiny random LLaMA with its LM
head, training lowers the loss, a 2-client 1-round federation (in memory and through ``fedpeft
simulate``), ``fedpeft centralized`` and the refusals.

Every model here is random-initialised and every text is written by the tests: nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server.evaluation import Evaluator
from broker_server.report import validate_report
from broker_server.service import ServiceConfig
from edge_runtime.config import TrainConfig
from edge_runtime.data import LMDataset, TextDataset, folder_task, load_folder, load_labels, load_split
from edge_runtime.errors import ConfigError, DataFormatError
from edge_runtime.lm_data import read_lm_file
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, PromptSpec
from edge_runtime.task_metrics import next_token_figures
from sdk.simulate import Simulation, SimulationConfig
from tests.federations import federate_in_memory
from tests.helpers import LM_SENTENCES, write_lm_folder
from tests.tiny_model import make_tiny_causal_llama, make_tiny_model

LM = "causal-lm"
LLAMA_LORA = LoraSpec(rank=4, target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_llama(tmp_path_factory.mktemp("llama") / "llama")


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lm_folder(tmp_path_factory.mktemp("lm") / "data")


def _config(model: Path, spec: Any = LLAMA_LORA, **kw: Any) -> TrainConfig:
    values: dict[str, Any] = {"batch_size": 8, "lr": 1e-2, "logit_adjust": 0.0, "seq_len": 16}
    return TrainConfig(peft=spec, model=str(model), num_labels=2, task=LM, **(values | kw))


# --- targets and scores, by hand ------------------------------------------------------------------


def test_next_token_targets_shift_by_one_and_skip_padding() -> None:
    import torch

    from edge_runtime.engines.torch_engine import next_token_targets

    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert next_token_targets(ids, mask).tolist() == [[6, 7, -100, -100], [9, -100, -100, -100]]


def test_next_token_figures_by_hand() -> None:
    figures = next_token_figures(np.array([1, 2, 2, 3]), np.array([1, 2, 3, 3]), 4 * math.log(2))
    assert figures["next_token_accuracy"] == 0.75
    # token 1: F1 1; token 2: tp 1, fp 1 -> 2/3; token 3: tp 1, fn 1 -> 2/3
    assert figures["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert figures["loss"] == pytest.approx(math.log(2))
    assert figures["perplexity"] == pytest.approx(2.0)
    assert figures["tokens"] == 4
    with pytest.raises(ConfigError, match="as many predictions as targets"):
        next_token_figures(np.array([1]), np.array([1, 2]), 0.0)


# --- the loader -----------------------------------------------------------------------------------


def test_a_folder_of_unlabelled_texts_loads_as_causal_lm(texts: Path) -> None:
    assert folder_task(texts) == LM
    train, test = load_folder(texts)
    assert isinstance(train, LMDataset) and isinstance(test, LMDataset)
    assert (len(train), len(test)) == (24, 8)
    assert train.texts[:4] == LM_SENTENCES and train.task == LM
    assert load_labels(texts) == ("text",) == train.label_names
    assert train.label_histogram().tolist() == [24]
    sample = load_split(texts, "train", limit=5, seed=2)
    assert isinstance(sample, LMDataset) and len(sample) == 5


def test_a_labelled_first_line_keeps_a_folder_classification(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b"}\n')
    assert folder_task(tmp_path) == "classification"
    with pytest.raises(DataFormatError, match="'label' is missing"):
        load_split(tmp_path, "train")


BAD_RECORDS = [
    ("{", "invalid JSON"),
    ("[1]", "expected a JSON object with 'text', got list"),
    ('{"body": "x"}', "'text' is missing"),
    ('{"text": "  "}', "'text' is empty"),
    ('{"text": 5}', "'text' must be a string, got int"),
    ('{"text": "x", "label": 1}', "a causal-LM file has no 'label'"),
]


@pytest.mark.parametrize(("line", "message"), BAD_RECORDS)
def test_a_bad_text_names_its_file_line_and_fault(tmp_path: Path, line: str, message: str) -> None:
    folder = write_lm_folder(tmp_path / "data", train=2, test=1)
    path = folder / "train.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataFormatError) as caught:
        load_folder(folder)
    assert str(caught.value).startswith(f"{path}:2: ")
    assert message in str(caught.value)


def test_an_empty_split_and_a_missing_split_are_errors(tmp_path: Path) -> None:
    folder = write_lm_folder(tmp_path / "data", train=2, test=1)
    (folder / "test.jsonl").write_text("\n\n")
    with pytest.raises(DataFormatError, match=r"test\.jsonl: the file holds no texts"):
        load_folder(folder)
    (folder / "test.jsonl").unlink()
    with pytest.raises(DataFormatError, match=r"no test\.jsonl in this causal-LM folder"):
        load_folder(folder)
    assert read_lm_file(folder / "train.jsonl").texts == LM_SENTENCES[:2]


# --- the decoder in the torch engine --------------------------------------------------------------


def test_the_loss_is_the_mean_next_token_cross_entropy_of_the_lm_head(llama: Path, texts: Path) -> None:
    import torch

    from edge_runtime.engines.torch_engine import TorchEngine

    engine = TorchEngine(_config(llama), seed=0, threads=1)
    assert engine.task == LM and engine.model.pooling == "next_token"
    state = engine.trainable_state()
    assert len(state) == 2 * 2 * 2 and not any(n.startswith("head.") for n in state)  # layers x q,v x A,B
    _, split = load_folder(texts)
    # texts of different lengths, so that the engine's batches are right-padded
    test = LMDataset((*split.texts[:3], "a b", "the cat sat on the mat and then the dog ran in the park"))
    assert len({len(engine.tokenizer(t)["input_ids"]) for t in test.texts}) >= 3
    result = engine.evaluate(test)
    # by hand: the model's log-probability of each real next token, text by text
    nll, hits, count = 0.0, 0, 0
    per_text = []
    with torch.no_grad():
        for text in test.texts:
            ids = torch.tensor([engine.tokenizer(text)["input_ids"]])
            logits = engine.model.encoder(input_ids=ids).logits[0, :-1]
            logp = torch.log_softmax(logits, -1)
            nxt = ids[0, 1:]
            nll -= float(logp[torch.arange(len(nxt)), nxt].sum())
            right = int((logits.argmax(-1) == nxt).sum())
            per_text.append(right / len(nxt))
            hits += right
            count += len(nxt)
    assert result.extra["tokens"] == count
    assert result.loss == pytest.approx(nll / count, rel=1e-4)
    assert result.accuracy == pytest.approx(hits / count)
    assert result.extra["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert result.task == LM
    np.testing.assert_allclose(result.predictions, per_text)  # each text's own accuracy, batched or not


@pytest.mark.parametrize("spec", [LLAMA_LORA, AdapterSpec(bottleneck=4), PromptSpec(length=2)])
def test_training_lowers_the_next_token_loss(llama: Path, texts: Path, spec: Any) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    engine = TorchEngine(_config(llama, spec), seed=0, threads=1)
    frozen = {n: p.detach().clone() for n, p in engine.model.named_parameters() if not p.requires_grad}
    train, test = load_folder(texts)
    before = engine.evaluate(test)
    engine.train(train, epochs=6, seed=0)
    after = engine.evaluate(test)
    assert after.loss < before.loss - 0.5
    assert after.extra["perplexity"] < before.extra["perplexity"]
    assert all(bool((p == frozen[n]).all()) for n, p in engine.model.named_parameters() if n in frozen)


def test_a_decoder_without_an_lm_head_and_classification_data_are_refused(
    tmp_path: Path, llama: Path
) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    bare = make_tiny_model(tmp_path / "bare", "llama")  # LlamaModel: no lm_head in its weights
    with pytest.raises(ConfigError, match=r"has no language-model head \(lm_head\)"):
        TorchEngine(_config(bare), seed=0, threads=1)
    engine = TorchEngine(_config(llama), seed=0, threads=1)
    labelled = TextDataset(("a b c",), np.array([0]), ("x", "y"))
    with pytest.raises(ConfigError, match="the data is for classification but this engine trains causal-lm"):
        engine.train(labelled, epochs=1, seed=0)
    with pytest.raises(Exception, match="is for classification; this engine trains causal-lm"):
        engine.predict_proba(LMDataset(("a b c",)))
    bert = tmp_path / "bert"
    make_tiny_model(bert, "bert")
    with pytest.raises(ConfigError, match="causal-LM fine-tuning trains LLaMA-style decoders"):
        TorchEngine(_config(bert, LoraSpec(rank=2, target_modules=("query",))), seed=0, threads=1)


@pytest.mark.parametrize("engine", ["ort", "ort-plain"])
def test_the_onnx_runtime_engines_refuse_causal_lm(llama: Path, engine: str) -> None:
    from edge_runtime.engines import create_engine
    from edge_runtime.engines.base import require_text
    from edge_runtime.engines.ort_engine import check_ort_support
    from edge_runtime.engines.ort_step_engine import check_step_support

    cfg = _config(llama, engine=engine)
    with pytest.raises(ConfigError, match=f"the {engine} engine trains classification only; {LM}"):
        create_engine(cfg, artifacts="unused")
    check = check_ort_support if engine == "ort" else check_step_support
    with pytest.raises(ConfigError, match="causal-LM fine-tuning trains with --engine torch"):
        check(cfg)
    with pytest.raises(ConfigError, match="causal-LM fine-tuning trains with --engine torch"):
        require_text(LMDataset(("a b",)))


# --- federated: 2 clients, 1 round ----------------------------------------------------------------


def test_two_clients_one_round_over_the_in_memory_transport(llama: Path, texts: Path, tmp_path: Path) -> None:
    train, test = load_folder(texts)
    cfg = _config(llama, bits=32)
    service_cfg = ServiceConfig(
        fleet="lm",
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
    assert record["accuracy"] == record["next_token_accuracy"]
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]), rel=1e-6)
    assert record["loss"] < before.loss
    final = service.final_state()
    assert all(not np.array_equal(final[k], initial[k]) for k in final if k.endswith(".lora_B"))
    for agent in agents:
        assert agent.final_state is not None
        for k, v in final.items():
            np.testing.assert_array_equal(agent.final_state[k], v)
    _exports_match_the_engine(cfg, final, tmp_path)


def _exports_match_the_engine(cfg: TrainConfig, state: dict[str, np.ndarray], root: Path) -> None:
    """The federated module exported as peft is plain peft's LoRA adapter for the decoder with its
    LM head: ``PeftModel.from_pretrained`` gives the engine's next-token logits exactly; as ONNX, the
    merged decoder gives them within the export's tolerance, on texts of several lengths (padding)."""
    import onnxruntime
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edge_runtime.engines.torch_engine import TorchEngine
    from sdk.export import (
        MANIFEST_NAME,
        ONNX_NAME,
        ONNX_TOLERANCE,
        ModuleSource,
        _encode,
        export_module,
        load_exported,
    )

    engine = TorchEngine(cfg, seed=0, threads=1)
    engine.load_trainable_state(state)
    sentences = ["the cat sat on the mat", "a", "the dog ran to the park and back home again", "birds sing"]
    ids, mask = _encode(engine.tokenizer, sentences, engine.max_tokens)
    assert int(mask.sum(1).min()) < int(mask.sum(1).max())
    with torch.no_grad():
        reference = engine.model(ids, mask)
        with engine._frozen_base():
            base = engine.model(ids, mask)
    real = mask.bool()
    assert float((reference - base)[real].abs().max()) > 1e-4  # the round's module changes the model
    source = ModuleSource(state, cfg, "a federated causal-LM module")

    folder = export_module(source, root / "peft", "peft").out
    exported = load_exported(folder, threads=1)
    assert exported.task == LM
    assert torch.equal(exported.next_token_logits(sentences), reference)
    # without FedPEFT+: peft's own loader on the decoder with its LM head
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(cfg.model, attn_implementation="eager"), str(folder)
    )
    plain.eval()
    with torch.no_grad():
        logits = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[real], reference[real], rtol=0, atol=1e-5)
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"

    folder = export_module(source, root / "onnx", "onnx").out
    session = onnxruntime.InferenceSession(str(folder / ONNX_NAME), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    diff = float(np.abs(got - reference.numpy())[real.numpy()].max())
    assert diff <= ONNX_TOLERANCE, diff
    assert (got.argmax(-1)[real.numpy()] == reference.argmax(-1)[real].numpy()).all()
    assert json.loads((folder / MANIFEST_NAME).read_text())["onnx"]["max_abs_diff"] <= ONNX_TOLERANCE


def test_the_fedpeft_simulate_command_fine_tunes_a_decoder(
    llama: Path, texts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdk.cli import main

    argv = ["simulate", "--data", str(texts), "--model", str(llama), "--clients", "2", "--rounds", "1"]
    argv += ["--partition", "iid", "--samples-per-client", "12", "--test-samples", "8", "--workers", "1"]
    argv += ["--seq-len", "16", "--lr", "0.01"]
    assert main([*argv, "--report", str(tmp_path / "lm.json")]) == 0
    report = json.loads((tmp_path / "lm.json").read_text())
    validate_report(report)
    assert report["rejected"] == []
    assert [r["round"] for r in report["rounds"]] == [1] and report["rounds"][0]["participants"] == 2
    assert all(c["engine"] == "torch" and c["updates_accepted"] == 1 for c in report["clients"])
    final, last = report["final"], report["rounds"][-1]
    assert final["task"] == LM
    assert final["accuracy"] == final["next_token_accuracy"] == last["next_token_accuracy"]
    assert final["perplexity"] == last["perplexity"] == pytest.approx(math.exp(last["loss"]))
    train = report["config"]["train"]
    assert (train["task"], train["logit_adjust"]) == (LM, 0.0)
    assert train["peft"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    out = capsys.readouterr()
    assert (
        f"final next-token accuracy {final['accuracy']:.3f}, perplexity {final['perplexity']:.2f}" in out.out
    )


def test_simulate_refuses_label_skew_and_serve_refuses_texts_without_labels(
    llama: Path, texts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdk.cli import main

    config = SimulationConfig(data=str(texts), model=str(llama), clients=2, rounds=1, partition="shards:2")
    with pytest.raises(
        ConfigError, match=r"skews labels; causal-LM fine-tuning has none: use --partition iid"
    ):
        Simulation(config).run()
    argv = ["serve", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--rounds", "1", "--min-clients", "1"]
    argv += ["--data", str(texts), "--model", str(llama), "--report", str(tmp_path / "r.json")]
    assert main([*argv, "--state", str(tmp_path / "state")]) == 2
    assert "fedpeft serve does not take causal-LM fine-tuning data yet" in capsys.readouterr().err


def test_centralized_fine_tunes_a_decoder_on_the_union(
    llama: Path, texts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdk.cli import main

    common = ["centralized", "--data", str(texts), "--model", str(llama), "--clients", "2", "--rounds", "2"]
    common += ["--samples-per-client", "12", "--test-samples", "8", "--lr", "0.01", "--seq-len", "16"]
    assert main([*common, "--partition", "iid", "--report", str(tmp_path / "c.json")]) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    validate_report(report)
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert report["final"]["task"] == LM
    assert report["final"]["perplexity"] == report["rounds"][-1]["perplexity"]
    assert report["rounds"][-1]["loss"] < report["rounds"][0]["loss"]  # it trained
    assert "centralized next-token accuracy" in capsys.readouterr().out
