"""Benchmark: what ``pip install "fedpeft[edge]"`` puts on a device, and that it trains.

Creates a fresh virtual environment (under /tmp by default), installs this checkout with the edge
extra (plain onnxruntime, no torch), and measures the installed size of every distribution (the
files their RECORD lists, ``pip`` and ``setuptools`` of the bare venv reported apart). Then checks
the device side there: which engines ``--engine auto`` offers, that torch and onnxruntime.training
are absent, and that the plain-onnxruntime engine trains: a step graph of a tiny model (built by
this interpreter, which has torch) trains one epoch in the edge venv and, for comparison, here
with onnxruntime-training's runtime; the report holds both losses and the largest difference of
the trained tensors. The edge extra has no ``tokenizers``, so the edge venv tokenizes with the
built-in WordPiece; the report says which tokenizer ran on each side and whether the ids of the
training texts and a few harder samples agree. Target: at most 150 MB installed.

    .venv/bin/python bench/edge_install.py --out bench/results/edge_install
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runner import ROOT, main_guard

TARGET_MB = 150.0
TOOLING = {"pip", "setuptools"}  # what `python -m venv` itself installs

SIZES = r"""
import json, importlib.metadata as md
out = {}
for dist in md.distributions():
    total = 0
    for f in dist.files or []:
        p = dist.locate_file(f)
        try:
            total += p.stat().st_size
        except OSError:
            pass
    out[dist.metadata["Name"]] = {"version": dist.version, "bytes": total}
print(json.dumps(out))
"""

DEVICE_CHECK = r"""
import importlib.util, json, sys
import onnxruntime
from edge_runtime.engines import device_engines
print(json.dumps({
    "python": sys.version.split()[0],
    "onnxruntime": onnxruntime.__version__,
    "auto_engines": list(device_engines("auto")),
    "absent": [n for n in ("torch", "transformers", "peft", "tokenizers")
               if importlib.util.find_spec(n) is None]
        + (["onnxruntime.training"] if importlib.util.find_spec("onnxruntime.training") is None else []),
}))
"""

TRAIN = r"""
import hashlib, json, sys
from pathlib import Path
import numpy as np
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.engines.ort_step_engine import OrtStepEngine
from edge_runtime.tokenizer import chosen_backend, load_tokenizer
config = TrainConfig.from_dict(json.loads(sys.argv[1]))
train, test = load_folder(sys.argv[3])
engine = OrtStepEngine(config, artifacts=sys.argv[2], seed=0, threads=1)
result = engine.train(train, epochs=1, seed=3)
np.savez(sys.argv[4], **engine.trainable_state())
import onnxruntime
tokenizer = load_tokenizer(Path(sys.argv[2]) / "tokenizer.json", 128)
ids = tokenizer.encode_batch(list(train.texts) + json.loads(sys.argv[5]))
print(json.dumps({"loss": result.loss, "steps": result.steps, "onnxruntime": onnxruntime.__version__,
                  "eval_loss": engine.evaluate(test).loss, "tokenizer": chosen_backend(),
                  "token_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()}))
"""
# tokenized in both venvs besides the training texts: accents, CJK, control characters, emoji, an
# added token, a word over max_input_chars_per_word
TOKENIZER_SAMPLES = [
    "Héllo, WÖRLD! naïve café",
    "中文字符 and 日本語 [MASK] tokens",
    "tab\there\x00nul\u200bzero-width \u00adsoft hyphen",
    "emoji 🥰👍🏽 «quotes» — dash…",
    "x" * 120,
]


# the edge venv must see only what it installed, not this checkout through PYTHONPATH
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _run(cmd: list[str], *, cwd: str = "/tmp", env: dict[str, str] | None = CLEAN_ENV) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{done.stderr[-3000:]}")
    return str(done.stdout)


def main() -> int:
    """Install the edge extra in a fresh venv, measure it, check it trains; write report.json."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench/results/edge_install"))
    p.add_argument("--venv", default=None, help="where to create the venv (default: a new folder in /tmp)")
    p.add_argument("--python", default=sys.executable, help="interpreter the venv is made from")
    p.add_argument("--keep", action="store_true", help="keep the venv afterwards")
    args = p.parse_args()
    venv = Path(args.venv or tempfile.mkdtemp(prefix="fedpeft-edge-venv-", dir="/tmp"))
    if venv.exists():
        shutil.rmtree(venv)
    try:
        start = time.perf_counter()
        _run([args.python, "-m", "venv", str(venv)])
        py = str(venv / "bin/python")
        _run(
            [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{ROOT}[edge]"],
            cwd="/tmp",
        )
        install_s = time.perf_counter() - start
        sizes = json.loads(_run([py, "-c", SIZES]))
        device = json.loads(_run([py, "-c", DEVICE_CHECK]))
        training = _train_both(py)
    finally:
        if not args.keep:
            shutil.rmtree(venv, ignore_errors=True)
    packages = {n: s for n, s in sizes.items() if n.lower() not in TOOLING}
    total_mb = sum(s["bytes"] for s in packages.values()) / 2**20
    report = {
        "what": 'pip install "fedpeft[edge]" in a fresh venv (this checkout, no torch)',
        "machine": platform.machine(),
        "python": device["python"],
        "installed_mb": round(total_mb, 1),
        "installed_mb_with_pip_setuptools": round(sum(s["bytes"] for s in sizes.values()) / 2**20, 1),
        "target_mb": TARGET_MB,
        "within_target": total_mb <= TARGET_MB,
        "install_s": round(install_s, 1),
        "packages": {
            n: {"version": s["version"], "mb": round(s["bytes"] / 2**20, 2)}
            for n, s in sorted(packages.items(), key=lambda kv: -kv[1]["bytes"])
        },
        "device": device,
        "training": training,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "packages"}, indent=2))
    return 0


