"""Benchmark: the README's main run with each engine: all torch, all ONNX Runtime, and a mixed fleet.

20 Newsgroups, 8 clients, Dirichlet(0.5), 150 samples a client, 4-bit updates, defaults otherwise
(5 rounds after the class-mean round), seed 0, the embedded broker. ``mixed`` runs one worker
process on each engine (half the devices each). Reports final accuracy, wall time and each
engine's peak worker memory, and the gaps to the all-torch run.

    .venv/bin/python bench/engines.py --out bench/results/engines
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runner import DATA_20NG, ROOT, basic_summary, engines_here, main_guard, run_all

RUNS = {"torch": ["--engine", "torch"], "ort": ["--engine", "ort"], "mixed": ["--engine", "mixed"]}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Accuracy and the largest device peak per engine (the runner adds the wall time)."""
    peaks: dict[str, float] = {}
    for c in report["clients"]:
        peaks[c["engine"]] = max(peaks.get(c["engine"], 0.0), round(c["peak_rss_mb"], 1))
    return basic_summary(report) | {"peak_rss_mb_by_engine": peaks}


def main() -> int:
    """Run the three fleets and write the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA_20NG)
    p.add_argument("--out", default=str(ROOT / "bench/results/engines"))
    p.add_argument("--only", nargs="*", default=None)
    a = p.parse_args()
    common = [
        "--data", a.data, "--clients", "8", "--partition", "dirichlet:0.5", "--samples-per-client", "150",
        "--bits", "4", "--seed", "0", "--no-progress",
    ]  # fmt: skip
    out = Path(a.out)
    # ort and mixed (half the workers on ort) need onnxruntime-training
    wanted = engines_here(None if a.only is None else ",".join(a.only), list(RUNS), ("ort", "mixed"))
    summary = run_all(RUNS, common, out, only=wanted, summarise=summarise)
    if "torch" in summary:
        ref = summary["torch"]["final_accuracy"]
        for s in summary.values():
            s["gap_to_torch"] = round(ref - s["final_accuracy"], 4)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
