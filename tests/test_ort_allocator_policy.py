"""The ORT engines use the lean allocator only under a memory cap (bench/ort_allocator.py measures why)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from edge_runtime.config import TrainConfig
from edge_runtime.engines import create_engine, ort_engine, ort_step_engine
from edge_runtime.engines.ort_engine import wants_lean_memory
from edge_runtime.peft_specs import LoraSpec


def _config(engine: str = "ort", cap: float | None = None) -> TrainConfig:
    return TrainConfig(peft=LoraSpec(), num_labels=3, engine=engine, mem_cap_mb=cap)


def test_lean_only_under_a_cap() -> None:
    assert wants_lean_memory(_config()) is False
    assert wants_lean_memory(_config(cap=384.0)) is True
    assert wants_lean_memory(_config(), device_cap_mb=512.0) is True
    assert wants_lean_memory(_config(cap=384.0), device_cap_mb=512.0) is True


class _Recorder:
    """Stands in for an ORT engine class: records the lean_memory it is built with."""

    seen: ClassVar[list[Any]] = []

    def __init__(self, config: TrainConfig, **kwargs: Any) -> None:
        _Recorder.seen.append(kwargs.get("lean_memory", "missing"))


@pytest.mark.parametrize(
    ("engine", "module", "cls"),
    [("ort", ort_engine, "OrtEngine"), ("ort-plain", ort_step_engine, "OrtStepEngine")],
)
@pytest.mark.parametrize(
    ("cap", "device_cap", "lean"),
    [(None, None, False), (384.0, None, True), (None, 512.0, True)],
)
def test_create_engine_passes_the_policy(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    engine: str,
    module: Any,
    cls: str,
    cap: float | None,
    device_cap: float | None,
    lean: bool,
) -> None:
    monkeypatch.setattr(module, cls, _Recorder)
    _Recorder.seen = []
    create_engine(_config(engine, cap), artifacts=tmp_path, device_cap_mb=device_cap)
    assert _Recorder.seen == [lean]


def test_engines_resolve_none_from_the_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(ort_engine, "use_lean_allocator", lambda *a: calls.append(1) or True)

    class Stop(Exception):
        pass

    def stop(*args: Any) -> Any:
        raise Stop

    monkeypatch.setattr(ort_engine, "load_manifest", stop)
    for cap, expected in ((None, 0), (384.0, 1)):
        calls.clear()
        with pytest.raises(Stop):
            ort_engine.OrtEngine(_config(cap=cap), artifacts="/nonexistent")
        assert len(calls) == expected
