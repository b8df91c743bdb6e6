"""The ONNX Runtime engine on a tiny random BERT with LoRA: parity with torch, state, no torch on device.

The tiny model is saved with dropout 0 in the base: the torch engine trains in train mode (dropout
on) while the ORT graphs are exported in eval mode, so only a dropout-free base can match step for
step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.engines.ort_engine import ORT_TRAINING_INSTALL

pytest.importorskip("onnxruntime.training.api", reason=f"engine ort needs {ORT_TRAINING_INSTALL}")
pytest.importorskip("onnx", reason="onnx is needed to build ORT training artifacts")

from broker_server.artifacts import ArtifactPaths, artifact_key, build_artifacts
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset, load_folder
from edge_runtime.engines.ort_engine import OrtEngine
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ConfigError, ShapeMismatch
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, PromptSpec
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

REPO = Path(__file__).resolve().parent.parent
LORA = LoraSpec(rank=4, target_modules=("query", "value"))


@dataclasses.dataclass(frozen=True)
class Tiny:
    model: Path
    data: Path
    artifacts: ArtifactPaths
    cache: Path


def _config(model: Path, **kw: object) -> TrainConfig:
    values: dict[str, Any] = dict(
        model=str(model), num_labels=3, seq_len=16, batch_size=8, lr=5e-3, head_lr=5e-2, peft=LORA
    )
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("ort")
    model = make_tiny_bert(root / "model")
    config_path = model / "config.json"
    hf_config = json.loads(config_path.read_text())
    hf_config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config_path.write_text(json.dumps(hf_config))
    data = write_text_folder(root / "data", per_class_train=54, per_class_test=10)
    cache = root / "artifacts"
    artifacts = build_artifacts(_config(model, engine="ort"), seed=0, cache_dir=cache, threads=1)
    return Tiny(model, data, artifacts, cache)


def _train_rows(tiny: Tiny) -> tuple[TextDataset, TextDataset]:
    train, test = load_folder(tiny.data)
    return train.subset(np.arange(160)), test  # 160 rows at batch 8: 20 steps an epoch


def test_artifacts_are_cached_by_content(tiny: Tiny) -> None:
    cfg = _config(tiny.model, engine="ort")
    assert build_artifacts(cfg, seed=0, cache_dir=tiny.cache).folder == tiny.artifacts.folder
    manifest = json.loads(tiny.artifacts.manifest.read_text())
    names = {t["name"] for t in manifest["trainable"]}
    assert names == set(TorchEngine(cfg, seed=0, threads=1).trainable_state())
    for path in (tiny.artifacts.training_model, tiny.artifacts.eval_model, tiny.artifacts.optimizer_model):
        assert path.is_file()
    assert artifact_key(cfg, seed=1) != artifact_key(cfg, seed=0)
    assert artifact_key(dataclasses.replace(cfg, peft=LoraSpec(rank=2))) != artifact_key(cfg)
    assert artifact_key(dataclasses.replace(cfg, lr=1.0)) == artifact_key(cfg)  # not in the graph


@pytest.mark.parametrize(
    ("prox_mu", "weight_decay", "head_lr"), [(0.0, 0.0, 5e-2), (1.0, 0.01, 5e-2), (0.0, 0.0, 0.0)]
)
def test_twenty_steps_match_torch(tiny: Tiny, prox_mu: float, weight_decay: float, head_lr: float) -> None:
    train, test = _train_rows(tiny)
    cfg = _config(tiny.model, prox_mu=prox_mu, weight_decay=weight_decay, head_lr=head_lr)
    ort = OrtEngine(dataclasses.replace(cfg, engine="ort"), artifacts=tiny.artifacts.folder, threads=1)
    torch_engine = TorchEngine(cfg, seed=0, threads=1)
    start = torch_engine.trainable_state()
    for name, value in ort.trainable_state().items():
        np.testing.assert_array_equal(value, start[name])
    assert ort._tokens(train) == torch_engine._tokens(train)

    results = [e.train(train, epochs=1, seed=3) for e in (ort, torch_engine)]
    assert [r.steps for r in results] == [20, 20]
    assert results[0].loss == pytest.approx(results[1].loss, rel=0.02)
    assert results[0].accuracy == pytest.approx(results[1].accuracy, abs=0.02)
    after_ort, after_torch = ort.trainable_state(), torch_engine.trainable_state()
    for name, value in after_torch.items():
        moved = float(np.linalg.norm(value - start[name]))
        if head_lr == 0 and name.startswith("head."):
            assert moved == 0.0 and np.array_equal(after_ort[name], value)
            continue
        assert moved > 0.0
        gap = float(np.linalg.norm(after_ort[name] - value))
        assert gap <= 1e-4 * max(float(np.linalg.norm(value)), 1e-6), name
    evals = [e.evaluate(test) for e in (ort, torch_engine)]
    assert evals[0].loss == pytest.approx(evals[1].loss, rel=1e-4)
    np.testing.assert_array_equal(evals[0].predictions, evals[1].predictions)


def test_state_round_trip_by_name_reaches_the_graph(tiny: Tiny) -> None:
    train, test = _train_rows(tiny)
    cfg = _config(tiny.model)
    ort = OrtEngine(cfg, artifacts=tiny.artifacts.folder, threads=1)
    torch_engine = TorchEngine(cfg, seed=0, threads=1)
    torch_engine.train(train, epochs=1, seed=0)
    trained = torch_engine.trainable_state()
    ort.load_trainable_state(trained)
    for name, value in ort.trainable_state().items():
        np.testing.assert_array_equal(value, trained[name])
    assert ort.evaluate(test).loss == pytest.approx(torch_engine.evaluate(test).loss, rel=1e-4)
    sums = [e.class_feature_sums(test) for e in (ort, torch_engine)]
    np.testing.assert_allclose(sums[0][0], sums[1][0], atol=1e-4)
    np.testing.assert_array_equal(sums[0][1], sums[1][1])
    np.testing.assert_array_equal(ort.trainable_state()["head.bias"], trained["head.bias"])  # restored

    bad = dict(trained)
    bad["head.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ShapeMismatch, match=r"head\.bias"):
        ort.load_trainable_state(bad)
    with pytest.raises(ShapeMismatch, match="missing"):
        ort.load_trainable_state({"head.bias": trained["head.bias"]})
    assert ort.total_params == torch_engine.total_params


@pytest.mark.parametrize(
    "peft",
    [AdapterSpec(bottleneck=4), PromptSpec(length=4), LoraSpec(rank=4, dropout=0.1)],
    ids=["adapter", "prompt", "lora-dropout"],
)
def test_unsupported_modules_are_refused(tiny: Tiny, peft: object) -> None:
    cfg = _config(tiny.model, peft=peft, engine="ort")
    with pytest.raises(ConfigError, match="ORT engine"):
        OrtEngine(cfg, artifacts=tiny.artifacts.folder)
    with pytest.raises(ConfigError, match="ORT engine"):
        build_artifacts(cfg, cache_dir=tiny.cache)


def test_artifacts_for_another_configuration_are_refused(tiny: Tiny) -> None:
    with pytest.raises(ConfigError, match="num_labels"):
        OrtEngine(_config(tiny.model, num_labels=4), artifacts=tiny.artifacts.folder)


def test_the_engine_runs_without_torch_transformers_or_peft(tiny: Tiny) -> None:
    # None in sys.modules makes an import fail, as on an edge install that lacks these packages.
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("torch", "transformers", "peft"):
            sys.modules[name] = None
        from edge_runtime.config import TrainConfig
        from edge_runtime.data import load_folder
        from edge_runtime.engines.ort_engine import OrtEngine
        from edge_runtime.peft_specs import LoraSpec

        train, test = load_folder({str(tiny.data)!r})
        cfg = TrainConfig(model={str(tiny.model)!r}, num_labels=3, seq_len=16, batch_size=8, lr=5e-3,
                          head_lr=5e-2, peft=LoraSpec(rank=4), engine="ort", prox_mu=0.1)
        engine = OrtEngine(cfg, artifacts={str(tiny.artifacts.folder)!r}, threads=1)
        before = engine.evaluate(test).loss
        engine.train(train, epochs=2, seed=0)
        engine.class_feature_sums(test)
        assert engine.evaluate(train).loss < before
        loaded = [n for n in ("torch", "transformers", "peft") if sys.modules.get(n) is not None]
        print("loaded:", loaded)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded: []" in done.stdout


def test_micro_batches_give_the_whole_batch_gradients_and_steps(tiny: Tiny) -> None:
    """Micro-batches of 3 (sorted, weighted): the gradients of a batch of 8 are the whole batch's,
    and 20 steps match torch on whole batches."""
    from edge_runtime.engines.numpy_state import micro_batch_step

    train, _ = _train_rows(tiny)
    cfg = dataclasses.replace(_config(tiny.model, engine="ort"), micro_batch=3)
    ort = OrtEngine(cfg, artifacts=tiny.artifacts.folder, threads=1)
    ids = ort._tokens(train)
    labels = np.asarray(train.labels, dtype=np.int64)
    names = sorted(ort.trainable_state())
    rows = np.random.default_rng(0).permutation(len(train))[:8]
    step = functools.partial(ort._step, trained=names, step=0)
    whole = micro_batch_step(step, ids, labels, rows, micro_rows=8, pad_id=ort._pad_id, names=names)
    parts = micro_batch_step(step, ids, labels, rows, micro_rows=3, pad_id=ort._pad_id, names=names)
    assert parts[0] == pytest.approx(whole[0], rel=1e-5) and parts[1] == whole[1]
    for name in names:
        np.testing.assert_allclose(parts[2][name], whole[2][name], rtol=1e-4, atol=1e-7, err_msg=name)

    torch_engine = TorchEngine(dataclasses.replace(cfg, engine="torch", micro_batch=0), seed=0, threads=1)
    for engine in (ort, torch_engine):
        engine.train(train, epochs=1, seed=3)
    after_ort, after_torch = ort.trainable_state(), torch_engine.trainable_state()
    for name, value in after_torch.items():
        gap = float(np.linalg.norm(after_ort[name] - value))
        assert gap <= 1e-4 * max(float(np.linalg.norm(value)), 1e-6), name


@pytest.mark.parametrize("lean", [False, True])
def test_the_memory_arena_is_on_only_without_a_memory_cap(
    tiny: Tiny, lean: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uncapped, ORT's CPU arena reuses buffers; under a cap (lean memory) it stays off, as the
    cap's predictions were measured."""
    from edge_runtime.engines import ort_engine

    real = ort_engine.import_onnxruntime()
    seen: list[bool] = []

    class Options(real.SessionOptions):  # type: ignore[misc, name-defined]
        def __setattr__(self, name: str, value: object) -> None:
            if name == "enable_cpu_mem_arena":
                seen.append(bool(value))
            super().__setattr__(name, value)

    class Runtime:
        SessionOptions = Options

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    monkeypatch.setattr(ort_engine, "import_onnxruntime", Runtime)
    monkeypatch.setattr(ort_engine, "use_lean_allocator", lambda *a: True)  # process-wide: not here
    engine = OrtEngine(_config(tiny.model, engine="ort"), artifacts=tiny.artifacts.folder, lean_memory=lean)
    assert seen == [not lean]
    train, _ = _train_rows(tiny)
    assert np.isfinite(engine.train(train.subset(np.arange(16)), epochs=1, seed=0).loss)
