"""Exporting a trained module: a peft adapter that loads back with the torch engine's logits, an ONNX
model whose onnxruntime logits match torch's, and ``fedpeft export`` on real state folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from broker_server.evaluation import Evaluator
from broker_server.service import AggregationService, ServiceConfig
from broker_server.state import ASSIGNMENT_KEY, TRAIN_CONFIG_KEY, StateStore
from edge_runtime import wire
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ConfigError, ShapeMismatch
from edge_runtime.module_store import GLOBAL_MODULE, PERSONAL_MODULE, ModuleStore
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, PromptSpec
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from sdk.cli import main
from sdk.export import (
    HEAD_NAME,
    MANIFEST_NAME,
    ONNX_NAME,
    ONNX_TOLERANCE,
    ModuleSource,
    _encode,
    export_onnx,
    export_peft,
    load_exported,
    module_name,
    peft_key,
    read_module,
)
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

TEXTS = (
    "The striker scored twice and the coach was pleased with the season.",
    "Shares fell after the bank reported lower earnings.",
    "A rocket launch to the moon",
    "ok",
)
SEQ_LEN = 32
TARGETS = ("query", "key", "value", "attention.output.dense")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: keep to one core
    yield
    torch.set_num_threads(before)


def _logits(engine: TorchEngine, texts: tuple[str, ...] = TEXTS) -> torch.Tensor:
    input_ids, mask = _encode(engine.tokenizer, texts, engine.config.seq_len)
    with torch.no_grad():
        logits: torch.Tensor = engine.model(input_ids, mask)
    return logits


# --- names, without a model -------------------------------------------------------------------------


def test_project_names_map_to_peft_keys_and_back() -> None:
    name = "encoder.encoder.layer.3.attention.self.query.lora_A"
    assert peft_key(name) == "base_model.model.encoder.layer.3.attention.self.query.lora_A.weight"
    param = "base_model.model.encoder.layer.3.attention.output.dense.lora_B.default.weight"
    assert module_name(param) == "encoder.encoder.layer.3.attention.output.dense.lora_B"
    for bad in ("head.weight", "encoder.encoder.layer.0.attention.output.adapter.down.weight", "lora_A"):
        with pytest.raises(ShapeMismatch, match="not a LoRA tensor"):
            peft_key(bad)


@pytest.mark.parametrize("spec", [AdapterSpec(bottleneck=4), PromptSpec(length=4)])
@pytest.mark.parametrize("export", [export_peft, export_onnx])
def test_other_kinds_are_refused_naming_what_is_supported(spec: Any, export: Any, tmp_path: Path) -> None:
    source = ModuleSource({}, TrainConfig(peft=spec, num_labels=2, seq_len=SEQ_LEN), "test")
    with pytest.raises(ConfigError, match=rf"'{spec.kind}' module \(supported: lora\)"):
        export(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the real MiniLM --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The bundled MiniLM with a LoRA module whose B factors and head are random (not a no-op)."""
    cfg = TrainConfig(peft=LoraSpec(rank=4, alpha=8.0, target_modules=TARGETS), num_labels=3, seq_len=SEQ_LEN)
    engine = TorchEngine(cfg, seed=0, threads=1)
    rng = np.random.default_rng(7)
    state = engine.trainable_state()
    for name, value in state.items():
        if name.endswith("lora_B"):  # zero at initialisation: made non-zero so the module acts
            state[name] = rng.normal(0.0, 0.05, value.shape).astype(np.float32)
    state["head.weight"] = rng.normal(0.0, 4.0, state["head.weight"].shape).astype(np.float32)
    state["head.bias"] = rng.normal(0.0, 1.0, state["head.bias"].shape).astype(np.float32)
    engine.load_trainable_state(state)
    reference = _logits(engine)
    with engine._frozen_base():
        base = _logits(engine)
    root = tmp_path_factory.mktemp("minilm-export")
    source = ModuleSource(state, cfg, "a random module on the bundled MiniLM")
    export_peft(source, root / "peft", threads=1)
    onnx = export_onnx(source, root / "onnx", threads=1)
    return {
        "state": state,
        "reference": reference,
        "base": base,
        "peft": root / "peft",
        "onnx": root / "onnx",
        "onnx_result": onnx,
    }


def test_real_minilm_round_trips_through_peft_with_identical_logits(minilm: dict[str, Any]) -> None:
    reference = minilm["reference"]
    assert (reference - minilm["base"]).abs().max() > 0.1  # the module changes the model
    exported = load_exported(minilm["peft"], threads=1)
    assert type(exported.model.encoder).__name__ == "PeftModel"
    got = exported.logits(TEXTS)
    assert torch.equal(got, reference), (got - reference).abs().max()


