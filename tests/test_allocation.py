"""The allocator: feasible by memory, tier-dependent choices, link-dependent bit widths."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_server.allocation import (
    AllocationConfig,
    Allocator,
    Candidate,
    CostEstimate,
    NoFeasibleConfig,
    RewardTable,
    allocate,
    bits_for_link,
    build_allocator,
    memory_cap_mb,
    ort_predictor,
    ort_trains,
    peft_key,
    plain_ort_trains,
    prior_reward,
)
from edge_runtime.config import TrainConfig
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, ModelDims, PromptSpec
from hw_profiles import DeviceProfile, load_profile

GRID = [Candidate(LoraSpec(rank=r, alpha=2.0 * r), b, 128) for r in (2, 4, 8, 16, 32) for b in (4, 16)]


def fake_predict(c: Candidate, p: DeviceProfile) -> CostEstimate:
    """Memory grows with batch and rank; time with batch over the device's speed."""
    rank = c.peft.to_dict()["rank"]
    params = 12 * 2 * 384 * rank
    memory = 500 + 40 * c.batch_size + 20 * rank  # MiB, roughly MiniLM's figures
    return CostEstimate(memory_mb=memory, step_s=0.02 * c.batch_size * 10 / p.gflops, trainable_params=params)


def test_tiers_get_different_modules_and_none_over_its_cap() -> None:
    cfg = AllocationConfig()
    chosen = {}
    for tier in ("low", "mid", "high"):
        profile = load_profile(tier)
        a = allocate(profile, GRID, fake_predict, RewardTable(), cfg, steps_per_round=150)
        assert a.cost.memory_mb <= a.mem_cap_mb == memory_cap_mb(profile, cfg)
        chosen[tier] = a.candidate.peft.to_dict()["rank"]
        assert set(a.terms()) >= {"R", "C", "E", "U"}
        assert a.utility == pytest.approx(
            cfg.alpha * a.reward - cfg.beta * a.resource_cost + cfg.gamma * a.economy
        )
    assert chosen["low"] < chosen["high"], chosen


def test_infeasible_candidates_are_never_assigned() -> None:
    tiny = DeviceProfile(name="tiny", ram_mb=1000, cores=1, gflops=1.0)
    a = allocate(tiny, GRID, fake_predict, RewardTable(), AllocationConfig(), steps_per_round=10)
    assert a.cost.memory_mb <= a.mem_cap_mb
    too_small = DeviceProfile(name="pico", ram_mb=400, cores=1, gflops=1.0)
    with pytest.raises(NoFeasibleConfig, match=r"pico.*memory cap"):
        allocate(too_small, GRID, fake_predict, RewardTable(), AllocationConfig(), steps_per_round=10)


@settings(max_examples=50, deadline=None)
@given(st.floats(300, 16000), st.floats(0.5, 50), st.floats(0, 2), st.floats(0, 2), st.floats(0, 2))
def test_the_choice_always_fits_and_maximises_utility(
    ram: float, gflops: float, a: float, b: float, g: float
) -> None:
    profile = DeviceProfile(name="x", ram_mb=ram, cores=2, gflops=gflops)
    cfg = AllocationConfig(alpha=a, beta=b, gamma=g)
    try:
        best = allocate(profile, GRID, fake_predict, RewardTable(), cfg, steps_per_round=100)
    except NoFeasibleConfig:
        assert all(fake_predict(c, profile).memory_mb > memory_cap_mb(profile, cfg) for c in GRID)
        return
    assert best.cost.memory_mb <= memory_cap_mb(profile, cfg)
    for c in GRID:  # no feasible candidate scores higher
        if fake_predict(c, profile).memory_mb <= memory_cap_mb(profile, cfg):
            other = allocate(profile, [c], fake_predict, RewardTable(), cfg, steps_per_round=100)
            assert other.utility <= best.utility + 1e-9


