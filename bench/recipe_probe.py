"""Probe a fine-tuning recipe centrally, fast: the union of the main run's devices, one engine.

Trains the torch engine's LoRA module and head from the class-mean head on the union of the
README main run's 8 x 150 samples (seed, Dirichlet 0.5) and prints the test accuracy after every
epoch. A screening tool for levers before federated runs (one seed, no logit adjustment), e.g.

    .venv/bin/python bench/recipe_probe.py --lr 1e-3 --targets query,key,value,attention.output.dense
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from broker_server.aggregation import head_from_class_means
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder, resolve_data_dir
from edge_runtime.engines.torch_engine import TorchEngine
from edge_runtime.peft_specs import LoraSpec
from sdk.partition import parse_partition, partition

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument(
    "--data", default=str(Path(__file__).resolve().parent.parent.parent / "shared/datasets/20newsgroups")
)
ap.add_argument("--lr", type=float, default=5e-4)
ap.add_argument("--head-lr", type=float, default=2e-3)
ap.add_argument("--targets", default="query,value")
ap.add_argument("--rank", type=int, default=8)
ap.add_argument("--alpha", type=float, default=16)
ap.add_argument("--epochs", type=int, default=5)
ap.add_argument("--seq-len", type=int, default=128)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--test", type=int, default=500)
ap.add_argument("--scale", type=float, default=16)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--wd", type=float, default=0.0)
a = ap.parse_args()
folder = resolve_data_dir(a.data)
train, test = load_folder(folder, test_limit=a.test, seed=a.seed)
parts = partition(train.labels, 8, parse_partition("dirichlet:0.5"), seed=a.seed, samples_per_client=150)
union = train.subset(np.concatenate(parts))
cfg = TrainConfig(
    peft=LoraSpec(rank=a.rank, alpha=a.alpha, target_modules=tuple(a.targets.split(","))),
    num_labels=len(train.label_names),
    batch_size=a.batch,
    seq_len=a.seq_len,
    lr=a.lr,
    head_lr=a.head_lr,
    weight_decay=a.wd,
)
eng = TorchEngine(cfg, seed=a.seed, threads=2)
s, c = eng.class_feature_sums(union)
eng.load_trainable_state({**eng.trainable_state(), **head_from_class_means(s, c, a.scale)})
t = time.time()
accs = [eng.evaluate(test).accuracy]
print(vars(a), "ep0", accs[0], flush=True)
for e in range(1, a.epochs + 1):
    r = eng.train(union, epochs=1, seed=a.seed + e)
    accs.append(eng.evaluate(test).accuracy)
    print(
        f"ep{e} acc {accs[-1]:.3f} trainloss {r.loss:.3f} trainacc {r.accuracy:.3f} {time.time() - t:.0f}s",
        flush=True,
    )
print("RESULT", json.dumps({"args": vars(a), "accs": accs}), flush=True)
