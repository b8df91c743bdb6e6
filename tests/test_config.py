"""Validated configuration: specs and training configs reject bad values with the field's name."""

from __future__ import annotations

import pytest

from edge_runtime.config import TrainConfig
from edge_runtime.errors import ConfigError
from edge_runtime.peft_specs import LoraSpec, peft_kinds, register_peft_kind, spec_from_dict


def test_lora_spec_round_trips_through_its_dict() -> None:
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=("query", "key", "value"))
    assert spec_from_dict(spec.to_dict()) == spec
    assert "lora" in peft_kinds()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rank": 0}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"target_modules": ()}, "target_modules"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_lora_spec_rejects_bad_fields(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        LoraSpec(**kwargs)


def test_unknown_kind_and_fields_are_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown PEFT kind"):
        spec_from_dict({"kind": "magic"})
    with pytest.raises(ConfigError, match="bad fields"):
        spec_from_dict({"kind": "lora", "rnak": 3})


def test_registering_a_second_class_under_a_taken_name_fails() -> None:
    class Impostor:
        kind = "lora"

    with pytest.raises(ConfigError, match="already registered"):
        register_peft_kind(Impostor)


def test_train_config_round_trips_and_validates() -> None:
    cfg = TrainConfig(num_labels=20, bits=4, prox_mu=0.01)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="bits"):
        TrainConfig(bits=3)
    with pytest.raises(ConfigError, match="unknown training configuration fields"):
        TrainConfig.from_dict({**cfg.to_dict(), "surprise": 1})
    with pytest.raises(ConfigError, match="engine"):
        TrainConfig(engine="tensorflow")


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_service_config_refuses_a_head_scale_that_is_not_a_positive_number(scale: float) -> None:
    from broker_server.service import ServiceConfig

    with pytest.raises(ConfigError, match="head_scale"):
        ServiceConfig(fleet="f", rounds=1, train=TrainConfig(num_labels=3), head_scale=scale)
    assert (
        ServiceConfig(fleet="f", rounds=1, train=TrainConfig(num_labels=3), head_scale=32.0).head_scale
        == 32.0
    )
