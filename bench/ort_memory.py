"""Benchmark: peak memory and step time of the ONNX Runtime engines against the torch engine.

MiniLM + LoRA r=8 on query and value, batch 32, 64 tokens: each engine trains ``--steps`` steps in
a fresh process (edge_runtime.engines.memory_probe), side by side in one run, ``--repeats`` times
alternately; the ORT process has torch, transformers and peft made unimportable, as on a device
with the ``edge`` extra only. ``ort-plain`` (the step graph in plain onnxruntime, ``--engines``
includes it by default) also has ``onnxruntime.training`` made unimportable. ``--frozen-weights
int8 int8-grad`` adds ``ort-int8`` and ``ort-int8-grad``: the ort engine on artifacts built with
that ``frozen_weights`` (``--int8`` is ``--frozen-weights int8``). Reports peak
resident memory (VmHWM) and mean seconds per step (without the warm-up step), and the ratios of
each ORT engine to torch.

    .venv/bin/python bench/ort_memory.py --out bench/results/ort_memory
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from runner import ROOT, engines_here, main_guard

from broker_server.artifacts import build_artifacts
from edge_runtime.config import FROZEN_WEIGHTS, TrainConfig
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
    p.add_argument(
        "--engines",
        help="comma-separated; torch is always measured (default torch,ort,ort-plain, without ort where "
        "onnxruntime-training is not installed)",
    )
    p.add_argument(
        "--frozen-weights",
        nargs="+",
        default=[],
        choices=[f for f in FROZEN_WEIGHTS if f != "fp32"],
        help="also measure the ort engine with the frozen linear weights in these formats "
        "(as ort-int8, ort-int8-grad)",
    )
    p.add_argument("--int8", action="store_true", help="the same as --frozen-weights int8")
    a = p.parse_args()
    formats = list(dict.fromkeys([*a.frozen_weights, *(["int8"] if a.int8 else [])]))
    here = engines_here(a.engines, ("torch", "ort", "ort-plain"))
    engines = ["torch"] + [e for e in here if e != "torch"]
    if formats and "ort" not in engines:
        p.error("--frozen-weights needs the ort engine (onnxruntime-training)")
    base = TrainConfig(
        peft=LoraSpec(rank=8, alpha=16.0), num_labels=20, batch_size=a.batch_size, seq_len=a.seq_len
    )
    configs = {name: replace(base, engine=name) for name in engines}
    for fmt in formats:
        configs[f"ort-{fmt}"] = replace(base, engine="ort", frozen_weights=fmt)
    print("building ORT artifacts (cached after the first time)...", flush=True)
    folders: dict[str, str | None] = {"torch": None}
    if "ort" in configs:
        folders["ort"] = str(build_artifacts(configs["ort"]).folder)
    for fmt in formats:
        folders[f"ort-{fmt}"] = str(build_artifacts(configs[f"ort-{fmt}"]).folder)
    if "ort-plain" in configs:
        folders["ort-plain"] = str(build_artifacts(configs["ort-plain"], flavour="step").folder)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for i in range(a.repeats):
        for name, cfg in configs.items():
            m = measure_training(
                cfg, steps=a.steps, threads=a.threads, artifacts=folders[name], lean_memory=True
            )
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
            "threads": a.threads,
            "steps": a.steps,
        },
        "runs": runs,
    }
    for name in runs:
        summary[name] = {
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs[name]),
            "step_s": statistics.median(r["step_s"] for r in runs[name]),
            "loaded_rss_mb": statistics.median(r["loaded_rss_mb"] for r in runs[name]),
        }
    t = summary["torch"]
    assert isinstance(t, dict)
    for name in configs:
        if name == "torch":
            continue
        o = summary[name]
        assert isinstance(o, dict)
        tag = name.replace("-", "_")
        summary[f"memory_ratio_{tag}_to_torch"] = round(o["peak_rss_mb"] / t["peak_rss_mb"], 3)
        summary[f"step_time_ratio_{tag}_to_torch"] = round(o["step_s"] / t["step_s"], 3)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
