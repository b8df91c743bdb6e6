"""Probe: heads fit on the frozen model's features against the class-mean head (no fine-tuning).

For seeds 0, 1, 2 of the README's main run (20 Newsgroups, the union of 8 x 150 samples under
Dirichlet 0.5, 1,000 test samples, 128 tokens), embeds the samples with the frozen MiniLM (mean
pooling, unit norm, as the engines do) and scores heads fit on those 1,200 features: the
class-mean head that round 0 builds, ridge regression onto one-hot labels, shrinkage LDA (shared
covariance) and logistic regression. Asks whether a better round-0 head could replace fine-tuning.

    .venv/bin/python bench/head_probe.py --out bench/results/levers/head-probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runner import DATA_20NG, main_guard


def _heads(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, classes: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    from broker_server.aggregation import head_from_class_means

    onehot = np.eye(classes)[ytr]
    sums, counts = onehot.T @ xtr, onehot.sum(0)

    def acc(weight: np.ndarray, bias: np.ndarray | float = 0.0) -> float:
        return float(((xte @ weight.T + bias).argmax(1) == yte).mean())

    out = {"class_mean": acc(head_from_class_means(sums, counts, 16.0)["head.weight"])}
    gram = xtr.T @ xtr
    for lam in (0.01, 0.1, 1.0, 10.0):
        out[f"ridge_{lam}"] = acc(np.linalg.solve(gram + lam * np.eye(len(gram)), xtr.T @ onehot).T)
    means = sums / np.maximum(counts[:, None], 1)
    centred = xtr - means[ytr]
    within = centred.T @ centred / len(ytr)
    for shrink in (0.1, 0.3, 0.5):
        cov = (1 - shrink) * within + shrink * np.trace(within) / len(within) * np.eye(len(within))
        weight = np.linalg.solve(cov, means.T).T
        out[f"lda_{shrink}"] = acc(weight, -0.5 * np.sum(weight * means, 1))
    for c in (1.0, 10.0, 100.0):
        model = LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr)
        out[f"logreg_{c}"] = float((model.predict(xte) == yte).mean())
    return out


def main() -> int:
    """Embed, fit, score, write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DATA_20NG)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="bench/results/levers/head-probe.json")
    a = p.parse_args()
    import torch

    from edge_runtime.config import TrainConfig
    from edge_runtime.data import load_folder, resolve_data_dir
    from edge_runtime.engines.torch_engine import TorchEngine
    from sdk.partition import parse_partition, partition

    results = {}
    for seed in a.seeds:
        train, test = load_folder(resolve_data_dir(a.data), test_limit=1000, seed=seed)
        skew = parse_partition("dirichlet:0.5")
        parts = partition(train.labels, 8, skew, seed=seed, samples_per_client=150)
        union = train.subset(np.concatenate(parts))
        config = TrainConfig(num_labels=len(train.label_names), seq_len=128)
        engine = TorchEngine(config, seed=seed, threads=2)
        with torch.no_grad():
            xtr = engine._pooled(union, 64).numpy().astype(np.float64)
            xte = engine._pooled(test, 64).numpy().astype(np.float64)
        ytr, yte = np.asarray(union.labels), np.asarray(test.labels)
        results[str(seed)] = _heads(xtr, ytr, xte, yte, len(train.label_names))
        print(seed, json.dumps(results[str(seed)]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    main_guard(main)
