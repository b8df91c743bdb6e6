"""Shapes of the global state: the phases of a run, configuration ids, and groups of devices that
share one global topic and one view of the module."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from edge_runtime.config import TrainConfig

STATS_PHASE = "stats"
"""Round 0 with a class-mean head: devices send per-class feature sums of the frozen model."""
TRAIN_PHASE = "train"
PERSONALIZE_PHASE = "personalize"
"""After the last round: devices fine-tune the final module and report what it measured."""
DONE_PHASE = "done"


@dataclass
class Group:
    """Devices that train the same configuration share one global topic and one module view."""

    config: TrainConfig
    config_id: str
    topic: str
    shapes: dict[str, tuple[int, ...]]
    global_id: str = ""


def config_id(config: TrainConfig) -> str:
    """A short content address of a training configuration, used in the global topic."""
    blob = json.dumps(config.to_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
