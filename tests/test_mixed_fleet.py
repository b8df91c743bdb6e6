"""A mixed fleet end to end in memory: the allocator's picks, truncated views, padded aggregation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from broker_server.allocation import AllocationConfig, Allocator, Candidate, CostEstimate
from broker_server.evaluation import Evaluator
from broker_server.service import AggregationService, ServiceConfig
from broker_server.state import StateStore
from edge_runtime import wire
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, PromptSpec
from edge_runtime.transport import InMemoryBroker, InMemoryTransport
from hw_profiles import DeviceProfile
from tests.helpers import write_text_folder
from tests.tiny_model import make_tiny_bert

GRID = [Candidate(LoraSpec(rank=r, alpha=2.0 * r), 8, 16) for r in (2, 8)]


def predict(c: Candidate, p: DeviceProfile) -> CostEstimate:
    rank = c.peft.to_dict()["rank"]
    return CostEstimate(memory_mb=1000 + 60 * rank, step_s=0.1, trainable_params=1000 * rank)


@pytest.mark.parametrize("strategy", ["fedit", "hetlora"])
def test_tiers_train_different_ranks_of_one_global_module(tmp_path: Path, strategy: str) -> None:
    model = make_tiny_bert(tmp_path / "model")
    train, test = load_folder(write_text_folder(tmp_path / "data", per_class_train=8))
    base = TrainConfig(model=str(model), num_labels=3, seq_len=16, bits=32)
    config = ServiceConfig(
        fleet="mix", rounds=2, train=base, min_clients=3, expected_clients=4, round_timeout_s=30,
        strategy=strategy,
    )  # fmt: skip
    broker = InMemoryBroker()
    allocator = Allocator(GRID, predict, AllocationConfig(beta=2.0))
    service = AggregationService(
        InMemoryTransport(broker, "server"),
        config,
        Evaluator(base, test, seed=0, threads=1),
        store=StateStore(tmp_path / "s.db"),
        allocator=allocator,
    )
    service.start()
    engines: dict[str, TorchEngine] = {}

    def engine_for(cfg: TrainConfig) -> TorchEngine:
        key = str(cfg.peft.to_dict())
        if key not in engines:
            engines[key] = TorchEngine(cfg, seed=0, threads=1)
        return engines[key]

    agents = []
    # 2.5 GB: cap 1.9 GB fits rank 2 only under beta=2; 8 GB fits either and prefers rank 8;
    # 1 GB: a cap of 512 MB fits nothing, so that device is left out with a reason
    for name, ram in (("small", 2500.0), ("big", 8192.0), ("pico", 1024.0), ("big2", 8192.0)):
        profile = DeviceProfile(name=name, ram_mb=ram, cores=2, gflops=10.0)
        agent = DeviceAgent(
            name, "mix", InMemoryTransport(broker, name), train, engine_for, profile=profile.to_dict()
        )
        agent.on_ready = lambda a: a.run_pending()
        agents.append(agent)
    for a in agents:
        a.start()
    service.run()

    ranks = {d: rec.config.peft.to_dict()["rank"] for d, rec in service.devices.items() if not rec.excluded}
    assert ranks == {"small": 2, "big": 8, "big2": 8}, ranks
    assert "memory cap" in service.devices["pico"].excluded
    assert agents[2].assignment is None  # never assigned, never waited for
    assert all(r["participants"] == 3 for r in service.rounds)
    # each device trained its own view: rank-2 shapes for small, rank-8 for the others
    state = service.final_state()
    lora_a = next(k for k in state if k.endswith("lora_A"))
    assert state[lora_a].shape[0] == 8
    assert agents[0].final_state is not None and agents[0].final_state[lora_a].shape[0] == 2
    np.testing.assert_array_equal(agents[0].final_state[lora_a], state[lora_a][:2])
    np.testing.assert_array_equal(agents[1].final_state[lora_a], state[lora_a])
    # rows 2..7 were trained by the big devices only, rows 0..1 by all three: all moved
    assert service.rounds[-1]["accuracy"] is not None
    assert service.rounds[-1]["accuracy_by_kind"].keys() == {"lora"}
    for rec in service.devices.values():
        if rec.allocation is not None:
            assert (
                rec.config.mem_cap_mb is not None and rec.allocation.cost.memory_mb <= rec.config.mem_cap_mb
            )
    # the reward table learnt from the training round
    assert sum(len(v) for v in allocator.rewards.observations.values()) >= 1
    retained = wire.decode_global(
        broker.retained[service.broadcast.group(service.devices["small"].config).topic]
    )
    assert retained.meta["phase"] == "done"


KIND_GRID = [
    Candidate(LoraSpec(rank=4, alpha=8.0), 8, 16),
    Candidate(AdapterSpec(bottleneck=8, layers=(1,)), 8, 16),
    Candidate(PromptSpec(length=4), 8, 16),
]
KIND_MEMORY = {"lora": 3000.0, "adapter": 2000.0, "prompt": 1000.0}


def predict_by_kind(c: Candidate, p: DeviceProfile) -> CostEstimate:
    return CostEstimate(memory_mb=KIND_MEMORY[c.peft.kind], step_s=0.1, trainable_params=1000)


def test_lora_adapter_and_prompt_devices_share_one_federation(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    train, test = load_folder(write_text_folder(tmp_path / "data", per_class_train=8))
    base = TrainConfig(model=str(model), num_labels=3, seq_len=16, bits=8)
    config = ServiceConfig(
        fleet="kinds", rounds=2, train=base, min_clients=3, expected_clients=3, round_timeout_s=30
    )
    broker = InMemoryBroker()
    # beta = 0: each device takes the most rewarding kind under its cap (LoRA > adapter > prompt)
    allocator = Allocator(KIND_GRID, predict_by_kind, AllocationConfig(beta=0.0, gamma=0.0))
    service = AggregationService(
        InMemoryTransport(broker, "server"),
        config,
        Evaluator(base, test, seed=0, threads=1),
        store=StateStore(tmp_path / "s.db"),
        allocator=allocator,
    )
    service.start()
    agents = []
    for name, ram in (("phone", 8192.0), ("pi", 3000.0), ("watch", 1800.0)):
        profile = DeviceProfile(name=name, ram_mb=ram, cores=1, gflops=5.0)
        agent = DeviceAgent(
            name,
            "kinds",
            InMemoryTransport(broker, name),
            train,
            lambda cfg: TorchEngine(cfg, seed=0, threads=1),
            profile=profile.to_dict(),
        )
        agent.on_ready = lambda a: a.run_pending()
        agents.append(agent)
    for a in agents:
        a.start()
    service.run()

    kinds = {d: rec.config.peft.kind for d, rec in service.devices.items()}
    assert kinds == {"phone": "lora", "pi": "adapter", "watch": "prompt"}, kinds
    accepted = {d: rec.updates_accepted for d, rec in service.devices.items()}
    assert accepted == {"phone": 3, "pi": 3, "watch": 3}  # the class-mean round and two training rounds
    assert [r["participants"] for r in service.rounds] == [3, 3, 3]
    assert service.rounds[-1]["accuracy_by_kind"].keys() == {"lora", "adapter", "prompt"}
    state = service.final_state()
    for agent in agents:  # each device ends on its own view of the one global module
        assert agent.final_state is not None
        for name, value in agent.final_state.items():
            big = state[name]
            np.testing.assert_array_equal(value, big[tuple(slice(0, n) for n in value.shape)])
    names = set(state)
    assert any("lora_A" in n for n in names) and any(".adapter." in n for n in names)
    assert "prompt.embeddings" in names
    # the adapter device trained layer 1's adapters only, and they moved away from the identity
    adapter_state = agents[1].final_state
    assert adapter_state is not None
    adapters = [n for n in adapter_state if ".adapter." in n]
    assert adapters and all("layer.1." in n for n in adapters)
    assert np.any(adapter_state["encoder.encoder.layer.1.output.adapter.up.weight"])
