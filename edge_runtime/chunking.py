"""Chunks: payloads larger than the broker's limit travel in pieces and are put back together.

Brokers drop messages above their size limit (Mosquitto's ``max_packet_size``), and for MQTT
3.1.1 publishers Mosquitto still acknowledges them, so a device would never know. A payload
above the device's ``max_message_bytes`` is therefore split; each chunk is::

    magic b"FPFC" | version u16 | content id (32 bytes: SHA-256 of the whole payload)
    | index u32 | count u32 | total length u32 | data

The assembler never trusts a chunk: it bounds the total size, the chunk count and the number of
messages in progress per sender, and checks the SHA-256 of the reassembled payload.
"""

from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass, field

from edge_runtime.errors import ConfigError, MalformedPayload, PayloadTooLarge, SchemaMismatch

CHUNK_MAGIC = b"FPFC"
CHUNK_VERSION = 1
_HEAD = struct.Struct("<4sH32sIII")
MIN_CHUNK_BYTES = 256


def is_chunk(payload: bytes) -> bool:
    """True if ``payload`` is a chunk rather than a whole message."""
    return payload[:4] == CHUNK_MAGIC


def split_payload(payload: bytes, max_message_bytes: int) -> list[bytes]:
    """The payload itself if it fits, else chunks of at most ``max_message_bytes`` each."""
    if max_message_bytes < MIN_CHUNK_BYTES:
        raise ConfigError(f"max_message_bytes must be at least {MIN_CHUNK_BYTES}, got {max_message_bytes}")
    if len(payload) <= max_message_bytes:
        return [payload]
    digest = hashlib.sha256(payload).digest()
    size = max_message_bytes - _HEAD.size
    count = (len(payload) + size - 1) // size
    return [
        _HEAD.pack(CHUNK_MAGIC, CHUNK_VERSION, digest, i, count, len(payload))
        + payload[i * size : (i + 1) * size]
        for i in range(count)
    ]


@dataclass
class _Partial:
    total: int
    count: int
    parts: dict[int, bytes] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts.values())


class ChunkAssembler:
    """Reassembles chunked payloads per sender, within fixed memory and time bounds."""

    def __init__(self, *, max_bytes: int, max_pending_per_sender: int = 2, timeout_s: float = 600.0) -> None:
        self.max_bytes = max_bytes
        self.max_pending = max_pending_per_sender
        self.timeout_s = timeout_s
        self._partials: dict[tuple[str, bytes], _Partial] = {}

    def add(self, sender: str, chunk: bytes) -> bytes | None:
        """Take one chunk; the whole payload once its last chunk arrived, else None."""
        if len(chunk) < _HEAD.size:
            raise MalformedPayload(f"truncated chunk: {len(chunk)} bytes")
        magic, version, digest, index, count, total = _HEAD.unpack_from(chunk)
        if magic != CHUNK_MAGIC:
            raise MalformedPayload(f"bad chunk magic {magic!r}")
        if version != CHUNK_VERSION:
            raise SchemaMismatch(f"unknown chunk version {version}")
        if total > self.max_bytes:
            raise PayloadTooLarge(f"chunked payload of {total} bytes exceeds the limit of {self.max_bytes}")
        data = chunk[_HEAD.size :]
        if count < 2 or index >= count or not data or count > total:
            raise MalformedPayload(f"bad chunk {index} of {count} for {total} bytes")
        self._expire()
        key = (sender, digest)
        partial = self._partials.get(key)
        if partial is None:
            if sum(1 for s, _ in self._partials if s == sender) >= self.max_pending:
                raise MalformedPayload(f"too many chunked messages in progress from {sender}")
            partial = self._partials[key] = _Partial(total, count)
        if (partial.total, partial.count) != (total, count):
            raise MalformedPayload("chunk disagrees with earlier chunks of the same message")
        partial.parts[index] = data
        if partial.size > total:
            del self._partials[key]
            raise MalformedPayload("chunks add up to more than the announced length")
        if len(partial.parts) < count:
            return None
        del self._partials[key]
        payload = b"".join(partial.parts[i] for i in range(count))
        if len(payload) != total or hashlib.sha256(payload).digest() != digest:
            raise MalformedPayload("reassembled payload does not match its content id")
        return payload

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, p in self._partials.items() if now - p.started > self.timeout_s]:
            del self._partials[key]
