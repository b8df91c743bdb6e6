"""The ``serve``, ``edge``, ``centralized`` and ``export`` subcommands (kept apart from the parser)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.config import DEFAULT_MICRO_BATCH, TrainConfig
from edge_runtime.families import lora_targets_for
from edge_runtime.peft_specs import LoraSpec

log = logging.getLogger("fedpeft")


def _train_config(args: argparse.Namespace, num_labels: int, bits: int = 32) -> TrainConfig:
    return TrainConfig(
        peft=LoraSpec(
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            target_modules=lora_targets_for(
                args.model, tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
            ),
            # FFA-LoRA: A stays at its shared initialisation; commands without --strategy train it
            train_a=getattr(args, "strategy", "fedit") != "ffa",
        ),
        model=args.model,
        num_labels=num_labels,
        bits=bits,
        batch_size=args.batch_size,
        micro_batch=getattr(args, "micro_batch", DEFAULT_MICRO_BATCH),
        seq_len=args.seq_len,
        local_epochs=args.local_epochs,
        lr=args.lr,
        head_lr=args.head_lr,
        prox_mu=args.prox_mu,
        logit_adjust=getattr(args, "logit_adjust", 1.0),
        engine="torch",
    )


def _transport(
    args: argparse.Namespace, client_id: str, *, will: tuple[str, bytes, bool] | None = None
) -> Any:
    from edge_runtime.transport import MqttTransport, parse_broker_url

    transport = MqttTransport(
        parse_broker_url(args.broker),
        client_id=client_id,
        clean_start=False,
        will=will,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
    )
    transport.connect()
    return transport


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the aggregation service until the last round, then write its report."""
    from broker_server.allocation import AllocationConfig, build_allocator
    from broker_server.evaluation import Evaluator
    from broker_server.report import (
        build_report,
        communication,
        peft_entry,
        train_config_entry,
        write_report,
    )
    from broker_server.service import AggregationService, ServiceConfig
    from broker_server.state import StateStore
    from edge_runtime.data import TextDataset, load_labels, load_split, resolve_data_dir
    from edge_runtime.errors import ConfigError
    from edge_runtime.families import CLASSLESS_TASKS, TASK_NAMES, dims_of_dir
    from edge_runtime.models import resolve_model

    folder = resolve_data_dir(args.data)
    test = load_split(folder, "test", limit=args.test_samples, seed=args.seed)
    if test.task in CLASSLESS_TASKS:
        raise ConfigError(
            f"fedpeft serve does not take {TASK_NAMES[test.task]} data yet; fedpeft simulate trains it"
        )
    labels = load_labels(folder) or test.label_names
    train_cfg = _train_config(args, len(labels), bits=args.bits)
    if args.frozen_weights != "fp32":
        if args.allocation == "fixed":
            raise ConfigError(
                f"--frozen-weights {args.frozen_weights} is an option of the ort engine's artifacts, which "
                "devices get under --allocation utility|uniform; with --allocation fixed every device "
                "trains with torch"
            )
        if args.distill_epochs > 0:
            raise ConfigError(
                f"--frozen-weights {args.frozen_weights} and --distill-epochs: distillation trains "
                "every kind's module with torch on the server, in fp32"
            )
        train_cfg = replace(train_cfg, frozen_weights=args.frozen_weights)
    if args.mode == "async" and args.allocation != "fixed":
        raise ConfigError(
            f"--mode async with --allocation {args.allocation} is not supported yet: every device "
            "trains the one configured module (--allocation fixed)"
        )
    config = ServiceConfig(
        fleet=args.fleet,
        rounds=args.rounds,
        train=train_cfg,
        min_clients=args.min_clients,
        expected_clients=args.min_clients,
        strategy=args.strategy,
        server_lr=args.server_lr,
        server_momentum=args.server_momentum,
        delta_downlink=args.downlink == "delta",
        clip_norm=args.clip_norm,
        norm_bound=args.norm_bound,
        dp_noise_multiplier=args.dp_noise,
        dp_delta=args.dp_delta,
        dp_sample_rate=args.dp_sample_rate,
        head_init=args.head_init,
        head_scale=args.head_scale,
        personalize_epochs=args.personalize_epochs,
        clusters=args.clusters,
        cluster_share=args.cluster_share,
        distill_epochs=args.distill_epochs,
        distill_alpha=args.distill_alpha,
        round_timeout_s=args.round_timeout,
        hello_timeout_s=args.hello_timeout,
        mode=args.mode,
        buffer_size=args.buffer_size,
        staleness=args.staleness,
        max_staleness=args.max_staleness,
        seed=args.seed,
    )
    allocator = build_allocator(
        args.allocation,
        train_cfg,
        dims_of_dir(resolve_model(train_cfg.model)),
        AllocationConfig(alpha=args.alpha, beta=args.beta, gamma=args.gamma),
    )
    if allocator is not None and (args.strategy not in ("fedit", "hetlora") or args.dp_noise is not None):
        raise ConfigError(
            "--allocation utility/uniform aggregates with fedit or hetlora, without DP, for now"
        )
    texts = None
    if args.distill_epochs > 0:
        from broker_server.distillation import unlabeled

        if not args.distill_data:
            raise ConfigError("--distill-epochs needs --distill-data (a folder of server-side text)")
        spare = load_split(resolve_data_dir(args.distill_data), "train", limit=256, seed=args.seed)
        if not isinstance(spare, TextDataset):
            raise ConfigError("--distill-data must be a folder of texts; image data is not supported")
        texts = unlabeled(spare.texts, labels)
    store = StateStore(Path(args.state) / "state.sqlite")
    evaluator = Evaluator(train_cfg, test, seed=args.seed, threads=len(os.sched_getaffinity(0)))
    transport = _transport(args, f"fedpeft-server-{args.fleet}")

    def on_round(record: dict[str, Any]) -> None:
        acc = record["accuracy"]
        print(
            f"round {record['round']}: {record['participants']} updates, "
            f"accuracy {acc if acc is None else round(acc, 4)}",
            flush=True,
        )

    service = AggregationService(
        transport, config, evaluator, store=store, on_round=on_round, allocator=allocator, unlabeled=texts
    )
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    start = time.monotonic()
    try:
        service.run()
    finally:
        transport.close()
    summary = service.fleet_summary()
    clients = [
        {
            "id": d.device_id,
            "profile": d.profile,
            "peft": peft_entry(d.config, d.trainable_params),
            "allocation": d.allocation,
            "bits": d.config.bits,
            "engine": d.config.engine,
            "mem_cap_mb": d.config.mem_cap_mb,
            "peak_rss_mb": float(d.last_metrics.get("peak_rss_mb", 0.0)),
            "train_s": d.train_s,
            "samples": d.samples,
            "cluster": d.cluster,
            "updates_sent": int(d.last_metrics.get("updates_sent", d.updates_received)),
            "updates_accepted": d.updates_accepted,
            "global_own_accuracy": d.personalization.get("global_own_accuracy"),
            "personalized_accuracy": d.personalization.get("personalized_accuracy"),
        }
        for d in summary.devices.values()
    ]
    final = dict(summary.final)
    if args.mode == "async":  # acknowledged, but the run ended before a version took them in
        final["unaggregated"] = list(summary.unaggregated)
    report = build_report(
        kind="serve",
        config={
            "data": str(folder),
            "model": args.model,
            "seed": args.seed,
            "fleet": args.fleet,
            "rounds": args.rounds,
            "strategy": args.strategy,
            "clusters": args.clusters,
            "min_clients": args.min_clients,
            "mode": args.mode,
            "train": train_config_entry(train_cfg.to_dict(), clients),
        },
        rounds=summary.reported_rounds(),
        final=final,
        communication=communication(
            summary.bytes_up_total, summary.bytes_down, evaluator.total_params, summary.participations
        ),
        clients=clients,
        rejected=summary.rejected,
        extra={"wall_s": time.monotonic() - start},
    )
    print(f"report {write_report(report, args.report)}")
    store.close()
    return 0


