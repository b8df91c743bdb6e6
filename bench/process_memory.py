"""The memory of a process tree, sampled while a command runs: what ``bench/flower_compare.py``
measures each side with (wall time, peak RSS and PSS summed over the tree, each process's own peak).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


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
