"""Benchmark: ``fedpeft simulate`` beside Flower 1.42 on the same workload, back to back (issue 14).

The workload of issue 14's second acceptance bullet: 20 Newsgroups, 8 devices x 150 samples,
Dirichlet 0.5, 128 tokens, 5 rounds, 2 local epochs, 500 test samples, all-MiniLM-L6-v2 with LoRA
r=8 on query and value, batch 32, torch on both sides, seed 0.

How it works:

1. The workload is built once, in this process, with FedPEFT+'s own loader and partition
   (``edge_runtime.data.load_folder`` and ``sdk.partition.partition``, called exactly as
   ``fedpeft simulate`` calls them), and written to a JSON file outside the repo (``--work``):
   each device's texts and labels, the test samples, every hyperparameter.
2. ``fedpeft simulate`` runs with the matching flags (``--engine torch``, everything else at its
   defaults, e.g. 4-bit uplink, class-mean head). Its report's per-device sample counts and label
   histograms are checked against the workload file: the benchmark fails if the data differ.
3. Then Flower runs ``bench/flower_app.py`` in its own venv: a ClientApp that trains the same model
   with peft LoRA, Flower's own FedAvg, a server-side evaluate function on the same test samples,
   ``flwr.simulation.run_simulation`` (Ray backend).

Each side is one child process, timed from start to exit; a sampler thread sums the RSS (and the
PSS, which counts shared pages once) of that process and all its descendants every ``--interval``
seconds (psutil, else /proc) and keeps the peaks, each process's own peak PSS and its PSS in the
sample where the tree's sum peaked (``processes``). A descendant that outlives its parent (Ray's
daemons) stays counted while it lives, and any still alive when the side ends is stopped by its pid
and listed in the report (after a 10 s grace). The sides never overlap. Reports go to ``--out``:
``fedpeft.json`` and ``flower.json`` (wall time, memory peaks, per process and timeline, accuracy
by round, load average before and after, the name of the side's raw report), the raw reports and
each side's log, and ``summary.json`` (the ratios fedpeft/flower of wall time and peak memory, the
accuracy difference, and what differs between the sides). A side whose report exists is not run again (delete
it to rerun), so an interrupted benchmark resumes.

The Flower venv (benchmark-only; never inside the repo, never the project's venv), about 1.9 GB:

    python3.11 -m venv /work/flower-venv
    /work/flower-venv/bin/pip install -r bench/flower_requirements.txt

``torch==2.13.0`` must stay exact: it resolves to the local CPU wheel, a looser pin downloads the
multi-GB CUDA build. The transformers, peft and tokenizers pins match the project's venv.

The full run (about an hour on the 2-core machine; nothing else should run meanwhile):

    .venv/bin/python bench/flower_compare.py --out bench/results/flower

The fedpeft side runs this checkout's code (``PYTHONPATH`` is set to it) with ``--fedpeft``'s
interpreter (default ``.venv/bin/fedpeft``; from a worktree without a venv, pass
``--fedpeft /work/main/.venv/bin/fedpeft``). ``--flower-client-cpus 2`` gives Flower its own
default (one ClientApp at a time with two threads) instead of two single-threaded ClientApps
at once, which is how FedPEFT+'s two workers run; ``--fedpeft-extra '--bits 32'`` sends fp32
updates as Flower does.

A tiny smoke run:

    nice -n 15 .venv/bin/python bench/flower_compare.py --out /tmp/flower-smoke --clients 2 \\
        --samples-per-client 16 --rounds 1 --local-epochs 1 --seq-len 32 --test-samples 32
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from process_memory import measured_run
from runner import DATA_20NG, ROOT, main_guard
from step_speed import machine_info

sys.path.insert(0, str(ROOT))

FLOWER_PYTHON = "/work/flower-venv/bin/python"
# Both sides: no downloads (the model is the bundled copy), no telemetry or usage reports.
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# What differs between the two sides by design; written into the summary beside the figures.
UNEQUAL = [
    "FedPEFT+ runs a head round (round 0: class-mean head from the devices' features) before its "
    "training rounds; Flower's round 0 is its random initial head. Both then train --rounds rounds.",
    "FedPEFT+ classifies mean-pooled, L2-normalised features with a cosine head and logit adjustment "
    "(its defaults); Flower's client uses AutoModelForSequenceClassification (CLS pooler, dropout 0.1 "
    "in train mode) with peft's SEQ_CLS LoRA, which trains the classifier head, as Hugging Face users do.",
    "FedPEFT+ sends 4-bit quantized updates over MQTT (its default) and deltas downlink; Flower sends "
    "the LoRA and head weights in fp32 in memory through Ray.",
    "Flower runs through flwr.simulation.run_simulation, which 1.42 marks deprecated in favour of "
    "`flwr run`; `flwr run` starts the same Simulation Runtime behind a detached local SuperLink, "
    "whose process (outside this tree) and startup are therefore not measured.",
    "FedPEFT+'s wall time includes reading and cleaning the whole 20 Newsgroups train split and "
    "partitioning it; Flower's reads the prepared workload file (a few seconds in Flower's favour).",
    "Flower's ClientApp builds the model afresh for every message (Flower's examples do); FedPEFT+'s "
    "workers keep an engine per configuration across devices and rounds.",
]


# --- the workload -------------------------------------------------------------------------------


def build_workload(a: argparse.Namespace) -> dict[str, Any]:
    """Each device's samples and the test samples, exactly as ``fedpeft simulate`` draws them."""
    import numpy as np

    from edge_runtime.data import load_folder, resolve_data_dir
    from sdk.partition import parse_partition, partition

    train, test = load_folder(resolve_data_dir(a.data), test_limit=a.test_samples, seed=a.seed)
    parts = partition(
        train.labels,
        a.clients,
        parse_partition(a.partition),
        seed=a.seed,
        samples_per_client=a.samples_per_client,
    )
    digest = hashlib.sha256()
    for idx in parts:
        digest.update(np.asarray(idx, dtype=np.int64).tobytes())
    for text in test.texts:
        digest.update(text.encode())
    devices = [
        {
            "texts": [train.texts[i] for i in idx],
            "labels": [int(train.labels[i]) for i in idx],
            "label_histogram": np.bincount(train.labels[idx], minlength=train.num_classes).tolist(),
        }
        for idx in parts
    ]
    return {
        "seed": a.seed,
        "rounds": a.rounds,
        "local_epochs": a.local_epochs,
        "seq_len": a.seq_len,
        "batch_size": a.batch_size,
        "lora_rank": a.lora_rank,
        "lora_alpha": a.lora_alpha,
        "lora_targets": a.lora_targets.split(","),
        "lr": a.lr,
        "head_lr": a.head_lr,
        "label_names": list(train.label_names),
        "devices": devices,
        "test": {"texts": list(test.texts), "labels": [int(y) for y in test.labels]},
        "fingerprint": digest.hexdigest(),
    }


