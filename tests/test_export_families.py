"""Export on every text family: a tiny random BERT, RoBERTa, DistilBERT and LLaMA each run a
2-device, 1-round federation with LoRA on their own attention projections; ``fedpeft export``
writes the service's global module as a peft adapter that loads back with the torch engine's
logits, and as an ONNX model whose onnxruntime logits match the torch engine's.

LLaMA is the family most at risk: its classifier reads the last real token rather than the mean,
and transformers' causal-mask code does not trace for ``torch.onnx.export``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from broker_server.evaluation import Evaluator
from broker_server.service import ServiceConfig
from broker_server.state import StateStore
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.families import FAMILIES, family_of_dir
from edge_runtime.peft_specs import LoraSpec
from sdk.cli import main
from sdk.export import MANIFEST_NAME, ONNX_NAME, ONNX_TOLERANCE, _encode, load_exported
from tests.federations import federate_in_memory
from tests.helpers import write_text_folder
from tests.tiny_model import TINY_FAMILIES, make_tiny_model

SEQ_LEN = 24
# texts the export neither traced nor checked, of several lengths, so rows are padded differently
TEXTS = (
    "The striker scored twice and the coach was pleased with the season.",
    "ok",
    "Shares fell after the bank reported lower earnings than investors expected.",
    "A rocket launch",
    "the league title",
    "Rain is expected on the coast tomorrow",
    "a",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: keep to one core
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def federated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two devices, one round, on a tiny model of one family: the service's state folder."""
    model_type: str = request.param
    root = tmp_path_factory.mktemp(f"export-{model_type}")
    model = make_tiny_model(root / "model", model_type)
    targets = family_of_dir(str(model)).lora_modules(("attention",))
    train, test = load_folder(write_text_folder(root / "data", per_class_train=8, per_class_test=2))
    cfg = TrainConfig(
        model=str(model), num_labels=3, seq_len=SEQ_LEN, bits=32, batch_size=4, lr=3e-2,
        peft=LoraSpec(rank=2, alpha=4.0, target_modules=targets),
    )  # fmt: skip
    config = ServiceConfig(
        fleet="f", rounds=1, train=cfg, min_clients=2, expected_clients=2, round_timeout_s=60,
        head_init="random",
    )  # fmt: skip
    store = StateStore(root / "service" / "state.sqlite")
    service, agents = federate_in_memory(config, train, Evaluator(cfg, test, seed=0, threads=1), store=store)
    store.close()
    assert all(a.done.is_set() for a in agents)
    return {"root": root, "cfg": cfg, "final": service.final_state(), "model_type": model_type}


def _engine_logits(cfg: TrainConfig, state: dict[str, np.ndarray]) -> tuple[TorchEngine, torch.Tensor]:
    engine = TorchEngine(cfg, seed=0, threads=1)
    engine.load_trainable_state(state)
    input_ids, mask = _encode(engine.tokenizer, TEXTS, cfg.seq_len)
    with torch.no_grad():
        logits: torch.Tensor = engine.model(input_ids, mask)
    return engine, logits


def _export(federated: dict[str, Any], fmt: str) -> Path:
    out: Path = federated["root"] / f"export-{fmt}"
    argv = ["export", "--state", str(federated["root"] / "service"), "--format", fmt, "--out", str(out)]
    assert main(argv) == 0
    return out


def test_the_round_moved_the_lora_module_on_the_familys_own_projections(federated: dict[str, Any]) -> None:
    family = FAMILIES["bert" if federated["model_type"] == "roberta" else federated["model_type"]]
    b_factors = {n: v for n, v in federated["final"].items() if n.endswith("lora_B")}
    assert b_factors, "no LoRA tensors in the global module"
    assert all(any(n.split(".lora_")[0].endswith(t) for t in family.attention_modules) for n in b_factors)
    assert any(np.abs(v).max() > 0 for v in b_factors.values()), "one round left every B factor at zero"


def test_the_peft_export_loads_back_with_the_torch_engine_s_logits(federated: dict[str, Any]) -> None:
    out = _export(federated, "peft")
    _, expected = _engine_logits(federated["cfg"], federated["final"])
    exported = load_exported(out, threads=1)
    got = exported.logits(list(TEXTS))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    classifier = json.loads((out / MANIFEST_NAME).read_text())["classifier"]
    if federated["model_type"] == "llama":
        # a decoder's features are its last real token: the mean would give other logits
        assert "last real token" in classifier
        assert exported.model.pooling == "last_token"
        exported.model.pooling = "mean"
        assert float((exported.logits(list(TEXTS)) - expected).abs().max()) > 1e-3
    else:
        assert "mean of last_hidden_state" in classifier


def test_the_onnx_export_runs_in_onnxruntime_with_the_engine_s_logits(federated: dict[str, Any]) -> None:
    import onnxruntime

    out = _export(federated, "onnx")
    engine, expected = _engine_logits(federated["cfg"], federated["final"])
    input_ids, mask = _encode(engine.tokenizer, TEXTS, federated["cfg"].seq_len)
    assert int(mask.sum(1).min()) < int(mask.sum(1).max())  # rows of several lengths: padding matters
    session = onnxruntime.InferenceSession(str(out / ONNX_NAME), providers=["CPUExecutionProvider"])
    logits, features = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
    diff = float(np.abs(logits - expected.numpy()).max())
    assert diff <= ONNX_TOLERANCE, diff
    assert (logits.argmax(-1) == expected.numpy().argmax(-1)).all()
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["onnx"]["max_abs_diff"] <= ONNX_TOLERANCE