def _train_both(edge_python: str) -> dict[str, object]:
    """One epoch of a tiny model's adapter on the step graph: in the edge venv and here."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from broker_server.artifacts import build_artifacts
    from edge_runtime.config import TrainConfig
    from edge_runtime.peft_specs import AdapterSpec
    from tests.helpers import write_text_folder
    from tests.tiny_model import make_tiny_bert

    with tempfile.TemporaryDirectory(prefix="fedpeft-edge-train-") as tmp:
        root = Path(tmp)
        model = make_tiny_bert(root / "model")
        data = write_text_folder(root / "data", per_class_train=8, per_class_test=4)
        config = TrainConfig(
            model=str(model), num_labels=3, seq_len=16, batch_size=8, peft=AdapterSpec(bottleneck=8), lr=5e-3
        )
        folder = build_artifacts(config, seed=0, cache_dir=root / "cache", flavour="step").folder
        argv = [json.dumps(config.to_dict()), str(folder), str(data)]
        samples = json.dumps(TOKENIZER_SAMPLES)
        edge = json.loads(_run([edge_python, "-c", TRAIN, *argv, str(root / "edge.npz"), samples]))
        here = json.loads(
            _run(
                [sys.executable, "-c", TRAIN, *argv, str(root / "here.npz"), samples], cwd=str(ROOT), env=None
            )
        )
        with np.load(root / "edge.npz") as a, np.load(root / "here.npz") as b:
            gap = max(float(np.max(np.abs(a[n] - b[n]))) for n in a.files)
    return {
        "module": "adapter b8 on a 2-layer, 32-wide BERT; 24 samples, batch 8, 1 epoch",
        "edge_venv": edge,
        "reference": here,
        "max_abs_diff_trained": gap,
        # the edge venv has no tokenizers: the built-in WordPiece there, tokenizers here, same ids
        "same_token_ids": edge["token_ids_sha256"] == here["token_ids_sha256"],
    }


if __name__ == "__main__":
    main_guard(main)
