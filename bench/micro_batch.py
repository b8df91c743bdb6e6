"""Benchmark: a training batch in micro-batches against the whole batch at once (issue 14).

``TrainConfig.micro_batch`` runs a batch in micro-batches (default 8 rows) whose weighted
gradients sum to the batch's before its one update (``tests/test_micro_batch.py``). This measures
what that changes on all-MiniLM-L6-v2 with LoRA r=8 on query and value, batch 32: the peak
resident memory (VmHWM of a fresh process, loading included) and the seconds a step, for each
micro-batch size in ``--micro-batches`` (0: the whole batch, as before micro-batches), on each
engine in ``--engines``, at each length in ``--seq-lens`` and thread count in ``--threads``.

Each measurement is :func:`edge_runtime.engines.memory_probe.measure_training` (synthetic texts
that fill every row to exactly the length, so the sorting by length saves nothing here: this is
the cost of the pass itself; the padding that sorting saves on real texts is counted by
``--padding-data``), the mean step time without the warm-up step. Micro-batch sizes alternate
within each of ``--repeats`` repeats, the order rotating by one each repeat. The report holds the
machine, every measurement, and per setting the mean step time and peak against micro-batch 0.

``--eval-batches`` (64,16 by default) times the evaluation of 500 test samples of
``--padding-data`` at each evaluation batch on each engine (in this process, alternating, at least
3 repeats), with the accuracy and loss each gives. ``--round-micro-batches`` (0,8 by default)
times one simulated device's round on real texts, one thread as in the simulator's workers: the
main workload's first device (150 posts, batch 32, 128 tokens, 2 epochs) on each engine in
``--round-engines`` (torch by default; ort too), each micro-batch alternating, at least 3
repeats, a fresh engine each after a warm-up step; there sorting by length saves padding too
(``--only-eval``: these two parts alone).

``--padding-data`` (a data folder, 20 Newsgroups by default) adds the padded tokens a batch of 32
costs on real texts: FedPEFT+'s simulation partition (8 devices x 150, Dirichlet 0.5, seed 0),
two epochs of random batches, whole batches padded to their longest against micro-batches of
each size sorted by length.

    .venv/bin/python bench/micro_batch.py --out bench/results/micro_batch/summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from runner import DATA_20NG, ROOT, engines_here, main_guard
from step_speed import machine_info

from edge_runtime.config import TrainConfig
from edge_runtime.engines.memory_probe import measure_training
from edge_runtime.peft_specs import LoraSpec


class Workload(NamedTuple):
    """The simulation workload's data: train split, 500 test samples, 8 devices' sample indices."""

    data: str
    train: Any
    test: Any
    parts: list[Any]


def simulation_workload(data: str) -> Workload:
    """``data`` split as ``fedpeft simulate`` splits it (8 devices x 150, Dirichlet 0.5, seed 0)."""
    from edge_runtime.data import load_folder, resolve_data_dir
    from sdk.partition import parse_partition, partition

    train, test = load_folder(resolve_data_dir(data), test_limit=500, seed=0)
    parts = partition(train.labels, 8, parse_partition("dirichlet:0.5"), seed=0, samples_per_client=150)
    return Workload(data, train, test, list(parts))


def padding_cost(work: Workload, micro_sizes: list[int], batch: int, seq_len: int) -> dict[str, Any]:
    """Padded tokens of two epochs of the simulation's partition, whole batches vs micro-batches."""
    import numpy as np

    from edge_runtime.engines.base import micro_batches
    from edge_runtime.models import bundled_minilm_path
    from edge_runtime.tokenizer import load_tokenizer

    train, parts = work.train, work.parts
    tokenizer = load_tokenizer(Path(str(bundled_minilm_path())) / "tokenizer.json", seq_len)
    rng = np.random.default_rng(0)
    real = 0
    padded = {m: 0 for m in micro_sizes}
    for idx in parts:
        lengths = [len(ids) for ids in tokenizer.encode_batch([train.texts[int(i)] for i in idx])]
        for _ in range(2):
            order = rng.permutation(len(idx))
            for start in range(0, len(idx), batch):
                rows = order[start : start + batch]
                real += sum(lengths[int(i)] for i in rows)
                for m in micro_sizes:
                    size = m or len(rows)
                    chunks = micro_batches(rows, size, [lengths[int(i)] for i in rows])
                    padded[m] += sum(len(c) * max(lengths[int(i)] for i in c) for c in chunks)
    whole = padded.get(0) or 1
    return {
        "data": work.data,
        "real_tokens": real,
        "padded_tokens": {str(m): t for m, t in padded.items()},
        "padded_vs_whole": {str(m): round(t / whole, 4) for m, t in padded.items()},
    }


