"""Training artifacts over MQTT: one folder packed, sent in bounded chunks, put back and unpacked.

An ORT device needs the folder that ``broker_server.artifacts.build_artifacts`` writes (graphs,
checkpoint, tokenizer, manifest: about 90 MB for MiniLM). The service packs it into one
deterministic payload and publishes it retained, in chunks, on ``fl/{fleet}/artifact/{key}/{index}``
(:func:`edge_runtime.wire.artifact_topic`); a device fetches it once per key into its cache, so only
the small trainable module travels each round.

Payload (the pack), all integers little-endian::

    magic b"FPAK" | version u16 | n_files u32
    then per file, names sorted:  name_len u16 | name (UTF-8, relative POSIX path) | size u64 | data

Chunk::

    magic b"FPAR" | version u16 | key_len u8 | key | sha256 (32 bytes, of the whole pack)
    | index u32 | count u32 | stride u32 | total u64 | data

Every chunk but the last holds exactly ``stride`` bytes, so a chunk's place in the pack is
``index * stride`` and the assembler writes it straight into a spool file: a device never holds the
whole pack in memory. The assembler trusts nothing: it bounds the total size and the chunk count
before writing a byte, rejects chunks whose metadata disagree with the first one (or with what the
assignment announced), and checks the SHA-256 of the whole before unpacking. Unpacking refuses
absolute names, ``..``, empty or duplicate names and sizes that do not add up, creates regular
files only (the format has no links), and writes into a temporary sibling that is renamed into
``cache_dir/key`` at the end, so a reader never sees half a folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from edge_runtime.errors import ConfigError, MalformedPayload, PayloadTooLarge, SchemaMismatch

log = logging.getLogger("fedpeft.artifacts")

PACK_MAGIC = b"FPAK"
CHUNK_MAGIC = b"FPAR"
PACK_VERSION = 1
DEFAULT_CHUNK_BYTES = 256 * 1024
MIN_CHUNK_BYTES = 1024
DEFAULT_MAX_ARTIFACT_BYTES = 2 * 1024**3  # MiniLM's folder is about 90 MB
DEFAULT_MAX_CHUNKS = 1 << 16
MAX_FILES = 1024
MAX_NAME_BYTES = 1024

_PACK_HEAD = struct.Struct("<4sHI")
_FILE_NAME = struct.Struct("<H")
_FILE_SIZE = struct.Struct("<Q")
_CHUNK_PRE = struct.Struct("<4sHB")  # magic, version, key length
_CHUNK_POST = struct.Struct("<32sIIIQ")  # sha256, index, count, stride, total
_KEY = re.compile(r"[0-9A-Za-z_-]{1,64}")
_COPY = 1 << 20


def check_key(key: object) -> str:
    """``key`` if it is a safe artifact key (a folder name and a topic segment), else ConfigError."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ConfigError(f"artifact key {str(key)[:80]!r} must be 1-64 characters of [0-9A-Za-z_-]")
    return key


@dataclass(frozen=True)
class ArtifactInfo:
    """What an assignment announces of an artifact pack: its key, size, hash and chunk count."""

    key: str
    size: int
    sha256: str
    chunks: int

    def __post_init__(self) -> None:
        check_key(self.key)
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ConfigError(f"ArtifactInfo.size must be a positive integer, got {self.size!r}")
        if not isinstance(self.chunks, int) or isinstance(self.chunks, bool) or self.chunks < 1:
            raise ConfigError(f"ArtifactInfo.chunks must be a positive integer, got {self.chunks!r}")
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ConfigError("ArtifactInfo.sha256 must be 64 lowercase hex digits")

    def to_dict(self) -> dict[str, Any]:
        """As it travels in an assignment's header."""
        return {"key": self.key, "size": self.size, "sha256": self.sha256, "chunks": self.chunks}

    @classmethod
    def from_dict(cls, value: object) -> ArtifactInfo:
        """Parse an assignment's ``artifact`` field; :class:`ConfigError` names what is wrong."""
        if not isinstance(value, dict):
            raise ConfigError("artifact must be a JSON object")
        missing = {"key", "size", "sha256", "chunks"} - set(value)
        if missing:
            raise ConfigError(f"artifact lacks {sorted(missing)}")
        return cls(key=value["key"], size=value["size"], sha256=value["sha256"], chunks=value["chunks"])


