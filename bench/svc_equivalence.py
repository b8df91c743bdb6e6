"""Equivalence of the aggregation service before and after a refactoring: the same figures.

Runs a set of small deterministic federations in memory (tiny random BERT, fixed seeds, devices
that train in the service's thread as the in-memory broker delivers) through
:class:`~broker_server.service.AggregationService`, one per configuration (strategies fedavg,
median, exact, ffa, clusters, distillation, clip, dp, fedavgm, async), and dumps for each the
SHA-256 of every tensor of the final global state and the run's figures as the reports read them
(:meth:`AggregationService.fleet_summary`), with the wall-clock timings left out. Two dumps of
the same code are identical; two dumps of code that aggregates alike are too.

    PYTHONPATH=. python bench/svc_equivalence.py --out bench/results/svc-split-equivalence/before.json
    python bench/svc_equivalence.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# wall-clock figures: they differ between any two runs
TIMING_KEYS = ("wall_s", "round_wall_s", "server_s", "client_train_s", "train_s")


class CountingTime:
    """The device agent's clock in this benchmark: ``perf_counter`` steps 0.25 s a call, so that a
    device's measured ``train_s`` (and with it each update's payload length) is the same every run;
    ``monotonic`` and ``sleep`` are the real ones."""

    def __init__(self) -> None:
        self.t = 0.0
        self.monotonic = time.monotonic
        self.sleep = time.sleep
        self.time = time.time

    def perf_counter(self) -> float:
        """A clock that advances 0.25 s each time it is read."""
        self.t += 0.25
        return self.t


def _make_deterministic() -> None:
    """What a device measures of its host (training seconds, resident memory) fixed, so that two
    runs send byte-identical updates."""
    import edge_runtime.agent
    import edge_runtime.memory

    edge_runtime.agent.time = CountingTime()  # type: ignore[assignment]
    edge_runtime.memory.current_rss_mb = lambda: 500.0


class StubClock:
    """Asynchronous jobs on a simulated clock: fast devices 1 s a job, "slow" 2.5 s, "snail" 10 s."""

    def start(self, device: str, t: float) -> float:
        """A job starts when it is given."""
        return t

    def finish(self, device: str, start: float, train_s: float, bytes_up: int, bytes_down: int) -> float:
        """When a job's update lands."""
        return start + {"slow": 2.5, "snail": 10.0}.get(device, 1.0)


def _clean(value: Any, *, keep_virtual: bool) -> Any:
    """``value`` as JSON, timings left out."""
    if isinstance(value, dict):
        return {
            str(k): _clean(v, keep_virtual=keep_virtual)
            for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
            if k not in TIMING_KEYS and (keep_virtual or k != "virtual_s")
        }
    if isinstance(value, list | tuple):
        return [_clean(v, keep_virtual=keep_virtual) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float):
        return repr(value)  # every bit of it
    return value


def _digest(state: dict[str, np.ndarray]) -> dict[str, str]:
    return {
        name: hashlib.sha256(np.ascontiguousarray(v).tobytes() + str(v.dtype).encode()).hexdigest()[:16]
        for name, v in sorted(state.items())
    }


