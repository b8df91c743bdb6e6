"""The wire format: one binary container for every message, paired ``encode_*``/``decode_*``.

Container layout (all integers little-endian)::

    magic        4 bytes   b"FPFT"
    version      u16       SCHEMA_VERSION
    kind         u8        MessageKind
    header_len   u32       then header_len bytes: a UTF-8 JSON object (the message's fields)
    n_tensors    u32       then, per tensor:
        name_len   u16       then name_len bytes of UTF-8 (non-empty, unique in the message)
        bits       u8        32, 16, 8, 4 or 2
        ndim       u8        at most 8
        dims       u32 * ndim
        rows       u32       scale_rows(shape) at 8, 4 and 2 bits; 0 at 32 and 16 bits
        lo         f32 * rows
        scale      f32 * rows
        data_len   u32       then data_len bytes: float32, float16 or packed codes
    sha256       32 bytes  SHA-256 of every byte before it

The content id (content address) of a message is the hex SHA-256 of the whole payload.

Decoders trust nothing they have not checked, in this order: the size limit (before reading a
byte), the minimum length, the magic, the schema version, the hash, the kind, then every length,
shape and count in the tensor table against the bytes that remain, the header's fields and types,
and finally the decoded values (finite). Every failure raises an
:class:`~edge_runtime.errors.UpdateRejected` subclass with a short ``reason``; nothing else
escapes a decoder. The version comes before the hash so that a device speaking a newer schema is
told "unknown schema version" rather than "bad hash". JSON only: never pickle, never eval.

Topics are ``fl/{fleet}/{kind}/{device}``; see :func:`topic` and :func:`parse_topic`. Artifact
chunks (:mod:`edge_runtime.artifact_transfer`) take one level more, ``fl/{fleet}/artifact/{key}/{index}``,
so that a device subscribes to its own key's chunks only (MQTT wildcards match whole levels); see
:func:`artifact_topic` and :func:`parse_artifact_topic`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from edge_runtime.errors import (
    ConfigError,
    FedPeftError,
    MalformedPayload,
    NonFinite,
    PayloadTooLarge,
    SchemaMismatch,
)
from edge_runtime.quantize import (
    SUPPORTED_BITS,
    QuantizedTensor,
    check_bits,
    dequantize,
    packed_nbytes,
    quantize,
    scale_rows,
)

MAGIC = b"FPFT"
SCHEMA_VERSION = 2  # 2: tensors with more rows than columns are quantized per column
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
MAX_NDIM = 8
MAX_ELEMENTS = 50_000_000  # per tensor and per message: a PEFT module is far smaller
MAX_TOPIC_SEGMENT = 128
TOPIC_KINDS = ("hello", "assign", "global", "update", "ack", "status", "artifact")

_PREAMBLE = struct.Struct("<4sHBI")  # magic, version, kind, header length
_HASH_LEN = 32
_MIN_LEN = _PREAMBLE.size + 2 + 4 + _HASH_LEN  # the smallest header is "{}"
_MAX_INT = 2**63 - 1  # counts and rounds must fit a SQLite integer
_F64_MAX = float(np.finfo(np.float64).max)


class MessageKind(IntEnum):
    """The message kinds the container carries (the ``kind`` byte)."""

    HELLO = 1
    ASSIGN = 2
    GLOBAL = 3
    UPDATE = 4
    ACK = 5
    STATUS = 6


@dataclass(frozen=True)
class Hello:
    """A device's introduction: its measured profile and a summary of its data."""

    device_id: str
    profile: dict[str, Any]
    num_samples: int
    label_histogram: tuple[int, ...]
    engines: tuple[str, ...] = ("torch",)


@dataclass(frozen=True)
class Assignment:
    """The server's choice of PEFT module and training configuration for one device."""

    device_id: str
    round: int
    config: dict[str, Any]
    global_topic: str
    # for engine "ort": {"key", "size", "sha256", "chunks"} of the artifact pack to fetch once
    artifact: dict[str, Any] | None = None


