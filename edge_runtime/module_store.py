"""A device's trained modules on disk, beside its outbox: what ``fedpeft export`` reads.

Two modules are kept, each in one file under the device's ``modules/`` folder:

- ``global.bin``: the last global module, written when the service says the run is done;
- ``personal.bin``: this device's fine-tune of it, written after the personalization phase (only
  when the service ran one; the personal module never leaves the device).

Each file is the wire format's global-module container at 32 bits (never pickle), whose meta holds
the device id, which module it is and the training configuration it belongs to, so the module can
be rebuilt on its model without the service. Files are replaced atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime import wire
from edge_runtime.config import TrainConfig
from edge_runtime.errors import DataFormatError, FedPeftError
from edge_runtime.outbox import write_atomically

GLOBAL_MODULE = "global"
PERSONAL_MODULE = "personal"
MODULE_NAMES = (GLOBAL_MODULE, PERSONAL_MODULE)
_CONFIG_ID = "device-module"


@dataclass(frozen=True)
class StoredModule:
    """A module a device kept: its tensors by canonical name and what they belong to."""

    name: str
    device_id: str
    round: int
    config: TrainConfig
    tensors: dict[str, np.ndarray]
    path: Path


class ModuleStore:
    """The ``global`` and ``personal`` modules of one device, one file each in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, name: str) -> Path:
        """The file of module ``name``."""
        if name not in MODULE_NAMES:
            raise ValueError(f"module name must be one of {', '.join(MODULE_NAMES)}, got {name!r}")
        return self.directory / f"{name}.bin"

    def save(
        self,
        name: str,
        tensors: dict[str, np.ndarray],
        config: TrainConfig,
        *,
        device_id: str,
        round_: int,
    ) -> Path:
        """Write module ``name`` (replacing the previous one) and return its file."""
        path = self.path(name)
        module = wire.GlobalModule(
            round=round_,
            config_id=_CONFIG_ID,
            tensors={k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()},
            meta={"module": name, "device_id": device_id, "config": config.to_dict()},
        )
        payload = wire.encode_global(module, bits=32)
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(path, payload)
        return path

    def load(self, name: str) -> StoredModule | None:
        """Module ``name``, or None if this device has not written it."""
        path = self.path(name)
        if not path.is_file():
            return None
        payload = path.read_bytes()
        try:
            module = wire.decode_global(payload, max_bytes=max(len(payload), wire.DEFAULT_MAX_PAYLOAD))
            meta = module.meta
            config_data = meta.get("config")
            if (
                meta.get("module") != name
                or not isinstance(meta.get("device_id"), str)
                or not isinstance(config_data, dict)
            ):
                raise DataFormatError(path, f"does not hold a device's {name!r} module")
            config = TrainConfig.from_dict(config_data)
        except DataFormatError:
            raise
        except FedPeftError as exc:
            raise DataFormatError(path, str(exc)) from None
        return StoredModule(
            name=name,
            device_id=meta["device_id"],
            round=module.round,
            config=config,
            tensors=dict(module.tensors),
            path=path,
        )

    def names(self) -> list[str]:
        """The modules this device has written, global first."""
        return [name for name in MODULE_NAMES if self.path(name).is_file()]
