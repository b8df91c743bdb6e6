"""``EdgeClient``: federated training embedded in an app, in a few lines.

from sdk import EdgeClient
client = EdgeClient("mqtt://broker:1883", fleet="shop", device_id="till-3", data="/data/till3",
                    state_dir="/var/lib/till/fedpeft", memory_cap_mb=512)
stats = client.run()          # blocks until the service publishes its last global module
module = client.final_module  # the trained PEFT module, by tensor name
personal = client.personal_module  # this device's fine-tune of it, if the service asked for one

``state_dir`` holds the durable outbox: an app restarted there resends the updates the service never
acknowledged. It also keeps the final global module and the personal one (``modules/``, see
:mod:`edge_runtime.module_store`), which ``fedpeft export --state STATE_DIR`` turns into a peft
adapter or an ONNX model. ``memory_cap_mb`` is announced to the service and enforced while training.
examples/embedded_client.py is a whole app.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import wire
from edge_runtime.agent import DeviceAgent, DeviceStats
from edge_runtime.data import (
    DATASET_TYPES,
    Dataset,
    load_folder,
    load_split,
    resolve_data_dir,
)
from edge_runtime.engines import device_engines
from edge_runtime.module_store import ModuleStore
from edge_runtime.outbox import Outbox
from edge_runtime.transport import BrokerUrl, MqttTransport, parse_broker_url
from hw_profiles import measure


class EdgeClient:
    """One device: connects, says hello, trains what it is assigned, sends updates until done."""

    def __init__(
        self,
        broker: str | BrokerUrl,
        *,
        fleet: str,
        device_id: str,
        data: str | Path | Dataset,
        state_dir: str | Path | None = None,
        max_samples: int | None = None,
        seed: int = 0,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        resend_after_s: float = 30.0,
        max_message_bytes: int | None = None,
        engine: str = "auto",
        artifacts_cache: str | Path | None = None,
        holdout: Dataset | None = None,
        memory_cap_mb: float | None = None,
    ) -> None:
        engines = device_engines(engine)  # before connecting: a missing engine is a bad flag
        self.holdout = holdout
        self.data: Dataset
        if isinstance(data, DATASET_TYPES):
            self.data = data
        else:
            folder = resolve_data_dir(data)
            if holdout is None and (
                any((folder / f"test{s}").is_file() for s in (".jsonl", ".csv")) or (folder / "test").is_dir()
            ):
                # the folder's test split is this device's held-out data (personalization is
                # measured on it, never trained on)
                self.data, self.holdout = load_folder(folder, train_limit=max_samples, seed=seed)
            else:
                self.data = load_split(folder, "train", limit=max_samples, seed=seed)
        self.fleet = fleet
        self.device_id = device_id
        self.seed = seed
        self.resend_after_s = resend_after_s
        status_topic = wire.topic(fleet, "status", device_id)
        offline = wire.encode_status(wire.Status(device_id=device_id, state="offline", detail={}))
        self.transport = MqttTransport(
            broker if isinstance(broker, BrokerUrl) else parse_broker_url(broker),
            client_id=f"{fleet}-{device_id}",
            clean_start=False,
            will=(status_topic, offline, True),
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )
        self._status_topic = status_topic
        state = Path(state_dir) if state_dir is not None else Path(".fedpeft-edge") / device_id
        profile = measure().to_dict()
        if memory_cap_mb is not None:
            # announced, so the service sizes this device's module under it; enforced by the agent
            profile["extra"]["mem_cap_mb"] = float(memory_cap_mb)
        # the agent's own engine factory: create_engine, with the ORT artifacts it fetched
        self.agent = DeviceAgent(
            device_id,
            fleet,
            self.transport,
            self.data,
            profile=profile,
            engines=engines,
            seed=seed,
            outbox=Outbox(state / "outbox"),
            max_message_bytes=max_message_bytes,
            artifacts_cache=Path(artifacts_cache) if artifacts_cache is not None else state / "artifacts",
            holdout=self.holdout,
            mem_cap_mb=memory_cap_mb,
            modules=ModuleStore(state / "modules"),
        )
        self._stop = threading.Event()

    def run(self) -> DeviceStats:
        """Train until the service publishes its last global module or :meth:`stop` is called."""
        self.transport.connect()
        try:
            self.agent.start()
            online = wire.encode_status(wire.Status(self.device_id, "online", {}))
            self.transport.publish(self._status_topic, online, retain=True)
            self.agent.run(self._stop, resend_s=self.resend_after_s)
            offline = wire.encode_status(wire.Status(self.device_id, "offline", {"reason": "done"}))
            self.transport.publish(self._status_topic, offline, retain=True)
        finally:
            self.transport.close()
        return self.agent.stats

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()

    @property
    def final_module(self) -> dict[str, np.ndarray] | None:
        """The last global module, once the service said done."""
        return self.agent.final_state

    @property
    def personal_module(self) -> dict[str, np.ndarray] | None:
        """This device's fine-tune of the final global module (when the service ran personalization)."""
        return self.agent.personal_state

    def summary(self) -> dict[str, Any]:
        """What this device did, as a dict."""
        s = self.agent.stats
        return {
            "device_id": s.device_id,
            "updates_sent": s.updates_sent,
            "updates_accepted": s.updates_accepted,
            "peak_rss_mb": s.peak_rss_mb,
            "train_s": s.train_s,
        } | self.agent.personalization
