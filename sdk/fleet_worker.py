"""A worker process of the fleet simulator: hosts several virtual devices, trains them in turn.

Each device keeps its own MQTT client (own client id, own session, own last will) and its own
data; the worker loads the base model once and swaps each device's module in and out of it, so
the memory measured here is what one device of this configuration needs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace
from typing import Any

from edge_runtime.config import TrainConfig
from edge_runtime.data import Dataset


@dataclass(frozen=True)
class VirtualDevice:
    """What a worker needs to run one virtual device: its data (texts or images) travel pickled."""

    device_id: str
    data: Dataset
    profile: dict[str, Any]
    attack: str | None = None
    holdout: Dataset | None = None  # held out of training, to measure personalization


@dataclass(frozen=True)
class WorkerJob:
    """Everything one worker process runs."""

    index: int
    broker_url: str
    fleet: str
    devices: tuple[VirtualDevice, ...]
    seed: int
    threads: int
    log_level: int = logging.WARNING
    resend_after_s: float = 20.0
    max_message_bytes: int | None = None
    # "ort", "ort-plain": this worker's devices train with ONNX Runtime, torch unimportable (and,
    # for ort-plain, onnxruntime.training too, as on a device with plain onnxruntime)
    engine: str = "torch"
    # (artifact_slot(config), folder) of each module, in the flavour of this worker's ORT engine
    artifacts: tuple[tuple[str, str], ...] = ()


def artifact_slot(config: TrainConfig) -> str:
    """What ORT artifacts depend on among what an assignment varies: model, module, labels."""
    return json.dumps([config.model, config.peft.to_dict(), config.num_labels], sort_keys=True)


def worker_main(job: WorkerJob, results: Any, stop: Any) -> None:
    """Entry point of a worker process: run its devices until the server says done or ``stop``."""
    logging.basicConfig(level=job.log_level, format=f"%(asctime)s worker{job.index} %(name)s: %(message)s")
    if job.engine in ("ort", "ort-plain"):  # as on a device with an edge extra: no torch here
        from edge_runtime.engines.ort_engine import block_torch

        already = block_torch(plain_ort=job.engine == "ort-plain")
        if already:
            logging.getLogger("fedpeft.sim").warning(
                "worker%d: %s imported before blocking", job.index, already
            )
    try:
        _run(job, results, stop)
    except BaseException as exc:  # report, never hang the simulator on a dead worker
        results.put(("error", job.index, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        results.put(("exit", job.index, None))


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS reflects what is held."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the pages stay until reused
        pass


def _run(job: WorkerJob, results: Any, stop: Any) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from edge_runtime import wire
    from edge_runtime.agent import DeviceAgent, peak_rss_mb
    from edge_runtime.engines.base import TrainingEngine
    from edge_runtime.transport import MqttTransport, parse_broker_url
    from sdk.attacks import attack_hook, parse_attack

    engines: dict[str, TrainingEngine] = {}

    def factory(config: TrainConfig) -> TrainingEngine:
        # One engine at a time, reused while devices of the same configuration take turns; a
        # device of another configuration gets a fresh one, so that the process holds what one
        # device would (its memory cap is checked against this process's resident memory).
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in engines:
            from edge_runtime.engines import create_engine

            engines.clear()
            _release_memory()
            if job.engine != config.engine:  # the engine is the device's own choice
                config = replace(config, engine=job.engine)
            folder = dict(job.artifacts).get(artifact_slot(config)) if job.artifacts else None
            engines[key] = create_engine(config, seed=job.seed, threads=job.threads, artifacts=folder)
        return engines[key]

    wake = threading.Event()
    url = parse_broker_url(job.broker_url)
    agents: list[DeviceAgent] = []
    transports: list[MqttTransport] = []
    for dev in job.devices:
        status_topic = wire.topic(job.fleet, "status", dev.device_id)
        offline = wire.encode_status(wire.Status(device_id=dev.device_id, state="offline", detail={}))
        transport = MqttTransport(
            url,
            client_id=f"{job.fleet}-{dev.device_id}",
            clean_start=False,  # a persistent session keeps acks and globals across broker restarts
            will=(status_topic, offline, False),
        )
        transport.connect()
        transports.append(transport)
        agent = DeviceAgent(
            dev.device_id,
            job.fleet,
            transport,
            dev.data,
            factory,
            profile=dev.profile,
            seed=job.seed,
            on_ready=lambda _agent: wake.set(),
            max_message_bytes=job.max_message_bytes,
            update_hook=attack_hook(parse_attack(dev.attack)) if dev.attack else None,
            engines=(job.engine,),
            holdout=dev.holdout if dev.holdout is not None and len(dev.holdout) else None,
        )
        agents.append(agent)
    for agent in agents:
        agent.start()
    results.put(("ready", job.index, [a.device_id for a in agents]))
    parent = os.getppid()
    while not stop.is_set() and not all(a.done.is_set() for a in agents):
        if os.getppid() != parent:  # the simulator was killed: nobody is left to report to
            logging.getLogger("fedpeft.sim").warning("worker%d: the simulator is gone, stopping", job.index)
            break
        worked = False
        for agent in agents:
            if agent.run_pending():
                worked = True
                results.put(("trained", job.index, agent.device_id))
            agent.resend_unacknowledged(job.resend_after_s)
        if not worked:
            wake.wait(0.2)
            wake.clear()
    for agent, transport in zip(agents, transports, strict=True):
        stats = asdict(agent.stats)
        stats["transport_bytes_published"] = transport.bytes_published
        stats["transport_bytes_received"] = transport.bytes_received
        stats["worker"] = job.index
        stats["engine"] = job.engine
        stats["worker_peak_rss_mb"] = peak_rss_mb()
        results.put(("stats", job.index, stats))
    time.sleep(0.2)  # let the last acks and publishes flush before closing
    for transport in transports:
        transport.close()
