"""Benchmark: the ORT engine's LoRA step under its two allocator settings (issue 14).

``lean``: glibc serves blocks of 1 MiB and more with mmap (:func:`use_lean_allocator`), so freed
activation buffers go back to the OS; ``default``: glibc's own dynamic threshold. Each measurement
trains 6 steps (the first is warm-up) of MiniLM with LoRA r=8 on query and value, batch 32, 64
tokens by default, 2 threads, in a fresh process (:func:`measure_in_process`), the settings
alternating in a rotating order, ``--repeats`` times. The report holds every measurement, the
medians and the ratios lean / default of step time and peak resident memory, and the load average
before and after. Measure with nothing else running:

    .venv/bin/python bench/ort_allocator.py --out bench/results/ort_allocator/summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("lean", "default")


def _child(setting: str, folder: str, config_json: str, steps: int) -> None:
    from edge_runtime.config import TrainConfig
    from edge_runtime.engines.memory_probe import measure_in_process
    from edge_runtime.engines.ort_engine import OrtEngine

    cfg = TrainConfig.from_dict(json.loads(config_json))
    lean = setting == "lean"

    def build() -> OrtEngine:
        return OrtEngine(cfg, artifacts=folder, seed=0, threads=2, lean_memory=lean)

    print(json.dumps(asdict(measure_in_process(build, cfg, steps))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench/results/ort_allocator/summary.json"))
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a.child[0], a.child[1], a.child[2], int(a.child[3]))
        return 0
    from broker_server.artifacts import build_artifacts
    from edge_runtime.config import TrainConfig
    from edge_runtime.peft_specs import LoraSpec

    cfg = TrainConfig(
        peft=LoraSpec(rank=8, alpha=16.0),
        model="all-MiniLM-L6-v2",
        num_labels=20,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        engine="ort",
    )
    folder = str(build_artifacts(cfg, flavour="training").folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    load_before = list(os.getloadavg())
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
    for r in range(a.repeats):
        order = SETTINGS[r % 2 :] + SETTINGS[: r % 2]
        for setting in order:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                setting,
                folder,
                json.dumps(cfg.to_dict()),
                str(a.steps),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=1800)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                return 1
            m = json.loads(done.stdout.strip().splitlines()[-1])
            runs[setting].append(m)
            print(
                f"repeat {r + 1}/{a.repeats} {setting}: {m['step_s']:.3f} s/step, "
                f"peak {m['peak_rss_mb']:.0f} MiB",
                flush=True,
            )
    med = {
        s: {
            "step_s_median": statistics.median(m["step_s"] for m in runs[s]),
            "step_s_mean": statistics.mean(m["step_s"] for m in runs[s]),
            "step_s_sd": statistics.stdev(m["step_s"] for m in runs[s]) if len(runs[s]) > 1 else 0.0,
            "peak_rss_mb_median": statistics.median(m["peak_rss_mb"] for m in runs[s]),
        }
        for s in SETTINGS
    }
    report = {
        "config": cfg.to_dict(),
        "threads": 2,
        "repeats": a.repeats,
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()),
        "runs": runs,
        "summary": med,
        "lean_over_default": {
            "step_s_median": med["lean"]["step_s_median"] / med["default"]["step_s_median"],
            "peak_rss_mb_median": med["lean"]["peak_rss_mb_median"] / med["default"]["peak_rss_mb_median"],
        },
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1), json.dumps(report["lean_over_default"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
