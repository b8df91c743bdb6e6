"""Benchmark: image classification on scikit-learn's handwritten digits, federated beside centralized.

The digits (``sklearn.datasets.load_digits``: 1,797 grey 8 x 8 images of 0 to 9, shipped inside
scikit-learn, nothing downloaded) are written as PNGs in the image folder layout
(``train/<digit>/*.png``, ``test/<digit>/*.png``, ``labels.txt``): a fixed, class-stratified
quarter (450 images) is the test split, the other 1,347 the train split. The model is a small ViT
(8 x 8 grey images, 2 x 2 patches, hidden 64, 4 layers, 4 heads) with RANDOM weights, one per seed:
no pretrained vision model ships its weights in a package here, so LoRA on it measures the
plumbing (loader, ViT, federated LoRA, evaluation), not transfer from pretraining.

For each seed, ``fedpeft simulate`` runs 5 devices, a Dirichlet(0.5) label skew over the whole
train split (``--samples-per-client all``), 6 rounds of 1 local epoch, 4-bit updates and every other
flag at its default (LoRA rank 4 on every attention projection, the class-mean head at round 0);
``fedpeft centralized`` trains the same model, module and recipe on the union of the same devices'
samples for the same 6 epochs, in a process pinned to one core: its engine otherwise trains with a
thread per core, and on a shared 2-core machine two threads waiting on each other took 300 s for an
epoch; the federated devices train with one thread each already. Reports go to ``--out``
(default ``bench/results/digits``), a report that exists is not run again (delete it to rerun),
and ``summary.json`` gives per kind the mean, standard deviation and range over the seeds of the
final test accuracy.

    .venv/bin/python bench/digits.py                  # seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runner import ROOT, main_guard, seed_stats

sys.path.insert(0, str(ROOT))

CLIENTS = 5
ROUNDS = 6
PARTITION = "dirichlet:0.5"
TEST_SHARE = 0.25
VIT = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "image_size": 8,
    "patch_size": 2,
    "num_channels": 1,
}


def write_digits(folder: Path) -> dict[str, int]:
    """The digits as an image folder: a fixed class-stratified test quarter, the rest train."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from edge_runtime.image_data import write_image_folder

    digits = load_digits()
    # pixel values are 0..16: scale to 0..255 grey
    images = np.clip(np.rint(digits.images * 255.0 / 16.0), 0, 255).astype(np.uint8)
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=TEST_SHARE, stratify=digits.target, random_state=0
    )
    names = tuple(str(d) for d in range(10))
    write_image_folder(folder, {"train": (train_x, train_y), "test": (test_x, test_y)}, names)
    return {"train": len(train_y), "test": len(test_y)}


def write_vit(folder: Path, seed: int) -> Path:
    """A random-initialised ViT of :data:`VIT`'s shape, saved with ``save_pretrained``."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    ViTModel(ViTConfig(**VIT)).save_pretrained(folder)
    return folder


def _one_core() -> None:
    """Pin the calling process to one core (run in the child before it starts)."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def _run(cmd: list[str], report: Path, *, one_core: bool = False) -> float:
    if report.exists():
        return float(json.loads(report.read_text()).get("extra", {}).get("bench_wall_s", 0.0))
    print("$", " ".join(cmd), flush=True)
    start = time.monotonic()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(cmd, check=True, env=env, preexec_fn=_one_core if one_core else None)
    wall = time.monotonic() - start
    data = json.loads(report.read_text())
    data.setdefault("extra", {})["bench_wall_s"] = wall
    report.write_text(json.dumps(data, indent=2) + "\n")
    return wall


def _summarise(reports: list[dict[str, Any]], walls: list[float]) -> dict[str, Any]:
    finals = [float(r["final"]["accuracy"]) for r in reports]
    return {
        "seeds": len(reports),
        "final_accuracy": seed_stats(finals),
        "finals": [round(f, 4) for f in finals],
        "round0_accuracy": seed_stats([float(r["rounds"][0]["accuracy"]) for r in reports]),
        "accuracy_by_round_mean": [
            round(statistics.fmean(float(r["rounds"][i]["accuracy"]) for r in reports), 4)
            for i in range(min(len(r["rounds"]) for r in reports))
        ],
        "bytes_up_mb": round(
            statistics.fmean(r["communication"]["bytes_up_total"] for r in reports) / 1e6, 4
        ),
        "wall_s_mean": round(statistics.fmean(walls), 1),
    }


def main() -> int:
    """Write the digits and the models, run every seed of both kinds, summarise."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench/results/digits"), help="report folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedpeft-digits-"))
    try:
        sizes = write_digits(work / "digits")
        cli = [sys.executable, "-m", "sdk.cli"]
        common = [
            "--data", str(work / "digits"),
            "--clients", str(CLIENTS),
            "--partition", PARTITION,
            "--samples-per-client", "all",
            "--rounds", str(ROUNDS),
            "--local-epochs", "1",
        ]  # fmt: skip
        runs: dict[str, tuple[list[dict[str, Any]], list[float]]] = {
            "federated": ([], []),
            "centralized": ([], []),
        }
        for seed in a.seeds:
            model = write_vit(work / f"vit-s{seed}", seed)
            flags = [*common, "--model", str(model), "--seed", str(seed)]
            for kind, cmd in (
                ("federated", [*cli, "simulate", *flags, "--engine", "torch", "--no-progress"]),
                ("centralized", [*cli, "centralized", *flags]),
            ):
                report = out / f"{kind}-s{seed}.json"
                wall = _run([*cmd, "--report", str(report)], report, one_core=kind == "centralized")
                runs[kind][0].append(json.loads(report.read_text()))
                runs[kind][1].append(wall)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {
        "data": {"images": sizes["train"] + sizes["test"], **sizes, "size": "8x8 grey", "classes": 10},
        "model": {"family": "vit", "weights": "random (seeded per run)", **VIT},
        "recipe": {"clients": CLIENTS, "partition": PARTITION, "rounds": ROUNDS, "local_epochs": 1},
    }
    for kind, (reports, walls) in runs.items():
        summary[kind] = _summarise(reports, walls)
    gaps = [
        c["final"]["accuracy"] - f["final"]["accuracy"]
        for f, c in zip(runs["federated"][0], runs["centralized"][0], strict=True)
    ]
    summary["gap_centralized_minus_federated"] = seed_stats(gaps)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
