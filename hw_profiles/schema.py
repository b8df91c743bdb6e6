"""The device profile: what a device has (memory, cores, compute, links, availability).

``hw_profiles`` sits left of everything (``hw_profiles <- edge_runtime <- broker_server <- sdk``)
and so cannot raise ``edge_runtime.errors.ConfigError``; it raises :class:`ProfileError`, a
``ValueError``, and ``edge_runtime`` wraps it in ``ConfigError`` where a user's flag or file is at
fault.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any


class ProfileError(ValueError):
    """A device profile is invalid or unknown; the message names the field or the profile."""


def _positive_number(name: str, value: object) -> None:
    # bool is an int subclass: True must not pass as 1 MB of RAM
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ProfileError(f"DeviceProfile.{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class DeviceProfile:
    """Measured or published resources of one device (frozen: it travels in ``hello`` messages)."""

    name: str = field(metadata={"help": "profile name, e.g. 'pi4-4gb' or 'host'"})
    ram_mb: float = field(metadata={"help": "total RAM in MiB"})
    cores: int = field(metadata={"help": "CPU cores available to the runtime"})
    gflops: float = field(metadata={"help": "fp32 matmul throughput of the whole device, GFLOP/s"})
    uplink_mbps: float = field(default=10.0, metadata={"help": "device to broker, Mbit/s"})
    downlink_mbps: float = field(default=50.0, metadata={"help": "broker to device, Mbit/s"})
    availability: float = field(default=1.0, metadata={"help": "fraction of time online, in (0, 1]"})
    tier: str | None = field(default=None, metadata={"help": "coarse class: low, mid or high"})
    description: str = field(default="", metadata={"help": "what the device is and where figures come from"})
    # Not part of equality's hash: a dict is unhashable, and profiles are used as dict keys.
    extra: dict[str, float] = field(
        default_factory=dict, hash=False, metadata={"help": "further measurements, e.g. step_s"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ProfileError(f"DeviceProfile.name must be a non-empty string, got {self.name!r}")
        for name in ("ram_mb", "gflops", "uplink_mbps", "downlink_mbps"):
            _positive_number(name, getattr(self, name))
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise ProfileError(f"DeviceProfile.cores must be a positive integer, got {self.cores!r}")
        a = self.availability
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (0 < a <= 1):
            raise ProfileError(f"DeviceProfile.availability must be in (0, 1], got {a!r}")
        if self.tier is not None and (not isinstance(self.tier, str) or not self.tier):
            raise ProfileError(f"DeviceProfile.tier must be a non-empty string or null, got {self.tier!r}")
        if not isinstance(self.description, str):
            raise ProfileError(f"DeviceProfile.description must be a string, got {self.description!r}")
        if not isinstance(self.extra, dict):
            raise ProfileError(f"DeviceProfile.extra must be an object, got {self.extra!r}")
        for key, value in self.extra.items():
            if (
                not isinstance(key, str)
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ProfileError(f"DeviceProfile.extra[{key!r}] must be a finite number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form (for ``hello`` messages, reports and profile files)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        """Build from a dict such as ``to_dict()`` gives; unknown or missing keys are refused."""
        if not isinstance(data, dict):
            raise ProfileError(f"a device profile must be a JSON object, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ProfileError(f"unknown device profile fields {unknown}; known: {', '.join(known)}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ProfileError(f"device profile {data.get('name', '?')!r} lacks required fields {missing}")
        return cls(**data)

    def speed_relative_to(self, other: DeviceProfile) -> float:
        """How many times faster this device computes than ``other`` (ratio of GFLOP/s)."""
        return self.gflops / other.gflops