def workload_flags(a: argparse.Namespace) -> list[str]:
    """``fedpeft simulate`` flags of the shared workload."""
    return [
        "--data", a.data, "--clients", str(a.clients), "--rounds", str(a.rounds),
        "--partition", a.partition, "--samples-per-client", str(a.samples_per_client),
        "--test-samples", str(a.test_samples), "--seq-len", str(a.seq_len),
        "--local-epochs", str(a.local_epochs), "--batch-size", str(a.batch_size),
        "--lora-rank", str(a.lora_rank), "--lora-alpha", str(a.lora_alpha),
        "--lora-targets", a.lora_targets, "--lr", str(a.lr), "--head-lr", str(a.head_lr),
        "--engine", "torch", "--seed", str(a.seed),
    ]  # fmt: skip


def check_same_data(report: dict[str, Any], work: dict[str, Any]) -> None:
    """Fail unless FedPEFT+'s devices hold the workload's sample counts and label histograms."""
    clients = sorted(report["clients"], key=lambda c: c["id"])
    got = [(int(c["samples"]), list(c["label_histogram"])) for c in clients]
    want = [(len(d["labels"]), d["label_histogram"]) for d in work["devices"]]
    if got != want:
        raise SystemExit(f"fedpeft simulate's devices differ from the workload file:\n{got}\n{want}")


# --- the two sides ------------------------------------------------------------------------------


