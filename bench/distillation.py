"""Benchmark: heterogeneous PEFT fusion (cross-kind distillation) on a mixed-kind fleet.

The allocation benchmark's fleet: 8 devices on 20 Newsgroups (Dirichlet 0.5), profiles
low=0.3, mid=0.4, high=0.3 with utility allocation (the low tier trains adapters, the others
LoRA), 3 training rounds, 500 test samples, seed 0, torch engine; once as it is and once with
``--distill-epochs 1`` (256 training texts no device holds, labels unread, a = 0.5).

    .venv/bin/python bench/distillation.py --out bench/results/distillation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runner import DATA_20NG, ROOT, basic_summary, main_guard, run_all

RUNS = {"plain": [], "distilled": ["--distill-epochs", "1"]}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Accuracy overall and by kind per round, and the kinds' agreement with their teachers."""
    return basic_summary(report) | {
        "accuracy_by_kind": [r.get("accuracy_by_kind") for r in report["rounds"]],
        "distill_agreement": [
            r.get("distill_agreement") for r in report["rounds"] if r.get("distill_agreement")
        ],
        "kinds": sorted({c["peft"]["type"] for c in report["clients"]}),
    }


def main() -> int:
    """Run both fleets and write the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA_20NG)
    p.add_argument("--out", default=str(ROOT / "bench/results/distillation"))
    a = p.parse_args()
    common = [
        "--data", a.data, "--clients", "8", "--rounds", "3", "--partition", "dirichlet:0.5",
        "--samples-per-client", "150", "--profiles", "low=0.3,mid=0.4,high=0.3", "--seed", "0",
        "--test-samples", "500", "--no-progress", "--engine", "torch",
    ]  # fmt: skip
    out = Path(a.out)
    summary = run_all(RUNS, common, out, summarise=summarise)
    if "plain" in summary and "distilled" in summary:
        summary["distilled"]["gain"] = round(
            summary["distilled"]["final_accuracy"] - summary["plain"]["final_accuracy"], 4
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
