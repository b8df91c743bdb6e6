"""The report contract: the bundled schema is the shared one, and a bad report is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.report import (
    build_report,
    communication,
    report_schema,
    train_config_entry,
    validate_report,
    write_report,
)
from edge_runtime.errors import ConfigError
from sdk.plot import plot_report

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "report-schema.json"


def _report() -> dict:
    return build_report(
        kind="simulate",
        config={"data": "d", "model": "m", "seed": 0},
        rounds=[
            {
                "round": 0,
                "wall_s": 1.0,
                "virtual_s": 1.0,
                "accuracy": 0.5,
                "participants": 2,
                "bytes_up": 10,
                "bytes_down": 20,
            }
        ],
        final={"accuracy": 0.5, "macro_f1": 0.4},
        communication=communication(10, 20, 1000, 2),
        clients=[
            {
                "id": "a",
                "profile": "host",
                "peft": {"type": "lora", "trainable_params": 5},
                "bits": 4,
                "engine": "torch",
                "mem_cap_mb": None,
                "peak_rss_mb": 100.0,
                "updates_sent": 1,
                "updates_accepted": 1,
            }
        ],
        rejected=[{"client": "a", "round": 0, "reason": "malformed: bad magic"}],
    )


def test_bundled_schema_is_the_shared_contract() -> None:
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not found")
    assert report_schema() == json.loads(SHARED.read_text())


def test_communication_reduction() -> None:
    comm = communication(bytes_up_total=100, bytes_down_total=300, full_model_params=1000, participations=2)
    assert comm["full_model_fp32_bytes"] == 4000
    assert comm["reduction_vs_full"] == pytest.approx(1 - 400 / (2 * 4000 * 2))


def test_the_train_block_names_the_engine_the_clients_trained_on() -> None:
    """The base configuration's engine is a placeholder: the report says what the devices ran."""
    base = {"engine": "torch", "seq_len": 128}
    ort = [{"engine": "ort"}, {"engine": "ort"}]
    assert train_config_entry(base, ort) == {"engine": "ort", "seq_len": 128}
    assert train_config_entry(base, [*ort, {"engine": "torch"}])["engine"] == "mixed"
    assert train_config_entry(base, []) == base
    assert base["engine"] == "torch"  # the caller's dict is left as it was


def test_valid_report_writes_and_plots(tmp_path: Path) -> None:
    path = write_report(_report(), tmp_path / "r.json")
    assert json.loads(path.read_text())["schema"] == "fedpeft.report/1"
    png = plot_report(_report(), tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_invalid_report_is_refused_with_the_place() -> None:
    bad = _report()
    bad["rounds"][0]["accuracy"] = 1.5
    with pytest.raises(ConfigError, match="rounds/0/accuracy"):
        validate_report(bad)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30))
def test_the_accuracy_axis_holds_the_data_and_is_never_a_narrow_zoom(acc: list[float]) -> None:
    from sdk.plot import accuracy_limits

    lo, hi = accuracy_limits(acc)
    assert 0.0 <= lo <= min(acc) and max(acc) <= hi <= 1.0
    assert hi - lo >= 0.3 - 1e-9


@pytest.mark.parametrize(
    "engine, runtime", [("ort", "onnxruntime-training"), ("ort-plain", "onnxruntime"), ("torch", None)]
)
def test_a_client_on_either_onnx_runtime_engine_reports_engine_ort_with_its_runtime(
    engine: str, runtime: str | None
) -> None:
    base = _report()
    report = build_report(
        kind="simulate",
        config=base["config"],
        rounds=base["rounds"],
        final=base["final"],
        communication=base["communication"],
        clients=[{**base["clients"][0], "engine": engine}],
        rejected=[],
    )
    validate_report(report)  # the contract's engine enum is ort | torch
    client = report["clients"][0]
    assert client["engine"] == ("torch" if runtime is None else "ort")
    assert client.get("ort_runtime") == runtime