def edge_config(args: argparse.Namespace) -> Any:
    """The device's :class:`DeviceConfig`: the --config file, if any, with the flags on top."""
    from edge_runtime.device_config import device_config, setting_keys

    return device_config(args.config, {key: getattr(args, key) for key in setting_keys()})


def cmd_edge(args: argparse.Namespace) -> int:
    """Run one device until the server publishes its last global module."""
    from sdk.edge_client import EdgeClient

    config = edge_config(args)
    config.check_files()
    url = config.broker_url()
    client = EdgeClient(
        url,
        fleet=config.fleet,
        device_id=config.device_id,
        data=config.data,
        state_dir=config.state_dir,
        max_samples=config.max_samples,
        seed=config.seed,
        ca_file=_str_or_none(config.ca_file),
        cert_file=_str_or_none(config.cert_file),
        key_file=_str_or_none(config.key_file),
        resend_after_s=config.resend_after,
        max_message_bytes=config.max_message_bytes,
        engine=config.engine,
        artifacts_cache=config.artifacts_cache,
        memory_cap_mb=config.memory_cap_mb,
    )
    signal.signal(signal.SIGTERM, lambda *_: client.stop())
    pending = len(client.agent.outbox.pending())
    print(
        f"device {config.device_id}: {len(client.data)} samples, engines {', '.join(client.agent.engines)}, "
        f"state {config.state_dir}"
        + (f" ({pending} unacknowledged update{'s' if pending != 1 else ''} to resend)" if pending else "")
        + f", waiting for the server on {url}",  # str(url) hides the password
        flush=True,
    )
    s = client.run()
    print(
        f"device {config.device_id}: {s.updates_sent} updates sent, {s.updates_accepted} accepted, "
        f"peak RSS {s.peak_rss_mb:.0f} MiB"
    )
    print(f"device {config.device_id}: accepted rounds {','.join(map(str, s.rounds_accepted))}", flush=True)
    personal = client.agent.personalization
    if personal.get("holdout"):
        print(
            f"device {config.device_id}: on its {int(personal['holdout'])} held-out samples, global module "
            f"{personal['global_own_accuracy']:.3f}, personalized {personal['personalized_accuracy']:.3f}"
        )
    return 0


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def cmd_centralized(args: argparse.Namespace) -> int:
    """Train the same model and PEFT on the union of the clients' data: the reference."""
    from broker_server.aggregation import head_from_class_means
    from broker_server.records import task_figures
    from broker_server.report import build_report, write_report
    from edge_runtime.data import load_folder, resolve_data_dir
    from edge_runtime.engines.torch_engine import TorchEngine
    from edge_runtime.errors import ConfigError
    from edge_runtime.families import CLASSLESS_TASKS, TASK_NAMES
    from edge_runtime.label_prior import train_logit_adjusted
    from sdk.partition import parse_partition, partition

    folder = resolve_data_dir(args.data)
    train, test = load_folder(folder, test_limit=args.test_samples, seed=args.seed)
    qa = train.task in CLASSLESS_TASKS  # no classes: no label skew, prior or class-mean head
    if qa and parse_partition(args.partition).kind != "iid":
        raise ConfigError(
            f"--partition {args.partition} skews labels; {TASK_NAMES[train.task]} has none: "
            "use --partition iid"
        )
    parts = partition(
        train.labels,
        args.clients,
        parse_partition(args.partition),
        seed=args.seed,
        samples_per_client=args.samples_per_client,
    )
    union = train.subset(np.concatenate(parts))
    cfg = _train_config(args, 2 if qa else len(train.label_names))
    if qa:  # QA's start/end span head, or no head; no label prior and no class-mean head
        cfg = replace(cfg, num_labels=2, task=train.task, logit_adjust=0.0)
    engine = TorchEngine(cfg, seed=args.seed, threads=len(os.sched_getaffinity(0)))
    start = time.monotonic()
    rounds = []
    if args.head_init == "ncm" and not qa:
        sums, counts = engine.class_feature_sums(union)
        engine.load_trainable_state(
            {**engine.trainable_state(), **head_from_class_means(sums, counts, args.head_scale)}
        )
    epochs = args.rounds * args.local_epochs
    from tqdm import tqdm

    result = engine.evaluate(test)
    rounds.append(_epoch_record(0, result, start))
    # torch is the one engine here: a centralized run of any task trains with it
    for epoch in tqdm(range(1, epochs + 1), desc="centralized", unit="epoch"):
        # the same recipe as a device's, logit adjustment by the (union's) label prior included
        train_logit_adjusted(engine, union, epochs=1, seed=args.seed + epoch, tau=cfg.logit_adjust)
        result = engine.evaluate(test)
        rounds.append(_epoch_record(epoch, result, start))
        tqdm.write(f"epoch {epoch}: {_figures(result)}")
    report = build_report(
        kind="centralized",
        config={
            "data": str(folder),
            "model": args.model,
            "seed": args.seed,
            "clients": args.clients,
            "samples_per_client": args.samples_per_client,
            "partition": args.partition,
            "epochs": epochs,
            "train": cfg.to_dict(),
            "train_samples": len(union),
        },
        rounds=rounds,
        final=task_figures({"accuracy": result.accuracy, "macro_f1": result.macro_f1}, train.task, rounds),
        communication={
            "bytes_up_total": 0,
            "bytes_down_total": 0,
            "full_model_fp32_bytes": 4 * engine.total_params,
            "reduction_vs_full": 1.0,
        },
        clients=[],
        rejected=[],
        extra={"wall_s": time.monotonic() - start},
    )
    print(f"centralized {_figures(result)}; report {write_report(report, args.report)}")
    return 0