def side_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment plus the quiet variables and ``extra``."""
    return os.environ | QUIET_ENV | extra


def run_fedpeft(a: argparse.Namespace, out: Path, work: dict[str, Any]) -> dict[str, Any]:
    """``fedpeft simulate`` on the workload; its measurements beside its report."""
    raw = out / "fedpeft-report.json"
    cmd = [a.fedpeft, "simulate", *workload_flags(a), *shlex.split(a.fedpeft_extra)]
    cmd += ["--no-progress", "--report", str(raw), "--plot", str(out / "fedpeft-report.png")]
    # This checkout's code, whichever checkout the venv's editable install points at.
    env = side_env({"PYTHONPATH": str(ROOT)})
    m = measured_run(cmd, env, out / "fedpeft.log", a.interval)
    if m["returncode"] != 0:
        raise SystemExit(f"fedpeft simulate failed ({m['returncode']}); see {out / 'fedpeft.log'}")
    report = json.loads(raw.read_text())
    check_same_data(report, work)
    rounds = report["rounds"]
    return m | {
        "side": "fedpeft",
        "command": shlex.join(cmd),
        "accuracy_by_round": [float(r["accuracy"]) for r in rounds],
        "final_accuracy": float(report["final"]["accuracy"]),
        "round_s": [float(r.get("round_wall_s") or 0.0) for r in rounds],
        "server_s": [float(r.get("server_s") or 0.0) for r in rounds],
        "report_wall_s": report.get("wall_s"),
        "same_data_as_workload": True,
        "report": raw.name,
    }


def run_flower(a: argparse.Namespace, out: Path, workload_path: Path) -> dict[str, Any]:
    """The Flower app on the workload; its measurements beside its report."""
    raw = out / "flower-report.json"
    cmd = [a.flower_python, str(Path(__file__).with_name("flower_app.py"))]
    cmd += [
        "--workload",
        str(workload_path),
        "--report",
        str(raw),
        "--client-cpus",
        str(a.flower_client_cpus),
    ]
    m = measured_run(cmd, side_env({}), out / "flower.log", a.interval)
    if m["returncode"] != 0 or not raw.exists():
        raise SystemExit(f"the Flower side failed ({m['returncode']}); see {out / 'flower.log'}")
    report = json.loads(raw.read_text())
    return m | {
        "side": "flower",
        "command": shlex.join(cmd),
        "accuracy_by_round": [float(r["accuracy"]) for r in report["rounds"]],
        "final_accuracy": float(report["final"]["accuracy"]),
        "round_s": [float(r["round_s"]) for r in report["rounds"]],
        "server_s": [float(r["eval_s"]) for r in report["rounds"]],
        "versions": report.get("versions"),
        "client_cpus": a.flower_client_cpus,
        "report": raw.name,
    }


def summarise(
    a: argparse.Namespace, work: dict[str, Any], sides: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Both sides' figures, the ratios fedpeft/flower and what differs between the sides."""
    keys = (
        "wall_s",
        "peak_rss_mb",
        "peak_pss_mb",
        "final_accuracy",
        "accuracy_by_round",
        "round_s",
        "server_s",
    )
    summary: dict[str, Any] = {
        "machine": machine_info(1),
        "workload": {
            "data": a.data,
            "clients": a.clients,
            "samples_per_client": a.samples_per_client,
            "partition": a.partition,
            "seq_len": a.seq_len,
            "rounds": a.rounds,
            "local_epochs": a.local_epochs,
            "test_samples": a.test_samples,
            "batch_size": a.batch_size,
            "lora": f"r={a.lora_rank} alpha={a.lora_alpha} on {a.lora_targets}",
            "lr": a.lr,
            "head_lr": a.head_lr,
            "seed": a.seed,
            "fingerprint": work["fingerprint"],
            "cores": len(os.sched_getaffinity(0)),
        },
        "fedpeft_extra_flags": a.fedpeft_extra,
        "flower_client_cpus": a.flower_client_cpus,
    }
    for name, s in sides.items():
        summary[name] = {k: s[k] for k in keys} | {
            "loadavg_before": s["loadavg_before"],
            "max_processes": s["max_processes"],
        }
    if len(sides) == 2:
        f, w = sides["fedpeft"], sides["flower"]
        ratios = {
            "wall_fedpeft_over_flower": round(f["wall_s"] / w["wall_s"], 3),
            "peak_rss_fedpeft_over_flower": round(f["peak_rss_mb"] / w["peak_rss_mb"], 3),
            "peak_pss_fedpeft_over_flower": round(f["peak_pss_mb"] / w["peak_pss_mb"], 3),
            "final_accuracy_fedpeft_minus_flower": round(f["final_accuracy"] - w["final_accuracy"], 4),
        }
        summary["ratios"] = ratios
        summary["issue14_targets"] = {
            "wall_at_most_0.5x": ratios["wall_fedpeft_over_flower"] <= 0.5,
            "peak_rss_at_most_0.25x": ratios["peak_rss_fedpeft_over_flower"] <= 0.25,
            "peak_pss_at_most_0.25x": ratios["peak_pss_fedpeft_over_flower"] <= 0.25,
            "accuracy_equal_or_better": ratios["final_accuracy_fedpeft_minus_flower"] >= 0.0,
        }
    summary["unequal"] = UNEQUAL + engine_differences(a.fedpeft_extra)
    return summary


