"""Benchmark: where the simulation's arithmetic goes, kernel by kernel, and how fast it could be.

Issue 14 asks for ``fedpeft simulate`` at half Flower's wall time on its workload. This measures
the work one run of that workload does, on the ORT engine the simulator's workers use, one
thread per engine as in the simulator's workers (``--threads``):

- a training round, profiled with ONNX Runtime's own profiler (every kernel's time and input and
  output shapes; ``OrtEngine(profile_prefix=...)``): every device's two local epochs (150 posts,
  128 tokens, batch 32, the default micro-batch, LoRA r=8 alpha 8 on query and value, the
  workload's rates) with round 1's batch order as the simulator's devices draw it (seed 0), each
  device timed once without the profiler (``wall_s``: the profiler costs time of its own) and
  then once with it;
- the statistics round (every device's class-feature sums, a forward pass of its posts) and one
  evaluation of the 500 test posts, timed; their FLOPs are counted, not profiled (the training
  module's two sessions would write their profiles to one file).

The data is 20 Newsgroups as ``fedpeft simulate`` partitions it for bench/flower_compare.py's
workload (8 devices x 150, Dirichlet 0.5, seed 0; ``--data``). Every profiled matmul's FLOPs come
from the shapes the profiler recorded (2 m k n per product; batched products per batch), sorted by
what the product computes: the frozen linear layers (query, key, value, attention output,
intermediate, output: forward and input gradients), the LoRA factors, attention (scores and
weighted values, forward and backward) and the rest (the head). As a check, the same round is
counted with bench/step_speed.py's ``step_flops`` formula per micro-batch (``step_flops_gflop``);
the forward-only phases are counted with its forward part, each batch padded to its longest.
The fp32 matmul peak of one thread is measured in a fresh process in the same run
(bench/step_speed.py's ``matmul_peak``, 2048 x 2048).

From those, a floor for the whole simulation: its matmul FLOPs (the statistics round, 5 training
rounds taken as round 1's, 6 evaluations) at one thread's peak on every core, nothing else
costing anything: ``floor_s = FLOPs / (cores x one-thread peak)``; and the same without the
training's padding (its FLOPs scaled by real tokens / token slots, which this also counts). The
report sets them against half of a Flower run's wall time (``--flower``, a bench/flower_compare.py
summary; another day's run unless given one from this machine).

    .venv/bin/python bench/step_profile.py --out bench/results/step_profile/summary.json

The report holds per phase the wall seconds and matmul FLOPs; for the training round also the
seconds inside ORT's kernels, kernel seconds by op type, matmul seconds, FLOPs and GFLOP/s by kind
against the peak, token slots and real tokens. A plot (``--plot``, next to the report by default)
shows the training round's seconds by kind beside the same FLOPs at the peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from runner import main_guard

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge_runtime.config import FROZEN_WEIGHTS, TrainConfig  # noqa: E402
from edge_runtime.engines.base import EVAL_BATCH  # noqa: E402
from edge_runtime.peft_specs import LoraSpec, ModelDims  # noqa: E402

DATA_20NG = str(ROOT.parent / "shared" / "datasets" / "20newsgroups")
MATMUL_OPS = frozenset(
    {"MatMul", "FusedMatMul", "Gemm", "MatMulScaleFusion", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
)
ROUNDS = 5  # the workload's training rounds (bench/flower_compare.py)
EVALUATIONS = ROUNDS + 1  # the start's, then one a round


def matmul_flops(a: Sequence[int], b: Sequence[int], out: Sequence[int]) -> int:
    """FLOPs of one (possibly batched, possibly transposed) product from its operand shapes.

    For ``out = A B`` with inner size k, ``|A| |B| / |out|`` is ``k^2`` times the batch the two
    operands share (both batched: the output's leading dims; one a plain matrix: 1), whichever
    axes the transposes permute; the product costs ``2 |out| k``.
    """
    size_a, size_b, size_out = math.prod(a), math.prod(b), math.prod(out)
    if size_out == 0:
        return 0
    batched = len(a) > 2 and len(b) > 2 and math.prod(b[:-2]) > 1 and math.prod(a[:-2]) > 1
    shared = math.prod(out[:-2]) if batched and len(out) > 2 else 1
    k = round(math.sqrt(size_a * size_b / (size_out * shared)))
    return 2 * size_out * k


_PACKED_ATTENTION = re.compile(r"^/MatMul(_\d+)?(/|_Grad/|_kernel_time$|$)")
_PACKED_LINEAR = re.compile(r"^/(query|key|value|intermediate|output)(/|_\d+/)")


def matmul_kind(node: str) -> str:
    """What a matmul node of the exported MiniLM graphs computes, from its name.

    The padded graphs name nodes by module path (``/encoder/encoder/layer.0/attention/self/...``);
    the packed ones (broker_server.packed_encoder) by the projection called (``/query/base_layer_1/
    MatMul``, ``/output/dense_3/MatMul``), the attention products being ``/MatMul``, ``/MatMul_1``...
    With ``--frozen-weights int8`` the forward products are ``DynamicQuantizeMatMul`` nodes named
    after the product they replace plus ``_int8``: kind ``frozen linear int8``. With ``int8-grad``
    the input gradients' ``MatMulIntegerToFloat`` nodes are named ``<product>_int8/rows/product``:
    kind ``input gradients int8``.
    """
    if "/default" in node or "lora_" in node:
        return "lora"
    if "_int8/rows/" in node:  # broker_server.int8_weights' per-row input-gradient products
        return "input gradients int8"
    if node.removesuffix("_kernel_time").endswith("_int8"):  # broker_server.int8_weights' products
        return "frozen linear int8"
    if "attention/self/MatMul" in node or _PACKED_ATTENTION.match(node):
        return "attention"
    if "encoder/layer." in node or _PACKED_LINEAR.match(node):
        return "frozen linear"
    return "other"


def _shapes(args: Mapping[str, Any], key: str) -> list[list[int]]:
    return [list(next(iter(entry.values()))) for entry in args.get(key, [])]


def summarize_profile(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Kernel seconds by op type and matmul seconds/FLOPs by kind, from an ORT profile's events."""
    by_op: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    kind_us: Counter[str] = Counter()
    kind_flops: Counter[str] = Counter()
    runs_us = 0
    runs = 0
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs_us += int(event.get("dur", 0))
            runs += 1
            continue
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        op = str(args.get("op_name", "?"))
        duration = int(event.get("dur", 0))
        by_op[op] += duration
        calls[op] += 1
        if op in MATMUL_OPS:
            inputs, outputs = _shapes(args, "input_type_shape"), _shapes(args, "output_type_shape")
            if len(inputs) >= 2 and outputs:
                kind = matmul_kind(name)
                kind_us[kind] += duration
                kind_flops[kind] += matmul_flops(inputs[0], inputs[1], outputs[0])
    return _summary(
        runs,
        runs_us / 1e6,
        {op: us / 1e6 for op, us in by_op.items()},
        calls,
        {kind: us / 1e6 for kind, us in kind_us.items()},
        {kind: flops / 1e9 for kind, flops in kind_flops.items()},
    )


def merge(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summaries of several profiles added up (shares recomputed)."""
    by_op: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    kind_s: Counter[str] = Counter()
    kind_gflop: Counter[str] = Counter()
    for s in summaries:
        for op, v in s["by_op"].items():
            by_op[op] += v["s"]
            calls[op] += v["calls"]
        for kind, v in s["matmul"].items():
            kind_s[kind] += v["s"]
            kind_gflop[kind] += v["gflop"]
    runs = sum(s["runs"] for s in summaries)
    return _summary(runs, sum(s["run_s"] for s in summaries), by_op, calls, kind_s, kind_gflop)


def _summary(
    runs: int,
    run_s: float,
    op_s: Mapping[str, float],
    calls: Mapping[str, int],
    kind_s: Mapping[str, float],
    kind_gflop: Mapping[str, float],
) -> dict[str, Any]:
    """The summary's form: kernel seconds by op (largest first, with shares), matmuls by kind."""
    kernel = sum(op_s.values())
    return {
        "runs": runs,
        "run_s": run_s,
        "kernel_s": kernel,
        "by_op": {
            op: {"s": v, "share": v / kernel if kernel else 0.0, "calls": calls[op]}
            for op, v in sorted(op_s.items(), key=lambda item: -item[1])
        },
        "matmul": {k: {"s": kind_s[k], "gflop": kind_gflop[k]} for k in sorted(kind_s)},
    }


def with_rates(summary: dict[str, Any], peak_gflops: float) -> dict[str, Any]:
    """Each matmul kind's GFLOP/s and fraction of ``peak_gflops``; totals; the rest's seconds."""
    mm = summary["matmul"]
    for v in mm.values():
        v["gflops"] = v["gflop"] / v["s"] if v["s"] else 0.0
        v["of_peak"] = v["gflops"] / peak_gflops
    mm_s = sum(v["s"] for v in mm.values())
    mm_gflop = sum(v["gflop"] for v in mm.values())
    summary["matmul_s"] = mm_s
    summary["matmul_gflop"] = mm_gflop
    summary["matmul_gflops"] = mm_gflop / mm_s if mm_s else 0.0
    summary["other_kernels_s"] = summary["kernel_s"] - mm_s
    summary["at_peak_s"] = mm_gflop / peak_gflops
    return summary


def token_counts(ids: Sequence[Sequence[int]], batches: Iterable[Sequence[int]]) -> tuple[int, int]:
    """Real tokens and token slots (rows x the batch's longest) of ``batches`` of row indices."""
    real = slots = 0
    for rows in batches:
        lengths = [len(ids[i]) for i in rows]
        real += sum(lengths)
        slots += len(lengths) * max(lengths)
    return real, slots


def training_batches(
    ids: Sequence[Sequence[int]], config: TrainConfig, seed: int, epochs: int
) -> list[list[int]]:
    """The micro-batches of rows a device's ``train`` runs on ``ids`` (same order, same split)."""
    import numpy as np

    from edge_runtime.engines.base import micro_batches

    n = len(ids)
    rng = np.random.default_rng(seed)
    steps = math.ceil(n / config.batch_size)
    out: list[list[int]] = []
    for _ in range(epochs):
        order = rng.permutation(n)
        for b in range(steps):
            rows = order[b * config.batch_size : (b + 1) * config.batch_size]
            lengths = [len(ids[int(i)]) for i in rows]
            out.extend([int(i) for i in c] for c in micro_batches(rows, config.micro_rows(), lengths))
    return out


def eval_batches(ids: Sequence[Sequence[int]], batch: int = EVAL_BATCH) -> list[list[int]]:
    """The batches the ORT engine's evaluation and class-feature sums run: sorted by length."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[s : s + batch] for s in range(0, len(order), batch)]


def profiled(prefix: Path, work: Any) -> tuple[float, dict[str, Any]]:
    """Wall seconds of ``work(prefix)`` and the summary of the profile it left under ``prefix``."""
    before = set(prefix.parent.glob(prefix.name + "*.json"))
    start = time.perf_counter()
    work(prefix)
    wall = time.perf_counter() - start
    gc.collect()
    files = sorted(set(prefix.parent.glob(prefix.name + "*.json")) - before)
    if not files:
        raise RuntimeError(f"ONNX Runtime wrote no profile under {prefix}")
    summary = merge([summarize_profile(json.loads(f.read_text())) for f in files])
    for f in files:
        f.unlink()
    return wall, summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.environ.get("FEDPEFT_DATA_20NG", DATA_20NG))
    p.add_argument("--out", default=str(ROOT / "bench/results/step_profile/summary.json"))
    p.add_argument("--plot", default=None, help="PNG of the training round by kind (default: next to --out)")
    p.add_argument("--threads", type=int, default=1, help="threads per engine (the simulator's workers: 1)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the floor divides by")
    p.add_argument("--devices", type=int, default=8, help="devices of the workload to profile (<= 8)")
    p.add_argument(
        "--frozen-weights",
        default="fp32",
        choices=FROZEN_WEIGHTS,
        help="the artifacts' frozen linear weights (TrainConfig.frozen_weights; int8: the forward products "
        "are DynamicQuantizeMatMul, counted as kind 'frozen linear int8'; int8-grad: the input gradients' "
        "MatMulIntegerToFloat too, kind 'input gradients int8')",
    )
    p.add_argument(
        "--flower",
        default=str(ROOT / "bench/results/flower-ort-arena/summary.json"),
        help="a bench/flower_compare.py summary whose Flower wall time the floor is set against",
    )
    a = p.parse_args()

    from micro_batch import simulation_workload
    from step_speed import _peak_of, _run_child, machine_info, step_flops
    from tqdm import tqdm

    from broker_server.artifacts import build_artifacts
    from edge_runtime.agent import _job_seed
    from edge_runtime.engines.ort_engine import OrtEngine
    from edge_runtime.models import resolve_model

    work = simulation_workload(a.data)
    train, test = work.train, work.test
    config = TrainConfig(
        peft=LoraSpec(rank=8, alpha=8.0, target_modules=("query", "value")),
        num_labels=train.num_classes,
        seq_len=128,
        batch_size=32,
        lr=3e-3,
        head_lr=2e-3,
        engine="ort",
        frozen_weights=a.frozen_weights,
    )
    folder = str(build_artifacts(config).folder)
    peak_run = _run_child(["--child", "peak", "--threads", str(a.threads), "--peak-sizes", "2048"], a.threads)
    peak, peak_source = _peak_of(peak_run)
    print(f"fp32 matmul peak, {a.threads} thread(s): {peak:.1f} GFLOP/s ({peak_source})", flush=True)

    dims = ModelDims.from_model_dir(resolve_model(config.model))

    def forward_gflop(ids: Sequence[Sequence[int]], batches: Iterable[Sequence[int]]) -> float:
        """Matmul GFLOP of forward passes over ``batches`` (each padded to its longest)."""
        return (
            sum(
                step_flops(
                    dims, batch=len(rows), seq_len=max(len(ids[i]) for i in rows), num_labels=c, mode="lora"
                ).forward
                for rows in batches
            )
            / 1e9
        )

    c = config.num_labels
    tmp = Path(tempfile.mkdtemp(prefix="fedpeft-profile-"))
    stats_wall = stats_gflop = 0.0
    rounds: list[dict[str, Any]] = []
    real_total = slots_total = 0
    counted_gflop = 0.0
    devices = work.parts[: a.devices]
    with tqdm(total=3 * len(devices) + 1, desc="profiling", unit="run") as bar:
        for i, part in enumerate(devices):
            data = train.subset(part)
            engine = OrtEngine(config, artifacts=folder, threads=a.threads)
            ids = engine._tokens(data)
            start = time.perf_counter()
            engine.class_feature_sums(data)
            stats_wall += time.perf_counter() - start
            stats_gflop += forward_gflop(ids, eval_batches(ids))
            engine.close()
            bar.update(1)
            seed = _job_seed(0, f"dev{i:03d}", 1)  # the simulator's device i in round 1
            engine = OrtEngine(config, artifacts=folder, threads=a.threads)
            start = time.perf_counter()
            engine.train(data, epochs=2, seed=seed)
            plain_wall = time.perf_counter() - start  # the profiler costs time of its own
            engine.close()
            bar.update(1)

            def do_train(prefix: Path, data: Any = data, seed: int = seed) -> None:
                engine = OrtEngine(config, artifacts=folder, threads=a.threads, profile_prefix=prefix)
                engine.train(data, epochs=2, seed=seed)
                engine.close()

            wall, summary = profiled(tmp / f"train{i}", do_train)
            batches = training_batches(ids, config, seed, 2)
            real, slots = token_counts(ids, batches)
            real_total += real
            slots_total += slots
            for rows in batches:
                n = max(len(ids[r]) for r in rows)
                flops = step_flops(dims, batch=len(rows), seq_len=n, num_labels=c, mode="lora")
                counted_gflop += (flops.forward + flops.backward) / 1e9
            rounds.append(
                summary
                | {"wall_s": plain_wall, "profiled_wall_s": wall, "real_tokens": real, "token_slots": slots}
            )
            bar.update(1)
            bar.write(f"device {i}: training round {plain_wall:.1f} s ({wall:.1f} s profiled)")
        engine = OrtEngine(config, artifacts=folder, threads=a.threads)
        test_ids = engine._tokens(test)
        start = time.perf_counter()
        engine.evaluate(test)
        eval_wall = time.perf_counter() - start
        eval_gflop = forward_gflop(test_ids, eval_batches(test_ids))
        engine.close()
        bar.update(1)
    tmp.rmdir()

    training = merge(rounds) | {
        "wall_s": sum(r["wall_s"] for r in rounds),
        "real_tokens": real_total,
        "token_slots": slots_total,
        "profiled_wall_s": sum(r["profiled_wall_s"] for r in rounds),
        "device_wall_s": [round(r["wall_s"], 2) for r in rounds],
        "step_flops_gflop": counted_gflop,
    }
    phases = {
        "statistics": {"wall_s": stats_wall, "matmul_gflop": stats_gflop, "at_peak_s": stats_gflop / peak},
        "training_round": with_rates(training, peak),
        "evaluation": {
            "wall_s": eval_wall,
            "samples": len(test),
            "matmul_gflop": eval_gflop,
            "at_peak_s": eval_gflop / peak,
        },
    }
    run_gflop = (
        phases["statistics"]["matmul_gflop"]
        + ROUNDS * phases["training_round"]["matmul_gflop"]
        + EVALUATIONS * phases["evaluation"]["matmul_gflop"]
    )
    floor_s = run_gflop / (a.cores * peak)
    unpadded = real_total / slots_total if slots_total else 1.0
    floor: dict[str, Any] = {
        "matmul_gflop": run_gflop,
        "cores": a.cores,
        "floor_s": floor_s,
        "training_real_over_slots": unpadded,
        # the training rounds' step_flops count (padded) scaled to the real tokens: a packed graph's
        # profiled FLOPs are already below the count, and must not be scaled a second time
        "floor_without_training_padding_s": (
            run_gflop - ROUNDS * (phases["training_round"]["matmul_gflop"] - counted_gflop * unpadded)
        )
        / (a.cores * peak),
        "measured_wall_s_at_this_speed": (
            phases["statistics"]["wall_s"]
            + ROUNDS * phases["training_round"]["wall_s"]
            + EVALUATIONS * phases["evaluation"]["wall_s"]
        )
        / a.cores,
    }
    flower_path = Path(a.flower)
    if flower_path.is_file():
        flower = json.loads(flower_path.read_text())
        flower_s = float(flower["flower"]["wall_s"])
        floor |= {
            "flower_summary": str(
                flower_path.relative_to(ROOT) if flower_path.is_relative_to(ROOT) else flower_path
            ),
            "flower_wall_s": flower_s,
            "half_flower_s": flower_s / 2,
            "floor_vs_flower": floor_s / flower_s,
            "fedpeft_wall_s_there": float(flower["fedpeft"]["wall_s"]),
        }
    report = {
        "benchmark": "step_profile",
        "workload": {
            "data": a.data,
            "devices": len(devices),
            "samples_per_device": 150,
            "seq_len": config.seq_len,
            "batch_size": config.batch_size,
            "micro_batch": config.micro_batch,
            "local_epochs": 2,
            "module": "LoRA r=8 alpha 8 on query,value",
            "frozen_weights": config.frozen_weights,
            "test_samples": len(test),
            "rounds": ROUNDS,
        },
        "machine": machine_info(a.threads) | {"loadavg_end": list(os.getloadavg())},
        "peak_gflops_one_engine": peak,
        "peak_source": peak_source,
        "phases": phases,
        "floor": floor,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot = Path(a.plot) if a.plot else out.with_suffix(".png")
    draw(phases["training_round"], peak, plot)
    _print(report)
    print(f"wrote {out} and {plot}")
    return 0


def draw(phase: Mapping[str, Any], peak: float, path: Path) -> None:
    """Horizontal bars: the training round's kernel seconds by matmul kind and the other ops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"matmul: {k}", v["s"], v["gflop"] / peak) for k, v in phase["matmul"].items()]
    others = sorted(
        ((op, v["s"]) for op, v in phase["by_op"].items() if op not in MATMUL_OPS), key=lambda x: -x[1]
    )
    top = others[:6]
    rows += [(op, s, 0.0) for op, s in top]
    rows.append(("other ops", sum(s for _, s in others[6:]), 0.0))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [r[0] for r in rows][::-1]
    ax.barh(labels, [r[1] for r in rows][::-1], color="#4C72B0", label="measured")
    ax.barh(
        labels, [r[2] for r in rows][::-1], color="#DD8452", alpha=0.8, label="the same FLOPs at the peak"
    )
    ax.set_xlabel("seconds, all devices' training round (one thread each)")
    ax.set_title(f"Where a training round goes (ORT, peak {peak:.0f} GFLOP/s a thread)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print(report: Mapping[str, Any]) -> None:
    peak = report["peak_gflops_one_engine"]
    phases = report["phases"]
    for name in ("statistics", "evaluation"):
        phase = phases[name]
        print(f"{name}: wall {phase['wall_s']:.1f} s, {phase['matmul_gflop']:.0f} GFLOP of matmuls")
    t = phases["training_round"]
    print(
        f"training round: wall {t['wall_s']:.1f} s ({t['profiled_wall_s']:.1f} s profiled), "
        f"kernels {t['kernel_s']:.1f} s, matmuls "
        f"{t['matmul_s']:.1f} s at {t['matmul_gflops']:.1f} GFLOP/s ({t['matmul_gflops'] / peak:.0%} of "
        f"the peak), other kernels {t['other_kernels_s']:.1f} s; {t['matmul_gflop']:.0f} GFLOP profiled, "
        f"{t['step_flops_gflop']:.0f} counted by step_flops; real tokens / slots "
        f"{t['real_tokens'] / t['token_slots']:.3f}"
    )
    for kind, v in t["matmul"].items():
        rate = f"{v['gflops']:6.1f} GFLOP/s ({v['of_peak']:.0%})"
        print(f"  {kind:14s} {v['s']:7.2f} s {v['gflop']:8.1f} GFLOP {rate}")
    f = report["floor"]
    print(
        f"floor: {f['matmul_gflop'] / 1e3:.2f} TFLOP of matmuls at {f['cores']} x {peak:.1f} GFLOP/s = "
        f"{f['floor_s']:.0f} s ({f['floor_without_training_padding_s']:.0f} s without padding); "
        f"the phases as measured here, over {f['cores']} cores: {f['measured_wall_s_at_this_speed']:.0f} s"
    )
    if "half_flower_s" in f:
        print(f"half of Flower's {f['flower_wall_s']:.0f} s: {f['half_flower_s']:.0f} s")


if __name__ == "__main__":
    main_guard(main)
