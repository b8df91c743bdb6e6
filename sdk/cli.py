"""The ``fedpeft`` command line: profile, simulate, serve, edge, centralized, export.

Every subcommand prints ``--help``; bad input exits with status 2 and one clear line (after a bad
flag, one short line of usage before it, not the whole usage block).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from edge_runtime.config import DEFAULT_MICRO_BATCH, FROZEN_WEIGHTS, TrainConfig
from edge_runtime.engines import DEVICE_ENGINE_CHOICES
from edge_runtime.errors import ConfigError, FedPeftError, TransportError
from edge_runtime.families import dims_of_dir
from edge_runtime.peft_specs import PeftSpec, spec_from_dict
from sdk.export import EXPORT_FORMATS, MODULE_CHOICES, ONNX_TOLERANCE

if TYPE_CHECKING:
    from sdk.simulate import SimulationConfig

DEFAULTS_NOTE = "Defaults reach the README's results without tuning."
EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, worth retrying (the broker cannot be reached)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are two lines: a short usage, then the error itself."""

    def short_usage(self) -> str:
        """``usage: PROG`` with the required flags, ``[options]`` and the positionals."""
        required = [
            f"{a.option_strings[0]} {a.metavar if isinstance(a.metavar, str) else a.dest.upper()}"
            for a in self._actions
            if a.option_strings and a.required
        ]
        positionals = [
            (a.metavar if isinstance(a.metavar, str) else a.dest)
            + (" ..." if a.nargs == argparse.PARSER else "")
            for a in self._actions
            if not a.option_strings
        ]
        return " ".join(["usage:", self.prog, *required, "[options]", *positionals])

    def error(self, message: str) -> NoReturn:
        """Print the short usage, where the full one is, and the error; exit 2 as argparse does."""
        self.exit(2, f"{self.short_usage()} (try '{self.prog} --help')\n{self.prog}: error: {message}\n")

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """Parse ``args``; an unknown flag is reported by the subcommand it was given to."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._subcommand_parser(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _subcommand_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen: argparse.ArgumentParser = action.choices.get(getattr(parsed, action.dest, ""), self)
                return chosen
        return self


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "positive")


def _nonneg_int(text: str) -> int:
    return _int_at_least(text, 0, "non-negative")


def _samples(text: str) -> int | None:
    """A positive sample count, or ``all`` (None): the whole train split, each sample on one client."""
    if text.strip().lower() == "all":
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="data folder (train.jsonl/test.jsonl/labels.txt or CSV; images: train/<class>/*.png and "
        "test/<class>/*.png), or a dataset name under $FEDPEFT_DATASETS (default ../shared/datasets)",
    )
    p.add_argument(
        "--model", default="all-MiniLM-L6-v2", help="model name or local folder (default: bundled MiniLM)"
    )
    p.add_argument(
        "--seq-len",
        type=_positive_int,
        default=128,
        help="tokens per text (default 128); an image is its model's patches",
    )
    p.add_argument("--local-epochs", type=_positive_int, default=1, help="local epochs per round (default 1)")
    p.add_argument(
        "--lr", type=_nonneg_float, default=3e-3, help="AdamW learning rate of the PEFT module (default 3e-3)"
    )
    p.add_argument(
        "--head-lr", type=_nonneg_float, default=2e-3, help="learning rate of the head (0 freezes it)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument(
        "--micro-batch",
        type=_nonneg_int,
        default=DEFAULT_MICRO_BATCH,
        help=f"rows of one forward and backward pass (default {DEFAULT_MICRO_BATCH}): a batch runs in "
        "micro-batches sorted by length and makes one update, as the whole batch would, in less "
        "memory and time; 0: the whole batch at once",
    )
    p.add_argument("--lora-rank", type=_positive_int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--lora-alpha", type=_nonneg_float, default=8.0, help="LoRA alpha (default 8: scale 2)")
    p.add_argument(
        "--lora-targets",
        default="attention",
        help="comma-separated module names, or 'attention' (default: every attention projection of "
        "the model's family, e.g. BERT's query,key,value,attention.output.dense) or 'default' (its "
        "query and value projections)",
    )
    p.add_argument(
        "--prox-mu", type=_nonneg_float, default=0.0, help="proximal weight lambda (0 = plain FedAvg)"
    )
    p.add_argument(
        "--logit-adjust",
        type=_nonneg_float,
        default=1.0,
        help="tau of logit adjustment: devices train with logits + tau log p_device(y) (0 = off)",
    )
    p.add_argument(
        "--head-init",
        choices=("ncm", "random"),
        default="ncm",
        help="start the head from federated class means (ncm) or at random",
    )
    p.add_argument(
        "--head-scale",
        type=_positive_float,
        default=16.0,
        help="norm of the class-mean head's rows: the cosine classifier's logit scale (default 16)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--test-samples", type=_positive_int, default=1000, help="test samples evaluated each round"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedpeft`` with every subcommand."""
    parser = _Parser(
        prog="fedpeft",
        description="Federated parameter-efficient fine-tuning "
        "of foundation models on edge devices, over MQTT.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prof = sub.add_parser(
        "profile",
        help="measure this host and print its device profile as JSON",
        description="Measure this host (memory, cores, a matmul microbenchmark) and print its device "
        "profile as JSON. With --probe, also train a few steps of that PEFT module in a fresh process "
        "and add its seconds per step and peak memory to the profile's 'extra'.",
    )
    prof.add_argument(
        "--probe",
        default=None,
        metavar="KIND:SIZE",
        help="probe a training step of lora:RANK, adapter:BOTTLENECK or prompt:LENGTH (off by default)",
    )
    prof.add_argument(
        "--model", default="all-MiniLM-L6-v2", help="model of the probe (default: bundled MiniLM)"
    )
    prof.add_argument("--batch-size", type=_positive_int, default=8, help="batch of the probe (default 8)")
    prof.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sample of the probe")

    sim = sub.add_parser(
        "simulate",
        help="run a broker, the server and N virtual devices on this machine",
        description="Simulate a federation on one machine. " + DEFAULTS_NOTE,
    )
    _add_training_flags(sim)
    sim.add_argument("--clients", type=_positive_int, default=8)
    sim.add_argument("--rounds", type=_positive_int, default=5, help="training rounds after the head round")
    sim.add_argument("--partition", default="dirichlet:0.5", help="iid | dirichlet:ALPHA | shards:K")
    sim.add_argument(
        "--samples-per-client",
        type=_samples,
        default=150,
        help="samples each client gets (default 150), or 'all': the whole train split, shared out",
    )
    sim.add_argument(
        "--bits", type=int, default=4, choices=(32, 16, 8, 4, 2), help="uplink bit width (default 4)"
    )
    sim.add_argument("--profiles", default=None, help="device mix, e.g. low=0.3,mid=0.4,high=0.3")
    _add_allocation_flags(sim, default="auto")
    _add_aggregation_flags(sim)
    sim.add_argument(
        "--attack", default=None, help="simulate Byzantine devices: flip:COUNT or scale=FACTOR:COUNT"
    )
    sim.add_argument(
        "--max-message-bytes",
        type=_positive_int,
        default=None,
        help="the broker's message size limit; larger updates are sent in chunks",
    )
    _add_mode_flags(sim)
    sim.add_argument(
        "--stragglers",
        default=None,
        help="FRACTION:SLOWDOWN:AVAILABILITY, e.g. 0.3:5:0.5: that share of devices computes 5x "
        "slower and is online half the time (simulated clock)",
    )
    sim.add_argument(
        "--availability-period",
        type=_nonneg_float,
        default=600.0,
        help="seconds of one on/off cycle of a device's simulated availability (default 600)",
    )
    sim.add_argument(
        "--engine",
        default="auto",
        choices=("auto", "torch", "ort", "ort-plain", "mixed"),
        help="training engine of the devices: auto (ONNX Runtime where installed and the module allows, "
        "else torch), torch, ort (onnxruntime-training), ort-plain (plain onnxruntime, every PEFT kind), "
        "or mixed (half the worker processes on ort, half on torch)",
    )
    sim.add_argument(
        "--frozen-weights",
        default="fp32",
        choices=FROZEN_WEIGHTS,
        help="with --engine ort: fp32 (default); int8: the devices' forward multiplies by int8 copies "
        "of the frozen linear weights (faster where the CPU has integer matmul kernels; not exact: "
        "README, 'Frozen weights in int8'), the input gradients stay fp32; int8-grad: the input "
        "gradients' products in int8 too, the gradients quantized per row",
    )
    sim.add_argument("--broker", default=None, help="mqtt://[user:pass@]host:port; default: embedded broker")
    sim.add_argument("--workers", type=_positive_int, default=None, help="worker processes (default: cores)")
    sim.add_argument(
        "--distill-samples",
        type=_positive_int,
        default=256,
        help="with --distill-epochs: unlabeled server-side texts (training texts no device holds)",
    )
    sim.add_argument(
        "--holdout",
        type=_nonneg_float,
        default=0.2,
        help="with --personalize-epochs or --strategy layerwise: share of each device's samples held "
        "out of training to measure on (default 0.2)",
    )
    sim.add_argument("--report", default="run.json", help="report file (default run.json)")
    sim.add_argument("--plot", default=None, help="PNG plot file (default: the report's name with .png)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bars")
    sim.add_argument(
        "--test-between-rounds",
        action="store_true",
        help="test each round's module before the next round goes out (default: while the devices "
        "train the next round, which takes the test off the rounds' critical path)",
    )

    srv = sub.add_parser("serve", help="run the aggregation service next to an MQTT broker")
    _add_training_flags(srv)
    srv.add_argument("--broker", required=True, help="mqtt://[user:pass@]host:port or mqtts://...")
    srv.add_argument("--fleet", required=True, help="fleet name (topic prefix fl/FLEET/...)")
    srv.add_argument("--state", required=True, help="folder for the service's SQLite state")
    srv.add_argument(
        "--distill-data",
        default=None,
        help="with --distill-epochs: a data folder whose train split's texts (labels unread, at most "
        "256) are the server-side unlabeled text",
    )
    srv.add_argument("--rounds", type=_positive_int, default=5)
    srv.add_argument("--min-clients", type=_positive_int, default=2)
    srv.add_argument("--bits", type=int, default=4, choices=(32, 16, 8, 4, 2))
    srv.add_argument(
        "--frozen-weights",
        default="fp32",
        choices=FROZEN_WEIGHTS,
        help="with --allocation utility|uniform: fp32 (default), or int8 / int8-grad: devices on the ort "
        "engine get artifacts whose forward (int8-grad: and input gradients) multiplies by int8 copies "
        "of the frozen linear weights (not exact: README, 'Frozen weights in int8'); devices without "
        "the ort engine are left out, and the service still tests the global module with torch in fp32",
    )
    _add_aggregation_flags(srv)
    _add_allocation_flags(srv, default="fixed")
    _add_mode_flags(srv)
    srv.add_argument("--round-timeout", type=_nonneg_float, default=900.0, help="seconds a round waits")
    srv.add_argument("--hello-timeout", type=_nonneg_float, default=600.0, help="seconds to wait for devices")
    srv.add_argument("--report", default="serve.json")
    _add_tls_flags(srv)

    edge = sub.add_parser(
        "edge",
        help="run one device: train on local data, exchange updates over MQTT",
        description="Run one device until the service publishes its last global module. Settings come "
        "from the flags, or from a TOML file (--config) whose keys are the flags' names with "
        "underscores (device_id, memory_cap_mb, ...); flags override the file. Exits 2 on bad "
        "input and 75 when the broker cannot be reached (a service manager may retry).",
    )
    edge.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="TOML file with this device's settings, e.g. /etc/fedpeft/edge.toml (see docs/raspberry-pi.md)",
    )
    edge.add_argument("--broker", default=None, help="mqtt://[user:pass@]host:port or mqtts://...")
    edge.add_argument("--fleet", default=None, help="fleet name (topic prefix fl/FLEET/...)")
    edge.add_argument("--device-id", default=None)
    edge.add_argument("--data", default=None, help="folder with this device's train.jsonl (or train.csv)")
    edge.add_argument(
        "--state",
        default=None,
        help="folder for the durable outbox and fetched artifacts (default .fedpeft-edge/ID; "
        "required with --config)",
    )
    edge.add_argument(
        "--credentials",
        default=None,
        metavar="FILE",
        help="file of one line user:password for the broker, readable by its owner only (chmod 600)",
    )
    edge.add_argument(
        "--memory-cap-mb",
        type=_nonneg_float,
        default=None,
        help="MiB this device may use for training: announced to the service and enforced here",
    )
    edge.add_argument("--max-samples", type=_positive_int, default=None, help="use at most this many samples")
    edge.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    edge.add_argument(
        "--max-message-bytes",
        type=_positive_int,
        default=None,
        help="the broker's message size limit; larger updates are sent in chunks",
    )
    edge.add_argument(
        "--resend-after",
        type=_nonneg_float,
        default=None,
        help="seconds before an unacknowledged update is sent again (default 30)",
    )
    edge.add_argument(
        "--engine",
        default=None,
        choices=DEVICE_ENGINE_CHOICES,
        help="training engine (default auto: ort where onnxruntime-training is installed, else ort-plain "
        "where plain onnxruntime is, then torch; the server picks among those this device has), torch, "
        "ort, or ort-plain",
    )
    edge.add_argument(
        "--artifacts-cache",
        default=None,
        help="folder for the ORT training artifacts fetched from the server (default STATE/artifacts)",
    )
    _add_tls_flags(edge)

    cen = sub.add_parser("centralized", help="the centralized reference on the same data budget")
    _add_training_flags(cen)
    cen.add_argument("--clients", type=_positive_int, default=8)
    cen.add_argument(
        "--samples-per-client",
        type=_samples,
        default=150,
        help="samples each client gets (default 150), or 'all': the whole train split, shared out",
    )
    cen.add_argument("--partition", default="dirichlet:0.5")
    cen.add_argument("--rounds", type=_positive_int, default=5, help="epochs = rounds x local epochs")
    cen.add_argument("--report", default="centralized.json")

    exp = sub.add_parser(
        "export",
        help="write a trained LoRA module as a peft adapter or an ONNX model",
        description="Export the module of a service's or a device's state folder. peft: the LoRA "
        "adapter (PeftModel.save_pretrained), the head and the tokenizer; load it with "
        "sdk.export.load_exported. onnx: the base model with the LoRA update merged in, pooling and "
        f"head included, checked in onnxruntime against torch (largest logit difference allowed: "
        f"{ONNX_TOLERANCE:g}).",
    )
    exp.add_argument(
        "--state",
        required=True,
        help="a service's state folder (fedpeft serve --state) or a device's (fedpeft edge --state)",
    )
    exp.add_argument(
        "--device",
        default=None,
        metavar="ID",
        help="from a service's state: the module this device trains (its cluster's, or its assigned "
        "configuration's); from a device's: checked against the folder's device",
    )
    exp.add_argument(
        "--module",
        choices=MODULE_CHOICES,
        default="auto",
        help="a device's global or personal module (default auto: personal if it has one)",
    )
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="peft or onnx")
    exp.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder to write")
    return parser


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    """--mode and the asynchronous (FedBuff) flags, the same for simulate and serve."""
    p.add_argument(
        "--mode",
        default="sync",
        choices=("sync", "async"),
        help="sync rounds (default) or async: FedBuff aggregation of every --buffer-size updates",
    )
    p.add_argument("--buffer-size", type=_positive_int, default=4, help="async: updates per aggregation")
    p.add_argument(
        "--staleness", default="poly:0.5", help="async: staleness weight constant, poly:A or hinge:A:B"
    )
    p.add_argument("--max-staleness", type=int, default=8, help="async: drop updates staler than this")


