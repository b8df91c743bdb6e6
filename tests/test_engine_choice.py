"""Which engine devices train with: --engine auto, torch, ort and mixed, and what each refuses."""

from __future__ import annotations

import pytest

from edge_runtime.config import TrainConfig
from edge_runtime.engines import create_engine, ort_engine
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import AdapterSpec, LoraSpec
from sdk.simulate import SimulationConfig

LORA = TrainConfig(peft=LoraSpec(rank=4), num_labels=3)


def _sim(**kw: object) -> SimulationConfig:
    return SimulationConfig(data="x", **kw)  # type: ignore[arg-type]


@pytest.fixture
def with_ort_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice as on a host with onnxruntime-training (CPython <= 3.11, x86_64), on any host:
    choosing reads only whether it is installed, it trains nothing."""
    monkeypatch.setattr(ort_engine, "ort_available", lambda: True)


def test_torch_is_torch_everywhere_and_mixed_alternates(with_ort_training: None) -> None:
    assert _sim(engine="torch").worker_engines(LORA, 3) == ["torch"] * 3
    assert _sim(engine="ort").worker_engines(LORA, 2) == ["ort", "ort"]
    assert _sim(engine="mixed").worker_engines(LORA, 4) == ["ort", "torch", "ort", "torch"]
    assert _sim(engine="auto").worker_engines(LORA, 2) == ["ort", "ort"]


def test_auto_falls_back_to_torch_for_what_ort_cannot_train(with_ort_training: None) -> None:
    adapter = TrainConfig(peft=AdapterSpec(), num_labels=3)
    assert _sim(engine="auto").worker_engines(adapter, 2) == ["torch", "torch"]
    dropout = TrainConfig(peft=LoraSpec(rank=4, dropout=0.1), num_labels=3)
    assert _sim(engine="auto").worker_engines(dropout, 2) == ["torch", "torch"]
    with pytest.raises(ConfigError):
        _sim(engine="ort").worker_engines(adapter, 2)
    # under allocation, auto keeps torch (adapters and prompts are on offer); ort is asked for
    mix = "low=0.5,high=0.5"
    assert _sim(engine="auto", profiles=mix).worker_engines(adapter, 2) == ["torch", "torch"]
    assert _sim(engine="ort", profiles=mix).worker_engines(adapter, 2) == ["ort", "ort"]


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"engine": "tpu"}, "--engine must be one of"),
    ],
)
def test_bad_engine_choices_are_refused(kw: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        _sim(**kw)


def test_mixed_needs_two_workers(with_ort_training: None) -> None:
    with pytest.raises(ConfigError, match="at least 2 worker"):
        _sim(engine="mixed").worker_engines(LORA, 1)


def test_the_ort_engine_needs_its_artifacts() -> None:
    with pytest.raises(ConfigError, match="artifacts"):
        create_engine(TrainConfig(peft=LoraSpec(), num_labels=3, engine="ort"))


def test_blocking_torch_reports_what_was_already_imported() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from edge_runtime.engines.ort_engine import block_torch\n"
        "print(block_torch())\n"
        "try:\n    import torch\nexcept ImportError:\n    print('blocked')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "blocked"]


def test_ort_plain_workers_train_every_kind_and_auto_uses_it_without_onnxruntime_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edge_runtime.engines import ort_step_engine

    adapter = TrainConfig(peft=AdapterSpec(), num_labels=3)
    dropout = TrainConfig(peft=LoraSpec(rank=4, dropout=0.1), num_labels=3)
    assert _sim(engine="ort-plain").worker_engines(adapter, 2) == ["ort-plain", "ort-plain"]
    assert _sim(engine="ort-plain").worker_engines(LORA, 1) == ["ort-plain"]
    with pytest.raises(ConfigError, match="dropout"):
        _sim(engine="ort-plain").worker_engines(dropout, 2)
    # under allocation the allocator keeps LoRA dropout off these devices: no refusal up front
    mix = "low=0.5,high=0.5"
    assert _sim(engine="ort-plain", profiles=mix).worker_engines(dropout, 2) == ["ort-plain"] * 2
    # a host with plain onnxruntime only: auto takes ort-plain for one module it trains, else torch
    monkeypatch.setattr(ort_engine, "ort_available", lambda: False)
    assert _sim(engine="auto").worker_engines(adapter, 2) == ["ort-plain", "ort-plain"]
    assert _sim(engine="auto").worker_engines(dropout, 2) == ["torch", "torch"]
    assert _sim(engine="auto", profiles=mix).worker_engines(adapter, 2) == ["torch", "torch"]
    with pytest.raises(ConfigError, match="onnxruntime-training"):
        _sim(engine="ort").worker_engines(LORA, 2)
    monkeypatch.setattr(ort_step_engine, "plain_ort_available", lambda: False)
    with pytest.raises(ConfigError, match=r"fedpeft\[edge\]"):
        _sim(engine="ort-plain").worker_engines(LORA, 2)
    assert _sim(engine="auto").worker_engines(adapter, 2) == ["torch", "torch"]


def test_the_command_line_names_ort_plain_for_simulate_and_edge() -> None:
    from sdk.cli import build_parser

    edge = ["edge", "--broker", "mqtt://h:1", "--fleet", "f", "--device-id", "d", "--data", "x"]
    for engine in ("auto", "torch", "ort", "ort-plain"):
        assert build_parser().parse_args([*edge, "--engine", engine]).engine == engine
    for engine in ("auto", "torch", "ort", "ort-plain", "mixed"):
        args = build_parser().parse_args(["simulate", "--data", "x", "--engine", engine])
        assert args.engine == engine
        assert _sim(engine=engine).engine == engine
    with pytest.raises(SystemExit):
        build_parser().parse_args([*edge, "--engine", "mixed"])  # a device has one engine at a time