def test_bits_follow_the_link() -> None:
    params = 100_000
    assert bits_for_link(params, uplink_mbps=100.0, budget_s=1.0) == 16
    assert bits_for_link(params, uplink_mbps=0.5, budget_s=1.0) == 4
    assert bits_for_link(params, uplink_mbps=0.01, budget_s=1.0) == 2  # never below 2
    slow = allocate(
        load_profile("low"),
        GRID,
        fake_predict,
        RewardTable(),
        AllocationConfig(upload_budget_s=0.2),
        steps_per_round=10,
    )
    fast = allocate(
        load_profile("high"),
        GRID,
        fake_predict,
        RewardTable(),
        AllocationConfig(upload_budget_s=0.2),
        steps_per_round=10,
    )
    assert slow.bits <= fast.bits


def test_rewards_learn_from_observed_gains() -> None:
    table = RewardTable()
    spec = LoraSpec(rank=8)
    prior = table.reward(spec)
    for _ in range(5):
        table.observe([peft_key(spec)], accuracy_gain=0.05)
    assert table.reward(spec) > prior
    table.observe([peft_key(spec)] * 3, accuracy_gain=-10.0)  # counted once per round, clamped
    assert 0.0 <= table.reward(spec) <= 1.0
    assert len(table.observations["lora:r8"]) == 6
    assert RewardTable.from_dict(table.to_dict()).reward(spec) == table.reward(spec)
    assert table.reward(LoraSpec(rank=2)) == table.reward(LoraSpec(rank=2, alpha=1.0))  # keyed by kind+size


def test_bad_allocation_settings_are_refused() -> None:
    with pytest.raises(ConfigError):
        AllocationConfig(alpha=-1)
    with pytest.raises(ConfigError):
        AllocationConfig(round_budget_s=0)
    with pytest.raises(ConfigError):
        AllocationConfig(reserve_fraction=1.0)
    with pytest.raises(ConfigError, match="empty"):
        allocate(load_profile("low"), [], fake_predict, RewardTable(), AllocationConfig(), steps_per_round=1)


MINILM = ModelDims(hidden=384, layers=6, intermediate=1536, vocab=30522, heads=12, total_params=22_713_216)


def test_the_real_grid_gives_low_devices_a_cheaper_module_than_high_ones() -> None:
    """With the specs' own cost model on MiniLM, tiers split: top-layer adapters vs the largest LoRA."""
    base = TrainConfig(peft=LoraSpec(rank=8), num_labels=20, seq_len=128, batch_size=16)
    allocator = build_allocator("utility", base, MINILM)
    assert allocator is not None
    got = {tier: allocator.assign(base, load_profile(tier), 150) for tier in ("low", "mid", "high")}
    low, high = got["low"], got["high"]
    assert low[0].peft != high[0].peft
    assert low[1].cost.memory_mb < high[1].cost.memory_mb and low[1].cost.step_s < high[1].cost.step_s * 10
    assert high[0].peft == LoraSpec(rank=16, alpha=32.0)
    for cfg, alloc in got.values():
        assert alloc.cost.memory_mb <= cfg.mem_cap_mb
    # adapters on the top half only are in the grid and start with a lower prior than all layers
    top = AdapterSpec(bottleneck=8, layers=(3, 4, 5))
    assert any(c.peft == top for c in allocator.grid)
    assert prior_reward(top) < prior_reward(AdapterSpec(bottleneck=8))
    # the super-state takes each kind's largest module, in every layer
    assert AdapterSpec(bottleneck=32) in [c.peft for c in allocator.largest(base)]
    with pytest.raises(NoFeasibleConfig, match="pi-zero-2w"):
        allocator.assign(base, load_profile("pi-zero-2w"), 150)