def engine_differences(extra: str) -> list[str]:
    """What an ``--engine`` among FedPEFT+'s extra flags adds to the differences between the sides."""
    words = shlex.split(extra)
    engine = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--engine"), "torch")
    if engine == "torch":
        return []
    differences = [
        f"FedPEFT+ trains with --engine {engine} (ONNX Runtime: graphs exported without dropout; its "
        "service evaluates on the same engine) where Flower trains and evaluates with torch. Its "
        "artifacts are exported once per configuration and cached: fedpeft.log says how long the "
        "export took in this run ('ready in ... s')."
    ]
    frozen = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--frozen-weights"), "fp32")
    if frozen != "fp32":
        differences.append(
            f"FedPEFT+ runs with --frozen-weights {frozen}: its forward (training and testing) "
            "multiplies by int8 copies of the frozen linear weights, with activations quantized at "
            "run time (broker_server/int8_weights.py); not exact, where Flower computes in fp32."
        )
    return differences


def main() -> int:
    """Build the workload, run FedPEFT+ then Flower (each unless its report exists), summarise."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench/results/flower"))
    p.add_argument("--work", default=None, help="folder for the workload file (default: a temporary one)")
    p.add_argument("--data", default=DATA_20NG)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--samples-per-client", type=int, default=150)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--test-samples", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument(
        "--lora-alpha", type=float, default=8.0, help="FedPEFT+'s default (scale alpha/r = 1 at r=8)"
    )
    p.add_argument("--lora-targets", default="query,value")
    p.add_argument(
        "--lr", type=float, default=3e-3, help="LoRA learning rate, both sides (FedPEFT+'s default)"
    )
    p.add_argument(
        "--head-lr", type=float, default=2e-3, help="head learning rate, both sides (FedPEFT+'s default)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--only", choices=("fedpeft", "flower"), default=None)
    p.add_argument("--fedpeft", default=str(ROOT / ".venv/bin/fedpeft"), help="the fedpeft command")
    p.add_argument("--fedpeft-extra", default="", help="more fedpeft simulate flags, e.g. '--bits 32'")
    p.add_argument("--flower-python", default=FLOWER_PYTHON, help="python of the Flower venv")
    p.add_argument(
        "--flower-client-cpus",
        type=float,
        default=1.0,
        help="Ray CPUs per ClientApp: 1 runs as many clients at once as cores, like FedPEFT+'s "
        "workers (Flower's own default is 2)",
    )
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = build_workload(a)
    work_dir = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="flower-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    workload_path = work_dir / "workload.json"
    workload_path.write_text(json.dumps(work))
    tests = len(work["test"]["labels"])
    print(f"workload {work['fingerprint'][:12]}: {a.clients} devices, {tests} test samples", flush=True)
    sides: dict[str, dict[str, Any]] = {}
    for name in ("fedpeft", "flower"):
        path = out / f"{name}.json"
        if path.exists():
            sides[name] = json.loads(path.read_text())
            if sides[name].get("fingerprint") != work["fingerprint"]:
                raise SystemExit(f"{path} was measured on another workload; delete it to rerun")
            continue
        if a.only and name != a.only:
            continue
        result = run_fedpeft(a, out, work) if name == "fedpeft" else run_flower(a, out, workload_path)
        sides[name] = result | {"fingerprint": work["fingerprint"]}
        path.write_text(json.dumps(sides[name], indent=2) + "\n")
        wall, rss, acc = result["wall_s"], result["peak_rss_mb"], result["final_accuracy"]
        print(f"{name}: {wall} s, peak RSS {rss} MB, final accuracy {acc}", flush=True)
    if not a.work:
        workload_path.unlink()
        work_dir.rmdir()
    summary = summarise(a, work, sides)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "unequal"}, indent=2))
    return 0


if __name__ == "__main__":
    main_guard(main)
