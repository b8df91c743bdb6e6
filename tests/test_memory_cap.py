"""Memory caps are enforced while a device trains: halve the batch, then fail cleanly with a reason."""

from __future__ import annotations

import mmap
from collections.abc import Mapping

import numpy as np
import pytest

from edge_runtime import wire
from edge_runtime.agent import DeviceAgent
from edge_runtime.config import TrainConfig
from edge_runtime.data import TextDataset
from edge_runtime.engines.base import EvalResult, ProgressFn, TrainResult
from edge_runtime.errors import MemoryCapExceeded
from edge_runtime.memory import MemoryGuard, current_rss_mb
from edge_runtime.transport import InMemoryBroker, InMemoryTransport

MB_PER_SAMPLE = 30


class HungryEngine:
    """Holds ``batch_size * 30`` MiB of activations per step, like a real engine at scale."""

    name = "hungry"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.state = {"w": np.zeros(4, np.float32)}

    def trainable_state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.state.items()}

    def load_trainable_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.state = {k: np.array(v, np.float32) for k, v in state.items()}

    def train(
        self, data: TextDataset, *, epochs: int, seed: int, progress: ProgressFn | None = None
    ) -> TrainResult:
        for step in range(3):
            # fresh anonymous pages, touched, so resident: a malloc'd array may reuse heap pages that
            # are resident already (after earlier tests freed large blocks, glibc's dynamic mmap
            # threshold serves 30 MiB from the heap), and the RSS would not grow
            activations = mmap.mmap(-1, self.config.batch_size * MB_PER_SAMPLE * 2**20)
            pages = np.frombuffer(activations, np.uint8)
            pages[:: mmap.PAGESIZE] = 1
            assert int(pages[:: mmap.PAGESIZE].sum()) == len(pages) // mmap.PAGESIZE
            if progress is not None:
                progress(step + 1, 3)
            del pages
            activations.close()
        self.state["w"] += 1.0
        return TrainResult(steps=3, samples=len(data), loss=0.5, accuracy=0.5, seconds=0.0)

    def evaluate(self, data: TextDataset, *, batch_size: int = 64) -> EvalResult:
        raise NotImplementedError

    def class_feature_sums(self, data: TextDataset) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


def _agent(cap_mb: float, batch: int) -> tuple[DeviceAgent, InMemoryBroker, list[int]]:
    broker = InMemoryBroker()
    data = TextDataset(texts=("a", "b"), labels=np.array([0, 1]), label_names=("x", "y"))
    batches: list[int] = []

    def factory(cfg: TrainConfig) -> HungryEngine:
        batches.append(cfg.batch_size)
        return HungryEngine(cfg)

    agent = DeviceAgent("d", "f", InMemoryTransport(broker, "d"), data, factory)
    agent.config = TrainConfig(batch_size=batch, mem_cap_mb=cap_mb, bits=32)
    return agent, broker, batches


def _global() -> wire.GlobalModule:
    return wire.GlobalModule(
        round=1, config_id="c", tensors={"w": np.zeros(4, np.float32)}, meta={"phase": "train"}
    )


def test_the_batch_is_halved_until_training_fits_under_the_cap() -> None:
    base = current_rss_mb()
    # 16 x 30 MiB and 8 x 30 MiB go over; 4 x 30 = 120 MiB fits under base + 200
    agent, broker, batches = _agent(cap_mb=base + 200, batch=16)
    sent: list[bytes] = []
    InMemoryTransport(broker, "server").subscribe("fl/f/update/d", lambda t, p: sent.append(p))
    agent._train_and_send(_global(), "base", "train")
    assert batches == [16, 8, 4]
    update = wire.decode_update(sent[0])
    assert update.metrics["batch_size"] == 4
    assert update.metrics["memory_retries"] == 2  # the guard stopped batch 16 and batch 8
    assert update.metrics["peak_rss_mb"] <= base + 200
    assert agent.stats.peak_rss_mb == update.metrics["peak_rss_mb"]


def test_a_device_that_never_fits_fails_with_a_reason_and_tells_the_service() -> None:
    base = current_rss_mb()
    agent, broker, batches = _agent(cap_mb=base + 10, batch=2)
    statuses: list[wire.Status] = []
    InMemoryTransport(broker, "server").subscribe(
        "fl/f/status/d", lambda t, p: statuses.append(wire.decode_status(p))
    )
    agent._on_global("fl/f/global/c", wire.encode_global(_global()))
    assert agent.run_pending()
    assert batches == [2, 1]
    assert "cap" in agent.stats.last_error and "batch of 1" in agent.stats.last_error
    assert statuses and statuses[0].state == "failed" and statuses[0].detail["round"] == 1
    assert "memory" in statuses[0].detail["reason"]
    assert agent.stats.updates_sent == 0


@pytest.mark.parametrize("assigned", [None, "roomy"])
def test_the_devices_own_cap_binds_when_it_is_tighter_than_the_assignments(assigned: str | None) -> None:
    # `fedpeft edge --memory-cap-mb` (memory_cap_mb in edge.toml): the operator's cap holds whatever
    # the service assigned, none or a larger one
    base = current_rss_mb()
    agent, broker, batches = _agent(cap_mb=base + 2000, batch=16)
    if assigned is None:
        agent.config = TrainConfig(batch_size=16, mem_cap_mb=None, bits=32)
    agent.mem_cap_mb = base + 200
    sent: list[bytes] = []
    InMemoryTransport(broker, "server").subscribe("fl/f/update/d", lambda t, p: sent.append(p))
    agent._train_and_send(_global(), "base", "train")
    assert batches == [16, 8, 4]
    assert wire.decode_update(sent[0]).metrics["peak_rss_mb"] <= base + 200


def test_the_guard_trips_only_above_its_cap() -> None:
    with MemoryGuard(None) as free:
        x = np.ones(20 * 2**18, np.float32)
        free.check()  # no cap, never trips
    assert free.peak_mb >= current_rss_mb() - 1 and x.sum() > 0
    with pytest.raises(MemoryCapExceeded, match="over the cap"), MemoryGuard(current_rss_mb() + 5) as guard:
        y = np.ones(50 * 2**18, np.float32)
        assert y.sum() > 0
        guard.check()