def device_round_cost(
    work: Workload, micros: list[int], repeats: int, threads: int, engine_name: str = "torch"
) -> dict[str, Any]:
    """Seconds of one simulated device's round on real texts: the main workload's first device
    (150 20 Newsgroups posts, 128 tokens, batch 32, 2 local epochs) on ``engine_name`` (torch or
    ort), for each micro-batch, alternating; a fresh engine per measurement."""
    train = work.train
    device = train.subset(work.parts[0])
    config = TrainConfig(
        peft=LoraSpec(rank=8, alpha=8.0, target_modules=("query", "value")),
        num_labels=train.num_classes,
        seq_len=128,
        batch_size=32,
        lr=3e-3,
        engine=engine_name,
    )
    folder = None
    if engine_name == "ort":
        from broker_server.artifacts import build_artifacts

        folder = str(build_artifacts(config).folder)

    def make(micro: int) -> Any:
        cfg = replace(config, micro_batch=micro)
        if folder is not None:
            from edge_runtime.engines.ort_engine import OrtEngine

            return OrtEngine(cfg, artifacts=folder, seed=0, threads=threads)
        from edge_runtime.engines.torch_engine import TorchEngine

        return TorchEngine(cfg, seed=0, threads=threads)

    times: dict[int, list[float]] = {m: [] for m in micros}
    losses: dict[int, float] = {}
    for repeat in range(repeats):
        for micro in micros[repeat % len(micros) :] + micros[: repeat % len(micros)]:
            engine = make(micro)
            engine.train(device.subset(range(8)), epochs=1, seed=0)  # warm-up, then a fresh module
            engine = make(micro)
            start = time.perf_counter()
            result = engine.train(device, epochs=2, seed=0)
            times[micro].append(time.perf_counter() - start)
            losses[micro] = result.loss
            print(f"device round {engine_name} micro {micro}: {times[micro][-1]:.2f} s", flush=True)
    whole = statistics.fmean(times[micros[0]])
    return {
        "engine": engine_name,
        "samples": len(device),
        "epochs": 2,
        "threads": threads,
        "micro_batches": {
            str(m): {
                "seconds": [round(t, 3) for t in times[m]],
                "mean_s": round(statistics.fmean(times[m]), 3),
                f"vs_micro_{micros[0]}": round(statistics.fmean(times[m]) / whole, 3),
                "train_loss": round(losses[m], 8),
            }
            for m in micros
        },
    }


