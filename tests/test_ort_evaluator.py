"""The server-side model on ONNX Runtime: the torch evaluator's initial modules and figures, no torch.

A tiny random BERT (dropout 0, as in test_ort_engine) with LoRA, artifacts of both flavours built
once. The ORT evaluator must start from exactly the torch evaluator's initial module, give the same
predictions on a perturbed module, fall back to torch for what no folder covers, and run in a
process where torch cannot be imported. ``import_onnxruntime`` and ``build_artifacts_apart`` are
what keep torch out of the simulator's own process; each is checked in a fresh interpreter.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.engines.ort_engine import ORT_TRAINING_INSTALL

pytest.importorskip("onnxruntime.training.api", reason=f"the ORT evaluator needs {ORT_TRAINING_INSTALL}")
pytest.importorskip("onnx", reason="onnx is needed to build ORT training artifacts")

from broker_server.artifacts import build_artifacts
from broker_server.evaluation import Evaluator, OrtEvaluator
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset, load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import LoraSpec
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

REPO = Path(__file__).resolve().parent.parent
LORA = LoraSpec(rank=4, target_modules=("query", "value"))


@dataclasses.dataclass(frozen=True)
class Tiny:
    model: Path
    data: Path
    test: TextDataset
    config: TrainConfig
    training: Path  # artifact folder, flavour "training" (engine ort)
    step: Path  # flavour "step" (engine ort-plain)
    cache: Path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("ort-eval")
    model = make_tiny_bert(root / "model", dropout=0.0)
    data = write_text_folder(root / "data", per_class_train=4, per_class_test=20)
    _, test = load_folder(data)
    assert isinstance(test, TextDataset)
    config = TrainConfig(model=str(model), num_labels=3, seq_len=16, batch_size=8, peft=LORA)
    cache = root / "artifacts"
    training = build_artifacts(config, seed=0, cache_dir=cache, threads=1).folder
    step = build_artifacts(config, seed=0, cache_dir=cache, threads=1, flavour="step").folder
    return Tiny(model, data, test, config, training, step, cache)


def _perturbed(state: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    """A module away from the initial one (LoRA B nonzero), as after a few rounds."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0.0, 0.3, v.shape)).astype(np.float32) for k, v in state.items()}


@pytest.mark.parametrize("engine", ["ort", "ort-plain"])
def test_it_starts_from_and_scores_like_the_torch_evaluator(tiny: Tiny, engine: str) -> None:
    folder = tiny.training if engine == "ort" else tiny.step
    ort = OrtEvaluator(
        tiny.config, tiny.test, engine=engine, artifacts=[(tiny.config, folder)], seed=0, threads=1
    )
    torch = Evaluator(tiny.config, tiny.test, seed=0, threads=1)
    start, torch_start = ort.initial_state(), torch.initial_state()
    assert start.keys() == torch_start.keys()
    for name, value in start.items():
        assert np.array_equal(value, torch_start[name]), name
    assert ort.shapes(tiny.config) == torch.shapes(tiny.config)
    assert ort.total_params == torch.total_params
    state = _perturbed(start)
    got, want = ort.evaluate(state), torch.evaluate(state)
    assert got is not None and want is not None
    assert np.array_equal(got.predictions, want.predictions)
    assert got.accuracy == want.accuracy and got.macro_f1 == pytest.approx(want.macro_f1)
    assert got.loss == pytest.approx(want.loss, rel=1e-4)
    assert 0.0 < got.accuracy < 1.0  # a module that discriminates: equal predictions mean something
    assert ort._torch is None  # nothing here needed torch


def test_what_no_folder_covers_goes_to_torch(tiny: Tiny) -> None:
    ort = OrtEvaluator(
        tiny.config, tiny.test, engine="ort", artifacts=[(tiny.config, tiny.training)], seed=0, threads=1
    )
    other = dataclasses.replace(tiny.config, peft=LoraSpec(rank=2, target_modules=("query", "value")))
    assert ort._torch is None
    torch = Evaluator(tiny.config, tiny.test, seed=0, threads=1)
    assert ort.shapes(other) == torch.shapes(other)
    assert {s[0] for n, s in ort.shapes(other).items() if n.endswith("lora_A")} == {2}
    for name, value in ort.initial_state(other).items():
        assert np.array_equal(value, torch.initial_state(other)[name]), name
    state = _perturbed(ort.initial_state(other))
    got, want = ort.evaluate(state, other), torch.evaluate(state, other)
    assert got is not None and want is not None and np.array_equal(got.predictions, want.predictions)
    assert isinstance(ort.engine_for(tiny.config), TorchEngine)  # training on the server is torch's
    assert ort._torch is not None


