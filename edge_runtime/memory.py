"""Memory caps enforced for real: a guard that samples resident memory while a device trains.

A device's cap is what its profile's RAM leaves after a reserve for the OS and the app (the server
puts it in the assignment as ``mem_cap_mb``). :class:`MemoryGuard` samples this process's resident
set (``/proc/self/statm``) every few milliseconds in a thread while training runs; the training
loop calls :meth:`MemoryGuard.check` at every step (through the engine's progress callback), which
raises :class:`MemoryCapExceeded` once a sample went over the cap. The agent then retries with half
the batch, and gives up with the reason when even a batch of one does not fit.

Sampling can miss a peak shorter than its interval, so the reported peak is a lower bound; the
allocator's prediction keeps a margin for that.
"""

from __future__ import annotations

import os
import resource
import threading
from types import TracebackType

from edge_runtime.engines.base import ProgressFn
from edge_runtime.errors import MemoryCapExceeded

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0) if hasattr(os, "sysconf") else 4096 / 2**20


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB (the lifetime peak where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_MB
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class MemoryGuard:
    """Tracks the peak resident memory between ``__enter__`` and ``__exit__``; trips above ``cap_mb``."""

    def __init__(self, cap_mb: float | None, *, interval_s: float = 0.005) -> None:
        self.cap_mb = cap_mb
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_mb = max(self.peak_mb, current_rss_mb())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> MemoryGuard:
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="memory-guard", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def exceeded(self) -> bool:
        """True once a sample went over the cap."""
        return self.cap_mb is not None and self.peak_mb > self.cap_mb

    def check(self) -> None:
        """Raise :class:`MemoryCapExceeded` if the cap was exceeded."""
        self._sample()
        if self.exceeded:
            raise MemoryCapExceeded(
                f"resident memory reached {self.peak_mb:.0f} MiB, over the cap of {self.cap_mb:.0f} MiB"
            )

    def wrap(self, progress: ProgressFn | None) -> ProgressFn:
        """A progress callback that checks the cap at every step, then calls ``progress``."""

        def step(done: int, total: int) -> None:
            self.check()
            if progress is not None:
                progress(done, total)

        return step