# --- packing -----------------------------------------------------------------------------------


def _check_name(name: str) -> str | None:
    """Why ``name`` cannot be a file of a pack, or None if it can."""
    if not name or "\\" in name or "\x00" in name:
        return "is empty or holds a backslash or NUL"
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/"):
        return "is absolute"
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "holds an empty, '.' or '..' component"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def _files(folder: Path) -> list[tuple[str, Path]]:
    """The regular files under ``folder`` by sorted relative name; links and oddities refused."""
    out: list[tuple[str, Path]] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for d in dirs:
            if (Path(root) / d).is_symlink():
                raise ConfigError(f"artifact folder holds a link {Path(root) / d}; refusing to pack it")
        for n in names:
            path = Path(root) / n
            if path.is_symlink() or not path.is_file():
                raise ConfigError(f"artifact folder holds {path}, which is not a regular file")
            out.append((path.relative_to(folder).as_posix(), path))
    out.sort()
    if not out:
        raise ConfigError(f"artifact folder {folder} is empty")
    if len(out) > MAX_FILES:
        raise ConfigError(f"artifact folder {folder} holds more than {MAX_FILES} files")
    return out


def pack_folder(folder: str | Path, out: IO[bytes]) -> int:
    """Write the deterministic pack of ``folder`` to ``out``; the number of bytes written."""
    files = _files(Path(folder))
    written = out.write(_PACK_HEAD.pack(PACK_MAGIC, PACK_VERSION, len(files)))
    for name, path in files:
        problem = _check_name(name)
        if problem:
            raise ConfigError(f"artifact file name {name[:80]!r} {problem}")
        raw = name.encode("utf-8")
        written += out.write(_FILE_NAME.pack(len(raw)) + raw + _FILE_SIZE.pack(path.stat().st_size))
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_COPY), b""):
                written += out.write(block)
    return written


def pack_bytes(folder: str | Path) -> bytes:
    """The pack of ``folder`` in memory (small folders and tests)."""
    with tempfile.TemporaryFile() as f:
        pack_folder(folder, f)
        f.seek(0)
        return f.read()


# --- chunks ------------------------------------------------------------------------------------


def _chunk(key: str, digest: bytes, index: int, count: int, stride: int, total: int, data: bytes) -> bytes:
    raw = key.encode()
    return (
        _CHUNK_PRE.pack(CHUNK_MAGIC, PACK_VERSION, len(raw))
        + raw
        + _CHUNK_POST.pack(digest, index, count, stride, total)
        + data
    )


def chunk_overhead(key: str) -> int:
    """Header bytes of each chunk of ``key``."""
    return _CHUNK_PRE.size + len(key.encode()) + _CHUNK_POST.size