@dataclass(frozen=True)
class GlobalModule:
    """The global trainable module of one configuration at one round."""

    round: int
    config_id: str
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateMessage:
    """A device's parameter deltas for one round, sent at ``bits`` bits."""

    device_id: str
    round: int
    base_id: str  # content id of the global module the device trained from
    num_samples: int
    metrics: dict[str, float]
    tensors: dict[str, np.ndarray]
    bits: int


@dataclass(frozen=True)
class Ack:
    """The server's application-level acknowledgement of one update."""

    device_id: str
    round: int
    content_id: str
    accepted: bool
    reason: str = ""


@dataclass(frozen=True)
class Status:
    """A device's state ("online", "offline", "training", ...) and free-form detail."""

    device_id: str
    state: str
    detail: dict[str, Any] = field(default_factory=dict)


Message = Hello | Assignment | GlobalModule | UpdateMessage | Ack | Status


def content_id(payload: bytes) -> str:
    """The content address of a payload: the hex SHA-256 of all its bytes."""
    return hashlib.sha256(payload).hexdigest()


# --- topics ------------------------------------------------------------------------------------


def _segment_problem(value: object) -> str | None:
    """Why ``value`` cannot be one segment of a topic, or None if it can."""
    if not isinstance(value, str) or not value:
        return "is empty"
    if len(value) > MAX_TOPIC_SEGMENT:
        return f"is longer than {MAX_TOPIC_SEGMENT} characters"
    # + and # are MQTT wildcards, / separates levels, NUL and surrogates are not allowed by MQTT.
    if any(c in "/+#\x00" or "\ud800" <= c <= "\udfff" for c in value):
        return "holds '/', '+', '#' or a character MQTT forbids"
    return None


def topic(fleet: str, kind: str, device: str) -> str:
    """The topic ``fl/{fleet}/{kind}/{device}``; :class:`ConfigError` on a bad part."""
    for what, value in (("fleet", fleet), ("device", device)):
        problem = _segment_problem(value)
        if problem:
            raise ConfigError(f"{what} name {str(value)[:40]!r} {problem}")
    if kind not in TOPIC_KINDS:
        raise ConfigError(f"unknown topic kind {kind!r}; expected one of {', '.join(TOPIC_KINDS)}")
    return f"fl/{fleet}/{kind}/{device}"


def parse_topic(text: str) -> tuple[str, str, str]:
    """Split ``fl/{fleet}/{kind}/{device}`` into (fleet, kind, device); else MalformedPayload."""
    parts = text.split("/") if isinstance(text, str) else []
    if len(parts) != 4 or parts[0] != "fl":
        raise MalformedPayload(f"topic {str(text)[:80]!r} is not fl/FLEET/KIND/DEVICE")
    _, fleet, kind, device = parts
    for what, value in (("fleet", fleet), ("device", device)):
        problem = _segment_problem(value)
        if problem:
            raise MalformedPayload(f"topic {what} {value[:40]!r} {problem}")
    if kind not in TOPIC_KINDS:
        raise MalformedPayload(f"unknown topic kind {kind[:20]!r}")
    return fleet, kind, device


def artifact_topic(fleet: str, key: str, index: int) -> str:
    """The topic of chunk ``index`` of artifact ``key``: ``fl/{fleet}/artifact/{key}/{index}``."""
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ConfigError(f"artifact chunk index must be a non-negative integer, got {index!r}")
    return f"{topic(fleet, 'artifact', key)}/{index}"


def artifact_filter(fleet: str, key: str) -> str:
    """The subscription that matches every chunk of artifact ``key``."""
    return f"{topic(fleet, 'artifact', key)}/+"


def parse_artifact_topic(text: str) -> tuple[str, str, int]:
    """Split ``fl/{fleet}/artifact/{key}/{index}`` into (fleet, key, index); else MalformedPayload."""
    parts = text.split("/") if isinstance(text, str) else []
    if len(parts) != 5 or not parts[4].isdigit() or len(parts[4]) > 9:
        raise MalformedPayload(f"topic {str(text)[:80]!r} is not fl/FLEET/artifact/KEY/INDEX")
    fleet, kind, key = parse_topic("/".join(parts[:4]))
    if kind != "artifact":
        raise MalformedPayload(f"topic {str(text)[:80]!r} is not an artifact topic")
    return fleet, key, int(parts[4])


