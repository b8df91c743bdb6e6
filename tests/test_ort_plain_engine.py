"""The plain ONNX Runtime engine (step graph, AdamW in numpy) on a tiny random BERT: parity with torch.

As in ``tests/test_ort_engine.py``, the tiny model is saved with dropout 0 in the base: the torch
engine trains in train mode while the step graph is traced in eval mode. Tolerances are that
file's: after 20 steps every trained tensor within 1e-4 of its norm, the mean loss within 2%.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
pytest.importorskip("onnx", reason="onnx is needed to write the step graph")

from broker_server.artifacts import ArtifactPaths, artifact_key, build_artifacts
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset, load_folder
from edge_runtime.engines.ort_step_engine import OrtStepEngine
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ConfigError, EngineError, ShapeMismatch
from edge_runtime.label_prior import train_logit_adjusted
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, PromptSpec
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

REPO = Path(__file__).resolve().parent.parent
KINDS = {
    "lora": LoraSpec(rank=4, target_modules=("query", "value")),
    "adapter": AdapterSpec(bottleneck=4),
    "prompt": PromptSpec(length=4),
}


@dataclasses.dataclass(frozen=True)
class Tiny:
    model: Path
    data: Path
    cache: Path


def _config(model: Path, kind: str = "lora", **kw: object) -> TrainConfig:
    values: dict[str, Any] = dict(
        model=str(model), num_labels=3, seq_len=16, batch_size=8, lr=5e-3, head_lr=5e-2, peft=KINDS[kind]
    )
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("ort-plain")
    model = make_tiny_bert(root / "model")
    config_path = model / "config.json"
    hf_config = json.loads(config_path.read_text())
    hf_config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config_path.write_text(json.dumps(hf_config))
    data = write_text_folder(root / "data", per_class_train=54, per_class_test=10)
    return Tiny(model, data, root / "artifacts")


def _artifacts(tiny: Tiny, kind: str) -> ArtifactPaths:
    return build_artifacts(_config(tiny.model, kind), seed=0, cache_dir=tiny.cache, threads=1, flavour="step")


def _train_rows(tiny: Tiny) -> tuple[TextDataset, TextDataset]:
    train, test = load_folder(tiny.data)
    return train.subset(np.arange(160)), test  # 160 rows at batch 8: 20 steps an epoch


def _assert_twenty_steps_match(
    tiny: Tiny, cfg: TrainConfig, kind: str, *, tau: float = 0.0
) -> dict[str, float]:
    """Train both engines 20 steps from the same start; the relative gap of every tensor."""
    train, test = _train_rows(tiny)
    plain = OrtStepEngine(cfg, artifacts=_artifacts(tiny, kind).folder, threads=1)
    torch_engine = TorchEngine(cfg, seed=0, threads=1)
    start = torch_engine.trainable_state()
    assert plain.trainable_state().keys() == start.keys()
    for name, value in plain.trainable_state().items():
        np.testing.assert_array_equal(value, start[name])
    assert plain._tokens(train) == torch_engine._tokens(train)

    results = [train_logit_adjusted(e, train, epochs=1, seed=3, tau=tau) for e in (plain, torch_engine)]
    assert [r.steps for r in results] == [20, 20]
    assert results[0].loss == pytest.approx(results[1].loss, rel=0.02)
    assert results[0].accuracy == pytest.approx(results[1].accuracy, abs=0.02)
    after_plain, after_torch = plain.trainable_state(), torch_engine.trainable_state()
    gaps = {}
    for name, value in after_torch.items():
        moved = float(np.linalg.norm(value - start[name]))
        if cfg.head_lr == 0 and name.startswith("head."):
            assert moved == 0.0 and np.array_equal(after_plain[name], value)
            continue
        assert moved > 0.0, name
        gap = float(np.linalg.norm(after_plain[name] - value)) / max(float(np.linalg.norm(value)), 1e-6)
        assert gap <= 1e-4, name
        gaps[name] = gap
    evals = [e.evaluate(test) for e in (plain, torch_engine)]
    assert evals[0].loss == pytest.approx(evals[1].loss, rel=1e-4)
    np.testing.assert_array_equal(evals[0].predictions, evals[1].predictions)
    return gaps


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_twenty_steps_match_torch_for_every_kind(tiny: Tiny, kind: str) -> None:
    gaps = _assert_twenty_steps_match(tiny, _config(tiny.model, kind), kind)
    print(f"{kind}: largest relative parameter gap after 20 steps {max(gaps.values()):.2e}")


def test_micro_batches_match_torch(tiny: Tiny) -> None:
    """Batches of 8 in sorted micro-batches of 3 on both engines: 20 steps still match."""
    assert _config(tiny.model).micro_rows() == 8  # the other tests run whole batches
    cfg = dataclasses.replace(_config(tiny.model), micro_batch=3)
    gaps = _assert_twenty_steps_match(tiny, cfg, "lora")
    assert gaps


@pytest.mark.parametrize(
    ("prox_mu", "weight_decay", "head_lr", "tau"),
    [(1.0, 0.01, 5e-2, 0.0), (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 5e-2, 1.0)],
    ids=["prox-decay", "frozen-head", "logit-adjusted"],
)
def test_lora_options_match_torch(
    tiny: Tiny, prox_mu: float, weight_decay: float, head_lr: float, tau: float
) -> None:
    cfg = _config(tiny.model, prox_mu=prox_mu, weight_decay=weight_decay, head_lr=head_lr)
    _assert_twenty_steps_match(tiny, cfg, "lora", tau=tau)


def test_ffa_lora_keeps_a_fixed(tiny: Tiny) -> None:
    cfg = _config(tiny.model, peft=LoraSpec(rank=4, train_a=False))
    folder = build_artifacts(cfg, seed=0, cache_dir=tiny.cache, threads=1, flavour="step").folder
    plain = OrtStepEngine(cfg, artifacts=folder, threads=1)
    before = plain.trainable_state()
    plain.train(_train_rows(tiny)[0], epochs=1, seed=0)
    after = plain.trainable_state()
    for name, value in after.items():
        moved = not np.array_equal(value, before[name])
        assert moved == (not name.endswith(".lora_A")), name


def test_state_round_trip_and_frozen_statistics(tiny: Tiny) -> None:
    train, test = _train_rows(tiny)
    for kind in ("lora", "adapter"):
        cfg = _config(tiny.model, kind)
        plain = OrtStepEngine(cfg, artifacts=_artifacts(tiny, kind).folder, threads=1)
        torch_engine = TorchEngine(cfg, seed=0, threads=1)
        torch_engine.train(train, epochs=1, seed=0)
        trained = torch_engine.trainable_state()
        plain.load_trainable_state(trained)
        assert plain.evaluate(test).loss == pytest.approx(torch_engine.evaluate(test).loss, rel=1e-4)
        sums = [e.class_feature_sums(test) for e in (plain, torch_engine)]
        np.testing.assert_allclose(sums[0][0], sums[1][0], atol=1e-4)
        np.testing.assert_array_equal(sums[0][1], sums[1][1])
        for name, value in plain.trainable_state().items():
            np.testing.assert_array_equal(value, trained[name])  # restored after the bypass
        assert plain.total_params == torch_engine.total_params
    bad = dict(trained)
    bad["head.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ShapeMismatch, match=r"head\.bias"):
        plain.load_trainable_state(bad)
    with pytest.raises(ShapeMismatch, match="missing"):
        plain.load_trainable_state({"head.bias": trained["head.bias"]})
    prompt = OrtStepEngine(_config(tiny.model, "prompt"), artifacts=_artifacts(tiny, "prompt").folder)
    with pytest.raises(EngineError, match="prompt"):
        prompt.class_feature_sums(test)


def test_folders_are_keyed_by_flavour_and_checked(tiny: Tiny) -> None:
    cfg = _config(tiny.model)
    assert artifact_key(cfg, flavour="step") != artifact_key(cfg)
    folder = _artifacts(tiny, "lora").folder
    assert _artifacts(tiny, "lora").folder == folder  # cached
    with pytest.raises(ConfigError, match="num_labels"):
        OrtStepEngine(_config(tiny.model, num_labels=4), artifacts=folder)
    with pytest.raises(ConfigError, match="dropout"):
        build_artifacts(
            _config(tiny.model, peft=LoraSpec(rank=4, dropout=0.1)), cache_dir=tiny.cache, flavour="step"
        )
    with pytest.raises(ConfigError, match="flavour"):
        build_artifacts(cfg, cache_dir=tiny.cache, flavour="nope")


def test_the_engine_trains_with_plain_onnxruntime_only(tiny: Tiny) -> None:
    folders = {kind: str(_artifacts(tiny, kind).folder) for kind in KINDS}
    blocked = ("torch", "transformers", "peft", "onnxruntime.training", "tokenizers")
    # None in sys.modules makes an import fail, as on a Raspberry Pi with plain onnxruntime (the
    # edge extra has no tokenizers either: the built-in WordPiece tokenizes)
    script = textwrap.dedent(
        f"""
        import json, sys
        for name in {blocked!r}:
            sys.modules[name] = None
        from edge_runtime.config import TrainConfig
        from edge_runtime.data import load_folder
        from edge_runtime.engines import create_engine
        from edge_runtime.engines.ort_step_engine import OrtStepEngine
        from edge_runtime.peft_specs import spec_from_dict

        train, test = load_folder({str(tiny.data)!r})
        specs = json.loads({json.dumps({k: v.to_dict() for k, v in KINDS.items()})!r})
        folders = {folders!r}
        for kind, folder in folders.items():
            cfg = TrainConfig(model={str(tiny.model)!r}, num_labels=3, seq_len=16, batch_size=8, lr=5e-3,
                              head_lr=5e-2, peft=spec_from_dict(specs[kind]), engine="ort-plain", prox_mu=0.1)
            engine = create_engine(cfg, artifacts=folder, threads=1)
            assert isinstance(engine, OrtStepEngine), type(engine)
            assert engine._tokenizer.backend == "wordpiece", engine._tokenizer.backend
            before = engine.evaluate(train).loss
            engine.train(train, epochs=2, seed=0)
            after = engine.evaluate(train).loss
            assert after < before, (kind, before, after)
            print(kind, round(before, 4), round(after, 4))
        loaded = [n for n in {blocked!r} if sys.modules.get(n) is not None]
        print("loaded:", loaded)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded: []" in done.stdout
    assert all(f"{kind} " in done.stdout for kind in KINDS)