def test_a_512_mb_device_with_onnx_runtime_gets_a_lora_module_that_fits() -> None:
    """Engines in the device's order of preference: torch fits nothing on a Pi Zero 2 W, ORT does."""
    base = TrainConfig(peft=LoraSpec(rank=8), num_labels=20, seq_len=128, batch_size=16)
    allocator = build_allocator("utility", base, MINILM)
    assert allocator is not None
    pi_zero = load_profile("pi-zero-2w")
    with pytest.raises(NoFeasibleConfig, match="below the smallest candidate"):
        allocator.assign(base, pi_zero, 150, engines=("torch",))
    for engines in (("ort",), ("torch", "ort"), ("ort", "torch")):
        cfg, alloc = allocator.assign(base, pi_zero, 150, engines=engines)
        assert cfg.engine == "ort" and isinstance(cfg.peft, LoraSpec)
        assert alloc.cost.memory_mb <= cfg.mem_cap_mb == memory_cap_mb(pi_zero, AllocationConfig())
        assert cfg.batch_size == 4  # batch 8 would not fit its 384 MiB
    # ORT trains LoRA only, so a low-tier device that prefers ORT gets LoRA rather than adapters
    low = load_profile("low")
    assert allocator.assign(base, low, 150, engines=("torch",))[0].peft.kind == "adapter"
    assert allocator.assign(base, low, 150, engines=("ort", "torch"))[0].peft.kind == "lora"
    with pytest.raises(NoFeasibleConfig, match="none of its engines"):
        allocator.assign(base, low, 150, engines=("tpu",))


def test_a_cap_its_operator_announced_bounds_a_device_below_its_ram() -> None:
    # `fedpeft edge --memory-cap-mb 700` (or memory_cap_mb in edge.toml) puts it in the profile's extra
    from dataclasses import replace

    high = load_profile("high")
    capped = replace(high, extra={"mem_cap_mb": 700.0})
    cfg = AllocationConfig()
    assert memory_cap_mb(capped, cfg) == 700.0 < memory_cap_mb(high, cfg)
    a = allocate(capped, GRID, fake_predict, RewardTable(), cfg, steps_per_round=150)
    assert a.mem_cap_mb == 700.0 and a.cost.memory_mb <= 700.0
    assert allocate(high, GRID, fake_predict, RewardTable(), cfg, steps_per_round=150).cost.memory_mb > 700
    # a cap above what the RAM leaves changes nothing
    roomy = replace(high, extra={"mem_cap_mb": 10 * high.ram_mb})
    assert memory_cap_mb(roomy, cfg) == memory_cap_mb(high, cfg)


def test_plain_onnx_runtime_devices_get_every_peft_kind_at_ort_costs() -> None:
    """ort-plain trains LoRA, adapters and prompts (ort: LoRA only), with ORT's memory model."""
    base = TrainConfig(peft=LoraSpec(rank=8), num_labels=20, seq_len=128, batch_size=16)
    allocator = build_allocator("utility", base, MINILM)
    assert allocator is not None
    low = load_profile("low")
    # where torch would give an adapter and ort must give LoRA, ort-plain keeps the adapter
    torch_cfg, torch_alloc = allocator.assign(base, low, 150, engines=("torch",))
    plain_cfg, plain_alloc = allocator.assign(base, low, 150, engines=("ort-plain", "torch"))
    assert torch_cfg.peft.kind == "adapter" and plain_cfg.peft.kind == "adapter"
    assert plain_cfg.engine == "ort-plain" and torch_cfg.engine == "torch"
    assert plain_alloc.cost.memory_mb < torch_alloc.cost.memory_mb  # ORT's constants, not torch's
    predict_ort = ort_predictor(MINILM, base.num_labels)
    assert plain_alloc.cost == predict_ort(plain_alloc.candidate, low)
    # a Pi Zero 2 W fits nothing on torch and something on ort-plain, within its cap
    pi_zero = load_profile("pi-zero-2w")
    cfg, alloc = allocator.assign(base, pi_zero, 150, engines=("ort-plain",))
    assert cfg.engine == "ort-plain" and alloc.cost.memory_mb <= cfg.mem_cap_mb
    # the candidates it may get: every kind, but no LoRA with dropout
    assert {"lora", "adapter", "prompt"} <= {c.peft.kind for c in allocator.grid if plain_ort_trains(c.peft)}
    assert not plain_ort_trains(LoraSpec(rank=4, dropout=0.1)) and plain_ort_trains(PromptSpec(length=8))
    assert not ort_trains(AdapterSpec()) and not ort_trains(PromptSpec(length=8))
    only_dropout = Allocator(
        [Candidate(LoraSpec(rank=4, dropout=0.1), 8, 128)], predict_ort, predict_ort=predict_ort
    )
    with pytest.raises(NoFeasibleConfig, match="none of its engines"):
        only_dropout.assign(base, low, 150, engines=("ort-plain",))
    assert only_dropout.assign(base, low, 150, engines=("ort-plain", "torch"))[0].engine == "torch"


