"""How the aggregation service runs one federation: :class:`ServiceConfig`, each field checked.

The checks that combine fields (a strategy with a mode, DP with clusters, ...) are here too, so
that a bad combination fails when the configuration is made, before any device is contacted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from broker_server.asynchronous import parse_staleness
from broker_server.clustering import parse_clusters
from broker_server.privacy import DPFedAvg
from broker_server.strategies import STATEFUL_STRATEGIES, check_strategy
from edge_runtime import wire
from edge_runtime.config import TrainConfig
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import LoraSpec


@dataclass(frozen=True)
class ServiceConfig:
    """How the aggregation service runs one federation."""

    fleet: str
    rounds: int
    train: TrainConfig
    min_clients: int = 1
    expected_clients: int | None = field(
        default=None, metadata={"help": "start round 0 once this many devices said hello"}
    )
    strategy: str = "fedit"
    head_init: str = field(default="ncm", metadata={"help": "ncm (class means) or random"})
    head_scale: float = field(
        default=16.0, metadata={"help": "norm of the class-mean head's rows (the cosine logit scale)"}
    )
    round_timeout_s: float = 900.0
    hello_timeout_s: float = 300.0
    max_round_retries: int = 3
    max_payload_bytes: int = wire.DEFAULT_MAX_PAYLOAD
    norm_bound: float = field(default=1e3, metadata={"help": "reject deltas with a larger L2 norm"})
    clip_norm: float | None = field(
        default=None, metadata={"help": "scale accepted deltas down to this L2 norm"}
    )
    dp_noise_multiplier: float | None = field(
        default=None, metadata={"help": "DP-FedAvg noise multiplier z (needs clip_norm); None = no DP"}
    )
    dp_delta: float = 1e-5
    dp_sample_rate: float = field(
        default=1.0,
        metadata={
            "help": "DP: each round samples every device independently with this probability q; the "
            "mean's denominator is q times the fleet size (expected_clients, else min_clients)"
        },
    )
    down_bits: int = 32
    delta_downlink: bool = field(
        default=True,
        metadata={
            "help": "send each global module as a delta against the one devices hold, at the uplink's "
            "bits (one synchronous module: no allocation, clusters or async)"
        },
    )
    personalize_epochs: int = field(
        default=0,
        metadata={"help": "after the last round, devices fine-tune the global module this many epochs"},
    )
    clusters: str = field(
        default="off",
        metadata={"help": "off, auto or K: one global module per group of devices with similar labels"},
    )
    cluster_share: float = field(
        default=0.5,
        metadata={"help": "a tensor is shared across clusters when their updates have at least this cosine"},
    )
    distill_epochs: int = field(
        default=0,
        metadata={"help": "mixed kinds: distill each kind toward the others on unlabeled text (0 = off)"},
    )
    distill_alpha: float = field(
        default=0.5, metadata={"help": "weight a of the pseudo-label term (1 - a for the KL term)"}
    )
    mode: str = field(default="sync", metadata={"help": "sync rounds, or async (FedBuff) aggregation"})
    buffer_size: int = field(default=4, metadata={"help": "async: updates per aggregation (K)"})
    staleness: str = field(default="poly:0.5", metadata={"help": "async: constant, poly:A or hinge:A:B"})
    max_staleness: int = field(default=8, metadata={"help": "async: drop updates staler than this"})
    server_lr: float = field(
        default=1.0,
        metadata={"help": "the server's step size eta (sync: on the rule's step, FedAvgM; not with exact)"},
    )
    server_momentum: float = field(
        default=0.0,
        metadata={
            "help": "sync: the server's momentum beta (FedAvgM, clusters too; not with exact); 0 = none"
        },
    )
    evaluate_during_next_round: bool = field(
        default=False,
        metadata={
            "help": "sync: test each round's module while the devices train the next, not in between "
            "(not with a state store, an allocator, clusters or distillation); the round is then "
            "reported (on_round) after the next one went out; fedpeft simulate turns it on"
        },
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.fleet or any(c in self.fleet for c in "/+#"):
            raise ConfigError(f"ServiceConfig.fleet must be a plain name, got {self.fleet!r}")
        if self.rounds < 1:
            raise ConfigError(f"ServiceConfig.rounds must be at least 1, got {self.rounds}")
        if self.min_clients < 1:
            raise ConfigError(f"ServiceConfig.min_clients must be at least 1, got {self.min_clients}")
        if self.expected_clients is not None and self.expected_clients < self.min_clients:
            raise ConfigError("ServiceConfig.expected_clients must be at least min_clients")
        if self.head_init not in ("ncm", "random"):
            raise ConfigError(f"ServiceConfig.head_init must be ncm or random, got {self.head_init!r}")
        if self.head_init == "ncm" and self.train.task != "classification":
            raise ConfigError(
                "ServiceConfig.head_init 'ncm' builds the head from class means; "
                f"{self.train.task} (train.task) has no classes: use head_init='random'"
            )
        if not (math.isfinite(self.head_scale) and self.head_scale > 0):
            raise ConfigError(f"ServiceConfig.head_scale must be a positive number, got {self.head_scale!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"ServiceConfig.clip_norm must be positive, got {self.clip_norm}")
        if self.dp_noise_multiplier is not None:
            if self.dp_noise_multiplier < 0 or self.clip_norm is None:
                raise ConfigError("DP needs --clip-norm and a non-negative noise multiplier")
            if self.strategy not in ("fedit", "fedavg"):
                raise ConfigError(f"DP is defined for fedit/fedavg, not {self.strategy!r}")
            if not 0 < self.dp_delta < 1:
                raise ConfigError(f"ServiceConfig.dp_delta must be in (0, 1), got {self.dp_delta}")
            if not 0 < self.dp_sample_rate <= 1:
                raise ConfigError(
                    f"ServiceConfig.dp_sample_rate must be in (0, 1], got {self.dp_sample_rate}"
                )
        if self.personalize_epochs < 0:
            raise ConfigError(f"--personalize-epochs must be 0 or more, got {self.personalize_epochs}")
        if parse_clusters(self.clusters) != 0:
            if self.strategy in STATEFUL_STRATEGIES or self.dp_noise_multiplier is not None:
                raise ConfigError(
                    "--clusters works with the stateless rules (fedit, hetlora, layerwise, median, "
                    f"trimmed_mean) without DP, not {self.strategy!r}"
                    + (" with DP" if self.dp_noise_multiplier is not None else "")
                )
            if not -1.0 <= self.cluster_share <= 1.0:
                raise ConfigError(f"--cluster-share is a cosine in [-1, 1], got {self.cluster_share}")
        if self.distill_epochs < 0 or not 0 <= self.distill_alpha <= 1:
            raise ConfigError("--distill-epochs must be 0 or more and --distill-alpha in [0, 1]")
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"--mode must be sync or async, got {self.mode!r}")
        if self.mode == "async":
            parse_staleness(self.staleness)
            if self.buffer_size < 1 or self.max_staleness < 0 or not self.server_lr > 0:
                raise ConfigError("async needs --buffer-size >= 1, --max-staleness >= 0 and --server-lr > 0")
            if self.strategy not in ("fedit", "fedavg") or self.dp_noise_multiplier is not None:
                raise ConfigError("--mode async aggregates with its own rule (FedBuff): no --strategy, no DP")
            if parse_clusters(self.clusters) != 0 or self.personalize_epochs > 0 or self.distill_epochs > 0:
                raise ConfigError(
                    "--mode async works without --clusters, personalization or distillation for now"
                )
        if not self.server_lr > 0 or not 0 <= self.server_momentum < 1:
            raise ConfigError(
                f"--server-lr must be positive and --server-momentum in [0, 1); got {self.server_lr}, "
                f"{self.server_momentum}"
            )
        if self.server_momentum > 0 and (self.mode != "sync" or self.dp_noise_multiplier is not None):
            raise ConfigError("--server-momentum applies to synchronous rounds without DP")
        if self.strategy == "exact" and (self.server_lr != 1.0 or self.server_momentum > 0):
            # the fedavgm wrapper refuses it too (broker_server.strategy_wrappers); said here first
            raise ConfigError(
                "--server-lr/--server-momentum with --strategy exact is not supported: exact "
                "re-factorizes the LoRA pairs each round, so the change of the factors is no step to "
                "take with momentum (use --strategy ffa or fedit for FedAvgM)"
            )
        if self.dp_noise_multiplier is not None and self.server_lr != 1.0:
            raise ConfigError("DP-FedAvg publishes its noisy mean as is: no --server-lr with DP")
        if self.down_bits not in (32, 16):
            raise ConfigError("ServiceConfig.down_bits must be 32 or 16")
        check_strategy(self.strategy)
        if self.strategy == "exact" and not isinstance(self.train.peft, LoraSpec):
            raise ConfigError(
                f"--strategy exact averages LoRA products; the module is {self.train.peft.kind}"
            )
        if self.strategy == "ffa" and not (
            isinstance(self.train.peft, LoraSpec) and not self.train.peft.train_a
        ):
            raise ConfigError(
                "--strategy ffa (FFA-LoRA) needs a LoRA module with frozen A factors (train_a=False); "
                f"the module is {self.train.peft.to_dict()}"
            )

    def dp_mechanism(self) -> DPFedAvg | None:
        """DP-FedAvg as configured (None without DP); N is the fleet size fixed before any hello."""
        if self.dp_noise_multiplier is None:
            return None
        assert self.clip_norm is not None
        return DPFedAvg(
            clip_norm=self.clip_norm,
            noise_multiplier=self.dp_noise_multiplier,
            sample_rate=self.dp_sample_rate,
            fleet_size=self.expected_clients or self.min_clients,
        )


def check_combination(config: ServiceConfig, *, mixed: bool, unlabeled: int) -> None:
    """Raise :class:`ConfigError` naming a combination the service does not run: ``mixed`` says
    the fleet is mixed (an allocator assigns configurations), ``unlabeled`` how many unlabeled
    server-side texts distillation has."""
    if config.mode == "async" and mixed:
        raise ConfigError(
            "--mode async with a mixed fleet (--allocation utility/uniform, --profiles) is not "
            "supported yet: every device trains the one configured module"
        )
    if config.distill_epochs > 0 and (not mixed or unlabeled == 0):
        raise ConfigError(
            "distillation fuses the modules of different PEFT kinds: it needs a mixed fleet "
            "(allocation) and unlabeled server-side text"
        )
    if mixed and (config.strategy not in ("fedit", "hetlora") or config.dp_noise_multiplier is not None):
        raise ConfigError("a mixed fleet (allocation) aggregates with fedit or hetlora, without DP, for now")
    if mixed and config.strategy in STATEFUL_STRATEGIES:
        raise ConfigError(
            f"--strategy {config.strategy} with a mixed fleet (allocation) is not supported yet"
        )
    if mixed and config.clusters != "off":
        raise ConfigError("--clusters with a mixed fleet (allocation) is not supported yet")
