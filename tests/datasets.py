"""The shared real datasets: a path, or a skip with a clear reason (a failure in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_runtime.data import datasets_root


def shared_dataset(name: str) -> Path:
    """The folder of dataset ``name``; skips (or fails with FEDPEFT_REQUIRE_DATASETS=1) when absent."""
    folder = datasets_root() / name
    if (folder / "test.jsonl").is_file():
        return folder
    reason = (
        f"dataset {name!r} not found under {datasets_root()}; "
        "set FEDPEFT_DATASETS to the folder that holds the shared datasets"
    )
    if os.environ.get("FEDPEFT_REQUIRE_DATASETS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)
