"""Benchmark: asynchronous (FedBuff) against synchronous FedAvg on the simulated clock.

20 Newsgroups, 8 clients (IID), 100 samples a client, 64 tokens, 300 test samples, a random head
(so that accuracy climbs over rounds), head learning rate 1e-2, seed 0; 30% of the fleet
(2 devices) computes 5x slower and is online half the time (``--stragglers 0.3:5:0.5``, cycles of
600 s). ``sync`` runs 10 rounds (each waits for its slowest device, which waits to be online);
``async`` aggregates every 4 updates with poly:0.5 staleness weights. The summary gives the
simulated time at which async first reaches the accuracy sync has after 10 rounds, and the ratio.

    .venv/bin/python bench/asynchronous.py --out bench/results/async
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runner import DATA_20NG, ROOT, basic_summary, main_guard, run_all

RUNS = {
    "sync": ["--mode", "sync", "--rounds", "10"],
    "async": ["--mode", "async", "--rounds", "30", "--buffer-size", "4", "--staleness", "poly:0.5"],
}


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Accuracy and simulated time of every round (version)."""
    rounds = report["rounds"]
    return basic_summary(report) | {
        "virtual_s_by_round": [round(r["virtual_s"], 1) for r in rounds],
        "staleness": [r.get("staleness") for r in rounds if r.get("staleness") is not None],
        "stale_dropped": sum(1 for r in report["rejected"] if r["reason"].startswith("stale_round")),
    }


def plot_comparison(summary: dict[str, Any], path: Path) -> None:
    """Both modes' accuracy against simulated hours, with sync's final accuracy as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, color in (("sync", "tab:blue"), ("async", "tab:orange")):
        hours = [t / 3600 for t in summary[name]["virtual_s_by_round"]]
        ax.plot(hours, summary[name]["accuracy_by_round"], marker=".", color=color, label=name)
    ax.axhline(summary["comparison"]["sync_accuracy_after_10_rounds"], color="gray", ls="--", lw=1)
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("30% of devices 5x slower, online half the time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    """Run both modes and compare the simulated time to sync's final accuracy."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA_20NG)
    p.add_argument("--out", default=str(ROOT / "bench/results/async"))
    a = p.parse_args()
    common = [
        "--data", a.data, "--clients", "8", "--partition", "iid", "--samples-per-client", "100",
        "--seq-len", "64", "--test-samples", "300", "--head-init", "random", "--head-lr", "1e-2",
        "--stragglers", "0.3:5:0.5", "--bits", "8", "--seed", "0", "--no-progress", "--engine", "torch",
    ]  # fmt: skip
    out = Path(a.out)
    summary = run_all(RUNS, common, out, summarise=summarise)
    if "sync" in summary and "async" in summary:
        from broker_server.asynchronous import first_time_reaching

        target = summary["sync"]["final_accuracy"]
        sync_time = summary["sync"]["virtual_s_by_round"][-1]
        reached = first_time_reaching(
            summary["async"]["virtual_s_by_round"], summary["async"]["accuracy_by_round"], target
        )
        summary["comparison"] = {
            "sync_accuracy_after_10_rounds": target,
            "sync_virtual_s": sync_time,
            "async_virtual_s_to_reach_it": reached if reached != float("inf") else None,
            "ratio": round(reached / sync_time, 3) if reached != float("inf") else None,
        }
        plot_comparison(summary, out / "sync_vs_async.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