def _add_allocation_flags(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--allocation",
        default=default,
        choices=("auto", "fixed", "utility", "uniform")
        if default == "auto"
        else ("fixed", "utility", "uniform"),
        help="who trains what: fixed (the flags' module for all), utility (U = aR - bC + gE per "
        "device profile), uniform (the flags' module where it fits, others left out)"
        + ("; auto = utility with --profiles, else fixed" if default == "auto" else ""),
    )
    p.add_argument("--alpha", type=_nonneg_float, default=1.0, help="utility weight of expected gain R")
    p.add_argument("--beta", type=_nonneg_float, default=0.5, help="utility weight of resource cost C")
    p.add_argument("--gamma", type=_nonneg_float, default=0.2, help="utility weight of parameter economy E")


def _add_aggregation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--downlink",
        choices=("delta", "full"),
        default="delta",
        help="delta (default): global modules as quantized deltas against the one devices hold, at the "
        "update's bits; full: the whole module in fp32 every round",
    )
    p.add_argument(
        "--server-lr",
        type=_nonneg_float,
        default=1.0,
        help="the server's step size eta on the aggregated step (FedAvgM; async: FedBuff's eta)",
    )
    p.add_argument(
        "--server-momentum",
        type=_nonneg_float,
        default=0.0,
        help="sync rounds: the server's momentum beta (FedAvgM; 0 = plain averaging)",
    )
    p.add_argument(
        "--strategy",
        default="fedit",
        help="aggregation rule: fedit (default), exact (LoRA products averaged exactly, SVD, error "
        "feedback), ffa (FFA-LoRA: A frozen at its shared initialisation, only B trained and "
        "averaged), hetlora (HetLoRA: zero-padded factors, clients weighted by the norm of their "
        "LoRA update), layerwise (each layer weighted by how much the device's update to it lowered its "
        "held-out loss), median, trimmed_mean",
    )
    p.add_argument("--clip-norm", type=_nonneg_float, default=None, help="clip each update to this L2 norm")
    p.add_argument(
        "--norm-bound",
        type=_nonneg_float,
        default=1e3,
        help="reject updates with a larger L2 norm (default 1000)",
    )
    p.add_argument(
        "--dp-noise",
        type=_nonneg_float,
        default=None,
        help="DP-FedAvg noise multiplier z (needs --clip-norm): noise of std z*C on the sum of "
        "clipped updates, which is divided by q*N; epsilon goes in the report",
    )
    p.add_argument(
        "--dp-delta", type=_nonneg_float, default=1e-5, help="delta of the reported (epsilon, delta)"
    )
    p.add_argument(
        "--dp-sample-rate",
        type=_positive_float,
        default=1.0,
        help="DP: each round samples every device independently with probability q in (0, 1] "
        "(default 1: all); N is the fleet size (simulate: --clients; serve: --min-clients)",
    )
    p.add_argument(
        "--clusters",
        default="off",
        help="off (default), auto or K: group devices by the cosine similarity of their label "
        "histograms, one global module per group",
    )
    p.add_argument(
        "--cluster-share",
        type=float,
        default=0.5,
        help="with --clusters: a tensor whose per-cluster updates all have at least this cosine is "
        "shared by every cluster (default 0.5)",
    )
    p.add_argument(
        "--distill-epochs",
        type=int,
        default=0,
        help="mixed PEFT kinds: after each round, distill each kind's module toward the other kinds' "
        "ensemble on unlabeled server-side text for this many epochs (default 0: off)",
    )
    p.add_argument(
        "--distill-alpha",
        type=float,
        default=0.5,
        help="weight a of L = a CE(pseudo-labels) + (1 - a) KL(student || teacher) (default 0.5)",
    )
    p.add_argument(
        "--personalize-epochs",
        type=int,
        default=0,
        help="after the last round, each device fine-tunes the global module this many epochs on its "
        "own data and reports both models' accuracy on its held-out samples (default 0: off)",
    )


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-file", default=None, help="CA certificate for mqtts://")
    p.add_argument("--cert-file", default=None, help="client certificate for mqtts://")
    p.add_argument("--key-file", default=None, help="client key for mqtts://")