# --- header fields -----------------------------------------------------------------------------
# One table per kind, used by both sides: encoders check what they are about to send (ConfigError)
# and decoders check what they received (MalformedPayload), so an encoded message always decodes.

_Check = Callable[[Any], str | None]  # None if the value is acceptable, else what is wrong


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def _nonempty_str(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "must be a non-empty string"


def _count(v: Any) -> str | None:
    return None if _is_int(v) and 0 <= v <= _MAX_INT else "must be a non-negative integer"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _object(v: Any) -> str | None:
    return None if isinstance(v, dict) else "must be a JSON object"


def _device(v: Any) -> str | None:
    problem = _segment_problem(v)
    return f"must be a valid topic segment ({problem})" if problem else None


def _counts(v: Any) -> str | None:
    ok = isinstance(v, list) and all(_count(x) is None for x in v)
    return None if ok else "must be a list of non-negative integers"


def _strings(v: Any) -> str | None:
    return None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "must be a list of strings"


def _bits(v: Any) -> str | None:
    return None if _is_int(v) and v in SUPPORTED_BITS else f"must be one of {SUPPORTED_BITS}"


def _metrics(v: Any) -> str | None:
    if not isinstance(v, dict):
        return "must be a JSON object"
    for value in v.values():
        # A 400-digit int is valid JSON but overflows float(); non-finite floats never get here.
        if not isinstance(value, (int, float)) or isinstance(value, bool) or abs(value) > _F64_MAX:
            return "must map names to finite numbers"
    return None


def _global_topic(v: Any) -> str | None:
    try:
        kind = parse_topic(v)[1]
    except MalformedPayload as exc:
        return f"must be a topic ({exc.reason})"
    return None if kind == "global" else "must be a global topic"


_FIELDS: dict[MessageKind, tuple[tuple[str, _Check], ...]] = {
    MessageKind.HELLO: (
        ("device_id", _device),
        ("profile", _object),
        ("num_samples", _count),
        ("label_histogram", _counts),
        ("engines", _strings),
    ),
    MessageKind.ASSIGN: (
        ("device_id", _device),
        ("round", _count),
        ("config", _object),
        ("global_topic", _global_topic),
    ),
    MessageKind.GLOBAL: (("round", _count), ("config_id", _nonempty_str), ("meta", _object)),
    MessageKind.UPDATE: (
        ("device_id", _device),
        ("round", _count),
        ("base_id", _str),
        ("num_samples", _count),
        ("metrics", _metrics),
        ("bits", _bits),
    ),
    MessageKind.ACK: (
        ("device_id", _device),
        ("round", _count),
        ("content_id", _str),
        ("accepted", _flag),
        ("reason", _str),
    ),
    MessageKind.STATUS: (("device_id", _device), ("state", _nonempty_str), ("detail", _object)),
}
_CARRIES_TENSORS = (MessageKind.GLOBAL, MessageKind.UPDATE)


def _artifact_ref(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        return "must be a JSON object or null"
    key, sha = v.get("key"), v.get("sha256")
    if (
        not isinstance(key, str)
        or not 1 <= len(key) <= 64
        or not all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    ):
        return "must have a key of 1-64 characters of [0-9A-Za-z_-]"
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        return "must have a sha256 of 64 lowercase hex digits"
    for name in ("size", "chunks"):
        if not (_is_int(v.get(name)) and 1 <= v[name] <= _MAX_INT):
            return f"must have a positive integer {name}"
    return None


# Fields a newer sender may add: checked when present, absent in what older senders write.
_OPTIONAL: dict[MessageKind, tuple[tuple[str, _Check], ...]] = {
    MessageKind.ASSIGN: (("artifact", _artifact_ref),),
}


def _check_header(kind: MessageKind, header: dict[str, Any], error: type[FedPeftError]) -> None:
    """Raise ``error`` naming the first required field that is missing or of the wrong type."""
    for name, check in _FIELDS[kind]:
        if name not in header:
            raise error(f"{kind.name.lower()} header field {name!r} is missing")
        problem = check(header[name])
        if problem:
            raise error(f"{kind.name.lower()} header field {name!r} {problem}")
    for name, check in _OPTIONAL.get(kind, ()):
        problem = check(header[name]) if name in header else None
        if problem:
            raise error(f"{kind.name.lower()} header field {name!r} {problem}")


# --- container: encoding -----------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    """Let numpy scalars and arrays in profiles, configs and metrics travel as plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def _header_bytes(kind: MessageKind, header: dict[str, Any]) -> bytes:
    """Serialise and check a header exactly as the decoder will see it."""
    try:
        text = json.dumps(header, separators=(",", ":"), allow_nan=False, default=_json_default)
    except ValueError as exc:  # allow_nan=False: a NaN or infinity somewhere in the header
        raise NonFinite(f"{kind.name.lower()} header holds NaN or infinity ({exc})") from None
    except (TypeError, RecursionError) as exc:
        raise ConfigError(f"{kind.name.lower()} header is not JSON-able: {exc}") from None
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{kind.name.lower()} header holds an unpaired surrogate") from None
    _check_header(kind, json.loads(raw), ConfigError)
    return raw


def _container(kind: int, head: bytes, tensors: Mapping[str, QuantizedTensor], version: int) -> bytes:
    """Lay out a container and append its hash; checks nothing (tests use it to forge payloads)."""
    out = [_PREAMBLE.pack(MAGIC, version, kind, len(head)), head, struct.pack("<I", len(tensors))]
    for name, q in tensors.items():
        raw = name.encode("utf-8")
        out.append(struct.pack("<H", len(raw)) + raw)
        out.append(struct.pack(f"<BB{len(q.shape)}I", q.bits, len(q.shape), *q.shape))
        out.append(struct.pack("<I", q.rows))
        out.append(np.asarray(q.lo, "<f4").tobytes() + np.asarray(q.scale, "<f4").tobytes())
        out.append(struct.pack("<I", len(q.data)))
        out.append(q.data)
    body = b"".join(out)
    return body + hashlib.sha256(body).digest()


def _quantize_all(
    tensors: Mapping[str, Any], bits: int, rng: np.random.Generator
) -> dict[str, QuantizedTensor]:
    """Quantize every tensor, checking what the decoder will check of names and shapes."""
    out: dict[str, QuantizedTensor] = {}
    total = 0
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tensor name {name!r} must be a non-empty string")
        try:
            raw = name.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"tensor name {name[:40]!r} is not valid UTF-8") from None
        if len(raw) > 0xFFFF:
            raise ConfigError(f"tensor name {name[:40]!r}... is longer than 65535 bytes")
        arr = np.asarray(value)
        if arr.ndim > MAX_NDIM or any(d > 0xFFFFFFFF for d in arr.shape):
            raise ConfigError(f"tensor {name[:40]!r}: shape {arr.shape} does not fit the wire format")
        total += arr.size
        if arr.size > MAX_ELEMENTS or total > MAX_ELEMENTS:
            raise ConfigError(f"tensor {name[:40]!r}: more than {MAX_ELEMENTS} elements")
        try:
            out[name] = quantize(arr, bits, rng)
        except NonFinite as exc:
            raise NonFinite(f"tensor {name[:40]!r}: {exc.reason}") from None
    return out


def _encode(
    kind: MessageKind,
    header: dict[str, Any],
    tensors: Mapping[str, Any] | None = None,
    bits: int = 32,
    rng: np.random.Generator | None = None,
) -> bytes:
    """Check a message's header and tensors and lay out its container."""
    head = _header_bytes(kind, header)
    quantized = _quantize_all(tensors or {}, bits, rng if rng is not None else np.random.default_rng())
    return _container(int(kind), head, quantized, SCHEMA_VERSION)


# --- container: decoding -----------------------------------------------------------------------


class _Reader:
    """Bounds-checked reads from a buffer; running past ``end`` is a MalformedPayload."""

    def __init__(self, buf: bytes, start: int, end: int) -> None:
        self.buf = buf
        self.pos = start
        self.end = end

    def take(self, n: int, what: str) -> bytes:
        if self.end - self.pos < n:
            raise MalformedPayload(f"truncated {what} at byte {self.pos}")
        chunk = self.buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


@dataclass(frozen=True)
class _Parsed:
    kind: MessageKind
    header: dict[str, Any]
    tensors: dict[str, QuantizedTensor]


def _reject_constant(name: str) -> Any:
    raise NonFinite(f"header holds {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e999" parses to inf without passing through parse_constant
        raise NonFinite(f"header holds {text[:20]}, which is not a finite float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # two parsers could disagree on which duplicate wins
        raise MalformedPayload("header has a duplicate key")
    return out


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(
            raw.decode("utf-8"),
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
        # json accepts "\ud800" escapes; such a string could not be logged, stored or re-sent.
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, an int of 4300+ digits
        raise MalformedPayload(f"header is not valid JSON: {str(exc)[:60]}") from None
    if not isinstance(header, dict):
        raise MalformedPayload(f"header is a JSON {type(header).__name__}, not an object")
    return header


def _read_tensor(r: _Reader) -> tuple[str, QuantizedTensor]:
    at = r.pos
    (name_len,) = r.unpack("<H", "tensor name length")
    try:
        name = r.take(name_len, "tensor name").decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPayload(f"tensor name at byte {at} is not UTF-8") from None
    if not name:
        raise MalformedPayload(f"empty tensor name at byte {at}")
    label = f"tensor {name[:40]!r}"
    bits, ndim = r.unpack("<BB", f"{label} bits")
    if bits not in SUPPORTED_BITS:
        raise MalformedPayload(f"{label}: unsupported bit width {bits}")
    if ndim > MAX_NDIM:
        raise MalformedPayload(f"{label}: {ndim} dimensions (at most {MAX_NDIM})")
    shape = tuple(int(d) for d in r.unpack(f"<{ndim}I", f"{label} shape"))
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise MalformedPayload(f"{label}: shape {shape} has {count} elements (at most {MAX_ELEMENTS})")
    (rows,) = r.unpack("<I", f"{label} row count")
    expected_rows = scale_rows(shape) if bits <= 8 else 0
    if rows != expected_rows:
        raise MalformedPayload(f"{label}: {rows} scale rows for shape {shape} at {bits} bits")
    lo = np.frombuffer(r.take(4 * rows, f"{label} offsets"), dtype="<f4").astype(np.float32)
    scale = np.frombuffer(r.take(4 * rows, f"{label} scales"), dtype="<f4").astype(np.float32)
    if not (np.isfinite(lo).all() and np.isfinite(scale).all()):
        raise NonFinite(f"{label}: non-finite offset or scale")
    if (scale < 0).any():
        raise MalformedPayload(f"{label}: negative scale")
    (data_len,) = r.unpack("<I", f"{label} data length")
    if data_len != packed_nbytes(count, bits):
        raise MalformedPayload(f"{label}: {data_len} data bytes do not fit shape {shape} at {bits} bits")
    data = r.take(data_len, f"{label} data")
    return name, QuantizedTensor(shape, bits, lo, scale, data)


def _parse(payload: Any, expected: MessageKind | None, max_bytes: int) -> _Parsed:
    """Check and parse a container down to its header and (still quantized) tensor table."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MalformedPayload(f"payload is a {type(payload).__name__}, not bytes")
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    if size > max_bytes:
        raise PayloadTooLarge(f"{size} bytes exceeds the limit of {max_bytes}")
    buf = bytes(payload)
    if size < _MIN_LEN:
        raise MalformedPayload(f"truncated: {size} bytes is shorter than any message")
    magic, version, kind_code, head_len = _PREAMBLE.unpack_from(buf)
    if magic != MAGIC:
        raise MalformedPayload(f"bad magic {magic!r}")
    if version != SCHEMA_VERSION:
        raise SchemaMismatch(f"unknown schema version {version} (this build reads {SCHEMA_VERSION})")
    end = size - _HASH_LEN
    if hashlib.sha256(buf[:end]).digest() != buf[end:]:
        raise MalformedPayload("bad SHA-256: the payload was corrupted or truncated")
    try:
        kind = MessageKind(kind_code)
    except ValueError:
        raise SchemaMismatch(f"unknown message kind {kind_code}") from None
    if expected is not None and kind != expected:
        raise SchemaMismatch(f"expected a {expected.name.lower()} message, got {kind.name.lower()}")
    r = _Reader(buf, _PREAMBLE.size, end)
    header = _parse_header(r.take(head_len, "header"))
    (count,) = r.unpack("<I", "tensor count")
    if count and kind not in _CARRIES_TENSORS:
        raise MalformedPayload(f"a {kind.name.lower()} message carries no tensors, got {count}")
    tensors: dict[str, QuantizedTensor] = {}
    total = 0
    for _ in range(count):
        name, q = _read_tensor(r)
        if name in tensors:
            raise MalformedPayload(f"tensor {name[:40]!r} appears twice")
        total += math.prod(q.shape)
        if total > MAX_ELEMENTS:
            raise MalformedPayload(f"more than {MAX_ELEMENTS} elements in all")
        tensors[name] = q
    if r.pos != end:
        raise MalformedPayload(f"{end - r.pos} trailing bytes after the tensor table at byte {r.pos}")
    _check_header(kind, header, MalformedPayload)
    return _Parsed(kind, header, tensors)


def _dequantize_all(tensors: dict[str, QuantizedTensor]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, q in tensors.items():
        array = dequantize(q)
        if not np.isfinite(array).all():
            raise NonFinite(f"tensor {name[:40]!r} holds NaN or infinity")
        out[name] = array
    return out


# --- messages ----------------------------------------------------------------------------------


def encode_hello(msg: Hello) -> bytes:
    """Encode a hello."""
    header = {
        "device_id": msg.device_id,
        "profile": msg.profile,
        "num_samples": msg.num_samples,
        "label_histogram": list(msg.label_histogram),
        "engines": list(msg.engines),
    }
    return _encode(MessageKind.HELLO, header)


def _hello(p: _Parsed) -> Hello:
    h = p.header
    return Hello(
        device_id=h["device_id"],
        profile=h["profile"],
        num_samples=h["num_samples"],
        label_histogram=tuple(h["label_histogram"]),
        engines=tuple(h["engines"]),
    )


def decode_hello(payload: bytes, *, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> Hello:
    """Decode and check a hello."""
    return _hello(_parse(payload, MessageKind.HELLO, max_bytes))


def encode_assignment(msg: Assignment) -> bytes:
    """Encode an assignment."""
    header = {
        "device_id": msg.device_id,
        "round": msg.round,
        "config": msg.config,
        "global_topic": msg.global_topic,
    }
    if msg.artifact is not None:  # absent otherwise, so older devices read the same header
        header["artifact"] = msg.artifact
    return _encode(MessageKind.ASSIGN, header)


def _assignment(p: _Parsed) -> Assignment:
    h = p.header
    return Assignment(
        device_id=h["device_id"],
        round=h["round"],
        config=h["config"],
        global_topic=h["global_topic"],
        artifact=h.get("artifact"),
    )


def decode_assignment(payload: bytes, *, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> Assignment:
    """Decode and check an assignment."""
    return _assignment(_parse(payload, MessageKind.ASSIGN, max_bytes))


def encode_global(msg: GlobalModule, bits: int = 32, rng: np.random.Generator | None = None) -> bytes:
    """Encode a global module; 32 bits by default, since the downlink is small and exactness matters."""
    header = {"round": msg.round, "config_id": msg.config_id, "meta": msg.meta}
    return _encode(MessageKind.GLOBAL, header, msg.tensors, check_bits(bits), rng)


def _global(p: _Parsed) -> GlobalModule:
    h = p.header
    return GlobalModule(
        round=h["round"], config_id=h["config_id"], tensors=_dequantize_all(p.tensors), meta=h["meta"]
    )


def decode_global(payload: bytes, *, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> GlobalModule:
    """Decode and check a global module; tensors come back as float32."""
    return _global(_parse(payload, MessageKind.GLOBAL, max_bytes))


def encode_update(msg: UpdateMessage, rng: np.random.Generator) -> bytes:
    """Quantize the deltas to ``msg.bits`` bits with ``rng`` and encode the update."""
    header = {
        "device_id": msg.device_id,
        "round": msg.round,
        "base_id": msg.base_id,
        "num_samples": msg.num_samples,
        "metrics": msg.metrics,
        "bits": msg.bits,
    }
    return _encode(MessageKind.UPDATE, header, msg.tensors, check_bits(msg.bits), rng)


def _update(p: _Parsed) -> UpdateMessage:
    h = p.header
    for name, q in p.tensors.items():
        if q.bits != h["bits"]:
            raise MalformedPayload(f"tensor {name[:40]!r} is at {q.bits} bits, the update says {h['bits']}")
    return UpdateMessage(
        device_id=h["device_id"],
        round=h["round"],
        base_id=h["base_id"],
        num_samples=h["num_samples"],
        metrics={str(k): float(v) for k, v in h["metrics"].items()},
        tensors=_dequantize_all(p.tensors),
        bits=h["bits"],
    )


def decode_update(payload: bytes, *, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> UpdateMessage:
    """Decode and check an update; tensors come back dequantized as float32."""
    return _update(_parse(payload, MessageKind.UPDATE, max_bytes))


def encode_ack(msg: Ack) -> bytes:
    """Encode an acknowledgement."""
    header = {
        "device_id": msg.device_id,
        "round": msg.round,
        "content_id": msg.content_id,
        "accepted": msg.accepted,
        "reason": msg.reason,
    }
    return _encode(MessageKind.ACK, header)


def _ack(p: _Parsed) -> Ack:
    h = p.header
    return Ack(
        device_id=h["device_id"],
        round=h["round"],
        content_id=h["content_id"],
        accepted=h["accepted"],
        reason=h["reason"],
    )


def decode_ack(payload: bytes, *, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> Ack:
    """Decode and check an acknowledgement."""
    return _ack(_parse(payload, MessageKind.ACK, max_bytes))


def encode_status(msg: Status) -> bytes:
    """Encode a status message."""
    header = {"device_id": msg.device_id, "state": msg.state, "detail": msg.detail}
    return _encode(MessageKind.STATUS, header)


def _status(p: _Parsed) -> Status:
    h = p.header
    return Status(device_id=h["device_id"], state=h["state"], detail=h["detail"])


def decode_status(payload: bytes, *, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> Status:
    """Decode and check a status message."""
    return _status(_parse(payload, MessageKind.STATUS, max_bytes))


_BUILDERS: dict[MessageKind, Callable[[_Parsed], Message]] = {
    MessageKind.HELLO: _hello,
    MessageKind.ASSIGN: _assignment,
    MessageKind.GLOBAL: _global,
    MessageKind.UPDATE: _update,
    MessageKind.ACK: _ack,
    MessageKind.STATUS: _status,
}


def decode_any(payload: bytes, *, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> Message:
    """Decode a payload of any kind; raises only :class:`UpdateRejected` subclasses."""
    parsed = _parse(payload, None, max_bytes)
    return _BUILDERS[parsed.kind](parsed)


__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "MAGIC",
    "MAX_ELEMENTS",
    "MAX_NDIM",
    "SCHEMA_VERSION",
    "TOPIC_KINDS",
    "Ack",
    "Assignment",
    "GlobalModule",
    "Hello",
    "Message",
    "MessageKind",
    "Status",
    "UpdateMessage",
    "artifact_filter",
    "artifact_topic",
    "content_id",
    "decode_ack",
    "decode_any",
    "decode_assignment",
    "decode_global",
    "decode_hello",
    "decode_status",
    "decode_update",
    "encode_ack",
    "encode_assignment",
    "encode_global",
    "encode_hello",
    "encode_status",
    "encode_update",
    "parse_artifact_topic",
    "parse_topic",
    "topic",
]
