"""Shared by the benchmarks: run `fedpeft simulate` configurations, keep reports, write a summary."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA_20NG = str(ROOT.parent / "shared/datasets/20newsgroups")

Summarise = Callable[[dict[str, Any]], dict[str, Any]]


def engines_here(
    requested: str | None, default: Sequence[str], needs_training: Sequence[str] = ("ort",)
) -> list[str]:
    """The engines to measure: ``requested`` (comma-separated) or ``default``.

    Those in ``needs_training`` run on onnxruntime-training, which installs only on Linux x86_64
    with CPython <= 3.11: left out of the default where it is absent (said on stdout), and an
    explicit request for one of them there exits with the error naming the extra.
    """
    from edge_runtime.engines.ort_engine import ORT_TRAINING_INSTALL, ort_available

    names = [e for e in (requested.split(",") if requested is not None else default) if e]
    missing = [e for e in names if e in needs_training and not ort_available()]
    if missing and requested is not None:
        raise SystemExit(f"engine {', '.join(missing)} needs {ORT_TRAINING_INSTALL}")
    if missing:
        print(f"leaving out {', '.join(missing)}: it needs {ORT_TRAINING_INSTALL}", flush=True)
    return [e for e in names if e not in missing]


def seed_stats(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation (0 for one value), minimum and maximum over seeds, to 4 places."""
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def basic_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Final accuracy, accuracy by round and rejections of one report."""
    return {
        "final_accuracy": report["final"]["accuracy"],
        "accuracy_by_round": [r["accuracy"] for r in report["rounds"]],
        "rejected": len(report["rejected"]),
    }


def run_all(
    runs: Mapping[str, Sequence[str]],
    common: Sequence[str],
    out: Path,
    *,
    only: Sequence[str] | None = None,
    summarise: Summarise = basic_summary,
) -> dict[str, dict[str, Any]]:
    """Run each configuration (``common`` + its flags), writing ``out/NAME.json`` and ``summary.json``.

    A configuration whose report already exists is not run again (delete it to rerun), so an
    interrupted benchmark resumes where it stopped.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary: dict[str, dict[str, Any]] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name, extra in runs.items():
        if only and name not in only:
            continue
        report_path = out / f"{name}.json"
        if not report_path.exists():
            cmd = [str(ROOT / ".venv/bin/fedpeft"), "simulate", *common, *extra, "--report", str(report_path)]
            print("$", " ".join(cmd), flush=True)
            start = time.monotonic()
            subprocess.run(cmd, check=True)
            wall = time.monotonic() - start
        else:
            wall = float(summary.get(name, {}).get("wall_s", 0.0))
        summary[name] = summarise(json.loads(report_path.read_text())) | {"wall_s": round(wall, 1)}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main_guard(main: Callable[[], int]) -> None:
    """``sys.exit(main())`` for a benchmark script."""
    sys.exit(main())