def _figures(result: Any) -> str:
    """Accuracy and macro F1, or the task's own figures (exact match and F1; recalls; next-token
    accuracy and perplexity)."""
    if result.task == "question-answering":
        return f"exact match {result.accuracy:.3f}, F1 {result.macro_f1:.3f}"
    if result.task == "image-text-matching":
        return f"mean recall@1 {result.accuracy:.3f}, mean recall@5 {result.macro_f1:.3f}"
    if result.task == "causal-lm":
        return f"next-token accuracy {result.accuracy:.3f}, perplexity {result.extra['perplexity']:.2f}"
    return f"accuracy {result.accuracy:.3f}, macro-F1 {result.macro_f1:.3f}"


def _epoch_record(epoch: int, result: Any, start: float) -> dict[str, Any]:
    wall = time.monotonic() - start
    figures = (
        {"exact_match": result.accuracy, "f1": result.macro_f1} if result.task == "question-answering" else {}
    )
    figures |= {k: float(v) for k, v in result.extra.items()}
    return figures | {
        "round": epoch,
        "wall_s": wall,
        "virtual_s": wall,
        "accuracy": result.accuracy,
        "macro_f1": result.macro_f1,
        "loss": result.loss,
        "participants": 1,
        "bytes_up": 0,
        "bytes_down": 0,
    }


def cmd_export(args: argparse.Namespace) -> int:
    """Export the module of a state folder as a peft adapter or an ONNX model."""
    from sdk.export import ONNX_TOLERANCE, export_module, read_module

    source = read_module(args.state, device=args.device, module=args.module)  # before loading any model
    result = export_module(source, args.out, args.format)
    if result.format == "onnx":
        graphs = " and ".join(str(p) for p in sorted(result.out.glob("*.onnx")))  # CLIP: one per tower
        print(
            f"exported {result.origin} to {graphs} (LoRA merged, head included); "
            f"onnxruntime's outputs within {result.max_abs_diff:.1e} of torch's "
            f"(tolerance {ONNX_TOLERANCE:g})"
        )
    else:
        print(
            f"exported {result.origin} as a peft adapter to {result.out} ({result.tensors} tensors, "
            "head included); load it with sdk.export.load_exported"
        )
    return 0