def test_the_peft_folder_is_peft_s_format_and_plain_peft_reproduces_the_logits(
    minilm: dict[str, Any],
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from edge_runtime.models import bundled_minilm_path

    folder = minilm["peft"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert len(saved) == 6 * len(TARGETS) * 2  # every layer, every target, A and B; no head
    state = minilm["state"]
    for factor, shape in (("lora_A", (4, 384)), ("lora_B", (384, 4))):  # peft's orientation: r x in, out x r
        key = f"base_model.model.encoder.layer.2.attention.self.value.{factor}.weight"
        assert tuple(saved[key].shape) == shape
        np.testing.assert_array_equal(
            saved[key].numpy(), state[f"encoder.encoder.layer.2.attention.self.value.{factor}"]
        )

    # what a user without FedPEFT+ does: peft on the base encoder, then the documented pooling and head
    base = AutoModel.from_pretrained(str(bundled_minilm_path()), attn_implementation="eager")
    adapted = PeftModel.from_pretrained(base, str(folder)).eval()
    head = load_file(str(folder / HEAD_NAME))
    batch = AutoTokenizer.from_pretrained(str(folder))(
        list(TEXTS), truncation=True, max_length=SEQ_LEN, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = adapted(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    logits = pooled @ head["weight"].T + head["bias"]
    assert torch.allclose(logits, minilm["reference"], atol=1e-5)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["format"] == "peft" and manifest["seq_len"] == SEQ_LEN and manifest["num_labels"] == 3


def test_real_minilm_onnx_export_matches_torch_in_onnxruntime(minilm: dict[str, Any]) -> None:
    import onnxruntime

    folder = minilm["onnx"]
    session = onnxruntime.InferenceSession(str(folder / ONNX_NAME), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    # other texts, batch size and length than the export traced and checked
    texts = (*TEXTS, "a fifth text, to change the batch size")
    engine_free = load_exported(minilm["peft"], threads=1)
    reference = engine_free.logits(texts).numpy()
    input_ids, mask = engine_free.encode(texts)
    logits, features = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
    diff = float(np.abs(logits - reference).max())
    assert diff <= ONNX_TOLERANCE, diff
    assert (logits.argmax(-1) == reference.argmax(-1)).all()
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    # the same texts as the torch engine's reference, and what the export measured
    ids4, mask4 = engine_free.encode(TEXTS)
    (logits4,) = session.run(["logits"], {"input_ids": ids4.numpy(), "attention_mask": mask4.numpy()})
    assert float(np.abs(logits4 - minilm["reference"].numpy()).max()) <= ONNX_TOLERANCE
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["onnx"]["max_abs_diff"] == minilm["onnx_result"].max_abs_diff <= ONNX_TOLERANCE
    assert manifest["onnx"]["lora"] == "merged into the base weights"


def test_export_refuses_a_non_empty_out_folder(minilm: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    source = ModuleSource(
        minilm["state"],
        TrainConfig(peft=LoraSpec(rank=4, alpha=8.0, target_modules=TARGETS), num_labels=3),
        "x",
    )
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_peft(source, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# --- state folders of a tiny real run ------------------------------------------------------------


def _train_now(agent: DeviceAgent) -> None:
    agent.run_pending()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One device, one round and a personalization phase, on a tiny BERT: the service's state
    folder and the device's, as ``fedpeft serve --state`` and ``fedpeft edge --state`` lay them out."""
    root = tmp_path_factory.mktemp("export-run")
    model = make_tiny_bert(root / "model")
    train, test = load_folder(write_text_folder(root / "data", per_class_train=8, per_class_test=2))
    cfg = TrainConfig(
        model=str(model), num_labels=3, seq_len=16, bits=32, batch_size=8, peft=LoraSpec(rank=2, alpha=4.0)
    )
    config = ServiceConfig(
        fleet="f", rounds=1, train=cfg, min_clients=1, expected_clients=1, round_timeout_s=30,
        head_init="random", personalize_epochs=1,
    )  # fmt: skip
    broker = InMemoryBroker()
    store = StateStore(root / "service" / "state.sqlite")
    service = AggregationService(
        InMemoryTransport(broker, "server"), config, Evaluator(cfg, test, seed=0, threads=1), store=store
    )
    service.start()
    agent = DeviceAgent(
        "pi-1",
        "f",
        InMemoryTransport(broker, "pi-1"),
        train.subset(np.arange(0, len(train), 2)),
        lambda c: TorchEngine(c, seed=0, threads=1),
        holdout=train.subset(np.arange(1, len(train), 2)),
        modules=ModuleStore(root / "device" / "modules"),
    )
    agent.on_ready = _train_now  # in-memory delivery is synchronous
    agent.start()
    service.run()
    store.close()
    assert agent.done.is_set() and agent.personal_state is not None
    return {"root": root, "cfg": cfg, "agent": agent, "final": service.final_state()}


def _engine_with(cfg: TrainConfig, state: dict[str, np.ndarray]) -> TorchEngine:
    engine = TorchEngine(cfg, seed=0, threads=1)
    engine.load_trainable_state(state)
    return engine


def test_a_device_keeps_its_final_and_personal_modules(run: dict[str, Any]) -> None:
    store = ModuleStore(run["root"] / "device" / "modules")
    assert store.names() == [GLOBAL_MODULE, PERSONAL_MODULE]
    personal, final = store.load(PERSONAL_MODULE), store.load(GLOBAL_MODULE)
    assert personal is not None and final is not None
    assert personal.device_id == "pi-1" and personal.config == run["agent"].config
    for name, value in run["agent"].personal_state.items():
        np.testing.assert_array_equal(personal.tensors[name], value)
    for name, value in run["final"].items():
        np.testing.assert_array_equal(final.tensors[name], value)
    assert not np.array_equal(personal.tensors["head.weight"], final.tensors["head.weight"])


def test_cli_exports_the_service_s_global_module_as_peft(
    run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out = run["root"] / "service-peft"
    assert (
        main(["export", "--state", str(run["root"] / "service"), "--format", "peft", "--out", str(out)]) == 0
    )
    assert "global module of round" in capsys.readouterr().out
    expected = _logits(_engine_with(run["cfg"], run["final"]))
    assert torch.equal(load_exported(out, threads=1).logits(TEXTS), expected)


def test_cli_exports_a_device_s_personalized_module_as_onnx(
    run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime

    out = run["root"] / "device-onnx"
    argv = ["export", "--state", str(run["root"] / "device"), "--device", "pi-1", "--format", "onnx"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "personalized module of device pi-1" in printed and "tolerance 0.0001" in printed
    engine = _engine_with(run["cfg"], run["agent"].personal_state)
    input_ids, mask = _encode(engine.tokenizer, TEXTS, 16)
    session = onnxruntime.InferenceSession(str(out / ONNX_NAME), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
    assert float(np.abs(logits - _logits(engine).numpy()).max()) <= ONNX_TOLERANCE


def test_cli_exports_a_device_s_global_module_when_asked(run: dict[str, Any]) -> None:
    out = run["root"] / "device-global"
    argv = ["export", "--state", str(run["root"] / "device"), "--module", "global", "--format", "peft"]
    assert main([*argv, "--out", str(out)]) == 0
    assert torch.equal(
        load_exported(out, threads=1).logits(TEXTS), _logits(_engine_with(run["cfg"], run["final"]))
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--state", "{root}/nowhere"], "does not exist"),
        (["--state", "{root}/model"], "is not a FedPEFT+ state folder"),
        (["--state", "{root}/service", "--device", "pi-9"], "unknown device 'pi-9'"),
        (["--state", "{root}/service", "--module", "personal"], "never holds personalized modules"),
        (["--state", "{root}/device", "--device", "pi-9"], "device 'pi-1', not of 'pi-9'"),
        (["--state", "{root}/service", "--out", "{root}/model"], "not an empty folder"),
    ],
)
def test_cli_bad_state_or_device_exits_2_with_one_line(
    run: dict[str, Any], args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export", "--format", "peft", *[a.format(root=run["root"]) for a in args]]
    if "--out" not in argv:
        argv += ["--out", str(run["root"] / "never-written")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not (run["root"] / "never-written").exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["export", "--state", "x", "--format", "tflite", "--out", "y"], "invalid choice: 'tflite'"),
        (["export", "--state", "x", "--format", "peft"], "--out"),
        (["export", "--state", "x", "--out", "y", "--format", "peft", "--module", "mine"], "invalid choice"),
    ],
)
def test_cli_bad_flags_exit_2(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_a_device_folder_without_modules_says_so(tmp_path: Path) -> None:
    (tmp_path / "outbox").mkdir()  # what fedpeft edge leaves before its run ends
    with pytest.raises(ConfigError, match="holds no trained module"):
        read_module(tmp_path)


# --- service state folders of clustered and mixed fleets, built with the store's own classes -------


def _service_state(folder: Path, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    store = StateStore(folder / "state.sqlite")
    for device in ("a", "b"):
        hello = wire.Hello(device_id=device, profile={}, num_samples=1, label_histogram=(1, 0))
        store.save_device(device, wire.encode_hello(hello), 0.0)
    payload = wire.encode_global(wire.GlobalModule(round=3, config_id="c", tensors=tensors))
    store.save_global(3, wire.content_id(payload), payload)
    for key, value in meta.items():
        store.set_meta(key, value)
    store.close()
    return folder


def test_a_clustered_service_state_exports_the_device_s_cluster_module(tmp_path: Path) -> None:
    cfg = TrainConfig(num_labels=2)
    tensors = {f"cluster{c}/head.bias": np.full(2, float(c), np.float32) for c in (0, 1)}
    meta = {
        TRAIN_CONFIG_KEY: cfg.to_dict(),
        "clusters": {"members": {"a": 0, "b": 1}, "centroids": [[1.0, 0.0], [0.0, 1.0]], "silhouette": 0.5},
    }
    folder = _service_state(tmp_path, tensors, meta)
    with pytest.raises(ConfigError, match="one global module per cluster: pass --device"):
        read_module(folder)
    source = read_module(folder, device="b")
    np.testing.assert_array_equal(source.tensors["head.bias"], [1.0, 1.0])
    assert source.config == cfg and "cluster 1" in source.origin and not source.union


def test_a_mixed_fleet_s_state_exports_the_device_s_assigned_view(tmp_path: Path) -> None:
    fleet = TrainConfig(num_labels=2, peft=LoraSpec(rank=8, alpha=16.0))
    small = TrainConfig(num_labels=2, peft=LoraSpec(rank=2, alpha=4.0))
    tensors = {"encoder.encoder.layer.0.attention.self.query.lora_A": np.ones((8, 4), np.float32)}
    meta = {
        TRAIN_CONFIG_KEY: fleet.to_dict(),
        ASSIGNMENT_KEY + "a": {"config": small.to_dict(), "excluded": "", "terms": None},
        ASSIGNMENT_KEY + "b": {"config": fleet.to_dict(), "excluded": "too little memory", "terms": None},
    }
    folder = _service_state(tmp_path, tensors, meta)
    with pytest.raises(ConfigError, match="mixed fleet"):
        read_module(folder)
    with pytest.raises(ConfigError, match="left out of the run: too little memory"):
        read_module(folder, device="b")
    source = read_module(folder, device="a")
    assert source.union and source.config == small  # the export cuts rank 2 out of the rank-8 state


def test_a_mixed_fleet_device_s_export_is_its_rank_cut_from_the_global_state(
    run: dict[str, Any], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    model = run["cfg"].model
    fleet = TrainConfig(model=model, num_labels=3, seq_len=16, peft=LoraSpec(rank=8, alpha=16.0))
    small = TrainConfig(model=model, num_labels=3, seq_len=16, peft=LoraSpec(rank=2, alpha=4.0))
    rng = np.random.default_rng(3)
    state = {
        k: rng.normal(0.0, 0.2, v.shape).astype(np.float32)
        for k, v in TorchEngine(fleet, seed=0, threads=1).trainable_state().items()
    }
    assignment = {"config": small.to_dict(), "excluded": "", "terms": None}
    folder = _service_state(
        tmp_path / "state", state, {TRAIN_CONFIG_KEY: fleet.to_dict(), ASSIGNMENT_KEY + "a": assignment}
    )
    out = tmp_path / "a"
    export_peft(read_module(folder, device="a"), out, threads=1)
    saved = load_file(str(out / "adapter_model.safetensors"))
    name = "encoder.layer.1.attention.self.query"
    np.testing.assert_array_equal(
        saved[f"base_model.model.{name}.lora_A.weight"], state[f"encoder.{name}.lora_A"][:2]
    )
    np.testing.assert_array_equal(
        saved[f"base_model.model.{name}.lora_B.weight"], state[f"encoder.{name}.lora_B"][:, :2]
    )
    cut = {
        k: v[:2] if k.endswith("lora_A") else v[:, :2] if k.endswith("lora_B") else v
        for k, v in state.items()
    }
    assert torch.equal(load_exported(out, threads=1).logits(TEXTS), _logits(_engine_with(small, cut)))


def test_a_service_state_without_its_configuration_says_so(tmp_path: Path) -> None:
    folder = _service_state(tmp_path, {"head.bias": np.zeros(2, np.float32)}, {})
    with pytest.raises(ConfigError, match="does not record its training configuration"):
        read_module(folder)
