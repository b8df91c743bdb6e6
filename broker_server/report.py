"""The run report (contract: ``report-schema.json``), built from what a run measured."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from broker_server.allocation import peft_key
from edge_runtime.config import TrainConfig
from edge_runtime.errors import ConfigError

SCHEMA_ID = "fedpeft.report/1"


def report_schema() -> dict[str, Any]:
    """The JSON schema every report validates against (a copy of the shared contract)."""
    text = resources.files("broker_server").joinpath("schemas/report-schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def train_config_entry(train: Mapping[str, Any], clients: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The report's ``config.train``: the base training configuration, whose ``engine`` is a
    placeholder that assignment replaces per device, with the engine the clients trained on (the
    one they share, or ``mixed``; each client's is in ``clients[].engine``). Without clients the
    base configuration's engine is kept."""
    engines = sorted({str(c["engine"]) for c in clients})
    if not engines:
        return dict(train)
    return dict(train) | {"engine": engines[0] if len(engines) == 1 else "mixed"}


def communication(
    bytes_up_total: int, bytes_down_total: int, full_model_params: int, participations: int
) -> dict[str, Any]:
    """Bytes moved and the reduction against FedAvg of full fp32 models for the same participations.

    Full FedAvg moves the whole model down and up once per participation: 2 * 4 * params bytes.
    """
    full = 4 * full_model_params
    baseline = 2 * full * max(participations, 1)
    return {
        "bytes_up_total": int(bytes_up_total),
        "bytes_down_total": int(bytes_down_total),
        "full_model_fp32_bytes": int(full),
        "participations": int(participations),
        "reduction_vs_full": 1.0 - (bytes_up_total + bytes_down_total) / baseline,
    }


def build_report(
    *,
    kind: str,
    config: Mapping[str, Any],
    rounds: Sequence[Mapping[str, Any]],
    final: Mapping[str, Any],
    communication: Mapping[str, Any],
    clients: Sequence[Mapping[str, Any]],
    rejected: Sequence[Mapping[str, Any]],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a report dict in the contract's shape."""
    if kind not in ("simulate", "serve", "centralized", "bench"):
        raise ConfigError(f"unknown report kind {kind!r}")
    report: dict[str, Any] = {
        "schema": SCHEMA_ID,
        "kind": kind,
        "config": dict(config),
        "rounds": [dict(r) for r in rounds],
        "final": dict(final),
        "communication": dict(communication),
        "clients": [_client_entry(c) for c in clients],
        "rejected": [dict(r) for r in rejected],
    }
    if extra:
        report.update(extra)
    return report


# The report's ``engine`` names the engine family (contract: ``ort`` or ``torch``); which ONNX
# Runtime package a device trained with goes in ``ort_runtime`` beside it.
_ORT_RUNTIMES = {"ort": "onnxruntime-training", "ort-plain": "onnxruntime"}


def _client_entry(client: Mapping[str, Any]) -> dict[str, Any]:
    entry = dict(client)
    engine = entry.get("engine")
    if engine in _ORT_RUNTIMES:
        entry["engine"] = "ort"
        entry["ort_runtime"] = _ORT_RUNTIMES[engine]
    return entry


def validate_report(report: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the first place where ``report`` breaks the schema."""
    import jsonschema

    try:
        jsonschema.validate(dict(report), report_schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ConfigError(f"report does not match the schema at {where}: {exc.message}") from None


def write_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Validate and write a report atomically; returns the path."""
    validate_report(report)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    tmp.replace(target)
    return target


def peft_entry(config: TrainConfig, trainable_params: int) -> dict[str, Any]:
    """A client's ``peft`` entry: kind, its size field and trainable parameter count."""
    spec = config.peft.to_dict()
    entry: dict[str, Any] = {"type": config.peft.kind, "trainable_params": int(trainable_params)}
    for field_name, key in (("rank", "rank"), ("bottleneck", "bottleneck"), ("length", "prompt_length")):
        if field_name in spec:
            entry[key] = int(spec[field_name])
    return entry


def allocation_entry(record: Any) -> dict[str, Any] | None:
    """What the allocator chose for a device and why (utility terms), or why it left it out."""
    if record is None:
        return None
    if record.excluded:
        return {"excluded": record.excluded}
    # a service restarted from its state has the terms it stored with the assignment, not the object
    terms = record.allocation.terms() if record.allocation is not None else record.allocation_terms
    if terms is None:
        return None
    return {"module": peft_key(record.config.peft), **terms}
