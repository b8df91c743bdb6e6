"""Plots a person would rather look at than read: accuracy against round, bytes and simulated time."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write a PNG with accuracy per round, per cumulative megabyte moved and per simulated hour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in report["rounds"] if r.get("accuracy") is not None]
    xs = [r["round"] for r in rounds]
    acc = [r["accuracy"] for r in rounds]
    moved = []
    total = 0
    for r in report["rounds"]:
        total += int(r["bytes_up"]) + int(r["bytes_down"])
        if r.get("accuracy") is not None:
            moved.append(total / 1e6)
    hours = [float(r.get("virtual_s", 0.0)) / 3600 for r in rounds]
    fig, (left, right, clock) = plt.subplots(1, 3, figsize=(15, 4))
    left.plot(xs, acc, marker="o")
    left.set_xlabel("round (0 = class-mean head, before any training)")
    left.set_ylabel("test accuracy")
    left.set_title("accuracy per round")
    left.grid(alpha=0.3)
    left.set_ylim(0, 1)  # a zoomed axis would make small changes look large
    right.plot(moved, acc, marker="o", color="tab:orange")
    right.set_xlabel("MB moved (up + down, cumulative)")
    right.set_ylabel("test accuracy")
    right.set_title("accuracy per byte")
    right.grid(alpha=0.3)
    right.set_ylim(0, 1)
    clock.plot(hours, acc, marker="o", color="tab:green")
    clock.set_xlabel("simulated hours (device speeds, links, availability)")
    clock.set_ylabel("test accuracy")
    clock.set_title(
        "accuracy over time" + (" (async)" if report.get("config", {}).get("mode") == "async" else "")
    )
    clock.grid(alpha=0.3)
    clock.set_ylim(0, 1)
    cfg = report.get("config", {})
    fig.suptitle(
        f"{report.get('kind', '')}: {Path(str(cfg.get('data', ''))).name}, "
        f"{cfg.get('clients', '?')} clients, {cfg.get('partition', '')}, {cfg.get('bits', '?')}-bit"
    )
    fig.tight_layout()
    target = Path(path)
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
