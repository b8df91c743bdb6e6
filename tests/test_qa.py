"""Extractive question answering: SQuAD's metrics against hand-computed cases, the span search, the
JSON-lines loader and its errors, the span head on tiny random BERT-family encoders, a 2-client
1-round federation (in memory and through the simulator) and the refusals of classification-only
options.

Every model here is random-initialised and every question is generated: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server.evaluation import Evaluator
from broker_server.report import validate_report
from broker_server.service import AggregationService, ServiceConfig
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import QADataset, TextDataset, load_folder, load_labels, load_split
from edge_runtime.errors import ConfigError, DataFormatError, EngineError
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, PromptSpec
from edge_runtime.qa_data import Answer, is_qa_folder, read_qa_file
from edge_runtime.qa_eval import (
    answer_token_span,
    best_span,
    exact_match,
    normalize_answer,
    squad_scores,
    token_f1,
)
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from sdk.simulate import Simulation, SimulationConfig
from tests.helpers import qa_record, write_qa_folder, write_text_folder
from tests.tiny_model import make_tiny_bert, make_tiny_model, make_tiny_vit

QA = "question-answering"
BERT_LORA = LoraSpec(rank=4, target_modules=("query", "value"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qa_folder(tmp_path_factory.mktemp("qa") / "data")


def _config(model: Path, spec: Any = BERT_LORA, **kw: Any) -> TrainConfig:
    values: dict[str, Any] = {"batch_size": 8, "lr": 1e-2, "head_lr": 1e-2, "logit_adjust": 0.0}
    return TrainConfig(peft=spec, model=str(model), num_labels=2, task=QA, **(values | kw))


# --- SQuAD's metrics, by hand ---------------------------------------------------------------------


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces() -> None:
    assert normalize_answer("The  Big, RED car!") == "big red car"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles are whole words only


def test_exact_match_is_after_normalisation_and_takes_the_best_gold() -> None:
    assert exact_match("The red car.", ["red car"]) == 1.0
    assert exact_match("red", ["red car", "blue"]) == 0.0
    assert exact_match("blue", ["red car", "Blue"]) == 1.0


def test_token_f1_by_hand() -> None:
    # prediction tokens big red car, gold red car: 2 shared, precision 2/3, recall 1 -> 0.8
    assert token_f1("the big red car", ["red car"]) == pytest.approx(0.8)
    # bags, not sets: red red car against red car car shares one red and one car -> 2/3
    assert token_f1("red red car", ["red car car"]) == pytest.approx(2 / 3)
    assert token_f1("blue", ["red car"]) == 0.0
    # the best gold: red against red car, precision 1, recall 1/2 -> 2/3
    assert token_f1("red", ["blue", "red car"]) == pytest.approx(2 / 3)
    # answers that normalise to nothing: F1 1 when both do (an exact match), else 0
    assert token_f1("the", ["a"]) == 1.0 and exact_match("the", ["a"]) == 1.0
    assert token_f1("the", ["red"]) == 0.0


def test_squad_scores_are_means_over_questions() -> None:
    assert squad_scores(["red car", "blue"], [["red car"], ["red"]]) == (0.5, 0.5)
    em, f1 = squad_scores(["the big red car", "red"], [["red car"], ["blue", "red car"]])
    assert em == 0.0
    assert f1 == pytest.approx((0.8 + 2 / 3) / 2)
    with pytest.raises(ConfigError, match="one prediction per question"):
        squad_scores(["a"], [["a"], ["b"]])


def test_best_span_keeps_to_the_context_to_order_and_to_the_length_limit() -> None:
    start = np.array([5.0, 0.0, 1.0, 3.0, 0.0])
    end = np.array([9.0, 0.0, 2.0, 1.0, 4.0])
    context = np.array([False, True, True, True, True])  # token 0 ([CLS]) would win if allowed
    assert best_span(start, end, context) == (3, 4)  # 3 + 4
    assert best_span(start, end, np.ones(5, dtype=bool)) == (0, 0)  # 5 + 9
    # one-token spans: (3,3) and (4,4) both score 4; the earlier start wins
    assert best_span(start, end, context, max_tokens=1) == (3, 3)
    # an end before its start never counts, even where its sum is the largest (5 + 5 at (1, 0))
    assert best_span(np.array([0.0, 5.0, 0.0]), np.array([5.0, 0.0, 0.0]), np.ones(3, dtype=bool)) == (0, 0)
    with pytest.raises(ConfigError, match="no token is allowed"):
        best_span(start, end, np.zeros(5, dtype=bool))


def test_answer_token_span_maps_characters_to_the_covering_tokens() -> None:
    # [CLS] question [SEP] the red car [SEP], the context "the red car"
    offsets = [(0, 0), (0, 4), (0, 0), (0, 3), (4, 7), (8, 11), (0, 0)]
    inside = [False, False, False, True, True, True, False]
    assert answer_token_span(offsets, inside, 4, 7) == (4, 4)  # red
    assert answer_token_span(offsets, inside, 4, 11) == (4, 5)  # red car
    assert answer_token_span(offsets, inside, 5, 7) == (4, 4)  # part of a token: the whole token
    # the context truncated after "red": car is out of the window
    assert answer_token_span([*offsets[:5], (0, 0)], [*inside[:5], False], 8, 11) is None


# --- the loader -----------------------------------------------------------------------------------


def test_a_qa_folder_loads_with_every_gold_answer(qa: Path) -> None:
    assert is_qa_folder(qa)
    train, test = load_folder(qa)
    assert isinstance(train, QADataset) and isinstance(test, QADataset)
    assert (len(train), len(test)) == (48, 12)
    assert train.task == QA == test.task
    first = qa_record(0)
    assert (train.ids[0], train.contexts[0], train.questions[0]) == (
        first["id"],
        first["context"],
        first["question"],
    )
    multi = [i for i, golds in enumerate(train.answers) if len(golds) == 2]
    assert multi, "the helper gives some questions two gold answers"
    for i in multi:
        colour, with_noun = train.answers[i]
        assert with_noun.text == f"{colour.text} car" and with_noun.start == colour.start
    for context, golds in zip(train.contexts, train.answers, strict=True):
        assert all(context[a.start : a.end] == a.text for a in golds)
    # no classes: one pseudo-class, so the label-based parts see one shape
    assert load_labels(qa) == ("answer",) == train.label_names
    assert train.label_histogram().tolist() == [48]
    assert isinstance(load_split(qa, "test"), QADataset)
    sample = load_split(qa, "train", limit=10, seed=3)
    assert len(sample) == 10 and set(sample.ids) <= set(train.ids)


def test_a_text_folder_is_not_read_as_questions(tmp_path: Path) -> None:
    folder = write_text_folder(tmp_path / "texts")
    assert not is_qa_folder(folder)
    assert isinstance(load_folder(folder)[0], TextDataset)


GOOD = json.dumps(qa_record(0))
BAD_RECORDS = [
    ("{", "invalid JSON"),
    ('["a list"]', "expected a JSON object with id, context, question, answers"),
    (json.dumps({k: v for k, v in qa_record(1).items() if k != "context"}), "'context' is missing"),
    (json.dumps(qa_record(1) | {"question": "  "}), "'question' is empty"),
    (json.dumps(qa_record(1) | {"id": 7}), "'id' must be a string, got int"),
    (json.dumps(qa_record(0)), "id 'q0' repeats line 1"),
    (json.dumps(qa_record(1) | {"answers": {"text": "red"}}), "'answers' must be a list, got dict"),
    (json.dumps(qa_record(1) | {"answers": []}), "unanswerable questions (SQuAD 2.0) are not supported"),
    (json.dumps(qa_record(1) | {"answers": ["blue"]}), "answers[0] must be an object"),
    (
        json.dumps(qa_record(1) | {"answers": [{"text": "blue", "answer_start": True}]}),
        "answers[0].answer_start must be a non-negative integer, got True",
    ),
    (
        json.dumps(qa_record(1) | {"answers": [{"text": "", "answer_start": 0}]}),
        "answers[0].text must be a non-empty string",
    ),
    (
        json.dumps(qa_record(1) | {"answers": [{"text": "blue", "answer_start": 0}]}),
        "answers[0].text 'blue' is not in the context at answer_start 0 (the context has 'anna' there)",
    ),
]


@pytest.mark.parametrize(("line", "message"), BAD_RECORDS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_bad_record_names_its_file_line_and_fault(
    tmp_path: Path, split: str, line: str, message: str
) -> None:
    folder = write_qa_folder(tmp_path / "data", train=4, test=2)
    path = folder / f"{split}.jsonl"
    path.write_text(GOOD + "\n" + line + "\n")
    with pytest.raises(DataFormatError) as caught:
        load_folder(folder)
    assert str(caught.value).startswith(f"{path}:2: ")
    assert message in str(caught.value)
    assert (caught.value.path, caught.value.line) == (str(path), 2)


def test_an_empty_split_and_a_missing_split_are_errors(tmp_path: Path) -> None:
    folder = write_qa_folder(tmp_path / "data", train=4, test=2)
    (folder / "test.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match=r"test\.jsonl: the file holds no questions"):
        load_folder(folder)
    (folder / "test.jsonl").unlink()
    with pytest.raises(DataFormatError, match=r"no test\.jsonl in this question answering folder"):
        load_folder(folder)
    assert len(read_qa_file(folder / "train.jsonl")) == 4


def test_qa_dataset_checks_its_spans() -> None:
    with pytest.raises(ConfigError, match="is not a span of context 0"):
        QADataset(("q",), ("the red car",), ("what?",), ((Answer("blue", 4),),))
    with pytest.raises(ConfigError, match="every question needs an answer"):
        QADataset(("q",), ("the red car",), ("what?",), ((),))


# --- the span head in the torch engine ------------------------------------------------------------


def test_lora_on_a_tiny_bert_learns_to_answer(bert: Path, qa: Path) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    train, test = load_folder(qa)
    engine = TorchEngine(_config(bert), seed=0, threads=1)
    state = engine.trainable_state()
    assert state["head.weight"].shape == (2, 32) and state["head.bias"].shape == (2,)
    before = engine.evaluate(test)
    engine.train(train, epochs=15, seed=0)
    after = engine.evaluate(test)
    assert after.task == QA
    assert after.accuracy >= 0.9 and after.accuracy > before.accuracy
    assert after.macro_f1 >= after.accuracy  # an exact match has F1 1
    assert after.loss < before.loss
    # the predictions are spans of their contexts, scored as SQuAD scores them
    assert all(p in c for p, c in zip(after.predictions, test.contexts, strict=True))
    golds = [[a.text for a in g] for g in test.answers]
    assert squad_scores(list(after.predictions), golds) == (after.accuracy, after.macro_f1)


@pytest.mark.parametrize("model_type", ["roberta", "distilbert"])
def test_the_other_bert_family_encoders_train_a_span_head(tmp_path: Path, qa: Path, model_type: str) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    model = make_tiny_model(tmp_path / model_type, model_type)
    targets = ("q_lin", "v_lin") if model_type == "distilbert" else ("query", "value")
    engine = TorchEngine(_config(model, LoraSpec(rank=4, target_modules=targets)), seed=0, threads=1)
    train, test = load_folder(qa)
    start = engine.trainable_state()
    result = engine.train(train, epochs=1, seed=0)
    assert np.isfinite(result.loss) and result.steps == 6
    moved = engine.trainable_state()
    assert any(not np.array_equal(moved[k], start[k]) for k in start if k.endswith(".lora_B"))
    evaluated = engine.evaluate(test)
    assert 0.0 <= evaluated.accuracy <= evaluated.macro_f1 <= 1.0


@pytest.mark.parametrize("spec", [AdapterSpec(bottleneck=4), PromptSpec(length=4)], ids=["adapter", "prompt"])
def test_adapters_and_prompts_train_a_span_head_too(bert: Path, qa: Path, spec: Any) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    engine = TorchEngine(_config(bert, spec, seq_len=64), seed=0, threads=1)
    train, test = load_folder(qa)
    start = engine.trainable_state()
    engine.train(train, epochs=1, seed=0)
    assert any(not np.array_equal(v, start[k]) for k, v in engine.trainable_state().items())
    evaluated = engine.evaluate(test)
    # the prompt's positions are never candidates: every prediction is a span of its context
    assert all(p and p in c for p, c in zip(evaluated.predictions, test.contexts, strict=True))


def test_an_answer_truncated_away_trains_toward_the_first_token(bert: Path) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    context = "one two three four five six seven eight nine ten eleven twelve the answer is red ."
    data = QADataset(
        ("far", "near"),
        (context, "red is the answer ."),
        ("which colour ?", "which colour ?"),
        ((Answer("red", context.index("red")),), (Answer("red", 0),)),
    )
    engine = TorchEngine(_config(bert, seq_len=12), seed=0, threads=1)
    inputs = engine._inputs(data)
    assert all(len(ids) <= 12 for ids in inputs.input_ids)
    assert (inputs.starts[0], inputs.ends[0]) == (0, 0)  # [CLS]: the answer is past the window
    near = inputs.input_ids[1][inputs.starts[1]]
    assert engine.tokenizer.convert_ids_to_tokens(near) == "red"
    evaluated = engine.evaluate(data)
    assert all(p in c for p, c in zip(evaluated.predictions, data.contexts, strict=True))


def test_a_question_that_leaves_no_room_for_its_context_is_named(bert: Path) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    data = QADataset(("long",), ("red .",), (" ".join(["what"] * 20),), ((Answer("red", 0),),))
    engine = TorchEngine(_config(bert, seq_len=16), seed=0, threads=1)
    with pytest.raises(ConfigError, match="question 'long' takes 20 tokens, which leaves no room"):
        engine.evaluate(data)


def test_classification_only_parts_of_the_engine_refuse_question_answering(bert: Path, qa: Path) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    train, _ = load_folder(qa)
    engine = TorchEngine(_config(bert), seed=0, threads=1)
    with pytest.raises(EngineError, match=r"class-mean head .* is for classification"):
        engine.class_feature_sums(train)
    with pytest.raises(EngineError, match="class probabilities is for classification"):
        engine.predict_proba(train)
    with pytest.raises(EngineError, match="distillation toward class probabilities is for classification"):
        engine.distill(train, np.full((len(train), 2), 0.5), alpha=0.5, epochs=1, seed=0)


def test_data_and_task_must_match(bert: Path, qa: Path, tmp_path: Path) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    questions, _ = load_folder(qa)
    texts, _ = load_folder(write_text_folder(tmp_path / "texts"))
    classifier = TorchEngine(TrainConfig(peft=BERT_LORA, model=str(bert), num_labels=3), seed=0, threads=1)
    with pytest.raises(
        ConfigError, match="the data is for question-answering but this engine trains classification"
    ):
        classifier.train(questions, epochs=1, seed=0)
    reader = TorchEngine(_config(bert), seed=0, threads=1)
    with pytest.raises(
        ConfigError, match="the data is for classification but this engine trains question-answering"
    ):
        reader.train(texts, epochs=1, seed=0)


def test_families_without_question_answering_are_refused_by_name(tmp_path: Path, qa: Path) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    vit = make_tiny_vit(tmp_path / "vit")
    with pytest.raises(ConfigError, match=r"is a vit model: question answering trains BERT-family encoders"):
        TorchEngine(_config(vit), seed=0, threads=1)
    llama = make_tiny_model(tmp_path / "llama", "llama")
    with pytest.raises(
        ConfigError, match=r"is a llama model: question answering trains BERT-family encoders"
    ):
        TorchEngine(_config(llama, LoraSpec(rank=4, target_modules=("q_proj",))), seed=0, threads=1)


def test_the_task_is_validated_and_travels_only_when_it_is_not_classification(bert: Path) -> None:
    with pytest.raises(ConfigError, match="num_labels must be 2 for question-answering"):
        TrainConfig(model=str(bert), num_labels=3, task=QA)
    with pytest.raises(ConfigError, match=r"TrainConfig\.task is invalid: 'summarization'"):
        TrainConfig(task="summarization")
    cfg = _config(bert)
    assert cfg.to_dict()["task"] == QA
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert "task" not in TrainConfig().to_dict()  # classification keeps its content address


# --- federated: 2 clients, 1 round ----------------------------------------------------------------


def test_the_class_mean_start_is_refused_for_question_answering(bert: Path) -> None:
    with pytest.raises(ConfigError, match="head_init 'ncm' builds the head from class means"):
        ServiceConfig(fleet="qa", rounds=1, train=_config(bert))


def test_two_clients_one_round_over_the_in_memory_transport(bert: Path, qa: Path) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    train, test = load_folder(qa)
    cfg = _config(bert, bits=32)
    broker = InMemoryBroker()
    service_cfg = ServiceConfig(
        fleet="qa",
        rounds=1,
        train=cfg,
        min_clients=2,
        expected_clients=2,
        round_timeout_s=60,
        head_init="random",
    )
    evaluator = Evaluator(cfg, test, seed=0, threads=1)
    initial = evaluator.initial_state()
    service = AggregationService(InMemoryTransport(broker, "server"), service_cfg, evaluator)
    service.start()
    agents = []
    for i in range(2):
        agent = DeviceAgent(
            f"d{i}",
            "qa",
            InMemoryTransport(broker, f"d{i}"),
            train.subset(np.arange(i, len(train), 2)),
            lambda c: TorchEngine(c, seed=0, threads=1),
        )
        agent.on_ready = lambda a: a.run_pending()
        agents.append(agent)
    for agent in agents:
        agent.start()
    service.run()

    assert [r["round"] for r in service.rounds] == [1]  # no class-mean round 0
    record = service.rounds[0]
    assert record["participants"] == 2 and service.rejected == []
    final = service.final_state()
    assert all(not np.array_equal(final[k], initial[k]) for k in final if k.endswith(".lora_B"))
    # the round's figures are those of the aggregated module on the test questions
    engine = TorchEngine(cfg, seed=0, threads=1)
    engine.load_trainable_state(final)
    expected = engine.evaluate(test)
    assert record["exact_match"] == record["accuracy"] == pytest.approx(expected.accuracy)
    assert record["f1"] == record["macro_f1"] == pytest.approx(expected.macro_f1)
    assert record["loss"] == pytest.approx(expected.loss, rel=1e-4)


def test_fedpeft_simulate_runs_question_answering_and_reports_em_and_f1(bert: Path, qa: Path) -> None:
    config = SimulationConfig(
        data=str(qa),
        model=str(bert),
        clients=2,
        rounds=1,
        partition="iid",
        samples_per_client=12,
        test_samples=12,
        bits=8,
        workers=1,
        round_timeout_s=60.0,
        lr=1e-2,
    )
    report = Simulation(config).run()
    validate_report(report)
    assert report["rejected"] == []
    assert [r["round"] for r in report["rounds"]] == [1]
    last = report["rounds"][-1]
    assert last["participants"] == 2
    assert all(c["engine"] == "torch" and c["updates_accepted"] == 1 for c in report["clients"])
    assert sum(c["samples"] for c in report["clients"]) == 24
    final = report["final"]
    assert final["task"] == QA
    assert final["exact_match"] == final["accuracy"] == last["exact_match"]
    assert final["f1"] == final["macro_f1"] == last["f1"]
    assert 0.0 <= final["exact_match"] <= final["f1"] <= 1.0
    train = report["config"]["train"]
    assert (train["task"], train["num_labels"], train["logit_adjust"]) == (QA, 2, 0.0)


def test_the_fedpeft_simulate_command_runs_question_answering(
    bert: Path, qa: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdk.cli import main

    argv = ["simulate", "--data", str(qa), "--model", str(bert), "--clients", "2", "--rounds", "1"]
    argv += ["--partition", "iid", "--samples-per-client", "12", "--test-samples", "12", "--workers", "1"]
    assert main([*argv, "--report", str(tmp_path / "qa.json")]) == 0
    report = json.loads((tmp_path / "qa.json").read_text())
    validate_report(report)
    assert [r["round"] for r in report["rounds"]] == [1] and report["rounds"][0]["participants"] == 2
    final = report["final"]
    out = capsys.readouterr()
    assert f"final exact match {final['exact_match']:.3f}, F1 {final['f1']:.3f}" in out.out
    assert "round 1/1" in out.err  # the progress bar: no class-mean round 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"engine": "ort"}, "--engine ort: the ONNX Runtime engines train classification only"),
        ({"engine": "mixed"}, "--engine mixed: the ONNX Runtime engines train classification only"),
        ({"partition": "dirichlet:0.5"}, "--partition dirichlet:0.5 skews labels; .* use --partition iid"),
        ({"personalize_epochs": 1}, "--personalize-epochs starts from the device's label prior"),
        ({"clusters": "2"}, "--clusters groups devices by their label histograms"),
        ({"profiles": "low=0.5,high=0.5"}, "--profiles/--allocation utility\\|uniform is not supported"),
        (
            {"profiles": "low=0.5,high=0.5", "distill_epochs": 1},
            "--distill-epochs distills toward class probabilities",
        ),
    ],
)
def test_simulate_refuses_classification_only_options_for_questions(
    bert: Path, qa: Path, options: dict[str, Any], message: str
) -> None:
    options = {"partition": "iid"} | options
    config = SimulationConfig(data=str(qa), model=str(bert), clients=2, rounds=1, **options)
    with pytest.raises(ConfigError, match=message + r".*\(the data folder holds question answering data\)"):
        Simulation(config).run()


def test_simulate_refuses_an_image_model_for_questions(tmp_path: Path, qa: Path) -> None:
    vit = make_tiny_vit(tmp_path / "vit")
    config = SimulationConfig(data=str(qa), model=str(vit), clients=2, rounds=1, partition="iid")
    with pytest.raises(ConfigError, match=r"holds question answering data, but model .* is a vit model"):
        Simulation(config).run()


def test_serve_refuses_question_answering_in_one_line(
    bert: Path, qa: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdk.cli import main

    argv = ["serve", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--rounds", "1", "--min-clients", "1"]
    argv += ["--data", str(qa), "--model", str(bert), "--report", str(tmp_path / "r.json")]
    assert main([*argv, "--state", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "fedpeft serve does not take question answering data yet; fedpeft simulate trains it" in err


def test_centralized_trains_question_answering_on_the_union(
    bert: Path, qa: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdk.cli import main

    common = ["centralized", "--data", str(qa), "--model", str(bert), "--clients", "2", "--rounds", "2"]
    common += ["--samples-per-client", "12", "--test-samples", "12", "--lr", "0.01"]
    assert main([*common, "--partition", "dirichlet:0.5", "--report", str(tmp_path / "no.json")]) == 2
    assert "use --partition iid" in capsys.readouterr().err
    assert main([*common, "--partition", "iid", "--report", str(tmp_path / "c.json")]) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    validate_report(report)
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]  # before training, then each epoch
    assert all(r["exact_match"] == r["accuracy"] and r["f1"] == r["macro_f1"] for r in report["rounds"])
    assert report["final"]["task"] == QA
    assert report["final"]["exact_match"] == report["rounds"][-1]["exact_match"]
    assert report["config"]["train"]["task"] == QA and report["config"]["train_samples"] == 24
    assert report["rounds"][-1]["loss"] < report["rounds"][0]["loss"]  # it trained
    assert "centralized exact match" in capsys.readouterr().out


@pytest.mark.parametrize("engine", ["ort", "ort-plain"])
def test_the_onnx_runtime_engines_refuse_question_answering(bert: Path, engine: str, tmp_path: Path) -> None:
    from edge_runtime.engines import create_engine

    with pytest.raises(
        ConfigError, match=f"the {engine} engine trains classification only; question-answering"
    ):
        create_engine(_config(bert, engine=engine), artifacts=tmp_path)


def test_the_onnx_runtime_engines_refuse_question_data_naming_torch(qa: Path) -> None:
    from edge_runtime.engines.base import require_text

    train, _ = load_folder(qa)
    with pytest.raises(ConfigError, match="question answering trains with --engine torch"):
        require_text(train)


def test_the_edge_install_reads_questions_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import edge_runtime.data, edge_runtime.qa_data, edge_runtime.qa_eval; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