def iter_chunks(
    key: str, source: IO[bytes] | bytes, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[ArtifactInfo, Iterator[bytes]]:
    """The pack's announcement and its chunks, each at most ``chunk_bytes`` long (header included).

    ``source`` is the pack, in memory or as a seekable file (read twice: once to hash it).
    """
    check_key(key)
    stride = chunk_bytes - chunk_overhead(key)
    if chunk_bytes < MIN_CHUNK_BYTES or stride < 1:
        raise ConfigError(f"chunk_bytes must be at least {MIN_CHUNK_BYTES}, got {chunk_bytes}")
    stream: IO[bytes]
    if isinstance(source, (bytes, bytearray)):
        import io

        stream = io.BytesIO(bytes(source))
    else:
        stream = source
    stream.seek(0)
    digest = hashlib.sha256()
    total = 0
    for block in iter(lambda: stream.read(_COPY), b""):
        digest.update(block)
        total += len(block)
    if total == 0:
        raise ConfigError("an artifact pack cannot be empty")
    count = (total + stride - 1) // stride
    info = ArtifactInfo(key=key, size=total, sha256=digest.hexdigest(), chunks=count)

    def chunks() -> Iterator[bytes]:
        stream.seek(0)
        for index in range(count):
            yield _chunk(key, digest.digest(), index, count, stride, total, stream.read(stride))

    return info, chunks()


@dataclass(frozen=True)
class _ChunkHead:
    key: str
    digest: bytes
    index: int
    count: int
    stride: int
    total: int
    data: bytes


def parse_chunk(chunk: bytes) -> _ChunkHead:
    """Split one chunk into its header fields and data; MalformedPayload or SchemaMismatch."""
    if len(chunk) < _CHUNK_PRE.size:
        raise MalformedPayload(f"truncated artifact chunk: {len(chunk)} bytes")
    magic, version, key_len = _CHUNK_PRE.unpack_from(chunk)
    if magic != CHUNK_MAGIC:
        raise MalformedPayload(f"bad artifact chunk magic {magic!r}")
    if version != PACK_VERSION:
        raise SchemaMismatch(f"unknown artifact chunk version {version}")
    start = _CHUNK_PRE.size + key_len
    if len(chunk) < start + _CHUNK_POST.size:
        raise MalformedPayload(f"truncated artifact chunk: {len(chunk)} bytes")
    try:
        key = check_key(chunk[_CHUNK_PRE.size : start].decode("ascii"))
    except (UnicodeDecodeError, ConfigError):
        raise MalformedPayload("artifact chunk has a bad key") from None
    digest, index, count, stride, total = _CHUNK_POST.unpack_from(chunk, start)
    return _ChunkHead(key, digest, index, count, stride, total, chunk[start + _CHUNK_POST.size :])


class ArtifactAssembler:
    """Puts one artifact pack back together from its chunks, in any order, into a spool file."""

    def __init__(
        self,
        key: str,
        *,
        expected: ArtifactInfo | None = None,
        max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        spool_dir: str | Path | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.key = check_key(key)
        self.expected = expected
        self.max_bytes = max_bytes
        self.max_chunks = max_chunks
        self.progress = progress  # (chunks received, chunk count)
        self._spool_dir = None if spool_dir is None else str(spool_dir)
        self._file: IO[bytes] | None = None
        self._meta: tuple[bytes, int, int, int] | None = None  # digest, count, stride, total
        self._have: set[int] = set()
        self.complete = False

    @property
    def received(self) -> int:
        """Distinct chunks received so far."""
        return len(self._have)

    @property
    def all_in(self) -> bool:
        """Every chunk arrived (complete, or failed its hash check)."""
        return self._meta is not None and len(self._have) == self._meta[1]

    def add(self, chunk: bytes) -> bool:
        """Take one chunk; True once every chunk is in and the whole matches its SHA-256.

        Raises :class:`PayloadTooLarge` past the caps and :class:`MalformedPayload` for a bad or
        inconsistent chunk, or when the whole does not match its hash (a later, different copy of
        a chunk replaces the earlier one, so a redelivery can still complete the pack).
        """
        if self.complete:
            return True
        head = parse_chunk(chunk)
        if head.key != self.key:
            raise MalformedPayload(f"chunk of artifact {head.key!r} while fetching {self.key!r}")
        if head.total > self.max_bytes:
            raise PayloadTooLarge(f"artifact of {head.total} bytes exceeds the limit of {self.max_bytes}")
        if head.count > self.max_chunks:
            raise PayloadTooLarge(f"artifact in {head.count} chunks exceeds the limit of {self.max_chunks}")
        if not (
            head.count >= 1
            and head.stride >= 1
            and head.total >= 1
            and head.stride * (head.count - 1) < head.total <= head.stride * head.count
        ):
            raise MalformedPayload(
                f"inconsistent artifact chunk: {head.count} chunks of {head.stride} for {head.total} bytes"
            )
        if head.index >= head.count:
            raise MalformedPayload(f"artifact chunk {head.index} of {head.count}")
        expected_len = head.stride if head.index < head.count - 1 else head.total - head.stride * head.index
        if len(head.data) != expected_len:
            raise MalformedPayload(
                f"artifact chunk {head.index} holds {len(head.data)} bytes, expected {expected_len}"
            )
        meta = (head.digest, head.count, head.stride, head.total)
        if self.expected is not None and (
            head.digest.hex() != self.expected.sha256
            or head.total != self.expected.size
            or head.count != self.expected.chunks
        ):
            raise MalformedPayload("artifact chunk disagrees with what the assignment announced")
        if self._meta is None:
            self._meta = meta
            self._file = tempfile.TemporaryFile(prefix=f".{self.key}-", dir=self._spool_dir)
        elif self._meta != meta:
            raise MalformedPayload("artifact chunk disagrees with earlier chunks of the same key")
        assert self._file is not None
        self._file.seek(head.index * head.stride)
        self._file.write(head.data)
        new = head.index not in self._have
        self._have.add(head.index)
        if new and self.progress is not None:
            self.progress(len(self._have), head.count)
        if len(self._have) < head.count:
            return False
        self._file.flush()
        self._file.seek(0)
        digest = hashlib.sha256()
        for block in iter(lambda: self._file.read(_COPY), b""):  # type: ignore[union-attr]
            digest.update(block)
        if digest.digest() != head.digest:
            raise MalformedPayload(f"artifact {self.key} does not match its SHA-256")
        self.complete = True
        return True

    def payload(self) -> IO[bytes]:
        """The verified pack, as a file positioned at its start."""
        if not self.complete or self._file is None:
            raise MalformedPayload(f"artifact {self.key} is not complete ({self.received} chunks in)")
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        """Drop the spool file."""
        if self._file is not None:
            self._file.close()
            self._file = None


# --- unpacking ---------------------------------------------------------------------------------


def _read(source: IO[bytes], n: int, what: str) -> bytes:
    data = source.read(n)
    if len(data) != n:
        raise MalformedPayload(f"artifact pack truncated in {what}")
    return data


def unpack(source: IO[bytes] | bytes, cache_dir: str | Path, key: str) -> Path:
    """Unpack a verified pack into ``cache_dir/key`` (atomically) and return that folder."""
    check_key(key)
    if isinstance(source, (bytes, bytearray)):
        import io

        source = io.BytesIO(bytes(source))
    cache = Path(cache_dir)
    final = cache / key
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        magic, version, n_files = _PACK_HEAD.unpack(_read(source, _PACK_HEAD.size, "its header"))
        if magic != PACK_MAGIC:
            raise MalformedPayload(f"bad artifact pack magic {magic!r}")
        if version != PACK_VERSION:
            raise SchemaMismatch(f"unknown artifact pack version {version}")
        if not 1 <= n_files <= MAX_FILES:
            raise MalformedPayload(f"artifact pack lists {n_files} files")
        seen: set[str] = set()
        for _ in range(n_files):
            (name_len,) = _FILE_NAME.unpack(_read(source, _FILE_NAME.size, "a name length"))
            if name_len > MAX_NAME_BYTES:
                raise MalformedPayload(f"artifact file name of {name_len} bytes")
            try:
                name = _read(source, name_len, "a name").decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedPayload("artifact file name is not UTF-8") from None
            problem = _check_name(name)
            if problem:
                raise MalformedPayload(f"artifact file name {name[:80]!r} {problem}")
            # case-folded: two names that differ in case only would collide on some filesystems
            if name.casefold() in seen or any(
                s.startswith(name.casefold() + "/") or name.casefold().startswith(s + "/") for s in seen
            ):
                raise MalformedPayload(f"artifact file name {name[:80]!r} collides with another")
            seen.add(name.casefold())
            (size,) = _FILE_SIZE.unpack(_read(source, _FILE_SIZE.size, "a size"))
            target = work.joinpath(*name.split("/"))
            if work.resolve() not in target.resolve().parents:  # belt and braces over _check_name
                raise MalformedPayload(f"artifact file name {name[:80]!r} leaves its folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as f:
                left = size
                while left:
                    block = source.read(min(_COPY, left))
                    if not block:
                        raise MalformedPayload(f"artifact pack truncated in {name[:80]!r}")
                    f.write(block)
                    left -= len(block)
        if source.read(1):
            raise MalformedPayload("artifact pack has bytes after its last file")
        try:
            os.replace(work, final)
        except OSError:
            if not final.is_dir():  # not a concurrent fetch of the same key that won the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def cached_folder(cache_dir: str | Path, key: str) -> Path | None:
    """``cache_dir/key`` if a complete pack was unpacked there before, else None."""
    folder = Path(cache_dir) / check_key(key)
    return folder if folder.is_dir() else None


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_ARTIFACT_BYTES",
    "DEFAULT_MAX_CHUNKS",
    "ArtifactAssembler",
    "ArtifactInfo",
    "cached_folder",
    "check_key",
    "chunk_overhead",
    "iter_chunks",
    "pack_bytes",
    "pack_folder",
    "parse_chunk",
    "unpack",
]
