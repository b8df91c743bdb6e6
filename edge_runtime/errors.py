"""The one exception tree of FedPEFT+.

Every error the project raises on purpose derives from :class:`FedPeftError`, so an embedding
application can catch one class. Rejections of received payloads carry a short ``reason`` string
that reaches the log and the run report.

::

    FedPeftError
    ├── ConfigError                 a bad flag, option or configuration value
    ├── DataFormatError             a malformed data file (names the file and the line)
    ├── TransportError              the broker cannot be reached or refused us
    ├── EngineError                 a training engine cannot load or run a module
    │   ├── MemoryCapExceeded       training would not fit (or did not fit) under the memory cap
    │   └── UnsupportedTokenizer    a tokenizer.json the built-in tokenizer cannot run (install tokenizers)
    └── UpdateRejected              a payload failed a check; ``reason`` says which
        ├── PayloadTooLarge         larger than the size limit, rejected before parsing
        ├── MalformedPayload        bad magic, truncated, inconsistent table, bad hash
        ├── SchemaMismatch          unknown schema version or message kind
        ├── ShapeMismatch           a tensor's name, shape or dtype does not match the module
        ├── NonFinite               NaN or infinity in a tensor or a metric
        ├── NormTooLarge            the update's norm exceeds the server's bound
        ├── StaleRound              trained on a round the server no longer accepts
        ├── DuplicateUpdate         the same (device, round, content) was already accepted
        └── UnknownDevice           the sender never said hello or was never assigned
"""

from __future__ import annotations


class FedPeftError(Exception):
    """Base class of every error FedPEFT+ raises on purpose."""


class ConfigError(FedPeftError, ValueError):
    """A flag, option or configuration value is invalid."""


class DataFormatError(FedPeftError, ValueError):
    """A data file is malformed; the message names the file and, where known, the line."""

    def __init__(self, path: object, reason: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class TransportError(FedPeftError, ConnectionError):
    """The MQTT broker cannot be reached, refused the connection or dropped a message."""


class EngineError(FedPeftError, RuntimeError):
    """A training engine cannot load or run the assigned module."""


class MemoryCapExceeded(EngineError):
    """Training would not fit, or did not fit, under the device's memory cap."""


class UnsupportedTokenizer(EngineError):
    """A ``tokenizer.json`` uses a part the built-in WordPiece tokenizer does not implement."""


class UpdateRejected(FedPeftError):
    """A received payload failed a check. ``reason`` is short and goes to the log and report."""

    code = "rejected"

    def __init__(self, reason: str, *, device: str | None = None, round: int | None = None) -> None:
        self.reason = reason
        self.device = device
        self.round = round
        super().__init__(f"{self.code}: {reason}")


class PayloadTooLarge(UpdateRejected):
    """The payload is larger than the configured limit; it was not parsed."""

    code = "payload_too_large"


class MalformedPayload(UpdateRejected):
    """The container is not well formed: bad magic, truncated, inconsistent or bad hash."""

    code = "malformed"


class SchemaMismatch(UpdateRejected):
    """The schema version or message kind is not one this build understands."""

    code = "schema_mismatch"


class ShapeMismatch(UpdateRejected):
    """A tensor's name, shape or dtype does not match the assigned module."""

    code = "shape_mismatch"


class NonFinite(UpdateRejected):
    """A tensor or metric holds NaN or infinity."""

    code = "non_finite"


class NormTooLarge(UpdateRejected):
    """The update's L2 norm exceeds the server's bound."""

    code = "norm_too_large"


class StaleRound(UpdateRejected):
    """The update was trained on a round the server no longer accepts."""

    code = "stale_round"


class DuplicateUpdate(UpdateRejected):
    """This (device, round, content) was already accepted; it is counted once."""

    code = "duplicate"


class UnknownDevice(UpdateRejected):
    """The sender never said hello or holds no assignment."""

    code = "unknown_device"
