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
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from runner import DATA_20NG, ROOT, main_guard

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


# --- memory of a process tree -------------------------------------------------------------------


def _pss_kb(pid: int) -> int:
    """Proportional set size of one process from smaps_rollup (0 when unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class ProcessTree:
    """The processes of a tree: the root, its descendants, and those that outlive their parent.

    A process is keyed by (pid, start time) so that a reused pid is never mistaken for it.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, Any] = {}  # pid -> start time (a psutil.Process, or the /proc stat field)
        self.last_pss: dict[int, int] = {}  # pid -> PSS in bytes at the last sample
        self.labels: dict[int, str] = {}  # pid -> its command line, shortened (read when first seen)
        try:
            import psutil

            self.psutil: Any = psutil
            self.seen[root] = psutil.Process(root)
        except ImportError:
            self.psutil = None
            self.seen[root] = self._proc_stat()[root][1]

    def _proc_stat(self) -> dict[int, tuple[int, str]]:
        """pid -> (parent pid, start time) of every process but zombies, from /proc."""
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                out[int(entry.name)] = (int(fields[1]), fields[19])  # ppid, starttime
        return out

    def sample(self) -> tuple[int, int, int]:
        """(sum of RSS in bytes, sum of PSS in bytes, process count) of the tree now."""
        if self.psutil is not None:
            return self._sample_psutil()
        return self._sample_proc()

    def _sample_psutil(self) -> tuple[int, int, int]:
        ps = self.psutil
        found: dict[int, Any] = {}
        for pid, proc in list(self.seen.items()):
            try:
                if not proc.is_running() or proc.status() == ps.STATUS_ZOMBIE:
                    continue
                found[pid] = proc
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
            except ps.Error:
                continue
        rss = pss = 0
        self.last_pss = {}
        for pid, proc in found.items():
            try:
                rss += proc.memory_info().rss
            except ps.Error:
                continue
            self.last_pss[pid] = _pss_kb(pid) * 1024
            pss += self.last_pss[pid]
            self.seen.setdefault(pid, proc)
            self._label(pid)
        return rss, pss, len(found)

    def _label(self, pid: int) -> None:
        """Remember ``pid``'s command line (shortened), the first time it is seen."""
        if pid not in self.labels:
            try:
                words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                self.labels[pid] = " ".join(w.decode(errors="replace") for w in words)[:100]
            except OSError:
                self.labels[pid] = "?"

    def _sample_proc(self) -> tuple[int, int, int]:
        stat = self._proc_stat()
        alive = {pid for pid, start in self.seen.items() if stat.get(pid, (0, None))[1] == start}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _start) in stat.items():
            children.setdefault(ppid, []).append(pid)
        found, todo = set(), list(alive)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        rss = pss = 0
        self.last_pss = {}
        for pid in found:
            self.seen.setdefault(pid, stat[pid][1])
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
            except OSError:
                continue
            self.last_pss[pid] = _pss_kb(pid) * 1024
            pss += self.last_pss[pid]
            self._label(pid)
        return rss, pss, len(found)

    def stop_leftovers(self, grace: float = 10.0) -> list[str]:
        """Stop (SIGTERM, then SIGKILL) the tree's processes alive ``grace`` s after the root's exit.

        Returns their descriptions. The grace lets daemons that shut down on their own (Ray's
        actors, multiprocessing's resource tracker) do so.
        """
        deadline = time.monotonic() + grace
        while self.sample()[2] and time.monotonic() < deadline:  # also picks up late children
            time.sleep(0.5)
        left = []
        for pid in list(self.seen):
            if pid == self.root:
                continue
            if self.psutil is not None:
                proc = self.seen[pid]
                try:
                    if not proc.is_running() or proc.status() == self.psutil.STATUS_ZOMBIE:
                        continue
                    left.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
                    proc.terminate()
                    try:
                        proc.wait(5)
                    except self.psutil.TimeoutExpired:
                        proc.kill()
                except self.psutil.Error:
                    continue
            else:
                stat = self._proc_stat()
                if stat.get(pid, (0, None))[1] == self.seen[pid]:
                    left.append(str(pid))
                    os.kill(pid, 15)
        return left


class PeakSampler(threading.Thread):
    """Samples a process tree every ``interval`` seconds until stopped; keeps peaks and a timeline."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.tree = ProcessTree(root)
        self.interval = interval
        self.done = threading.Event()
        self.start_time = time.monotonic()
        self.peak_rss = self.peak_pss = self.max_procs = 0
        self.timeline: list[tuple[float, float, float, int]] = []  # (s, rss MB, pss MB, processes)
        self.process_peaks: dict[int, int] = {}  # pid -> its own peak PSS (bytes)
        self.at_peak: dict[int, int] = {}  # pid -> its PSS in the sample of the tree's peak PSS

    def run(self) -> None:
        """Sample until :meth:`stop`."""
        while not self.done.is_set():
            rss, pss, n = self.tree.sample()
            for pid, value in self.tree.last_pss.items():
                self.process_peaks[pid] = max(self.process_peaks.get(pid, 0), value)
            if pss > self.peak_pss:
                self.at_peak = dict(self.tree.last_pss)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.max_procs = max(self.max_procs, n)
            t = time.monotonic() - self.start_time
            self.timeline.append((round(t, 1), round(rss / 2**20, 1), round(pss / 2**20, 1), n))
            self.done.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self.done.set()
        self.join()


def measured_run(cmd: list[str], env: dict[str, str], log: Path, interval: float) -> dict[str, Any]:
    """Run ``cmd`` to its end with its output in ``log``: wall time and the tree's memory peaks."""
    print("$", shlex.join(cmd), f"> {log}", flush=True)
    load_before = os.getloadavg()
    with log.open("w") as out:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = PeakSampler(proc.pid, interval)
        sampler.start()
        code = proc.wait()
        wall = time.monotonic() - start
        sampler.stop()
    leftovers = sampler.tree.stop_leftovers()
    timeline = sampler.timeline
    labels = sampler.tree.labels
    processes = [
        {
            "pid": pid,
            "command": labels.get(pid, "?"),
            "peak_pss_mb": round(peak / 2**20, 1),
            "pss_at_tree_peak_mb": round(sampler.at_peak.get(pid, 0) / 2**20, 1),
        }
        for pid, peak in sorted(sampler.process_peaks.items())
        if peak >= 2**20  # leave out the tree's short-lived shells and helpers under 1 MB
    ]
    step = max(1, len(timeline) // 400)  # keep the report small: at most about 400 points
    return {
        "returncode": code,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "peak_pss_mb": round(sampler.peak_pss / 2**20, 1),
        "max_processes": sampler.max_procs,
        "samples": len(timeline),
        "interval_s": interval,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "leftover_processes_stopped": leftovers,
        # each process: its own peak PSS, and its PSS in the sample where the tree's sum peaked
        "processes": processes,
        "timeline_s_rss_pss_procs": timeline[::step],
    }


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
    return [
        f"FedPEFT+ trains with --engine {engine} (ONNX Runtime: graphs exported without dropout; its "
        "service evaluates on the same engine) where Flower trains and evaluates with torch. Its "
        "artifacts are exported once per configuration and cached: fedpeft.log says how long the "
        "export took in this run ('ready in ... s')."
    ]


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