def evaluation_cost(
    work: Workload, engines: list[str], batches: list[int], seq_len: int, repeats: int, threads: int
) -> dict[str, Any]:
    """Seconds to evaluate 500 test samples at each evaluation batch, alternating; same results?"""
    from broker_server.artifacts import build_artifacts

    test = work.test
    config = TrainConfig(
        peft=LoraSpec(rank=8, alpha=8.0, target_modules=("query", "value")), num_labels=20, seq_len=seq_len
    )
    out: dict[str, Any] = {"samples": len(test), "seq_len": seq_len, "threads": threads, "engines": {}}
    for engine_name in engines:
        engine: Any
        if engine_name == "ort":
            from edge_runtime.engines.ort_engine import OrtEngine

            folder = build_artifacts(replace(config, engine="ort")).folder
            engine = OrtEngine(replace(config, engine="ort"), artifacts=str(folder), threads=threads)
        else:
            from edge_runtime.engines.torch_engine import TorchEngine

            engine = TorchEngine(config, seed=0, threads=threads)
        engine.evaluate(test.subset(range(32)))  # warm-up
        times: dict[int, list[float]] = {b: [] for b in batches}
        results: dict[int, tuple[float, float]] = {}
        for repeat in range(repeats):
            for b in batches[repeat % len(batches) :] + batches[: repeat % len(batches)]:
                start = time.perf_counter()
                res = engine.evaluate(test, batch_size=b)
                times[b].append(time.perf_counter() - start)
                results[b] = (res.accuracy, res.loss)
                print(f"evaluation {engine_name} batch {b}: {times[b][-1]:.2f} s", flush=True)
        first = times[batches[0]]
        out["engines"][engine_name] = {
            str(b): {
                "seconds": [round(t, 3) for t in times[b]],
                "mean_s": round(statistics.fmean(times[b]), 3),
                f"vs_batch_{batches[0]}": round(statistics.fmean(times[b]) / statistics.fmean(first), 3),
                "accuracy": results[b][0],
                "loss": round(results[b][1], 6),
            }
            for b in batches
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench/results/micro_batch/summary.json"))
    p.add_argument("--engines", default=None, help="comma-separated: torch, ort (default both)")
    p.add_argument("--micro-batches", default="0,4,8,16")
    p.add_argument("--seq-lens", default="64,128")
    p.add_argument("--threads", default="2", help="comma-separated thread counts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--padding-data", default=DATA_20NG, help="'' to skip the padding count and evaluation")
    p.add_argument("--eval-batches", default="64,16", help="evaluation batches to time ('' to skip)")
    p.add_argument("--only-eval", action="store_true", help="time the evaluation and the device round only")
    p.add_argument(
        "--round-micro-batches", default="0,8", help="micro-batches of the device round on real texts"
    )
    p.add_argument("--round-engines", default="torch", help="engines of the device round: torch, ort")
    a = p.parse_args()
    engines = engines_here(a.engines, ("torch", "ort"))
    micros = [int(x) for x in a.micro_batches.split(",")]
    lengths = [int(x) for x in a.seq_lens.split(",")]
    threads = [int(x) for x in a.threads.split(",")]
    base = TrainConfig(
        peft=LoraSpec(rank=8, alpha=16.0, target_modules=("query", "value")),
        num_labels=20,
        batch_size=a.batch_size,
    )
    folders: dict[int, str] = {}
    if "ort" in engines:
        from broker_server.artifacts import build_artifacts

        for seq in lengths:
            folders[seq] = str(build_artifacts(replace(base, engine="ort", seq_len=seq)).folder)
    machine = machine_info(threads[0]) | {"loadavg_start": list(os.getloadavg())}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    settings = [] if a.only_eval else [(e, s, t) for e in engines for s in lengths for t in threads]
    for n, (engine, seq, th) in enumerate(settings, 1):
        for repeat in range(a.repeats):
            order = micros[repeat % len(micros) :] + micros[: repeat % len(micros)]
            for micro in order:
                cfg = replace(base, engine=engine, seq_len=seq, micro_batch=micro)
                m = measure_training(cfg, steps=a.steps, threads=th, artifacts=folders.get(seq))
                rows.append(
                    {
                        "engine": engine,
                        "seq_len": seq,
                        "threads": th,
                        "micro_batch": micro,
                        "repeat": repeat,
                        "step_s": round(m.step_s, 4),
                        "peak_rss_mb": round(m.peak_rss_mb, 1),
                        "loaded_rss_mb": round(m.loaded_rss_mb, 1),
                    }
                )
                print(
                    f"[{n}/{len(settings)} {time.perf_counter() - started:.0f}s] {engine} {seq} tokens "
                    f"{th} threads micro {micro}: {m.step_s:.3f} s/step, peak {m.peak_rss_mb:.0f} MiB",
                    flush=True,
                )
    table = []
    for engine, seq, th in settings:
        mine = [r for r in rows if (r["engine"], r["seq_len"], r["threads"]) == (engine, seq, th)]
        whole = [r for r in mine if r["micro_batch"] == 0]
        for micro in micros:
            these = [r for r in mine if r["micro_batch"] == micro]
            times = [r["step_s"] for r in these]
            step = statistics.fmean(times)
            peak = statistics.fmean(r["peak_rss_mb"] for r in these)
            entry = {
                "engine": engine,
                "seq_len": seq,
                "threads": th,
                "micro_batch": micro,
                "step_s_mean": round(step, 4),
                "step_s_sd": round(statistics.stdev(times), 4) if len(times) > 1 else 0.0,
                "peak_rss_mb_mean": round(peak, 1),
            }
            if whole:
                entry["step_vs_whole"] = round(step / statistics.fmean(r["step_s"] for r in whole), 3)
                entry["peak_vs_whole"] = round(peak / statistics.fmean(r["peak_rss_mb"] for r in whole), 3)
            table.append(entry)
    machine["loadavg_end"] = list(os.getloadavg())
    report: dict[str, Any] = {
        "benchmark": "micro_batch",
        "model": base.model,
        "module": "LoRA r=8 alpha 16 on query,value",
        "batch_size": a.batch_size,
        "steps": a.steps,
        "repeats": a.repeats,
        "machine": machine,
        "summary": table,
        "measurements": rows,
    }
    work = simulation_workload(a.padding_data) if a.padding_data else None
    if work is not None and a.eval_batches:
        batches = [int(x) for x in a.eval_batches.split(",")]
        report["evaluation"] = evaluation_cost(
            work, engines, batches, max(lengths), max(a.repeats, 3), threads[0]
        )
    if work is not None and a.round_micro_batches:
        round_micros = [int(x) for x in a.round_micro_batches.split(",")]
        rounds = [
            device_round_cost(work, round_micros, max(a.repeats, 3), 1, name)
            for name in engines_here(a.round_engines, ("torch",))
        ]
        report["device_round"] = rounds[0] if len(rounds) == 1 else {r["engine"]: r for r in rounds}
    if work is not None and not a.only_eval:
        report["padding"] = padding_cost(work, micros, a.batch_size, max(lengths))
        print(f"padding on real texts: {report['padding']['padded_vs_whole']}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for entry in table:
        print(json.dumps(entry), flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    main_guard(main)
