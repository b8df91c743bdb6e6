"""The ``fedpeft`` command line as child processes, for tests that run serve and edge for real."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def cli(*args: str) -> list[str]:
    """The argv that runs ``fedpeft ARGS`` with this interpreter."""
    return [sys.executable, "-m", "sdk.cli", *args]


def start_edge(
    url: str,
    fleet: str,
    device: str,
    data: Path,
    state: Path,
    *,
    seed: int,
    max_samples: int,
    cwd: Path,
    env: Mapping[str, str],
    extra: tuple[str, ...] = (),
) -> subprocess.Popen[str]:
    """``fedpeft edge`` as a child process, its output (text) on a pipe."""
    argv = cli(
        "edge", "--broker", url, "--fleet", fleet, "--device-id", device, "--data", str(data),
        "--state", str(state), "--max-samples", str(max_samples), "--seed", str(seed), *extra,
    )  # fmt: skip
    return subprocess.Popen(
        argv, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
