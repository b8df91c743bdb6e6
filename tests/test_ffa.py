"""``--strategy ffa`` (FFA-LoRA): A frozen at its shared start in both engines, B-only aggregation."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from broker_server.aggregation import ClientUpdate
from broker_server.evaluation import Evaluator
from broker_server.exact import ffa_fedavg
from broker_server.service import AggregationService, ServiceConfig
from broker_server.strategies import check_strategy, get_strategy
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset, load_folder
from edge_runtime.engines.base import TrainingEngine
from edge_runtime.engines.ort_engine import ORT_TRAINING_INSTALL
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, spec_from_dict
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

PREFIX = "encoder.layer.0.attention.self.query"
FFA = LoraSpec(rank=2, alpha=4.0, train_a=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ffa")
    return make_tiny_bert(root / "model"), write_text_folder(root / "data", per_class_train=16)


def _config(model: Path, **kw: object) -> TrainConfig:
    # weight decay on, so that a frozen A shows it is out of the decoupled decay as well
    values: dict[str, object] = dict(
        model=str(model), num_labels=3, seq_len=16, batch_size=8, lr=5e-2, head_lr=0.0, weight_decay=0.1
    )
    values.update(kw)
    return TrainConfig(peft=FFA, **values)  # type: ignore[arg-type]


def _check_only_b_moves(engine: TrainingEngine, train: TextDataset) -> None:
    state = engine.trainable_state()
    state["head.weight"] = state["head.weight"] * 30.0  # a sharp frozen head: only LoRA can lower the loss
    engine.load_trainable_state(state)
    before = engine.evaluate(train).loss
    engine.train(train, epochs=3, seed=0)
    after = engine.evaluate(train).loss
    assert after < before - 0.05, (before, after)
    end = engine.trainable_state()
    assert set(end) == set(state)  # A still travels: the wire shapes do not change
    a_names = [k for k in end if k.endswith(".lora_A")]
    b_names = [k for k in end if k.endswith(".lora_B")]
    assert a_names and len(a_names) == len(b_names)
    for name in a_names:
        np.testing.assert_array_equal(end[name], state[name])
    assert all(not np.array_equal(end[k], state[k]) for k in b_names)


def test_the_spec_field_is_validated_and_travels_only_when_set() -> None:
    assert FFA.to_dict()["train_a"] is False
    assert spec_from_dict(FFA.to_dict()) == FFA
    plain = LoraSpec(rank=2, alpha=4.0)
    assert "train_a" not in plain.to_dict()  # old configuration ids and artifact keys stay valid
    assert spec_from_dict(plain.to_dict()) == plain and plain.train_a is True
    assert FFA.trainable_params(32, 2, 3) == plain.trainable_params(32, 2, 3)  # A is module state
    with pytest.raises(ConfigError, match="train_a"):
        LoraSpec(train_a=0)  # type: ignore[arg-type]


def test_the_torch_engine_never_moves_a_frozen_a(tiny: tuple[Path, Path]) -> None:
    train, _ = load_folder(tiny[1])
    engine = TorchEngine(_config(tiny[0]), seed=0, threads=1)
    _check_only_b_moves(engine, train)
    assert all(p.requires_grad for p in engine._params.values())  # restored after training


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="onnxruntime and onnx are not installed",
)
def test_the_ort_engine_never_moves_a_frozen_a(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime.training.api", reason=f"engine ort needs {ORT_TRAINING_INSTALL}")
    from broker_server.artifacts import artifact_key, build_artifacts
    from edge_runtime.engines.ort_engine import OrtEngine

    monkeypatch.setenv("FEDPEFT_ARTIFACTS", str(tmp_path / "artifacts"))
    cfg = _config(tiny[0], engine="ort")
    assert artifact_key(cfg) != artifact_key(dataclasses.replace(cfg, peft=LoraSpec(rank=2, alpha=4.0)))
    artifacts = build_artifacts(cfg, seed=0, cache_dir=tmp_path / "artifacts", threads=1)
    train, _ = load_folder(tiny[1])
    _check_only_b_moves(OrtEngine(cfg, artifacts=artifacts.folder, threads=1), train)


def _state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        f"{PREFIX}.lora_A": rng.standard_normal((2, 6)).astype(np.float32),
        f"{PREFIX}.lora_B": rng.standard_normal((5, 2)).astype(np.float32),
        "head.weight": rng.standard_normal((3, 6)).astype(np.float32),
    }


def test_ffa_fedavg_keeps_a_and_averages_b_and_the_head_by_samples() -> None:
    rng = np.random.default_rng(0)
    glob = _state(rng)
    deltas = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in glob.items()} for _ in range(3)]
    counts = (10, 30, 20)
    updates = [ClientUpdate(f"d{i}", n, d) for i, (n, d) in enumerate(zip(counts, deltas, strict=True))]
    new = ffa_fedavg(glob, updates)
    p = np.array(counts) / 60
    a, b = f"{PREFIX}.lora_A", f"{PREFIX}.lora_B"
    np.testing.assert_array_equal(new[a], glob[a])  # a device's A delta is ignored: A is frozen
    for name in (b, "head.weight"):
        expected = glob[name].astype(np.float64) + sum(w * d[name] for w, d in zip(p, deltas, strict=True))
        np.testing.assert_allclose(new[name], expected, rtol=1e-5, atol=1e-6)
    assert set(new) == set(glob) and all(v.dtype == np.float32 for v in new.values())
    # the order of the clients does not matter
    again = ffa_fedavg(glob, updates[::-1])
    for name, value in new.items():
        np.testing.assert_allclose(again[name], value, rtol=1e-6)
    with pytest.raises(ConfigError, match="zero updates"):
        ffa_fedavg(glob, [])
    with pytest.raises(ConfigError, match="LoRA"):
        ffa_fedavg({"head.weight": glob["head.weight"]}, updates)


def test_ffa_configurations_that_cannot_work_are_refused(tiny: tuple[Path, Path]) -> None:
    check_strategy("ffa")
    with pytest.raises(ConfigError, match="the service runs it"):
        get_strategy("ffa")
    with pytest.raises(ConfigError, match="train_a=False"):
        ServiceConfig(fleet="f", rounds=1, train=TrainConfig(peft=LoraSpec()), strategy="ffa")
    with pytest.raises(ConfigError, match="train_a=False"):
        ServiceConfig(fleet="f", rounds=1, train=TrainConfig(peft=AdapterSpec()), strategy="ffa")
    with pytest.raises(ConfigError, match="DP"):
        ServiceConfig(
            fleet="f",
            rounds=1,
            train=TrainConfig(peft=FFA),
            strategy="ffa",
            clip_norm=1.0,
            dp_noise_multiplier=1.0,
        )
    cfg = TrainConfig(model=str(tiny[0]), num_labels=3, seq_len=16, peft=FFA)
    config = ServiceConfig(fleet="f", rounds=1, train=cfg, strategy="ffa")
    _, test = load_folder(tiny[1])
    with pytest.raises(ConfigError, match="mixed fleet"):
        AggregationService(
            InMemoryTransport(InMemoryBroker(), "server"),
            config,
            Evaluator(cfg, test, seed=0, threads=1),
            allocator=object(),  # type: ignore[arg-type]  # refused before it is used
        )


def test_the_sdk_builds_a_frozen_a_for_ffa() -> None:
    from sdk.commands import _train_config
    from sdk.simulate import SimulationConfig

    for strategy, train_a in (("ffa", False), ("fedit", True)):
        spec = SimulationConfig(data="unused", strategy=strategy).train_config(3).peft
        assert isinstance(spec, LoraSpec) and spec.train_a is train_a
        args = argparse.Namespace(
            lora_rank=2,
            lora_alpha=4.0,
            lora_targets="query,value",
            model="m",
            batch_size=8,
            seq_len=16,
            local_epochs=1,
            lr=1e-3,
            head_lr=0.0,
            prox_mu=0.0,
            strategy=strategy,
        )
        spec = _train_config(args, 3).peft
        assert isinstance(spec, LoraSpec) and spec.train_a is train_a
    del args.strategy  # ``centralized`` has no --strategy: plain LoRA
    assert _train_config(args, 3).peft == LoraSpec(rank=2, alpha=4.0)


def _run_pending(agent: DeviceAgent) -> None:
    agent.run_pending()


def test_a_federation_with_ffa_keeps_the_initial_a_exactly(tiny: tuple[Path, Path]) -> None:
    train, test = load_folder(tiny[1])
    cfg = TrainConfig(model=str(tiny[0]), num_labels=3, seq_len=16, bits=32, peft=FFA)
    broker = InMemoryBroker()
    config = ServiceConfig(
        fleet="ffa",
        rounds=2,
        train=cfg,
        min_clients=3,
        expected_clients=3,
        round_timeout_s=30,
        strategy="ffa",
    )
    evaluator = Evaluator(cfg, test, seed=0, threads=1)
    initial = evaluator.initial_state()
    service = AggregationService(InMemoryTransport(broker, "server"), config, evaluator)
    service.start()
    agents = []
    for i in range(3):
        part = train.subset(np.arange(i, len(train.labels), 3))
        agent = DeviceAgent(
            f"d{i}",
            "ffa",
            InMemoryTransport(broker, f"d{i}"),
            part,
            lambda c: TorchEngine(c, seed=0, threads=1),
        )
        agent.on_ready = _run_pending
        agents.append(agent)
    for a in agents:
        a.start()
    service.run()

    assert [r["participants"] for r in service.rounds][-2:] == [3, 3]
    final = service.final_state()
    a_names = [k for k in final if k.endswith(".lora_A")]
    b_names = [k for k in final if k.endswith(".lora_B")]
    assert a_names and b_names
    for name in a_names:
        # the shared start is the first module devices get: the initial one, sent at 16 bits
        np.testing.assert_array_equal(final[name], initial[name].astype(np.float16).astype(np.float32))
    assert all(not np.array_equal(final[k], initial[k]) for k in b_names)
    for agent in agents:  # every device ends on the published module
        assert agent.final_state is not None
        for k, v in final.items():
            np.testing.assert_array_equal(agent.final_state[k], v)
