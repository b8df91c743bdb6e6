"""A device's outbox: updates stay here until the server acknowledges them.

With a directory the outbox is durable: each payload is written atomically (temp file, fsync,
rename) before it is published, and removed when its ack arrives, so a device that restarts
resends what the server never confirmed. Without one it lives in memory.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class Outbox:
    """Unacknowledged update payloads keyed by round."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._lock = threading.Lock()
        self._items: dict[int, tuple[str, bytes]] = {}
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.directory.glob("update-*.bin")):
                round_ = int(path.stem.split("-")[1])
                topic = path.with_suffix(".topic").read_text() if path.with_suffix(".topic").exists() else ""
                if topic:
                    self._items[round_] = (topic, path.read_bytes())

    def put(self, round_: int, topic: str, payload: bytes) -> None:
        """Keep a payload (on disk first, when durable) before it is published."""
        with self._lock:
            if self.directory is not None:
                write_atomically(self.directory / f"update-{round_}.topic", topic.encode())
                write_atomically(self.directory / f"update-{round_}.bin", payload)
            self._items[round_] = (topic, payload)

    def ack(self, round_: int) -> bool:
        """Forget the payload of ``round_``; False if there was none."""
        with self._lock:
            found = self._items.pop(round_, None) is not None
            if self.directory is not None:
                for suffix in (".bin", ".topic"):
                    (self.directory / f"update-{round_}{suffix}").unlink(missing_ok=True)
            return found

    def pending(self) -> list[tuple[int, str, bytes]]:
        """Unacknowledged (round, topic, payload), oldest first."""
        with self._lock:
            return [(r, t, p) for r, (t, p) in sorted(self._items.items())]


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
