"""Benchmark: the README's main run on 20 Newsgroups, with the embedded broker and with Mosquitto.

Runs ``fedpeft simulate`` twice with the same seed (embedded amqtt broker, then the Mosquitto at
``--mosquitto``), writes both reports and a summary into ``--out``, and prints the figures the
walking-skeleton issue asks for: wall time, final accuracy, reduction_vs_full, and the accuracy gap
between the two brokers.

    .venv/bin/python bench/simulate_20ng.py --out bench/results/simulate_20ng
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], report: Path) -> dict:
    """Run fedpeft simulate with ``args`` and return its report plus the wall time."""
    cmd = [str(ROOT / ".venv/bin/fedpeft"), "simulate", *args, "--report", str(report), "--no-progress"]
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    data = json.loads(report.read_text())
    data["_bench_wall_s"] = time.monotonic() - start
    return data


def main() -> int:
    """Run the benchmark and write the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/datasets/20newsgroups"))
    p.add_argument("--out", default=str(ROOT / "bench/results/simulate_20ng"))
    p.add_argument("--mosquitto", default="mqtt://127.0.0.1:1883")
    p.add_argument("--skip-mosquitto", action="store_true")
    p.add_argument("extra", nargs="*", help="more flags for fedpeft simulate (after --)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [
        "--data",
        a.data,
        "--clients",
        "8",
        "--rounds",
        "5",
        "--partition",
        "dirichlet:0.5",
        "--samples-per-client",
        "150",
        "--bits",
        "4",
        "--seed",
        "0",
        *a.extra,
    ]
    runs = {"embedded": run(common, out / "embedded.json")}
    if not a.skip_mosquitto:
        runs["mosquitto"] = run([*common, "--broker", a.mosquitto], out / "mosquitto.json")
    summary = {
        name: {
            "wall_s": r["_bench_wall_s"],
            "final_accuracy": r["final"]["accuracy"],
            "macro_f1": r["final"]["macro_f1"],
            "reduction_vs_full": r["communication"]["reduction_vs_full"],
            "bytes_up_total": r["communication"]["bytes_up_total"],
            "bytes_down_total": r["communication"]["bytes_down_total"],
            "accuracy_by_round": [x["accuracy"] for x in r["rounds"]],
            "max_peak_rss_mb": max(c["peak_rss_mb"] for c in r["clients"]),
        }
        for name, r in runs.items()
    }
    if "mosquitto" in summary:
        summary["accuracy_gap_embedded_vs_mosquitto"] = abs(
            summary["embedded"]["final_accuracy"] - summary["mosquitto"]["final_accuracy"]
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    ok = all(
        s["wall_s"] < 900 and s["final_accuracy"] >= 0.40 and s["reduction_vs_full"] >= 0.995
        for k, s in summary.items()
        if isinstance(s, dict)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
