"""Benchmark: exact LoRA aggregation against FedIT, and both against centralized training.

IID, 4 clients, 2 local epochs on 20 Newsgroups: ``--strategy fedit`` (factor averages),
``--strategy exact`` (product averages, SVD, error feedback), and ``fedpeft centralized`` on the
union of the same clients' data with the same epochs budget (rounds x local epochs).

    .venv/bin/python bench/exact.py --out bench/results/exact
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from runner import DATA_20NG, ROOT, main_guard, run_all

RUNS = {"fedit": ["--strategy", "fedit"], "exact": ["--strategy", "exact"]}


def main() -> int:
    """Run the three and write a summary with the gaps to centralized."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA_20NG)
    p.add_argument("--out", default=str(ROOT / "bench/results/exact"))
    p.add_argument("--rounds", default="3")
    a = p.parse_args()
    shared = [
        "--data", a.data, "--clients", "4", "--partition", "iid", "--samples-per-client", "300",
        "--local-epochs", "2", "--rounds", a.rounds, "--seed", "0", "--test-samples", "1000",
    ]  # fmt: skip
    out = Path(a.out)
    summary = run_all(RUNS, [*shared, "--bits", "8", "--no-progress", "--engine", "torch"], out)
    central = out / "centralized.json"
    if not central.exists():
        cmd = [str(ROOT / ".venv/bin/fedpeft"), "centralized", *shared, "--report", str(central)]
        print("$", " ".join(cmd), flush=True)
        start = time.monotonic()
        subprocess.run(cmd, check=True)
        summary["centralized"] = {"wall_s": round(time.monotonic() - start, 1)}
    report = json.loads(central.read_text())
    summary["centralized"] = summary.get("centralized", {}) | {"final_accuracy": report["final"]["accuracy"]}
    ref = summary["centralized"]["final_accuracy"]
    for name in RUNS:
        summary[name]["gap_to_centralized"] = round(ref - summary[name]["final_accuracy"], 4)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
