"""Benchmark: a real arm64 device (``fedpeft[edge]``, engine ort-plain) under qemu user-mode emulation.

On an x86_64 Debian host, as root: builds (or reuses) an arm64 Debian bookworm root with debootstrap
and qemu-user-static, installs this checkout's wheel with the edge extra from PyPI inside it (binary
wheels only, aarch64 CPython 3.11), measures the device there (``fedpeft profile``), then runs a
federation of one: Mosquitto and ``fedpeft serve`` on the host with a tiny random BERT, and
``fedpeft edge --engine auto`` inside the arm64 root, for two rounds. The chroot shares the host's
network, so the device reaches the broker on 127.0.0.1. The report (JSON) holds the install's size,
packages and time, the device profile, its peak memory, rounds, accepted updates, engine and wall
times. The device announces a 1024 MB memory cap by default (``--memory-cap-mb``), since it sees
the host's memory.

The emulated CPU is a Cortex-A76 (Raspberry Pi 5) by default, through ``QEMU_CPU``: qemu's default
``max`` CPU has SME, and OpenBLAS (numpy's BLAS) then picks its ``armv9sme`` kernels, whose results
are right under qemu 7.2 but which raise spurious floating-point flags (numpy warns "overflow
encountered in matmul"); no Pi has SME. ``--cpu max`` reproduces that.

    apt-get install qemu-user-static debootstrap binfmt-support mosquitto
    .venv/bin/python bench/arm64_emulated.py --root /work/arm64-root --out bench/results/arm64_emulated
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runner import ROOT, main_guard

INSTALL_HINT = "apt-get update && apt-get install -y qemu-user-static debootstrap binfmt-support mosquitto"
GUEST_DIR = "/opt/fedpeft-bench"  # inside the arm64 root
BINFMT = Path("/proc/sys/fs/binfmt_misc")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
INCLUDE = "python3,python3-venv,python3-pip,ca-certificates"
GUEST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

WORDS = {
    0: "goal match team score league player coach season win striker",
    1: "stock market shares profit bank earnings investor trade price fund",
    2: "rocket orbit planet nasa telescope launch moon space star galaxy",
}

SIZES = r"""
import json, importlib.metadata as md
out = {}
for dist in md.distributions():
    total = sum(dist.locate_file(f).stat().st_size for f in dist.files or [] if dist.locate_file(f).exists())
    out[dist.metadata["Name"]] = {"version": dist.version, "bytes": total}
print(json.dumps(out))
"""

DEVICE_CHECK = r"""
import json, platform, sys, importlib.util
import numpy, onnxruntime
from edge_runtime.engines import device_engines
print(json.dumps({"machine": platform.machine(), "python": sys.version.split()[0],
    "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__,
    "providers": onnxruntime.get_available_providers(), "auto_engines": list(device_engines("auto")),
    "absent": [n for n in ("torch", "transformers", "peft") if importlib.util.find_spec(n) is None]}))
