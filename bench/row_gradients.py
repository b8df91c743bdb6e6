"""Benchmark: the packed row gathers' gradients as gathers against ONNX Runtime's GatherNDGrad.

``broker_server.packed_encoder.row_gradients_as_gathers`` rewrites, after ``generate_artifacts``,
every ``GatherNDGrad`` of the packed forward's row gathers (a scatter-add into zeros) as a
``GatherND`` (times the attention mask for the gathers back to the padded layout); training is
bit-for-bit the same (``tests/test_packed_encoder.py``). This times what it saves on the
simulator's work: the round-1 training jobs of the first ``--devices`` devices of the Flower
comparison's workload (20 Newsgroups, 8 devices x 150 posts, Dirichlet 0.5, seed 0; LoRA r=8
alpha 8 on query and value, batch 32, 128 tokens, 2 local epochs, one thread as in the simulator's
workers), on artifacts built with the rewrite and without it, for each ``--frozen-weights``. The
variants alternate, device by device, ``--repeats`` times; each job gets a fresh engine. The
report holds the machine, every job's seconds, per variant the seconds of one pass over the
devices (mean over repeats), the ratio of with to without, and whether both trained to the same
loss.

    .venv/bin/python bench/row_gradients.py --out bench/results/row_gradients/summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from runner import DATA_20NG, ROOT, main_guard


def main() -> int:
    """Time both artifact builds and write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("FEDPEFT_DATA_20NG", DATA_20NG))
    p.add_argument("--out", default=str(ROOT / "bench/results/row_gradients/summary.json"))
    p.add_argument("--devices", type=int, default=4, help="devices of the workload whose jobs run (<= 8)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--frozen-weights", default="fp32,int8", help="comma-separated: fp32, int8")
    a = p.parse_args()
    if not 1 <= a.devices <= 8 or a.repeats < 1:
        p.error("--devices must be 1 to 8 and --repeats at least 1")

    from micro_batch import simulation_workload
    from step_speed import machine_info
    from tqdm import tqdm

    import broker_server.packed_encoder as packed_encoder
    from broker_server.artifacts import build_artifacts
    from edge_runtime.agent import _job_seed
    from edge_runtime.config import TrainConfig
    from edge_runtime.engines.ort_engine import OrtEngine
    from edge_runtime.peft_specs import LoraSpec

    work = simulation_workload(a.data)
    formats = [f for f in a.frozen_weights.split(",") if f]
    rewrite = packed_encoder.row_gradients_as_gathers
    cache = Path(tempfile.mkdtemp(prefix="fedpeft-row-gradients-"))
    variants: list[tuple[str, TrainConfig, str]] = []
    print("building artifacts (4 folders, about 10 s each)...", flush=True)
    for fmt in formats:
        config = TrainConfig(
            peft=LoraSpec(rank=8, alpha=8.0, target_modules=("query", "value")),
            num_labels=work.train.num_classes,
            seq_len=128,
            batch_size=32,
            lr=3e-3,
            head_lr=2e-3,
            engine="ort",
            frozen_weights=fmt,
        )
        for name, fn in (("gathers", rewrite), ("GatherNDGrad", lambda model: 0)):
            packed_encoder.row_gradients_as_gathers = fn  # type: ignore[assignment]
            try:
                folder = build_artifacts(config, seed=0, cache_dir=cache / name, threads=1).folder
            finally:
                packed_encoder.row_gradients_as_gathers = rewrite
            variants.append((f"{fmt} {name}", config, str(folder)))
    jobs: dict[str, list[float]] = {v[0]: [] for v in variants}
    losses: dict[str, list[float]] = {v[0]: [] for v in variants}
    devices = work.parts[: a.devices]
    with tqdm(total=a.repeats * len(devices) * len(variants), desc="training jobs", unit="job") as bar:
        for repeat in range(a.repeats):
            for i, part in enumerate(devices):
                data = work.train.subset(part)
                seed = _job_seed(0, f"dev{i:03d}", 1)  # the simulator's device i in round 1
                for name, config, folder in variants:
                    engine = OrtEngine(config, artifacts=folder, threads=1)
                    start = time.perf_counter()
                    result = engine.train(data, epochs=2, seed=seed)
                    jobs[name].append(time.perf_counter() - start)
                    engine.close()
                    if repeat == 0:
                        losses[name].append(float(result.loss))
                    bar.update(1)
    per_pass = {name: sum(s) / a.repeats for name, s in jobs.items()}
    summary: dict[str, Any] = {
        "benchmark": "row_gradients",
        "machine": machine_info(1),
        "workload": {
            "data": a.data,
            "devices": a.devices,
            "repeats": a.repeats,
            "job": "round 1: 150 posts, batch 32, 128 tokens, 2 epochs, LoRA r=8 alpha 8 on query,value",
        },
        "jobs_s": jobs,
        "pass_s": per_pass,
        "job_s_median": {name: statistics.median(s) for name, s in jobs.items()},
    }
    for fmt in formats:
        with_, without = f"{fmt} gathers", f"{fmt} GatherNDGrad"
        summary[f"{fmt}_ratio_gathers_to_gathernd_grad"] = round(per_pass[with_] / per_pass[without], 3)
        summary[f"{fmt}_same_losses"] = losses[with_] == losses[without]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("jobs_s", "machine")}, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
