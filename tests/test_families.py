"""The model-family registry: lookup, shapes against real parameter counts, the torch engine on a
tiny model of every text family, a 2-client federated round per family, and a 7B decoder's memory.

CLIP trains image-text matching only (tests/test_image_text.py): the engine refuses it for
classification with the reason. ViT trains image classification (tests/test_images.py); LLaMA
also trains causal-LM fine-tuning (tests/test_causal_lm.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker_server.allocation import NoFeasibleConfig, build_allocator, memory_cap_mb
from broker_server.report import validate_report
from edge_runtime.config import TrainConfig
from edge_runtime.data import load_folder
from edge_runtime.errors import ConfigError
from edge_runtime.families import (
    FAMILIES,
    family_of,
    family_of_dir,
    lora_targets_for,
    model_dims,
    tower_dims,
)
from edge_runtime.peft_specs import AdapterSpec, LoraSpec, ModelDims, PromptSpec
from hw_profiles import DeviceProfile
from sdk.simulate import Simulation, SimulationConfig
from tests.helpers import write_text_folder
from tests.tiny_model import TINY_FAMILIES, make_tiny_model, tiny_config

FAMILY_OF_TYPE = {"bert": "bert", "roberta": "bert", "distilbert": "distilbert", "llama": "llama"}


def _vision_configs() -> dict[str, Any]:
    from transformers import CLIPConfig, ViTConfig

    vit = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    clip = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 100,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    return {"vit": vit, "clip": clip}


# --- the registry -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "family"),
    [
        ("bert", "bert"),
        ("roberta", "bert"),
        ("xlm-roberta", "bert"),
        ("distilbert", "distilbert"),
        ("llama", "llama"),
        ("mistral", "llama"),
        ("vit", "vit"),
        ("clip", "clip"),
    ],
)
def test_a_config_dict_finds_its_family(model_type: str, family: str) -> None:
    assert family_of({"model_type": model_type}).name == family


def test_an_unknown_model_type_names_every_supported_family() -> None:
    with pytest.raises(ConfigError) as err:
        family_of({"model_type": "gpt2"})
    message = str(err.value)
    assert "'gpt2' is not supported" in message
    for family in FAMILIES.values():
        assert family.name in message and all(t in message for t in family.model_types)
    with pytest.raises(ConfigError, match="not supported"):
        family_of({"hidden_size": 8})  # no model_type at all


def test_lora_keywords_become_the_familys_modules() -> None:
    llama = FAMILIES["llama"]
    assert llama.lora_modules(("attention",)) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert llama.lora_modules(("default",)) == ("q_proj", "v_proj")
    assert llama.lora_modules(("q_proj",)) == ("q_proj",)
    with pytest.raises(ConfigError, match="stand alone"):
        llama.lora_modules(("attention", "gate_proj"))
    # BERT's 'attention' is exactly the old default, so BERT runs are unchanged
    assert FAMILIES["bert"].lora_modules(("attention",)) == (
        "query",
        "key",
        "value",
        "attention.output.dense",
    )


@pytest.mark.parametrize(
    ("family", "name", "layer"),
    [
        ("bert", "encoder.layer.3.attention.output.dense", 3),
        ("bert", "encoder.layer.3.output.dense", 3),
        ("bert", "encoder.layer.3.intermediate.dense", None),
        ("distilbert", "transformer.layer.1.attention.out_lin", 1),
        ("distilbert", "transformer.layer.1.ffn.lin2", 1),
        ("distilbert", "transformer.layer.1.ffn.lin1", None),
        ("llama", "layers.5.self_attn.o_proj", 5),
        ("llama", "layers.5.mlp.down_proj", 5),
        ("llama", "layers.5.mlp.up_proj", None),
        ("vit", "encoder.layer.0.output.dense", 0),
        ("clip", "vision_model.encoder.layers.2.mlp.fc2", 2),
        ("clip", "text_model.encoder.layers.2.self_attn.out_proj", 2),
    ],
)
def test_adapter_sites_are_the_output_projections(family: str, name: str, layer: int | None) -> None:
    assert FAMILIES[family].adapter_site(name) == layer


# --- shapes: the cost model's total equals the parameters transformers builds -------------------


@pytest.mark.parametrize("model_type", [*TINY_FAMILIES, "llama-gqa", "vit", "clip"])
def test_shape_totals_are_the_models_parameter_counts(model_type: str) -> None:
    import torch
    from transformers import AutoModel, LlamaConfig

    if model_type in ("vit", "clip"):
        config = _vision_configs()[model_type]
    elif model_type == "llama-gqa":
        config = LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    else:
        config = tiny_config(model_type)
    model = AutoModel.from_config(config)
    towers = tower_dims(config)
    assert sum(d.total_params for d in towers.values()) == sum(p.numel() for p in model.parameters())
    # the linear projections inside the layers (what int8 frozen weights quantize) are counted too
    in_layers = [
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and re.search(r"(^|\.)layers?\.\d+\.", name)
    ]
    assert in_layers and sum(d.linear_weights for d in towers.values()) == sum(in_layers)
    # the dict of the saved config.json gives the same numbers as the config object
    assert tower_dims(json.loads(config.to_json_string())) == towers
    if model_type == "llama-gqa":
        (dims,) = towers.values()
        assert dims.kv == 8 and dims.gated_ffn


def test_clip_has_two_towers_and_no_single_tower_cost_yet() -> None:
    towers = tower_dims(_vision_configs()["clip"])
    assert set(towers) == {"text", "vision"}
    assert towers["vision"].hidden == 48 and towers["vision"].max_positions == 17  # 16 patches + class
    assert towers["text"].vocab == 100 and towers["vision"].vocab == 0
    with pytest.raises(ConfigError, match="2 towers"):
        model_dims(_vision_configs()["clip"])


def test_bert_formula_refuses_other_layouts() -> None:
    with pytest.raises(ConfigError, match=r"families\.model_dims"):
        ModelDims.from_hf_config({"model_type": "llama", "hidden_size": 8})


# --- the torch engine on a tiny model of every text family --------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {t: make_tiny_model(root / t, t) for t in TINY_FAMILIES}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_folder(tmp_path_factory.mktemp("families-data") / "data", per_class_train=20)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
@pytest.mark.parametrize("kind", ["lora", "adapter", "prompt"])
def test_every_kind_trains_on_every_text_family(
    tiny_models: dict[str, Path], data: Path, model_type: str, kind: str
) -> None:
    from edge_runtime.engines.torch_engine import TorchEngine

    model = tiny_models[model_type]
    family = family_of_dir(model)
    assert family.name == FAMILY_OF_TYPE[model_type]
    spec: Any = {
        "lora": LoraSpec(rank=4, target_modules=lora_targets_for(str(model), ("attention",))),
        "adapter": AdapterSpec(bottleneck=4),
        "prompt": PromptSpec(length=4),
    }[kind]
    cfg = TrainConfig(peft=spec, model=str(model), num_labels=3, seq_len=16, batch_size=8, lr=1e-2)
    engine = TorchEngine(cfg, seed=0)
    frozen = {
        n: p.detach().clone() for n, p in engine.model.encoder.named_parameters() if not p.requires_grad
    }
    before = engine.trainable_state()
    dims = model_dims(json.loads((model / "config.json").read_text()))
    # the cost model's count is the engine's: the frozen model, and the module with its head
    assert engine.total_params == dims.total_params + sum(v.size for v in before.values())
    assert sum(v.size for v in before.values()) == spec.trainable_params(dims.hidden, dims.layers, 3)
    train, _ = load_folder(data)
    engine.train(train, epochs=1, seed=0)
    after = engine.trainable_state()
    assert all(not np.array_equal(before[n], after[n]) for n in before), "every module tensor moves"
    assert all(
        torch_equal(p, frozen[n]) for n, p in engine.model.encoder.named_parameters() if n in frozen
    ), "the base model stays frozen"


def torch_equal(a: Any, b: Any) -> bool:
    """Whether two tensors hold the same values."""
    return bool((a == b).all())


def test_the_decoder_reads_the_last_real_token(tiny_models: dict[str, Path]) -> None:
    import torch

    from edge_runtime.engines.torch_engine import TorchEngine

    cfg = TrainConfig(peft=LoraSpec(rank=2, target_modules=("q_proj",)), model=str(tiny_models["llama"]))
    engine = TorchEngine(cfg, seed=0)
    assert engine.model.pooling == "last_token"
    ids = torch.tensor([[101, 2000, 2001, 102, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        padded = engine.model.features(ids, mask)
        plain = engine.model.features(ids[:, :4], mask[:, :4])
        hidden = engine.model.encoder(input_ids=ids[:, :4], attention_mask=mask[:, :4]).last_hidden_state
    # right padding changes nothing (a causal model's last real token never sees the pads) ...
    assert torch.allclose(padded, plain, atol=1e-5)
    # ... and the feature is that token's normalised hidden state
    assert torch.allclose(plain[0], torch.nn.functional.normalize(hidden[0, 3], dim=-1), atol=1e-5)


def test_tasks_a_family_does_not_train_are_refused_with_the_reason(tmp_path: Path) -> None:
    from transformers import AutoModel

    from edge_runtime.engines.torch_engine import TorchEngine

    clip = tmp_path / "clip"
    AutoModel.from_config(_vision_configs()["clip"]).save_pretrained(clip)
    with pytest.raises(
        ConfigError,
        match=r"is a clip model: it does not train classification \(it trains image-text matching\)",
    ):
        TorchEngine(TrainConfig(model=str(clip)))
    unknown = tmp_path / "gpt2"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ConfigError, match=r"'gpt2' is not supported; supported families: bert"):
        TorchEngine(TrainConfig(model=str(unknown)))


# --- a 2-client, 1-round federation per text family ---------------------------------------------


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_two_clients_one_round_for_every_text_family(
    tiny_models: dict[str, Path], data: Path, model_type: str
) -> None:
    model = tiny_models[model_type]
    config = SimulationConfig(
        data=str(data),
        model=str(model),
        clients=2,
        rounds=1,
        partition="iid",
        samples_per_client=20,
        test_samples=30,
        seq_len=16,
        bits=8,
        workers=1,
        round_timeout_s=60.0,
        lr=1e-2,
    )
    report = Simulation(config).run()
    validate_report(report)
    assert report["rejected"] == []
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["rounds"][1]["participants"] == 2
    assert all(c["updates_accepted"] == c["updates_sent"] >= 1 for c in report["clients"])
    # LoRA went on the family's own attention projections, and the global module moved
    assert report["config"]["lora_targets"] == list(family_of_dir(model).attention_modules)
    assert report["rounds"][1]["loss"] != report["rounds"][0]["loss"]


# --- the allocator and a 7B decoder (cost model only: no weights are built) ---------------------


def _llama_7b() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )


def _device(ram_gb: float) -> DeviceProfile:
    return DeviceProfile(name=f"ram-{ram_gb:g}gb", ram_mb=ram_gb * 1024, cores=8, gflops=200.0)


def test_a_7b_decoder_is_refused_on_2gb_and_gets_small_rank_lora_where_it_fits() -> None:
    config = _llama_7b()
    dims = model_dims(config)
    assert 6.5e9 < dims.total_params < 6.8e9  # LLaMA-2-7B without its LM head
    targets = family_of(config).lora_targets
    base = TrainConfig(peft=LoraSpec(rank=8, target_modules=targets), num_labels=2, seq_len=128)
    allocator = build_allocator("utility", base, dims)
    assert allocator is not None
    with pytest.raises(NoFeasibleConfig, match=r"memory cap 1536 MiB .* below the smallest candidate's"):
        allocator.assign(base, _device(2), num_samples=100)
    # fp32 frozen weights alone are 25 GiB: a 24 GB device is refused as well
    assert dims.total_params * 4 / 2**20 > memory_cap_mb(_device(24), allocator.config)
    with pytest.raises(NoFeasibleConfig):
        allocator.assign(base, _device(24), num_samples=100)
    cfg, chosen = allocator.assign(base, _device(64), num_samples=100)
    assert isinstance(cfg.peft, LoraSpec) and cfg.peft.target_modules == ("q_proj", "v_proj")
    assert cfg.peft.rank <= 16  # the grid's ranks are 2 to 16
    assert dims.total_params * 4 / 2**20 < chosen.cost.memory_mb <= chosen.mem_cap_mb
    # the module is a sliver of the model: under 0.2% of its parameters
    assert chosen.cost.trainable_params < 0.002 * dims.total_params
