"""Plots a person would rather look at than read: accuracy against round, bytes and simulated time."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def accuracy_limits(acc: list[float]) -> tuple[float, float]:
    """The accuracy axis: at least 0.3 wide, on tenths, around the data (inside 0-1), so that a
    change of a few points shows without a zoom that makes noise look like a trend."""
    import math

    if not acc:
        return 0.0, 1.0
    lo = max(0.0, math.floor((min(acc) - 0.05) * 10) / 10)
    hi = min(1.0, math.ceil((max(acc) + 0.05) * 10) / 10)
    while hi - lo < 0.3 - 1e-9:
        lo, hi = (max(0.0, lo - 0.1), hi) if lo > 0 else (lo, min(1.0, hi + 0.1))
        if lo == 0.0 and hi == 1.0:
            break
    return lo, hi


def plot_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write a PNG with accuracy per round, per cumulative megabyte moved and per simulated hour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in report["rounds"] if r.get("accuracy") is not None]
    xs = [r["round"] for r in rounds]
    acc = [float(r["accuracy"]) for r in rounds]
    moved = []
    total = 0
    for r in report["rounds"]:
        total += int(r["bytes_up"]) + int(r["bytes_down"])
        if r.get("accuracy") is not None:
            moved.append(total / 1e6)
    hours = [float(r.get("virtual_s", 0.0)) / 3600 for r in rounds]
    limits = accuracy_limits(acc)
    fig, (left, right, clock) = plt.subplots(1, 3, figsize=(15, 4))
    left.plot(xs, acc, marker="o")
    left.set_xlabel("round (0 = class-mean head, before any training)")
    left.set_ylabel("test accuracy")
    left.set_title("accuracy per round")
    left.grid(alpha=0.3)
    left.set_ylim(*limits)
    right.plot(moved, acc, marker="o", color="tab:orange")
    right.set_xlabel("MB moved (up + down, cumulative)")
    right.set_ylabel("test accuracy")
    right.set_title("accuracy per byte")
    right.grid(alpha=0.3)
    right.set_ylim(*limits)
    clock.plot(hours, acc, marker="o", color="tab:green")
    clock.set_xlabel("simulated hours (device speeds, links, availability)")
    clock.set_ylabel("test accuracy")
    clock.set_title(
        "accuracy over time" + (" (async)" if report.get("config", {}).get("mode") == "async" else "")
    )
    clock.grid(alpha=0.3)
    clock.set_ylim(*limits)
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
