"""A device's service configuration: the TOML file behind ``fedpeft edge --config``, validated.

The file holds the same settings as ``fedpeft edge``'s flags, one key per flag (``device_id`` for
``--device-id``), plus ``memory_cap_mb``. Command-line flags override the file. Every error names
where the bad value came from: ``edge.toml: key 'broker': ...`` for the file, ``--broker: ...`` for
a flag. Unknown keys are refused by name.

The broker password never sits in the TOML file (a service's configuration tends to be shared and
checked in): ``credentials`` names a separate file of one line ``user:password``, which must be
accessible by its owner alone (mode 0600 or 0400). Relative paths in the file are relative to the
file's folder, so the configuration means the same whatever the service's working directory.

::

    broker = "mqtts://broker.example.org:8883"
    fleet = "shop"
    device_id = "pi-7"
    data = "/var/lib/fedpeft-edge/data"
    state = "/var/lib/fedpeft-edge"
    credentials = "/etc/fedpeft/credentials"
    ca_file = "/etc/fedpeft/ca.crt"
    memory_cap_mb = 1024
"""

from __future__ import annotations

import math
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edge_runtime.data import resolve_data_dir
from edge_runtime.engines import DEVICE_ENGINE_CHOICES
from edge_runtime.errors import ConfigError
from edge_runtime.transport import BrokerUrl, parse_broker_url
from edge_runtime.wire import _segment_problem

ENGINE_CHOICES = DEVICE_ENGINE_CHOICES
REQUIRED_KEYS = ("broker", "fleet", "device_id", "data")
PATH_KEYS = ("data", "state", "credentials", "ca_file", "cert_file", "key_file", "artifacts_cache")
BROKER_FORMAT = "expected mqtt://host:port or mqtts://host:port"


def flag_name(key: str) -> str:
    """The command-line flag of a configuration key: ``device_id`` -> ``--device-id``."""
    return "--" + key.replace("_", "-")