"""


class Blocked(RuntimeError):
    """A step that cannot work here; its message says which and why."""


def need_tools() -> dict[str, str]:
    """The host tools; exits with the apt-get line when one is missing."""
    found: dict[str, str] = {}
    missing = []
    for name in ("qemu-aarch64-static", "debootstrap", "mosquitto", "chroot"):
        path = shutil.which(name) or next(
            (str(Path(d, name)) for d in ("/usr/sbin", "/usr/bin", "/sbin") if Path(d, name).is_file()), None
        )
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        sys.exit(
            f"arm64_emulated: missing {', '.join(missing)}: install them with `{INSTALL_HINT}` (as root)"
        )
    if os.geteuid() != 0:
        sys.exit("arm64_emulated: run as root (debootstrap, chroot and binfmt_misc need it)")
    if platform.machine() != "x86_64":
        print(f"note: host is {platform.machine()}, not x86_64", flush=True)
    return found


def ensure_binfmt() -> str:
    """Register qemu-aarch64 with binfmt_misc; returns how, or raises Blocked with the evidence."""
    entry = BINFMT / "qemu-aarch64"
    how = []
    if not (BINFMT / "status").exists():
        r = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True, text=True
        )
        how.append(f"mount binfmt_misc: rc={r.returncode} {r.stderr.strip()}")
    if not entry.exists() or "enabled" not in entry.read_text():
        r = subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True, text=True)
        how.append(f"update-binfmts --enable qemu-aarch64: rc={r.returncode} {r.stderr.strip()}")
    if not entry.exists() or "enabled" not in entry.read_text():
        raise Blocked("binfmt_misc has no enabled qemu-aarch64 entry after: " + "; ".join(how))
    flags = next(
        (
            line.split(":", 1)[1].strip()
            for line in entry.read_text().splitlines()
            if line.startswith("flags")
        ),
        "",
    )
    if "F" not in flags:
        raise Blocked(f"qemu-aarch64 is registered without the F flag ({flags!r}): a chroot cannot find it")
    return "binfmt_misc (" + ("; ".join(how) if how else "already registered") + f"), flags {flags}"


def guest_env(cpu: str) -> dict[str, str]:
    """A clean environment for the guest: none of the host's PIP_*, PYTHONPATH or OPENBLAS_*."""
    return {
        "PATH": GUEST_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "QEMU_CPU": cpu,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


def in_root(root: Path, cpu: str, *cmd: str, timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` inside the arm64 root (through binfmt) and return the completed process."""
    return subprocess.run(
        ["chroot", str(root), *cmd], env=guest_env(cpu), text=True, capture_output=True, timeout=timeout, **kw
    )


def bootstrap(root: Path, timings: dict[str, float]) -> dict[str, Any]:
    """debootstrap the arm64 root (first stage on the host, second under qemu) unless it is there."""
    marker = root / GUEST_DIR.lstrip("/") / "bootstrap.json"
    if (root / "usr/bin/python3").exists() and marker.exists():
        return {"reused": True, **json.loads(marker.read_text())}
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    subprocess.run(
        [
            "debootstrap",
            "--arch=arm64",
            "--foreign",
            "--variant=minbase",
            f"--include={INCLUDE}",
            SUITE,
            str(root),
            MIRROR,
        ],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    t1 = time.monotonic()
    r = subprocess.run(
        ["chroot", str(root), "/debootstrap/debootstrap", "--second-stage"],
        capture_output=True,
        text=True,
        timeout=3600,
        env=guest_env("max"),
    )
    if r.returncode != 0:
        raise Blocked(f"debootstrap --second-stage under qemu failed: {r.stdout[-1500:]}{r.stderr[-1500:]}")
    t2 = time.monotonic()
    info = {
        "suite": SUITE,
        "variant": "minbase",
        "include": INCLUDE,
        "first_stage_s": round(t1 - t0, 1),
        "second_stage_s": round(t2 - t1, 1),
    }
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(info, indent=1))
    return {"reused": False, **info}


def prepare_root(root: Path) -> None:
    """Mount /proc, /dev, /sys; give the guest the host's DNS and its extra CA certificates."""
    for name in ("proc", "dev", "sys", "dev/pts"):
        target = root / name
        if subprocess.run(["mountpoint", "-q", str(target)]).returncode != 0:
            subprocess.run(["mount", "--bind", f"/{name}", str(target)], check=True)
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    # a TLS-inspecting proxy's CA (if the host trusts one) must be trusted by the guest's pip too
    extra = list(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    for crt in extra:
        shutil.copy(crt, root / "usr/local/share/ca-certificates" / crt.name)
    if extra:
        in_root(root, "max", "/usr/sbin/update-ca-certificates", timeout=600)


def unmount(root: Path) -> None:
    """Undo prepare_root's bind mounts (innermost first)."""
    for name in ("dev/pts", "sys", "dev", "proc"):
        subprocess.run(["umount", "-l", str(root / name)], capture_output=True)


def install_edge(root: Path, cpu: str, timings: dict[str, float]) -> dict[str, Any]:
    """Build this checkout's wheel, make a fresh venv in the guest and pip install the edge extra."""
    wheels = Path("/tmp/fedpeft-wheel")
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(wheels.glob("fedpeft-*.whl"))
    guest = root / GUEST_DIR.lstrip("/")
    guest.mkdir(parents=True, exist_ok=True)
    shutil.copy(wheel, guest / wheel.name)
    shutil.rmtree(guest / "venv", ignore_errors=True)
    t0 = time.monotonic()
    r = in_root(root, cpu, "/usr/bin/python3", "-m", "venv", f"{GUEST_DIR}/venv", timeout=900)
    if r.returncode != 0:
        raise Blocked(f"python3 -m venv failed in the arm64 root: {r.stderr[-2000:]}")
    t1 = time.monotonic()
    r = in_root(
        root,
        cpu,
        f"{GUEST_DIR}/venv/bin/pip",
        "install",
        "--no-cache-dir",
        "--only-binary=:all:",
        f"{GUEST_DIR}/{wheel.name}[edge]",
        timeout=3600,
    )
    t2 = time.monotonic()
    (guest / "pip-install.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise Blocked(f"pip install fedpeft[edge] failed in the arm64 root: {(r.stdout + r.stderr)[-3000:]}")
    timings["venv_s"] = round(t1 - t0, 1)
    timings["pip_install_s"] = round(t2 - t1, 1)
    sizes = json.loads(in_root(root, cpu, f"{GUEST_DIR}/venv/bin/python", "-c", SIZES, timeout=600).stdout)
    packages = {
        name: {"version": v["version"], "mb": round(v["bytes"] / 1e6, 2)}
        for name, v in sorted(sizes.items(), key=lambda kv: -kv[1]["bytes"])
    }
    check = in_root(root, cpu, f"{GUEST_DIR}/venv/bin/python", "-c", DEVICE_CHECK, timeout=600)
    if check.returncode != 0:
        raise Blocked(f"the edge install does not import under emulation: {check.stderr[-3000:]}")
    return {
        "wheel": wheel.name,
        "command": f'pip install --only-binary=:all: "{wheel.name}[edge]"',
        "installed_mb": round(
            sum(v["bytes"] for k, v in sizes.items() if k not in ("pip", "setuptools")) / 1e6, 1
        ),
        "tooling_mb": round(sum(v["bytes"] for k, v in sizes.items() if k in ("pip", "setuptools")) / 1e6, 1),
        "packages": packages,
        "device_check": json.loads(check.stdout.strip().splitlines()[-1]),
        "stderr_warnings": [ln for ln in check.stderr.splitlines() if ln.strip()][:5],
    }


def write_data(folder: Path, per_class_train: int, per_class_test: int, seed: int = 0) -> Path:
    """A 3-class JSONL folder whose classes differ by vocabulary (a few dozen short texts)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.txt").write_text("sport\nfinance\nspace\n")
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for label, words in WORDS.items():
                for _ in range(n):
                    f.write(
                        json.dumps({"text": " ".join(rng.choice(words.split(), size=8)), "label": label})
                        + "\n"
                    )
    return folder


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (never 1883)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 1883:
            return port


def start_mosquitto(folder: Path, binary: str) -> tuple[subprocess.Popen[bytes], int]:
    """One Mosquitto on a free port with its own config in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                "persistence false",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "user root",
            ]
        )
        + "\n"
    )
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=open(folder / "mosquitto.log", "ab")
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise Blocked(f"mosquitto did not listen on {port}: {(folder / 'mosquitto.log').read_text()[-2000:]}")


def wait_with_peak(proc: subprocess.Popen[str], timeout: float) -> tuple[int, float]:
    """Wait for ``proc``; its exit code and the largest VmHWM of its image, in MiB.

    VmHWM is the resident high-water mark of the process's current memory map, which exec
    starts afresh; under emulation the process is qemu, so it counts the guest and the emulator.
    (``ru_maxrss`` from wait4 is no use here: exec keeps the forking parent's high-water mark.)
    Sampled every 0.1 s, so a peak in the last 0.1 s before exit can be missed.
    """
    status = Path(f"/proc/{proc.pid}/status")
    peak_kib = 0
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            raise Blocked(f"the device did not finish within {timeout:.0f} s")
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kib = max(peak_kib, int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass  # exiting between poll() and the read
        time.sleep(0.1)
    return int(proc.returncode), peak_kib / 1024.0


def federate(
    root: Path, cpu: str, tools: dict[str, str], work: Path, args: argparse.Namespace, native: bool = False
) -> dict[str, Any]:
    """Mosquitto and ``fedpeft serve`` on the host, ``fedpeft edge`` in the arm64 root, two rounds.

    ``native``: the same federation with the device on the host (x86_64, this checkout, engine
    ort-plain on this interpreter's onnxruntime), the baseline that the emulation's slowdown is
    measured against.
    """
    sys.path.insert(0, str(ROOT))
    from tests.tiny_model import make_tiny_bert

    guest = root / GUEST_DIR.lstrip("/")
    model = guest / "model"  # the server reads it on the host; the device gets the step graph over MQTT
    shutil.rmtree(model, ignore_errors=True)
    make_tiny_bert(model, hidden=32, layers=2)
    data = write_data(guest / "data", per_class_train=args.per_class, per_class_test=args.per_class // 2)
    shutil.rmtree(guest / "edge-state", ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    broker, port = start_mosquitto(work / "mosquitto", tools["mosquitto"])
    url = f"mqtt://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QEMU_")}
    env |= {"PYTHONPATH": str(ROOT), "FEDPEFT_ARTIFACTS": str(work / "server-artifacts")}
    serve_cmd = [
        sys.executable,
        "-m",
        "sdk.cli",
        "serve",
        "--broker",
        url,
        "--fleet",
        "arm",
        "--state",
        str(work / "state"),
        "--data",
        str(data),
        "--model",
        str(model),
        "--rounds",
        str(args.rounds),
        "--min-clients",
        "1",
        "--allocation",
        args.allocation,
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--test-samples",
        "30",
        "--bits",
        "8",
        "--hello-timeout",
        "900",
        "--round-timeout",
        "1800",
        "--report",
        str(work / "serve.json"),
    ]
    edge_cmd = [
        f"{GUEST_DIR}/venv/bin/fedpeft",
        "-v",
        "edge",
        "--broker",
        url,
        "--fleet",
        "arm",
        "--device-id",
        "pi-emu",
        "--data",
        f"{GUEST_DIR}/data",
        "--engine",
        "auto",
        "--state",
        f"{GUEST_DIR}/edge-state",
        "--resend-after",
        "120",
    ]
    if args.memory_cap_mb:  # the guest sees the host's memory: announce a board's cap instead
        edge_cmd += ["--memory-cap-mb", str(args.memory_cap_mb)]
    if native:  # same flags, host paths, and ort-plain named: auto would pick onnxruntime-training here
        edge_cmd = [sys.executable, "-m", "sdk.cli", *edge_cmd[1:]]
        edge_cmd[edge_cmd.index("--data") + 1] = str(data)
        edge_cmd[edge_cmd.index("--engine") + 1] = "ort-plain"
        edge_cmd[edge_cmd.index("--state") + 1] = str(work / "edge-state")
    t0 = time.monotonic()
    server = subprocess.Popen(
        serve_cmd,
        cwd=ROOT,
        env=env,
        stdout=open(work / "serve.log", "w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    device_log = open(work / "edge.log", "w")
    device = subprocess.Popen(
        edge_cmd if native else ["chroot", str(root), *edge_cmd],
        cwd=ROOT,
        env=env if native else guest_env(cpu),
        stdout=device_log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        device_rc, device_maxrss = wait_with_peak(device, args.timeout)
        t1 = time.monotonic()
        server_rc = server.wait(timeout=300)
        t2 = time.monotonic()
    finally:
        for p in (device, server):
            if p.poll() is None:
                p.kill()
        broker.terminate()
        broker.wait(10)
    edge_log = (work / "edge.log").read_text()
    serve_log = (work / "serve.log").read_text()
    prefix = "native-" if native else ""
    for name in ("edge.log", "serve.log"):
        shutil.copy(work / name, args.out / f"{prefix}{name}")
    if device_rc != 0 or server_rc != 0:
        raise Blocked(
            f"device exit {device_rc}, service exit {server_rc}; device log tail:\n{edge_log[-3000:]}\n"
            f"service log tail:\n{serve_log[-3000:]}"
        )
    report = json.loads((work / "serve.json").read_text())
    shutil.copy(work / "serve.json", args.out / f"{prefix}serve.json")
    client = next(c for c in report["clients"] if c["id"] == "pi-emu")
    return {
        "serve_command": " ".join(serve_cmd),
        "edge_command": ("" if native else "chroot ROOT ") + " ".join(edge_cmd),
        "device_exit": device_rc,
        "device_wall_s": round(t1 - t0, 1),
        "federation_wall_s": round(t2 - t0, 1),
        # VmHWM of the device's process seen from the host: under emulation, qemu (guest + emulator)
        "device_peak_rss_mb_process": round(device_maxrss, 1),
        "client": client,
        "rounds": [{k: r.get(k) for k in ("round", "participants", "accuracy")} for r in report["rounds"]],
        "training_rounds_completed": sum(
            1 for r in report["rounds"] if r["round"] >= 1 and r["participants"] >= 1
        ),
        "rejected": report.get("rejected", []),
        "final": {k: report["final"].get(k) for k in ("accuracy", "macro_f1")},
        "edge_log_tail": edge_log.strip().splitlines()[-6:],
    }


def main() -> int:
    """Bootstrap, install, profile and federate; write the report even when a step is blocked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=Path("/work/arm64-root"), help="the arm64 root (not in a git tree)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/arm64_emulated")
    parser.add_argument(
        "--cpu", default="cortex-a76", help="QEMU_CPU for the guest (cortex-a76: Pi 5; max: qemu's)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=12, help="train texts per class (test: half)")
    parser.add_argument("--allocation", default="utility", choices=("utility", "uniform"))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the device may take")
    parser.add_argument(
        "--keep-mounts", action="store_true", help="leave /proc, /dev, /sys bound in the root"
    )
    parser.add_argument(
        "--memory-cap-mb",
        type=int,
        default=1024,
        help="the device's memory cap (default 1024, as docs/systemd/edge.toml; 0: none, the host's RAM)",
    )
    parser.add_argument(
        "--native-baseline", action="store_true", help="also run the device natively, for the slowdown"
    )
    args = parser.parse_args()
    tools = need_tools()
    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    out: dict[str, Any] = {
        "host": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "qemu": subprocess.run(
                [tools["qemu-aarch64-static"], "--version"], capture_output=True, text=True
            ).stdout.splitlines()[0],
        },
        "guest_cpu": args.cpu,
        "timings_s": timings,
        "status": "running",
    }
    t_all = time.monotonic()
    root = args.root.resolve()
    try:
        out["binfmt"] = ensure_binfmt()
        out["root"] = {"path": str(root), **bootstrap(root, timings)}
        uname = in_root(root, args.cpu, "/usr/bin/uname", "-m", timeout=120).stdout.strip()
        out["root"]["uname_m"] = uname
        if uname != "aarch64":
            raise Blocked(f"uname -m inside the root says {uname!r}, not aarch64")
        prepare_root(root)
        print("installing fedpeft[edge] in the arm64 root...", flush=True)
        out["install"] = install_edge(root, args.cpu, timings)
        t0 = time.monotonic()
        prof = in_root(root, args.cpu, f"{GUEST_DIR}/venv/bin/fedpeft", "profile", timeout=600)
        timings["profile_s"] = round(time.monotonic() - t0, 1)
        out["profile"] = json.loads(prof.stdout)
        out["profile_stderr"] = [ln for ln in prof.stderr.splitlines() if ln.strip()][:6]
        print(f"profile: {out['profile']}", flush=True)
        host = subprocess.run(
            [sys.executable, "-m", "sdk.cli", "profile"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        out["host_profile"] = {k: json.loads(host.stdout)[k] for k in ("ram_mb", "cores", "gflops")}
        print("federating: serve on the host, edge in the arm64 root...", flush=True)
        t0 = time.monotonic()
        out["federation"] = federate(root, args.cpu, tools, Path("/tmp/fedpeft-arm64-run"), args)
        timings["federation_s"] = round(time.monotonic() - t0, 1)
        client = out["federation"]["client"]
        plain = client["engine"] == "ort-plain" or client.get("ort_runtime") == "onnxruntime"
        done = out["federation"]["training_rounds_completed"] >= args.rounds
        ok = plain and done and client["updates_accepted"] >= args.rounds
        out["status"] = "ok" if ok else "incomplete"
        if args.native_baseline:
            print("baseline: the same federation with the device on the host...", flush=True)
            native = federate(root, args.cpu, tools, Path("/tmp/fedpeft-arm64-native"), args, native=True)
            out["native_baseline"] = native
            emu, nat = out["federation"]["client"]["train_s"], native["client"]["train_s"]
            out["slowdown"] = {
                "train_s_emulated": round(emu, 2),
                "train_s_native": round(nat, 2),
                "train_x": round(emu / nat, 1) if nat > 0 else None,
                "device_wall_x": round(out["federation"]["device_wall_s"] / native["device_wall_s"], 1),
            }
    except (Blocked, subprocess.SubprocessError, OSError, json.JSONDecodeError, StopIteration) as exc:
        out["status"] = "blocked"
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if not args.keep_mounts:
            unmount(root)
    timings["total_s"] = round(time.monotonic() - t_all, 1)
    (args.out / "report.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out.get(k) for k in ("status", "error", "timings_s")}, indent=1))
    return 0 if out["status"] == "ok" else 1


if __name__ == "__main__":
    main_guard(main)
