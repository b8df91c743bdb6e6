"""Measure the host this runs on: memory and cores (psutil, cgroup-aware), fp32 matmul throughput.

Inside a container, psutil reports the host's RAM and ``os.cpu_count()`` the host's cores; the
device the runtime actually gets is what the cgroup (memory.max, cpu.max) and the CPU affinity
allow, so the smaller figure wins.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from hw_profiles.schema import DeviceProfile, ProfileError

DEFAULT_LINK_MBPS = 100.0
"""Uplink and downlink of a measured host: it cannot measure its links without a peer."""

_CGROUP = Path("/sys/fs/cgroup")


def _read_cgroup(name: str) -> str | None:
    try:
        return (_CGROUP / name).read_text().strip()
    except OSError:  # not Linux, cgroup v1, or not mounted: no limit known
        return None


def available_memory_mb() -> float:
    """Total RAM in MiB, capped by the cgroup v2 memory limit when there is one."""
    total = float(psutil.virtual_memory().total)
    limit = _read_cgroup("memory.max")
    if limit and limit.isdigit():
        total = min(total, float(limit))
    return total / 2**20


def available_cores() -> int:
    """Cores this process may use: CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity API in os
        cores = psutil.cpu_count(logical=True) or 1
    quota = _read_cgroup("cpu.max")  # "max 100000" or "150000 100000"
    if quota:
        parts = quota.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit() and int(parts[1]) > 0:
            cores = min(cores, max(1, math.ceil(int(parts[0]) / int(parts[1]))))
    return max(1, cores)


def matmul_gflops(size: int = 256, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 matmul throughput in GFLOP/s (numpy's BLAS, all its threads)."""
    if size < 16 or repeats < 1:
        raise ProfileError(f"matmul_size must be >= 16 and repeats >= 1, got {size} and {repeats}")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), dtype=np.float32)
    np.matmul(a, b, out=out)  # warm-up: BLAS thread start and page faults are not throughput
    best = math.inf
    budget = time.perf_counter() + 0.5  # keeps measure() well under a second on slow devices
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > budget:
            break
    # best of a few: the minimum is the least disturbed by other processes
    return 2.0 * size**3 / max(best, 1e-9) / 1e9


def measure(
    *, matmul_size: int = 256, repeats: int = 5, step_probe: Callable[[], float] | None = None
) -> DeviceProfile:
    """This host's profile; ``step_probe()`` (seconds per training step) goes to ``extra["step_s"]``."""
    extra: dict[str, float] = {}
    if step_probe is not None:
        step_s = float(step_probe())
        if not (math.isfinite(step_s) and step_s > 0):
            raise ProfileError(f"step_probe must return a positive number of seconds, got {step_s!r}")
        extra["step_s"] = step_s
    return DeviceProfile(
        name="host",
        ram_mb=round(available_memory_mb(), 1),
        cores=available_cores(),
        gflops=max(0.01, round(matmul_gflops(matmul_size, repeats), 2)),
        uplink_mbps=DEFAULT_LINK_MBPS,
        downlink_mbps=DEFAULT_LINK_MBPS,
        availability=1.0,
        tier=None,
        description=(
            f"measured on this host: fp32 {matmul_size}x{matmul_size} matmul, best of {repeats}; "
            f"links are the default {DEFAULT_LINK_MBPS:g} Mbit/s, not measured"
        ),
        extra=extra,
    )
