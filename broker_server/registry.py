"""The device registry: who said hello, what each device was assigned, who is online or left out.

It asks the allocator for a device's configuration once, keeps that choice in the state store (a
device's updates depend on it, so a restart must not change it) and holds each device's counters
for the report. It publishes nothing: the service assigns and offers work to the devices it returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from broker_server.allocation import Allocation, Allocator, NoFeasibleConfig, peft_key
from broker_server.state import ASSIGNMENT_KEY, StateStore
from edge_runtime import wire
from edge_runtime.config import TrainConfig
from hw_profiles import DeviceProfile, ProfileError

log = logging.getLogger("fedpeft.server")


@dataclass
class DeviceRecord:
    """What the service knows of one device."""

    device_id: str
    hello: wire.Hello
    config: TrainConfig
    allocation: Allocation | None = None
    # the allocation's utility terms for the report; kept with the assignment across restarts
    allocation_terms: dict[str, float] | None = None
    excluded: str = ""  # why the allocator left this device out, if it did
    updates_received: int = 0
    updates_accepted: int = 0
    bytes_up: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    train_s: float = 0.0
    samples: int = 0
    online: bool = True

    def counters(self) -> dict[str, Any]:
        """What the report counts for this device, as the state store keeps it."""
        return {
            "updates_received": self.updates_received,
            "bytes_up": self.bytes_up,
            "last_metrics": dict(self.last_metrics),
            "train_s": self.train_s,
            "samples": self.samples,
        }

    def restore_counters(self, counters: dict[str, Any]) -> None:
        """Take back the counters a service counted before a restart (see :meth:`counters`)."""
        self.updates_received = int(counters.get("updates_received", 0))
        self.bytes_up = int(counters.get("bytes_up", 0))
        self.last_metrics = {str(k): float(v) for k, v in dict(counters.get("last_metrics", {})).items()}
        self.train_s = float(counters.get("train_s", 0.0))
        self.samples = int(counters.get("samples", 0))

    def took(self, update: wire.UpdateMessage) -> None:
        """Count an accepted update: its metrics, training time and sample count."""
        self.updates_accepted += 1
        self.last_metrics = dict(update.metrics)
        self.train_s += float(update.metrics.get("train_s", 0.0))
        self.samples = update.num_samples


class DeviceRegistry:
    """Every device of the fleet by id, configured by the allocator (or the fleet's one config)."""

    def __init__(
        self,
        train: TrainConfig,
        allocator: Allocator | None,
        store: StateStore | None,
        *,
        serve_artifacts: bool = True,
    ) -> None:
        self.train = train
        self.serve_artifacts = serve_artifacts
        self.allocator = allocator
        self.store = store
        self.devices: dict[str, DeviceRecord] = {}
        # each device's counters from before a restart, applied when its record is made
        self.stored_counters: dict[str, dict[str, Any]] = {}

    def __contains__(self, device: object) -> bool:
        return device in self.devices

    def __iter__(self) -> Iterator[DeviceRecord]:
        return iter(self.devices.values())

    def __len__(self) -> int:
        return len(self.devices)

    def get(self, device: str) -> DeviceRecord | None:
        """The device's record, or None if it never said hello."""
        return self.devices.get(device)

    def hello(self, device: str, hello: wire.Hello, payload: bytes) -> tuple[DeviceRecord, bool]:
        """Register ``device`` or take its new hello; returns its record and whether it was offline
        (back after its last will). The hello is stored so that a restart registers it again."""
        record = self.devices.get(device)
        returning = record is not None and not record.online
        if record is None:
            record = self.register(device, hello)
            log.info("device %s registered (%d samples)", device, hello.num_samples)
        else:
            record.hello = hello
            record.online = True
        if self.store is not None:
            self.store.save_device(device, payload, time.time())
        return record, returning

    def register(self, device: str, hello: wire.Hello) -> DeviceRecord:
        """A new record for ``device``, configured, with what was counted for it before a restart."""
        record = DeviceRecord(device_id=device, hello=hello, config=self.train)
        self.configure(record)
        stored = self.stored_counters.pop(device, None)
        if stored is not None:
            record.restore_counters(stored)
        self.devices[device] = record
        return record

    def servable(self, record: DeviceRecord) -> tuple[str, ...]:
        """The device's engines that this service can serve, in the device's order.

        ``ort`` trains from onnxruntime-training artifacts, which this service builds only where
        onnxruntime-training is installed (Linux x86_64, CPython <= 3.11); without it the device
        gets its next engine, or is left out naming the package if ``ort`` was its only one.
        """
        engines = tuple(record.hello.engines)
        if "ort" not in engines or not self.serve_artifacts:
            return engines
        from edge_runtime.engines.ort_engine import ORT_TRAINING_INSTALL, ort_available

        if ort_available():
            return engines
        rest = tuple(e for e in engines if e != "ort")
        if not rest:
            raise NoFeasibleConfig(
                f"device {record.device_id} offers only engine ort, whose training artifacts this "
                f"service builds with {ORT_TRAINING_INSTALL}, not installed here"
            )
        log.info("device %s offers ort; without onnxruntime-training here it gets %s", record.device_id, rest)
        return rest

    def configure(self, record: DeviceRecord) -> None:
        """Choose the device's configuration: the allocator's pick for its profile, or the fleet's."""
        if self.allocator is None:
            return
        stored = None if self.store is None else self.store.get_meta(ASSIGNMENT_KEY + record.device_id)
        if stored is not None:  # assigned before a restart: keep it, its updates depend on it
            record.config = TrainConfig.from_dict(stored["config"])
            record.excluded = str(stored.get("excluded", ""))
            record.allocation_terms = stored.get("terms")
            return
        try:
            profile = DeviceProfile.from_dict(dict(record.hello.profile))
            record.config, record.allocation = self.allocator.assign(
                self.train, profile, record.hello.num_samples, engines=self.servable(record)
            )
        except (NoFeasibleConfig, ProfileError) as exc:
            record.excluded = str(exc)
            log.warning("device %s left out: %s", record.device_id, exc)
        else:
            record.allocation_terms = None if record.allocation is None else record.allocation.terms()
            log.info(
                "device %s assigned %s on %s, batch %d, %d bits (U=%.3f)",
                record.device_id,
                peft_key(record.config.peft),
                record.config.engine,
                record.config.batch_size,
                record.config.bits,
                record.allocation.utility if record.allocation else float("nan"),
            )
        if self.store is not None:
            self.store.set_meta(
                ASSIGNMENT_KEY + record.device_id,
                {
                    "config": record.config.to_dict(),
                    "excluded": record.excluded,
                    "terms": record.allocation_terms,
                },
            )

    def able(self) -> list[DeviceRecord]:
        """Devices that can train (the allocator did not leave them out), online or not."""
        return [r for r in self.devices.values() if not r.excluded]

    def participants(self) -> set[str]:
        """Devices a round waits for: online and able to train."""
        return {d for d, r in self.devices.items() if r.online and not r.excluded}

    def online_count(self) -> int:
        """Devices whose last word was not offline, left out or not."""
        return sum(r.online for r in self.devices.values())

    def left_out(self) -> str:
        """Why each left-out device is left out, for an error message."""
        return "; ".join(f"{r.device_id}: {r.excluded}" for r in self.devices.values() if r.excluded)
