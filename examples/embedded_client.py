"""An app that embeds FedPEFT+: it joins a federation with ``EdgeClient`` and trains on its own data.

The app holds labelled texts it collected itself (here read from a JSONL file of
``{"text": ..., "label": "name"}`` lines; any list of texts and labels works), hands them to
``EdgeClient`` as a ``TextDataset`` (no data folder needed) and trains in a background thread while
its main thread stays free. The data never leaves the device: only quantized updates of the small
PEFT module go to the aggregation service. When the service publishes its last global module, the
app saves it and prints a one-line JSON summary.

    python examples/embedded_client.py --broker mqtt://localhost:1883 --fleet shop \\
        --device-id till-3 --samples till3.jsonl --labels sport,finance,space --state ./till3-state

Ctrl-C (or SIGTERM) stops it; started again with the same ``--state``, it first resends the updates
the service never acknowledged.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.data import TextDataset
from edge_runtime.errors import FedPeftError
from sdk import EdgeClient


def load_samples(path: Path, label_names: list[str]) -> TextDataset:
    """The app's own samples: one JSON object a line with a text and a label name."""
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(label_names.index(row["label"]))
    return TextDataset(texts=tuple(texts), labels=np.array(labels), label_names=tuple(label_names))


def main(argv: list[str] | None = None) -> int:
    """Join the federation, train until it ends, save the final module, print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True, help="mqtt://[user:password@]host:port or mqtts://...")
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--samples", type=Path, required=True, help="JSONL of {text, label name}")
    parser.add_argument("--labels", required=True, help="the label names, comma-separated, in order")
    parser.add_argument("--state", type=Path, required=True, help="folder of the durable outbox")
    parser.add_argument("--memory-cap-mb", type=float, default=None, help="MiB training may use")
    parser.add_argument("--out", type=Path, default=None, help="where to save the final module (.npz)")
    args = parser.parse_args(argv)

    data = load_samples(args.samples, args.labels.split(","))
    try:
        client = EdgeClient(
            args.broker,
            fleet=args.fleet,
            device_id=args.device_id,
            data=data,
            state_dir=args.state,
            memory_cap_mb=args.memory_cap_mb,
        )
    except FedPeftError as exc:  # a bad URL or name, no training engine installed
        print(f"embedded_client: {exc}", file=sys.stderr)
        return 2

    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            outcome["stats"] = client.run()
        except FedPeftError as exc:  # the broker cannot be reached or refused us
            outcome["error"] = str(exc)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: client.stop())
    worker = threading.Thread(target=train, name="fedpeft-training")
    worker.start()
    while worker.is_alive():  # the app's own work would go here; join with a timeout lets signals in
        worker.join(timeout=0.5)
    if "error" in outcome:
        print(f"embedded_client: {outcome['error']}", file=sys.stderr)
        return 1

    module = client.final_module
    summary = client.summary() | {"finished": module is not None, "tensors": len(module or {})}
    if module is not None and args.out is not None:
        np.savez(args.out, **module)
        summary["saved"] = str(args.out)
    print(json.dumps(summary), flush=True)
    return 0 if module is not None else 3  # 3: stopped before the federation ended


if __name__ == "__main__":
    sys.exit(main())
