"""Benchmark: peak memory and step time of the ONNX Runtime engine against the torch engine.

MiniLM + LoRA r=8 on query and value, batch 32, 64 tokens: each engine trains ``--steps`` steps in
a fresh process (edge_runtime.engines.memory_probe), side by side in one run, ``--repeats`` times
alternately; the ORT process has torch, transformers and peft made unimportable, as on a device
with the ``edge`` extra only. Reports peak resident memory (VmHWM) and mean seconds per step
(without the warm-up step), and the ratios ORT / torch.

    .venv/bin/python bench/ort_memory.py --out bench/results/ort_memory
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from runner import ROOT, main_guard

from broker_server.artifacts import build_artifacts
from edge_runtime.config import TrainConfig
from edge_runtime.engines.memory_probe import measure_training
from edge_runtime.peft_specs import LoraSpec


def main() -> int:
    """Measure both engines and write ``summary.json``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench/results/ort_memory"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    base = TrainConfig(
        peft=LoraSpec(rank=8, alpha=16.0), num_labels=20, batch_size=a.batch_size, seq_len=a.seq_len
    )
    ort = replace(base, engine="ort")
    print("building ORT artifacts (cached after the first time)...", flush=True)
    artifacts = build_artifacts(ort)
    runs: dict[str, list[dict[str, float]]] = {"torch": [], "ort": []}
    for i in range(a.repeats):
        for name, cfg in (("torch", base), ("ort", ort)):
            m = measure_training(cfg, steps=a.steps, threads=a.threads, artifacts=str(artifacts.folder))
            runs[name].append(asdict(m))
            print(
                f"repeat {i + 1}/{a.repeats} {name}: peak {m.peak_rss_mb:.0f} MiB, {m.step_s:.3f} s/step",
                flush=True,
            )
    summary: dict[str, object] = {
        "config": {
            "model": base.model,
            "peft": base.peft.to_dict(),
            "batch": a.batch_size,
            "seq_len": a.seq_len,
        },
        "runs": runs,
    }
    for name in runs:
        summary[name] = {
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs[name]),
            "step_s": statistics.median(r["step_s"] for r in runs[name]),
            "loaded_rss_mb": statistics.median(r["loaded_rss_mb"] for r in runs[name]),
        }
    t, o = summary["torch"], summary["ort"]
    assert isinstance(t, dict) and isinstance(o, dict)
    summary["memory_ratio_ort_to_torch"] = round(o["peak_rss_mb"] / t["peak_rss_mb"], 3)
    summary["step_time_ratio_ort_to_torch"] = round(o["step_s"] / t["step_s"], 3)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
