"""Heterogeneous PEFT fusion: kinds distilled toward each other on unlabeled server-side text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from broker_server.allocation import AllocationConfig, Allocator
from broker_server.distillation import fuse_kinds, unlabeled
from broker_server.evaluation import Evaluator
from broker_server.service import AggregationService, ServiceConfig
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import AdapterSpec, LoraSpec
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from hw_profiles import DeviceProfile
from sdk.simulate import SimulationConfig
from tests.helpers import write_text_folder
from tests.test_mixed_fleet import KIND_GRID, predict_by_kind
from tests.tiny_model import make_tiny_bert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distill")
    return make_tiny_bert(root / "model"), write_text_folder(root / "data", per_class_train=16)


def _cfg(tiny: tuple[Path, Path], peft: object) -> TrainConfig:
    return TrainConfig(model=str(tiny[0]), num_labels=3, seq_len=16, batch_size=8, lr=2e-2, peft=peft)  # type: ignore[arg-type]


def test_distill_moves_the_student_toward_its_teacher_and_leaves_the_head(tiny: tuple[Path, Path]) -> None:
    train, _ = load_folder(tiny[1])
    texts = unlabeled(train.texts, train.label_names)
    assert not texts.labels.any()  # the true labels are out of reach
    teacher = np.eye(3)[train.labels] * 0.9 + 0.1 / 3  # a confident teacher that knows the classes
    engine = TorchEngine(_cfg(tiny, LoraSpec(rank=4, alpha=8.0)), seed=0, threads=1)
    before = engine.trainable_state()

    def kl() -> float:
        p = engine.predict_proba(texts)
        return float(np.mean(np.sum(p * (np.log(p) - np.log(teacher)), axis=1)))

    start = kl()
    engine.distill(texts, teacher, alpha=0.5, epochs=4, seed=0)
    assert kl() < start - 0.01
    after = engine.trainable_state()
    for name in ("head.weight", "head.bias"):
        np.testing.assert_array_equal(after[name], before[name])
    assert any(not np.array_equal(after[n], before[n]) for n in after if "lora_B" in n)
    with pytest.raises(Exception, match="teacher probabilities"):
        engine.distill(texts, teacher[:5], alpha=0.5, epochs=1, seed=0)


def test_fuse_kinds_does_not_depend_on_the_order_of_kinds(tiny: tuple[Path, Path]) -> None:
    train, test = load_folder(tiny[1])
    lora = _cfg(tiny, LoraSpec(rank=2, alpha=4.0))
    adapter = _cfg(tiny, AdapterSpec(bottleneck=4))
    evaluator = Evaluator(lora, test, seed=0, threads=1)
    state: dict[str, np.ndarray] = {}
    for cfg in (lora, adapter):
        for name, value in evaluator.initial_state(cfg).items():
            state.setdefault(name, value)
    rng = np.random.default_rng(0)
    state = {k: v + rng.normal(scale=0.05, size=v.shape).astype(np.float32) for k, v in state.items()}
    texts = unlabeled(train.texts[:24], train.label_names)
    a = fuse_kinds(evaluator, state, [lora, adapter], texts, alpha=0.3, epochs=2, seed=1)
    b = fuse_kinds(evaluator, state, [adapter, lora], texts, alpha=0.3, epochs=2, seed=1)
    for name in state:
        np.testing.assert_allclose(a.state[name], b.state[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.state["head.weight"], state["head.weight"])
    moved = [n for n in state if not np.array_equal(a.state[n], state[n])]
    assert any("lora" in n for n in moved) and any("adapter" in n for n in moved)
    assert set(a.agreement_after) == {"lora", "adapter"}
    # one kind alone has nobody to learn from
    alone = fuse_kinds(evaluator, state, [lora], texts)
    for name in state:
        np.testing.assert_array_equal(alone.state[name], state[name])
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        fuse_kinds(evaluator, state, [lora, adapter], texts, alpha=2.0)


def test_a_mixed_kind_federation_distills_every_round(tiny: tuple[Path, Path]) -> None:
    train, test = load_folder(tiny[1])
    base = TrainConfig(model=str(tiny[0]), num_labels=3, seq_len=16, bits=8)
    config = ServiceConfig(
        fleet="fuse", rounds=2, train=base, min_clients=3, expected_clients=3, round_timeout_s=30,
        distill_epochs=1,
    )  # fmt: skip
    allocator = Allocator(KIND_GRID, predict_by_kind, AllocationConfig(beta=0.0, gamma=0.0))
    broker = InMemoryBroker()
    with pytest.raises(ConfigError, match="distillation"):
        AggregationService(InMemoryTransport(broker, "x"), config, Evaluator(base, test, seed=0))
    service = AggregationService(
        InMemoryTransport(broker, "server"),
        config,
        Evaluator(base, test, seed=0, threads=1),
        allocator=allocator,
        unlabeled=unlabeled(train.texts[:24], train.label_names),
    )
    service.start()
    agents = []
    for name, ram in (("phone", 8192.0), ("pi", 3000.0), ("watch", 1800.0)):
        agent = DeviceAgent(
            name,
            "fuse",
            InMemoryTransport(broker, name),
            train,
            lambda cfg: TorchEngine(cfg, seed=0, threads=1),
            profile=DeviceProfile(name=name, ram_mb=ram, cores=1, gflops=5.0).to_dict(),
        )
        agent.on_ready = lambda a: a.run_pending()
        agents.append(agent)
    for a in agents:
        a.start()
    service.run()
    train_rounds = [r for r in service.rounds if r["phase"] == "train"]
    assert len(train_rounds) == 2
    for record in train_rounds:
        assert set(record["distill_agreement"]["after"]) == {"lora", "adapter", "prompt"}
    for agent in agents:  # devices train on the distilled modules
        assert agent.final_state is not None


def test_distillation_needs_a_mixed_fleet(tiny: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="--distill-epochs"):
        SimulationConfig(data=str(tiny[1]), distill_epochs=1)
    SimulationConfig(data=str(tiny[1]), distill_epochs=1, profiles="low=0.5,high=0.5")