def _targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def probe_spec(text: str) -> PeftSpec:
    """``lora:8``, ``adapter:16`` or ``prompt:16`` as a PEFT spec (the kind alone takes its default)."""
    kind, _, size = text.partition(":")
    field = {"lora": "rank", "adapter": "bottleneck", "prompt": "length"}.get(kind.strip())
    if field is None:
        raise ConfigError(f"--probe {text!r}: the kind must be lora, adapter or prompt")
    data: dict[str, object] = {"kind": kind.strip()}
    if size.strip():
        try:
            value = int(size)
        except ValueError:
            raise ConfigError(f"--probe {text!r}: {size!r} is not a whole number") from None
        data[field] = value
        if field == "rank":
            data["alpha"] = 2.0 * value  # the allocation grid's scaling, alpha / r = 2
    return spec_from_dict(data)


def cmd_profile(args: argparse.Namespace) -> int:
    """Print this host's measured profile, with a training-step probe if asked."""
    from hw_profiles import measure

    if args.probe is None:
        print(json.dumps(measure().to_dict(), indent=2))
        return 0
    from edge_runtime.engines.memory_probe import measure_training
    from edge_runtime.models import resolve_model

    config = TrainConfig(
        peft=probe_spec(args.probe),
        model=args.model,
        num_labels=2,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    dims = dims_of_dir(resolve_model(config.model))
    predicted = config.peft.predict_cost(
        dims, config.batch_size, config.seq_len, micro_batch=config.micro_batch
    ).memory_mb
    print(
        f"probing 3 training steps of {args.probe} (batch {args.batch_size}, {args.seq_len} tokens)...",
        file=sys.stderr,
    )
    measured = measure_training(config, steps=3)
    profile = measure(step_probe=lambda: measured.step_s)
    profile.extra.update(
        {
            "train_peak_rss_mb": round(measured.peak_rss_mb, 1),
            "train_predicted_mb": round(predicted, 1),
            "train_trainable_params": float(measured.trainable_params),
            "train_batch_size": float(args.batch_size),
            "train_seq_len": float(args.seq_len),
        }
    )
    print(json.dumps(profile.to_dict(), indent=2))
    return 0


def simulation_config(args: argparse.Namespace) -> SimulationConfig:
    """The simulation the ``simulate`` command's flags describe."""
    from sdk.simulate import SimulationConfig

    return SimulationConfig(
        data=args.data,
        clients=args.clients,
        rounds=args.rounds,
        partition=args.partition,
        samples_per_client=args.samples_per_client,
        test_samples=args.test_samples,
        seq_len=args.seq_len,
        local_epochs=args.local_epochs,
        bits=args.bits,
        seed=args.seed,
        profiles=args.profiles,
        allocation=args.allocation,
        alpha=args.alpha,
        beta=args.beta,
        gamma=args.gamma,
        strategy=args.strategy,
        clip_norm=args.clip_norm,
        dp_noise=args.dp_noise,
        dp_delta=args.dp_delta,
        dp_sample_rate=args.dp_sample_rate,
        attack=args.attack,
        norm_bound=args.norm_bound,
        max_message_bytes=args.max_message_bytes,
        mode=args.mode,
        engine=args.engine,
        frozen_weights=args.frozen_weights,
        model=args.model,
        broker=args.broker,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=_targets(args.lora_targets),
        lr=args.lr,
        head_lr=args.head_lr,
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        prox_mu=args.prox_mu,
        logit_adjust=args.logit_adjust,
        head_init=args.head_init,
        head_scale=args.head_scale,
        personalize_epochs=args.personalize_epochs,
        clusters=args.clusters,
        cluster_share=args.cluster_share,
        distill_epochs=args.distill_epochs,
        distill_alpha=args.distill_alpha,
        distill_samples=args.distill_samples,
        buffer_size=args.buffer_size,
        staleness=args.staleness,
        max_staleness=args.max_staleness,
        server_lr=args.server_lr,
        server_momentum=args.server_momentum,
        delta_downlink=args.downlink == "delta",
        test_during_next_round=not args.test_between_rounds,
        stragglers=args.stragglers,
        availability_period=args.availability_period,
        holdout=args.holdout,
        workers=args.workers,
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run a simulated federation and write its report and plot."""
    from broker_server.report import write_report
    from edge_runtime.data import folder_task, resolve_data_dir
    from sdk.plot import plot_report
    from sdk.progress import RoundProgress
    from sdk.simulate import Simulation

    config = simulation_config(args)
    per_round = config.clients if config.mode == "sync" else config.buffer_size  # async: a version's buffer
    # round 0 is the class-mean head, which data without classes (questions, image-text pairs,
    # causal-LM texts) never has
    head_round = config.head_init == "ncm" and folder_task(resolve_data_dir(config.data)) in (
        "classification",
        "image-classification",
    )
    progress = RoundProgress(
        per_round,
        config.rounds + (1 if head_round else 0),
        first=0 if head_round else 1,
        enabled=not args.no_progress,
    )
    report = Simulation(config, on_round=progress.round_done, on_update=progress.update).run()
    progress.close()
    path = write_report(report, args.report)
    plot = plot_report(report, args.plot or Path(args.report).with_suffix(".png"))
    final = report["final"]
    comm = report["communication"]
    measured = (
        f"final accuracy {final['accuracy']:.3f}, macro-F1 {final['macro_f1']:.3f}"
        if final.get("evaluated", True)
        else "final accuracy not measured (no evaluation ran)"
    )
    if final.get("task") == "question-answering" and final.get("evaluated", True):
        measured = f"final exact match {final['exact_match']:.3f}, F1 {final['f1']:.3f}"
    if final.get("task") == "image-text-matching" and final.get("evaluated", True):
        measured = f"final mean recall@1 {final['accuracy']:.3f}, mean recall@5 {final['macro_f1']:.3f}"
    if final.get("task") == "causal-lm" and final.get("evaluated", True):
        perplexity = final.get("perplexity", float("nan"))
        measured = f"final next-token accuracy {final['accuracy']:.3f}, perplexity {perplexity:.2f}"
    print(
        f"{measured}, "
        f"{(comm['bytes_up_total'] + comm['bytes_down_total']) / 1e6:.2f} MB moved "
        f"(reduction vs full fp32 FedAvg {comm['reduction_vs_full']:.4f}); report {path}, plot {plot}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedpeft`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers: dict[str, Any] = {
        "profile": cmd_profile,
        "simulate": cmd_simulate,
    }
    from sdk import commands

    handlers.update(
        serve=commands.cmd_serve,
        edge=commands.cmd_edge,
        centralized=commands.cmd_centralized,
        export=commands.cmd_export,
    )
    try:
        return int(handlers[args.command](args))
    except TransportError as exc:
        print(f"fedpeft {args.command}: error: {exc}", file=sys.stderr)
        # a device service retries an unreachable broker (systemd's Restart=on-failure) but not a
        # bad configuration (RestartPreventExitStatus=2)
        return EX_TEMPFAIL if args.command == "edge" else 2
    except FedPeftError as exc:
        print(f"fedpeft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedpeft {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