def test_bad_engines_and_no_folders_are_refused(tiny: Tiny) -> None:
    with pytest.raises(ConfigError, match="an ORT evaluator runs one of"):
        OrtEvaluator(tiny.config, tiny.test, engine="torch", artifacts=[(tiny.config, tiny.training)], seed=0)
    with pytest.raises(ConfigError, match="at least one folder"):
        OrtEvaluator(tiny.config, tiny.test, engine="ort", artifacts=[], seed=0)
    empty = OrtEvaluator(
        tiny.config, None, engine="ort", artifacts=[(tiny.config, tiny.training)], seed=0, threads=1
    )
    assert empty.evaluate(empty.initial_state()) is None


def _run(script: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_it_runs_where_torch_cannot_be_imported(tiny: Tiny) -> None:
    want = Evaluator(tiny.config, tiny.test, seed=0, threads=1).evaluate(
        _perturbed(Evaluator(tiny.config, None, seed=0, threads=1).initial_state())
    )
    assert want is not None
    out = _run(
        f"""
        import sys
        for name in ("torch", "transformers", "peft"):
            sys.modules[name] = None  # an import of any of these now fails
        import numpy as np
        from broker_server.evaluation import OrtEvaluator
        from edge_runtime.config import TrainConfig
        from edge_runtime.data import load_folder
        from edge_runtime.peft_specs import LoraSpec

        cfg = TrainConfig(model={str(tiny.model)!r}, num_labels=3, seq_len=16, batch_size=8,
                          peft=LoraSpec(rank=4, target_modules=("query", "value")))
        _, test = load_folder({str(tiny.data)!r})
        folders = [(cfg, {str(tiny.training)!r})]
        ev = OrtEvaluator(cfg, test, engine="ort", artifacts=folders, seed=0, threads=1)
        rng = np.random.default_rng(1)  # _perturbed's noise
        start = ev.initial_state()
        state = {{k: (v + rng.normal(0.0, 0.3, v.shape)).astype(np.float32) for k, v in start.items()}}
        print("predictions", "".join(str(p) for p in ev.evaluate(state).predictions))
        """
    )
    assert f"predictions {''.join(str(p) for p in want.predictions)}" in out


def test_importing_onnxruntime_leaves_torch_out_and_the_training_package_importable() -> None:
    out = _run(
        """
        import sys
        from edge_runtime.engines.ort_engine import import_onnxruntime
        ort = import_onnxruntime()
        print("torch after import:", "torch" in sys.modules, ort.__version__ != "")
        import onnxruntime.training.artifacts  # the artifact builder's import still works
        print("training package:", type(sys.modules["onnxruntime.training"]).__name__)
        """
    )
    assert "torch after import: False True" in out
    assert "training package: module" in out


def test_a_missing_folder_is_exported_in_a_child_and_a_cached_one_read_here(
    tiny: Tiny, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    out = _run(
        f"""
        import sys
        from broker_server.artifacts import build_artifacts_apart
        from edge_runtime.config import TrainConfig
        from edge_runtime.peft_specs import LoraSpec

        cfg = TrainConfig(model={str(tiny.model)!r}, num_labels=3, seq_len=16, batch_size=8,
                          peft=LoraSpec(rank=4, target_modules=("query", "value")))
        first = build_artifacts_apart(cfg, seed=0, cache_dir={str(cache)!r}, threads=1).folder
        again = build_artifacts_apart(cfg, seed=0, cache_dir={str(cache)!r}, threads=1).folder
        print("same folder:", first == again, (first / "manifest.json").is_file())
        print("torch here:", "torch" in sys.modules)
        """
    )
    assert "same folder: True True" in out
    assert "torch here: False" in out
    # the child's export is the one build_artifacts makes here: same key, same files
    built = build_artifacts(tiny.config, seed=0, cache_dir=cache, threads=1).folder
    assert built.parent == cache and sorted(p.name for p in built.iterdir()) == sorted(
        p.name for p in tiny.training.iterdir()
    )