def run_one(name: str, root: Path, model: Path, data: Path) -> dict[str, Any]:
    """One configuration's federation: its final modules' hashes and its figures."""
    from broker_server.allocation import AllocationConfig, Allocator
    from broker_server.distillation import unlabeled
    from broker_server.evaluation import Evaluator
    from broker_server.service import AggregationService, ServiceConfig
    from broker_server.state import StateStore
    from edge_runtime.agent import DeviceAgent
    from edge_runtime.config import TrainConfig
    from edge_runtime.data import load_folder
    from edge_runtime.engines.torch_engine import TorchEngine
    from edge_runtime.peft_specs import LoraSpec
    from edge_runtime.transport import InMemoryBroker, InMemoryTransport
    from hw_profiles import DeviceProfile
    from tests.test_mixed_fleet import KIND_GRID, predict_by_kind

    train, test = load_folder(data)
    lora = LoraSpec(rank=2, alpha=4.0)
    cfg = TrainConfig(model=str(model), num_labels=3, seq_len=16, bits=32, batch_size=8, peft=lora)
    n_devices = 3
    kw: dict[str, Any] = {}
    service_kw: dict[str, Any] = {}
    profiles: dict[str, dict[str, Any]] = {}
    split: Callable[[int], Any] = lambda i: train.subset(np.arange(i, len(train), n_devices))  # noqa: E731
    names = [f"d{i}" for i in range(n_devices)]
    if name == "fedavg":
        kw = {"strategy": "fedavg"}
    elif name == "median":
        kw = {"strategy": "median"}
    elif name == "exact":
        kw = {"strategy": "exact"}
    elif name == "ffa":
        cfg = TrainConfig(
            model=str(model), num_labels=3, seq_len=16, bits=32, batch_size=8,
            peft=LoraSpec(rank=2, alpha=4.0, train_a=False),
        )  # fmt: skip
        kw = {"strategy": "ffa"}
    elif name in ("clusters", "clusters_clip"):
        n_devices = 6
        names = [f"d{i}" for i in range(n_devices)]

        def split(i: int) -> Any:
            own = np.flatnonzero(train.labels == i // 2)
            return train.subset(own[(i % 2) :: 2][:8])

        kw = {"clusters": "auto"} | ({"clip_norm": 0.5} if name == "clusters_clip" else {})
    elif name == "distillation":
        cfg = TrainConfig(model=str(model), num_labels=3, seq_len=16, bits=8)
        kw = {"distill_epochs": 1}
        service_kw = {
            "allocator": Allocator(KIND_GRID, predict_by_kind, AllocationConfig(beta=0.0, gamma=0.0)),
            "unlabeled": unlabeled(train.texts[:24], train.label_names),
        }
        names = ["phone", "pi", "watch"]
        profiles = {
            n: DeviceProfile(name=n, ram_mb=ram, cores=1, gflops=5.0).to_dict()
            for n, ram in zip(names, (8192.0, 3000.0, 1800.0), strict=True)
        }
        split = lambda i: train  # noqa: E731
    elif name == "clip":
        kw = {"clip_norm": 0.05}
    elif name == "dp":
        kw = {"clip_norm": 0.5, "dp_noise_multiplier": 0.3, "dp_sample_rate": 1.0}
    elif name == "fedavgm":
        kw = {"server_momentum": 0.9, "server_lr": 1.5}
    elif name == "async":
        n_devices = 4
        names = ["fast1", "fast2", "slow", "snail"]
        split = lambda i: train.subset(np.arange(i, len(train), 4))  # noqa: E731
        kw = {"mode": "async", "buffer_size": 2, "staleness": "poly:1", "max_staleness": 2, "rounds": 8}
        service_kw = {"event_clock": StubClock()}
    else:
        raise SystemExit(f"unknown configuration {name!r}")
    rounds = kw.pop("rounds", 3)
    config = ServiceConfig(
        fleet=name, rounds=rounds, train=cfg, min_clients=len(names), expected_clients=len(names),
        round_timeout_s=30, seed=0, **kw,
    )  # fmt: skip
    store = StateStore(root / f"{name}.sqlite")
    store.set_meta("dp_key", "ab" * 32)  # DP's sampling and noise key, fixed for the comparison
    broker = InMemoryBroker()
    service = AggregationService(
        InMemoryTransport(broker, "server"),
        config,
        Evaluator(cfg, test, seed=0, threads=1),
        store=store,
        **service_kw,
    )
    service.start()
    engines: dict[str, TorchEngine] = {}

    def engine_for(c: TrainConfig) -> TorchEngine:
        key = json.dumps(c.to_dict(), sort_keys=True)
        if key not in engines:
            engines[key] = TorchEngine(c, seed=0, threads=1)
        return engines[key]

    agents = []
    for i, device in enumerate(names):
        agent = DeviceAgent(
            device,
            name,
            InMemoryTransport(broker, device),
            split(i),
            engine_for,
            **({"profile": profiles[device]} if device in profiles else {}),
        )
        agent.on_ready = lambda a: a.run_pending()
        agents.append(agent)
    for a in agents:
        a.start()
    start = time.monotonic()
    service.run()
    seconds = time.monotonic() - start
    summary = service.fleet_summary()
    store.close()
    out = {
        "state": _digest(service.final_state()),
        # the simulated clock of asynchronous versions is deterministic, the wall clock is not
        "rounds": [_clean(r, keep_virtual=r.get("mode") == "async") for r in summary.rounds],
        "final": _clean(dict(summary.final), keep_virtual=False),
        "devices": _clean(
            {
                d: {
                    "config": s.config.to_dict(),
                    "trainable_params": s.trainable_params,
                    "allocation": s.allocation,
                    "cluster": s.cluster,
                    "updates_received": s.updates_received,
                    "updates_accepted": s.updates_accepted,
                    "samples": s.samples,
                    "last_metrics": dict(s.last_metrics),
                }
                for d, s in summary.devices.items()
            },
            keep_virtual=False,
        ),
        "bytes_up_total": summary.bytes_up_total,
        "rejected": _clean(list(summary.rejected), keep_virtual=False),
        "unaggregated": _clean(list(summary.unaggregated), keep_virtual=False),
        "fleet_params": summary.fleet_params,
    }
    print(f"{name}: {len(summary.rounds)} records in {seconds:.1f} s", file=sys.stderr)
    return out


CONFIGS = (
    "fedavg", "median", "exact", "ffa", "clusters", "clusters_clip", "distillation", "clip", "dp",
    "fedavgm", "async",
)  # fmt: skip


def main() -> None:
    """Run every configuration (or those named) and write the JSON, or compare two dumps."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", nargs="*", default=list(CONFIGS))
    parser.add_argument("--compare", nargs=2, type=Path)
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        a.pop("_meta", None)
        b.pop("_meta", None)
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        print(f"{len(a)} configurations; identical: {not differ}; differ: {differ}")
        raise SystemExit(1 if differ else 0)
    import broker_server
    from tests.helpers import write_text_folder
    from tests.tiny_model import make_tiny_bert

    _make_deterministic()
    # one fixed folder: the model's path is in every device's configuration
    root = Path(tempfile.gettempdir()) / "fedpeft-svc-equivalence"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        model = make_tiny_bert(root / "model")
        data = write_text_folder(root / "data", per_class_train=16)
        results: dict[str, Any] = {
            "_meta": {"broker_server": str(Path(broker_server.__file__).parent), "configs": args.only}
        }
        for name in args.only:
            results[name] = run_one(name, root, model, data)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(results, indent=1, sort_keys=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
