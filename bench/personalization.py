"""Benchmark: clustered + personalized models against the single global model, on clients' own data.

20 Newsgroups, 8 clients, 150 samples a client of which 20% are held out on the device,
3 training rounds after the class-mean round, 8-bit updates, 500 test samples, seed 0, under
Dirichlet(0.1) and ``shards:2`` label skew. For each partition two runs, both ending with the
personalization phase (``--personalize-epochs 2``):

- ``global``: one global module; its accuracy on each client's held-out data is the baseline.
- ``clustered``: ``--clusters auto``; each device then personalizes its cluster's module.

    .venv/bin/python bench/personalization.py --out bench/results/personalization
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runner import DATA_20NG, ROOT, basic_summary, main_guard, run_all

PARTITIONS = {"dir0.1": "dirichlet:0.1", "shards2": "shards:2"}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy plus the own-data figures of the personalization phase."""
    final = report["final"]
    clusters = final.get("clusters") or {"k": 1, "sizes": [len(report["clients"])]}
    return basic_summary(report) | {
        "own_data_model": final["global_own_accuracy"],
        "own_data_prior_corrected": final.get("prior_accuracy"),
        "own_data_personalized": final["personalized_accuracy"],
        "clusters": clusters["k"],
        "cluster_sizes": clusters["sizes"],
    }


def main() -> int:
    """Run both fleets under both partitions and write the summary with the gains."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA_20NG)
    p.add_argument("--out", default=str(ROOT / "bench/results/personalization"))
    p.add_argument("--engine", default="auto")
    a = p.parse_args()
    common = [
        "--data", a.data, "--clients", "8", "--samples-per-client", "150", "--rounds", "3",
        "--bits", "8", "--test-samples", "500", "--seed", "0", "--no-progress", "--engine", a.engine,
        "--personalize-epochs", "2",
    ]  # fmt: skip
    runs = {}
    for tag, partition in PARTITIONS.items():
        runs[f"{tag}-global"] = ["--partition", partition]
        runs[f"{tag}-clustered"] = ["--partition", partition, "--clusters", "auto"]
    out = Path(a.out)
    summary = run_all(runs, common, out, summarise=summarise)
    for tag in PARTITIONS:
        g, c = summary.get(f"{tag}-global"), summary.get(f"{tag}-clustered")
        if g and c:
            summary[f"{tag}-gain"] = {
                "clustered_personalized_minus_global_model": round(
                    c["own_data_personalized"] - g["own_data_model"], 4
                ),
                "personalized_only_minus_global_model": round(
                    g["own_data_personalized"] - g["own_data_model"], 4
                ),
                "cluster_model_minus_global_model": round(c["own_data_model"] - g["own_data_model"], 4),
            }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
