"""Benchmark: heterogeneity-aware allocation against a uniform assignment on a mixed fleet.

8 devices on 20 Newsgroups (Dirichlet 0.5), profiles low=0.3, mid=0.4, high=0.3:

- ``utility``: every device gets the module the allocator scores best for its profile
  (U = alpha R - beta C + gamma E over LoRA ranks 2-16, adapters, prompts and two batch sizes);
- ``uniform``: every device gets LoRA rank 16 with batch 32, and devices whose memory cap it does
  not fit are left out, as a plain FedAvg-LoRA deployment does.

    .venv/bin/python bench/allocation.py --out bench/results/allocation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runner import DATA_20NG, ROOT, basic_summary, main_guard, run_all

RUNS = {
    "utility": ["--allocation", "utility"],
    "uniform": ["--allocation", "uniform", "--lora-rank", "16", "--lora-alpha", "32", "--batch-size", "32"],
}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Accuracy, and per client: tier, module, cap, measured peak, updates accepted."""
    clients = [
        {
            "id": c["id"],
            "profile": c["profile"],
            "module": (c.get("allocation") or {}).get("module") or c["peft"]["type"],
            "excluded": (c.get("allocation") or {}).get("excluded"),
            "batch_size": c.get("batch_size"),
            "bits": c["bits"],
            "mem_cap_mb": c["mem_cap_mb"],
            "peak_rss_mb": round(c["peak_rss_mb"], 1),
            "updates_accepted": c["updates_accepted"],
        }
        for c in report["clients"]
    ]
    return basic_summary(report) | {"clients": clients}


def main() -> int:
    """Run both assignments and print the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA_20NG)
    p.add_argument("--out", default=str(ROOT / "bench/results/allocation"))
    p.add_argument("--rounds", default="3")
    p.add_argument("--only", nargs="*", default=None)
    a = p.parse_args()
    common = [
        "--data", a.data, "--clients", "8", "--rounds", a.rounds, "--partition", "dirichlet:0.5",
        "--samples-per-client", "150", "--profiles", "low=0.3,mid=0.4,high=0.3", "--seed", "0",
        "--test-samples", "500", "--no-progress", "--engine", "torch",
    ]  # fmt: skip
    summary = run_all(RUNS, common, Path(a.out), only=a.only, summarise=summarise)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
