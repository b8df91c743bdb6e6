"""Probe a fine-tuning recipe centrally, fast: the union of the main run's devices, one engine.

Trains the torch engine's LoRA module and head from the class-mean head on the union of the
README main run's 8 x 150 samples (seed, Dirichlet 0.5) and prints the test accuracy after every
epoch. A screening tool for levers before federated runs (one seed; logit adjustment by the
union's label prior with ``--logit-adjust 1``, as ``fedpeft centralized`` trains), e.g.

    .venv/bin/python bench/recipe_probe.py --lr 1e-3 --targets query,key,value,attention.output.dense

Two levers only this probe has:

- ``--windows random``: each epoch, a post longer than the sequence trains on a window of
  ``seq_len - 2`` tokens at a random offset instead of its first tokens (the test set is read as
  always, from the start): more of each post's text for the same compute.
- ``--ncm-refresh``: after each epoch, also report the accuracy of a class-mean head recomputed on
  the union with the fine-tuned encoder (a prototype head that follows the features), beside the
  trained head's.

``--out FILE`` appends the run (arguments, accuracies by epoch) to a JSON list.
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
from edge_runtime.label_prior import train_logit_adjusted
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
ap.add_argument("--logit-adjust", type=float, default=0.0)
ap.add_argument("--windows", choices=("first", "random"), default="first")
ap.add_argument("--ncm-refresh", action="store_true")
ap.add_argument("--out", type=Path)
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


class WindowedEngine(TorchEngine):
    """The torch engine, training on a random window of each long post when ``windowed``."""

    windowed = False
    window_rng = np.random.default_rng(1234)

    def _tokens(self, data):  # type: ignore[no-untyped-def]
        if not self.windowed:
            return super()._tokens(data)
        full = getattr(self, "_full", None)
        if full is None or full[0] is not data:
            ids = self.tokenizer(list(data.texts), truncation=False, add_special_tokens=False)["input_ids"]
            self._full = full = (data, ids)
        width = self.config.seq_len - 2
        out = []
        for body in full[1]:
            if len(body) > width:
                start = int(self.window_rng.integers(0, len(body) - width + 1))
                body = body[start : start + width]
            out.append([self.tokenizer.cls_token_id, *body, self.tokenizer.sep_token_id])
        return out


eng = WindowedEngine(cfg, seed=a.seed, threads=2)
s, c = eng.class_feature_sums(union)
eng.load_trainable_state({**eng.trainable_state(), **head_from_class_means(s, c, a.scale)})
t = time.time()
accs = [eng.evaluate(test).accuracy]
refreshed: list[float] = []
print(vars(a), "ep0", accs[0], flush=True)
for e in range(1, a.epochs + 1):
    eng.windowed = a.windows == "random"
    r = train_logit_adjusted(eng, union, epochs=1, seed=a.seed + e, tau=a.logit_adjust)
    eng.windowed = False
    accs.append(eng.evaluate(test).accuracy)
    line = f"ep{e} acc {accs[-1]:.3f} trainloss {r.loss:.3f} trainacc {r.accuracy:.3f}"
    if a.ncm_refresh:
        trained = eng.trainable_state()
        s2, c2 = eng.class_feature_sums(union)
        eng.load_trainable_state({**trained, **head_from_class_means(s2, c2, a.scale)})
        refreshed.append(eng.evaluate(test).accuracy)
        eng.load_trainable_state(trained)
        line += f" refreshed-ncm {refreshed[-1]:.3f}"
    print(f"{line} {time.time() - t:.0f}s", flush=True)
result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "accs": accs}
if a.ncm_refresh:
    result["refreshed_ncm_accs"] = refreshed
print("RESULT", json.dumps(result), flush=True)
if a.out is not None:
    runs = json.loads(a.out.read_text()) if a.out.exists() else []
    a.out.write_text(json.dumps([*runs, result], indent=1) + "\n")
