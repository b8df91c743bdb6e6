"""Analysis: where the main run's levers end up in test loss and accuracy, seed by seed.

Reads reports that ``bench/learning.py`` already wrote (no training here) and, for each run, gives
the test loss and accuracy by round, the lowest test loss and the round it came at, and the best
and final gain in accuracy over the class-mean head of round 0. A lever that only makes the rounds
learn faster reaches the same lowest test loss sooner and then rises; a lever that lets the model
learn more reaches a lower one. Writes ``loss-floor-sSEED.json`` and ``.png`` beside the
reports.

    .venv/bin/python bench/loss_floor.py --seed 1 \
        default=bench/results/learning-downlink-fix/main-s1.json \
        headfrozen=bench/results/levers/headfrozen-s1.json \
        slr2=bench/results/levers/slr2-s1.json \
        le2=bench/results/levers/le2-s1.json lr1e-3=bench/results/levers/lr1e-3-s1.json \
        --out bench/results/levers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from runner import main_guard


def floor_of(report: dict[str, Any]) -> dict[str, Any]:
    """Test loss and accuracy by round, the lowest loss and its round, best and final gains."""
    rounds = report["rounds"]
    losses = [float(r["loss"]) for r in rounds]
    accs = [float(r["accuracy"]) for r in rounds]
    low = min(range(len(losses)), key=losses.__getitem__)
    return {
        "test_loss_by_round": [round(x, 4) for x in losses],
        "accuracy_by_round": accs,
        "lowest_test_loss": round(losses[low], 4),
        "lowest_loss_round": low,
        "best_gain": round(max(accs[1:]) - accs[0], 4) if len(accs) > 1 else 0.0,
        "final_gain": round(accs[-1] - accs[0], 4),
    }


def _plot(runs: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in runs.items():
        xs = range(len(r["test_loss_by_round"]))
        ax_loss.plot(xs, r["test_loss_by_round"], marker="o", label=name)
        ax_acc.plot(xs, r["accuracy_by_round"], marker="o", label=name)
    ax_loss.set_ylabel("test loss (cross-entropy)")
    ax_acc.set_ylabel("test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("round (0 = class-mean head)")
        ax.grid(alpha=0.3)
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    """Read the named reports, write the summary and the plot."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=REPORT.json")
    p.add_argument("--seed", type=int, required=True, help="the seed the reports share (for the title)")
    p.add_argument("--out", required=True, help="folder for loss-floor.json and loss-floor.png")
    a = p.parse_args()
    runs: dict[str, dict[str, Any]] = {}
    for spec in a.runs:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"expected NAME=REPORT.json, got {spec!r}")
        report = json.loads(Path(path).read_text())
        runs[name] = floor_of(report) | {"report": path}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"loss-floor-s{a.seed}.json").write_text(json.dumps(runs, indent=2) + "\n")
    title = f"main command, seed {a.seed}: test loss and accuracy by round"
    _plot(runs, title, out / f"loss-floor-s{a.seed}.png")
    for name, r in runs.items():
        print(
            f"{name:12s} lowest test loss {r['lowest_test_loss']:.3f} at round {r['lowest_loss_round']}, "
            f"best gain {r['best_gain']:+.3f}, final gain {r['final_gain']:+.3f}"
        )
    return 0


if __name__ == "__main__":
    main_guard(main)