@dataclass(frozen=True)
class DeviceConfig:
    """One device service: where the broker is, who this device is, its data, state and limits."""

    broker: str = field(metadata={"help": "mqtt://host:port or mqtts://host:port"})
    fleet: str = field(metadata={"help": "fleet name (topic prefix fl/FLEET/...)"})
    device_id: str = field(metadata={"help": "this device's id; it publishes only under it"})
    data: Path = field(metadata={"help": "folder with this device's train.jsonl (or train.csv)"})
    state: Path | None = field(
        default=None, metadata={"help": "folder of the durable outbox and the fetched ORT artifacts"}
    )
    credentials: Path | None = field(
        default=None, metadata={"help": "file of one line user:password, mode 0600"}
    )
    ca_file: Path | None = field(default=None, metadata={"help": "CA certificate for mqtts://"})
    cert_file: Path | None = field(default=None, metadata={"help": "client certificate for mqtts://"})
    key_file: Path | None = field(default=None, metadata={"help": "client key for mqtts://"})
    memory_cap_mb: float | None = field(
        default=None,
        metadata={"help": "MiB this device may use for training; the service sizes modules under it"},
    )
    max_samples: int | None = field(default=None, metadata={"help": "use at most this many samples"})
    seed: int = 0
    max_message_bytes: int | None = field(default=None, metadata={"help": "the broker's message limit"})
    resend_after: float = field(
        default=30.0, metadata={"help": "seconds before an unacknowledged update is sent again"}
    )
    engine: str = field(default="auto", metadata={"help": "auto, torch or ort"})
    artifacts_cache: Path | None = field(
        default=None, metadata={"help": "folder of the ORT artifacts (default STATE/artifacts)"}
    )
    # where each value came from, for error messages: "edge.toml: key 'fleet'" or "--fleet"
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    source: str = field(default="", compare=False, repr=False, metadata={"help": "the file's name"})

    def where(self, key: str) -> str:
        """Where ``key``'s value came from (or, unset, where it belongs), as errors name it."""
        if key in self.origins:
            return self.origins[key]
        return f"{self.source}: key {key!r}" if self.source else flag_name(key)

    def _fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {problem}")

    def __post_init__(self) -> None:
        url = self._broker_url()
        if url.password is not None and self.where("broker") != flag_name("broker"):  # i.e. in a file
            raise self._fail("broker", "put the password in the credentials file, not in the URL")
        if self.credentials is not None and url.username is not None:
            raise self._fail("broker", "has a user and 'credentials' is set too: give the user in one place")
        for key in ("fleet", "device_id"):
            value = getattr(self, key)
            problem = _segment_problem(value) if isinstance(value, str) else "must be a string"
            if problem:
                raise self._fail(key, f"{str(value)[:40]!r} {problem}")
        for key in PATH_KEYS:
            value = getattr(self, key)
            if value is not None and (not isinstance(value, Path) or not str(value).strip()):
                raise self._fail(key, f"expected a path, got {value!r}")
        if (self.ca_file or self.cert_file or self.key_file) and not url.tls:
            key = next(k for k in ("ca_file", "cert_file", "key_file") if getattr(self, k))
            raise self._fail(key, f"TLS files need an mqtts:// broker, got {url.scheme}://")
        if (self.cert_file is None) != (self.key_file is None):
            key = "cert_file" if self.cert_file is None else "key_file"
            raise self._fail(key, "is missing: a client certificate needs both cert_file and key_file")
        cap = self.memory_cap_mb
        if cap is not None and not (_is_number(cap) and math.isfinite(cap) and cap >= 64):
            raise self._fail("memory_cap_mb", f"expected a number of MiB, at least 64, got {cap!r}")
        for key in ("max_samples", "max_message_bytes"):
            value = getattr(self, key)
            if value is not None and not (_is_int(value) and value >= 1):
                raise self._fail(key, f"expected a positive integer, got {value!r}")
        if not _is_int(self.seed):
            raise self._fail("seed", f"expected an integer, got {self.seed!r}")
        if not (
            _is_number(self.resend_after) and math.isfinite(self.resend_after) and self.resend_after >= 0
        ):
            raise self._fail(
                "resend_after", f"expected a non-negative number of seconds, got {self.resend_after!r}"
            )
        if self.engine not in ENGINE_CHOICES:
            raise self._fail("engine", f"expected one of {', '.join(ENGINE_CHOICES)}, got {self.engine!r}")

    def _broker_url(self) -> BrokerUrl:
        if not isinstance(self.broker, str):
            raise self._fail("broker", f"{BROKER_FORMAT}, got {self.broker!r}")
        try:
            return parse_broker_url(self.broker)
        except ConfigError:
            shown = str(self.broker) if "@" not in self.broker else "<a URL with credentials>"
            raise self._fail("broker", f"{BROKER_FORMAT}, got {shown!r}") from None

    @property
    def state_dir(self) -> Path:
        """The state folder: as set, else ``.fedpeft-edge/DEVICE_ID`` under the working directory."""
        return self.state if self.state is not None else Path(".fedpeft-edge") / self.device_id

    @property
    def outbox_dir(self) -> Path:
        """Where the durable outbox lives: a restarted service resends what it holds."""
        return self.state_dir / "outbox"

    def broker_url(self) -> BrokerUrl:
        """The broker URL with the user and password of the credentials file, if one is set."""
        url = self._broker_url()
        if self.credentials is None:
            return url
        user, password = read_credentials(self.credentials, self.where("credentials"))
        return replace(url, username=user, password=password)

    def check_files(self) -> None:
        """Check that the files and folders this device reads exist, naming the key of one missing."""
        for key in ("data", "credentials", "ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path is None:
                continue
            if key == "data":
                try:  # a folder, or (from --data) a dataset name under $FEDPEFT_DATASETS
                    resolve_data_dir(path)
                except ConfigError:
                    raise self._fail(key, f"no such folder: {path}") from None
            elif not path.is_file():
                raise self._fail(key, f"no such file: {path}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is not 1


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_credentials(path: Path, where: str = "credentials") -> tuple[str, str]:
    """``(user, password)`` from a file of one line ``user:password`` that only its owner can read."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{where}: {path} is not a regular file")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{where}: {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run chmod 600 {path}"
        )
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc}") from None
    lines = [line for line in lines if line and not line.startswith("#")]
    # the password may hold ':', the user may not; never echo either in an error
    if len(lines) != 1 or ":" not in lines[0] or not lines[0].split(":", 1)[0]:
        raise ConfigError(f"{where}: {path} must hold one line user:password")
    user, password = lines[0].split(":", 1)
    return user, password


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli backport, if the user installed it
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(
                f"{path.name}: reading --config needs Python 3.11 or later (tomllib), "
                "or 'pip install tomli' on Python 3.10"
            ) from None
    try:
        with open(path, "rb") as f:
            return dict(tomllib.load(f))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path.name}: not valid TOML: {exc}") from None


def _from_file(key: str, value: object, folder: Path, where: str) -> object:
    """A TOML value as the dataclass field wants it: paths resolved against the file's folder."""
    if key in PATH_KEYS:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: expected a path (a non-empty string), got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else folder / path
    if key == "memory_cap_mb" or key == "resend_after":
        if not _is_number(value):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)  # type: ignore[arg-type]
    if key in ("broker", "fleet", "device_id", "engine") and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def device_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> DeviceConfig:
    """The configuration from the TOML file at ``path`` (if any), with ``overrides`` (flags) on top.

    ``overrides`` maps keys to values already parsed by the command line; ``None`` means the flag
    was not given. Without a file, ``broker``, ``fleet``, ``device_id`` and ``data`` must come from
    the flags; with one, ``state`` must be set too (a service's outbox must not depend on its
    working directory).
    """
    keys = setting_keys()
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    required = list(REQUIRED_KEYS)
    name = ""
    if path is not None:
        file = Path(path)
        name = file.name
        data = _load_toml(file)
        unknown = sorted(set(data) - set(keys))
        if unknown:
            raise ConfigError(
                f"{name}: unknown key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(k) for k in unknown)}; known keys: {', '.join(keys)}"
            )
        folder = file.resolve().parent
        for key, value in data.items():
            origins[key] = f"{name}: key {key!r}"
            values[key] = _from_file(key, value, folder, origins[key])
        required.append("state")
    for key, value in (overrides or {}).items():
        if key not in keys:
            raise ConfigError(f"unknown device setting {key!r}")
        if value is not None:
            values[key] = Path(value) if key in PATH_KEYS else value
            origins[key] = flag_name(key)
    missing = [key for key in required if key not in values]
    if missing and name:
        key = missing[0]
        raise ConfigError(f"{name}: key {key!r} is missing (set it in {name} or pass {flag_name(key)})")
    if missing:
        raise ConfigError(f"{flag_name(missing[0])} is required (or give --config FILE)")
    return DeviceConfig(**values, origins=origins, source=name)


def setting_keys() -> list[str]:
    """The keys of a device's settings, in order: the TOML file's keys and the flags' names."""
    return [f.name for f in fields(DeviceConfig) if f.name not in ("origins", "source")]
