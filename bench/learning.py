"""Benchmark: do federated rounds learn? The README's main job over seeds, beside centralized training.

Runs ``fedpeft simulate`` with the README's main command (20 Newsgroups, 8 devices, Dirichlet 0.5,
150 samples a device, 4-bit updates, everything else at its defaults) for each seed, and
``fedpeft centralized`` on the union of the same devices' samples with the same epochs and the same
recipe (rounds x local epochs, learning rates, LoRA, logit adjustment). A variant adds flags to the
federated runs (``--variant NAME="--flag value ..."``), e.g. the fp32 downlink or a lever turned
off, so that it differs from the main run in that factor only. Every report is kept; a report that
exists is not run again (delete it to rerun). The summary gives, per run kind, the mean, the
standard deviation and the range over seeds of the final accuracy and of its gain over the
class-mean head of round 0, bytes and wall time, and ``learning.png`` plots mean accuracy by round.

    .venv/bin/python bench/learning.py --out bench/results/learning --seeds 0 1 2
    .venv/bin/python bench/learning.py --out bench/results/learning --variant fp32down="--downlink full"

``--workload`` picks the federation (default ``main``, the README's main command); the others are
the issue's harder workloads, each written to its own folder by default:

    banking77      BANKING77, the whole train split over 20 devices, Dirichlet 0.5, its whole test split
    20ng-dir01     20 Newsgroups, 20 devices x 250 samples, Dirichlet 0.1, 64 tokens
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runner import DATA_20NG, ROOT, main_guard, seed_stats

sys.path.insert(0, str(ROOT))

DATASETS = Path(DATA_20NG).parent
# workload -> (data folder, flags of every run of it, federated and centralized, default output folder)
WORKLOADS: dict[str, tuple[str, list[str], str]] = {
    "main": (
        DATA_20NG,
        ["--clients", "8", "--rounds", "5", "--partition", "dirichlet:0.5", "--samples-per-client", "150"],
        "bench/results/learning",
    ),
    "banking77": (
        str(DATASETS / "banking77"),
        [
            "--clients", "20", "--rounds", "5", "--partition", "dirichlet:0.5",
            "--samples-per-client", "all", "--test-samples", "3080",
        ],
        "bench/results/learning-banking77",
    ),
    "20ng-dir01": (
        DATA_20NG,
        [
            "--clients", "20", "--rounds", "5", "--partition", "dirichlet:0.1",
            "--samples-per-client", "250", "--seq-len", "64",
        ],
        "bench/results/learning-20ng-dir01",
    ),
}  # fmt: skip


def _run(cmd: list[str], report: Path) -> float:
    if report.exists():
        return float(json.loads(report.read_text()).get("extra", {}).get("bench_wall_s", 0.0))
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    wall = time.monotonic() - start
    data = json.loads(report.read_text())
    data.setdefault("extra", {})["bench_wall_s"] = wall
    report.write_text(json.dumps(data, indent=2) + "\n")
    return wall


def _summarise(reports: list[dict[str, Any]], walls: list[float]) -> dict[str, Any]:
    finals = [float(r["final"]["accuracy"]) for r in reports]
    starts = [float(r["rounds"][0]["accuracy"]) for r in reports]
    comm = [r["communication"] for r in reports]
    return {
        "seeds": len(reports),
        "final_accuracy": seed_stats(finals),
        "round0_accuracy": seed_stats(starts),
        "gain_over_round0": seed_stats([f - s for f, s in zip(finals, starts, strict=True)]),
        "finals": [round(f, 4) for f in finals],
        "accuracy_by_round_mean": [
            round(statistics.fmean(float(r["rounds"][i]["accuracy"]) for r in reports), 4)
            for i in range(min(len(r["rounds"]) for r in reports))
        ],
        "bytes_up_mb": round(statistics.fmean(c["bytes_up_total"] for c in comm) / 1e6, 3),
        "bytes_down_mb": round(statistics.fmean(c["bytes_down_total"] for c in comm) / 1e6, 3),
        "reduction_vs_full": round(min(float(c["reduction_vs_full"]) for c in comm), 5),
        "wall_s_mean": round(statistics.fmean(walls), 1) if walls else None,
    }


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, s in summary.items():
        if not isinstance(s, dict) or "accuracy_by_round_mean" not in s:
            continue
        ys = s["accuracy_by_round_mean"]
        ax.plot(range(len(ys)), ys, marker="o", label=f"{name} ({s['seeds']} seeds)")
    from sdk.plot import accuracy_limits

    ys_all = [y for s in summary.values() if isinstance(s, dict) for y in s.get("accuracy_by_round_mean", [])]
    ax.set_ylim(*accuracy_limits(ys_all))
    ax.set_xlabel("round (0 = class-mean head) / centralized epoch")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    """Run every seed of every kind, then summarise."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="main")
    p.add_argument("--data", default=None, help="the workload's data folder, elsewhere")
    p.add_argument("--out", default=None, help="report folder (default: the workload's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variant", action="append", default=[], help='NAME="--flag value ...", federated')
    p.add_argument("--no-centralized", action="store_true")
    p.add_argument("--no-main", action="store_true", help="only the variants (and centralized)")
    p.add_argument("--common", default="", help="flags added to every run, federated and centralized")
    a = p.parse_args()
    data, workload_flags, default_out = WORKLOADS[a.workload]
    out = Path(a.out or ROOT / default_out)
    out.mkdir(parents=True, exist_ok=True)
    fedpeft = str(ROOT / ".venv/bin/fedpeft")
    common = ["--data", a.data or data, *workload_flags, *shlex.split(a.common)]
    kinds: dict[str, list[str]] = {} if a.no_main else {"main": ["--bits", "4"]}
    for spec in a.variant:
        name, _, flags = spec.partition("=")
        kinds[name] = ["--bits", "4", *shlex.split(flags)]
    summary_path = out / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for name, flags in kinds.items():
        reports, walls = [], []
        for seed in a.seeds:
            report = out / f"{name}-s{seed}.json"
            cmd = [fedpeft, "simulate", *common, *flags, "--seed", str(seed), "--no-progress"]
            walls.append(_run([*cmd, "--report", str(report)], report))
            reports.append(json.loads(report.read_text()))
        summary[name] = _summarise(reports, walls) | {"flags": " ".join(flags)}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    if not a.no_centralized:
        reports, walls = [], []
        for seed in a.seeds:
            report = out / f"centralized-s{seed}.json"
            cmd = [fedpeft, "centralized", *common, "--seed", str(seed), "--report", str(report)]
            walls.append(_run(cmd, report))
            reports.append(json.loads(report.read_text()))
        summary["centralized"] = _summarise(reports, walls)
    for name in kinds:
        if "centralized" in summary:
            gaps = [
                float(json.loads((out / f"centralized-s{s}.json").read_text())["final"]["accuracy"])
                - float(json.loads((out / f"{name}-s{s}.json").read_text())["final"]["accuracy"])
                for s in a.seeds
            ]
            summary[name]["gap_to_centralized"] = seed_stats(gaps)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    _plot(summary, out / "learning.png")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
