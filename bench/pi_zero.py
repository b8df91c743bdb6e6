"""Benchmark: Raspberry Pi Zero 2 W devices (512 MB) train MiniLM on ONNX Runtime beside torch devices.

20 Newsgroups, 4 devices with profiles ``pi-zero-2w=0.5,mid=0.5``, ``--engine mixed``: the two
smallest devices go to the worker process that trains with ONNX Runtime and never imports torch;
the allocator sees from their hello that they have ORT, predicts its memory, and picks a LoRA
module that fits their 384 MiB cap (torch would need about 680 MiB for the smallest candidate).
The report shows each device's engine, module, cap, measured peak and accepted updates.

    .venv/bin/python bench/pi_zero.py --out bench/results/pi_zero
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runner import DATA_20NG, ROOT, basic_summary, main_guard, run_all

RUNS = {"pi-zero-mixed": ["--engine", "mixed"]}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Accuracy, and per client: profile, engine, module, batch, cap, peak, accepted updates."""
    keys = ("id", "profile", "engine", "batch_size", "bits", "mem_cap_mb", "peak_rss_mb", "updates_accepted")
    clients = [
        {k: c[k] for k in keys} | {"module": (c.get("allocation") or {}).get("module")}
        for c in report["clients"]
    ]
    return basic_summary(report) | {"clients": clients}


def main() -> int:
    """Run the fleet and print the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA_20NG)
    p.add_argument("--out", default=str(ROOT / "bench/results/pi_zero"))
    p.add_argument("--rounds", default="2")
    a = p.parse_args()
    common = [
        "--data", a.data, "--clients", "4", "--rounds", a.rounds, "--partition", "dirichlet:0.5",
        "--samples-per-client", "150", "--profiles", "pi-zero-2w=0.5,mid=0.5", "--seed", "0",
        "--test-samples", "500", "--no-progress", "--allocation", "utility",
    ]  # fmt: skip
    summary = run_all(RUNS, common, Path(a.out), summarise=summarise)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