def test_int8_frozen_weights_are_predicted_on_top_and_trained_on_ort_only() -> None:
    """An int8 device holds int8 copies beside the fp32 weights: the cost model adds them, and
    only the ort engine (whose artifacts carry the option) may get such a configuration."""
    from dataclasses import replace

    from broker_server.allocation import ORT_INT8_BYTES_PER_WEIGHT, ORT_INT8_GRAD_BYTES_PER_WEIGHT

    base = TrainConfig(peft=LoraSpec(rank=8), num_labels=20, seq_len=128, batch_size=16)
    int8 = replace(base, frozen_weights="int8")
    assert MINILM.linear_weights == 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    low = load_profile("low")
    cand = Candidate(LoraSpec(rank=8, alpha=16.0), 8, 128)
    fp32_mb = ort_predictor(MINILM, 20)(cand, low).memory_mb
    int8_mb = ort_predictor(MINILM, 20, frozen_weights="int8")(cand, low).memory_mb
    assert int8_mb - fp32_mb == pytest.approx(ORT_INT8_BYTES_PER_WEIGHT * MINILM.linear_weights / 2**20)
    # int8-grad drops the fp32 copies: measured a few MiB above fp32, far below int8
    grad_mb = ort_predictor(MINILM, 20, frozen_weights="int8-grad")(cand, low).memory_mb
    assert grad_mb - fp32_mb == pytest.approx(ORT_INT8_GRAD_BYTES_PER_WEIGHT * MINILM.linear_weights / 2**20)
    assert fp32_mb < grad_mb < int8_mb
    with pytest.raises(ConfigError, match="frozen_weights"):
        ort_predictor(MINILM, 20, frozen_weights="int4")
    allocator = build_allocator("utility", int8, MINILM)
    assert allocator is not None and allocator.predict_ort is not None
    for engines in (("ort",), ("torch", "ort"), ("ort-plain", "ort")):
        cfg, alloc = allocator.assign(int8, low, 150, engines=engines)
        assert cfg.engine == "ort" and cfg.frozen_weights == "int8"
        assert alloc.cost == allocator.predict_ort(alloc.candidate, low)
        assert alloc.cost.memory_mb <= cfg.mem_cap_mb
    for engines in (("torch",), ("ort-plain",)):
        with pytest.raises(NoFeasibleConfig, match=r"none of its engines .* int8 trains on ort only"):
            allocator.assign(int8, low, 150, engines=engines)
    grad = replace(base, frozen_weights="int8-grad")
    grad_allocator = build_allocator("utility", grad, MINILM)
    assert grad_allocator is not None
    cfg, alloc = grad_allocator.assign(grad, low, 150, engines=("torch", "ort"))
    assert cfg.engine == "ort" and cfg.frozen_weights == "int8-grad"
    assert alloc.cost == grad_allocator.predict_ort(alloc.candidate, low)
    with pytest.raises(NoFeasibleConfig, match=r"int8-grad trains on ort only"):
        grad_allocator.assign(grad, low, 150, engines=("torch",))
    # a device whose cap fits a candidate in fp32 but not with the int8 copies gets a smaller one
    fp32_alloc = build_allocator("utility", base, MINILM)
    assert fp32_alloc is not None
    _, chosen = fp32_alloc.assign(base, low, 150, engines=("ort",))
    tight = replace(low, extra={"mem_cap_mb": chosen.cost.memory_mb + 1.0})
    assert fp32_alloc.assign(base, tight, 150, engines=("ort",))[1].candidate == chosen.candidate
    _, squeezed = allocator.assign(int8, tight, 150, engines=("ort",))
    assert squeezed.candidate != chosen.candidate and squeezed.cost.memory_mb <= tight.extra["mem_cap_mb"]
