"""Benchmark: robust aggregation against 2 Byzantine devices out of 8 on 20 Newsgroups.

Runs the all-honest federation, then 2 of 8 devices flipping the signs of what they send, or
scaling it by 1e4, under plain averaging (fedit), coordinate-wise median and trimmed mean. The
norm bound is lifted (--norm-bound 1e12) so that plain averaging faces the scaled updates
unprotected; with the default bound the service rejects them outright.

    .venv/bin/python bench/byzantine.py --out bench/results/byzantine
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runner import DATA_20NG, ROOT, main_guard, run_all

RUNS = {
    "honest-fedit": [],
    "flip-fedit": ["--attack", "flip:2"],
    "flip-median": ["--attack", "flip:2", "--strategy", "median"],
    "flip-trimmed_mean": ["--attack", "flip:2", "--strategy", "trimmed_mean"],
    "scale-fedit": ["--attack", "scale=1e4:2", "--norm-bound", "1e12"],
    "scale-median": ["--attack", "scale=1e4:2", "--norm-bound", "1e12", "--strategy", "median"],
    "scale-trimmed_mean": ["--attack", "scale=1e4:2", "--norm-bound", "1e12", "--strategy", "trimmed_mean"],
}


def main() -> int:
    """Run every configuration and write a summary with the gaps to the honest run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA_20NG)
    p.add_argument("--out", default=str(ROOT / "bench/results/byzantine"))
    p.add_argument("--rounds", default="2")
    p.add_argument("--only", nargs="*", default=None, help="run only these configurations")
    a = p.parse_args()
    common = [
        "--data", a.data, "--clients", "8", "--rounds", a.rounds, "--partition", "dirichlet:0.5",
        "--samples-per-client", "150", "--bits", "4", "--seed", "0", "--test-samples", "500",
        "--no-progress", "--engine", "torch",
    ]  # fmt: skip
    out = Path(a.out)
    summary = run_all(RUNS, common, out, only=a.only)
    if "honest-fedit" in summary:
        honest = summary["honest-fedit"]["final_accuracy"]
        for s in summary.values():
            s["gap_to_honest"] = round(honest - s["final_accuracy"], 4)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
