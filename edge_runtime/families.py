"""The model-family registry: what FedPEFT+ needs to know about each architecture it fine-tunes.

A family names the ``model_type`` values of Hugging Face configurations it covers, and says for
that architecture:

- which linear modules LoRA targets by default (``lora_targets``, the query and value
  projections) and every attention projection (``attention_modules``, the ``attention`` keyword of
  ``--lora-targets``);
- where bottleneck adapters go (``adapter_sites``: a pattern over module names that matches the
  attention block's and the feed-forward block's output projections, group 1 the layer index);
- how a soft prompt is prepended (``prompt_site``: before the input embeddings);
- how a classification head reads features (``pooling``): ``mean`` over real tokens for encoders,
  ``last_token`` (the last non-pad token) for decoders, ``cls`` for ViT, ``projection`` (the
  towers' projections) for CLIP;
- the shape numbers of each tower for the cost model (:class:`~edge_runtime.peft_specs.ModelDims`).

The torch engine trains text classification (BERT, DistilBERT, LLaMA families), extractive
question answering (BERT and DistilBERT families), image classification (ViT), causal-LM
fine-tuning (LLaMA family) and image-text matching (CLIP, both towers) (``trains``).

This module reads plain dicts (a ``config.json``) or transformers config objects (through their
``to_dict``) and imports neither torch nor transformers, so the edge install keeps it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import ConfigError
from edge_runtime.models import resolve_model
from edge_runtime.peft_specs import ModelDims

POOLINGS = ("mean", "last_token", "cls", "projection")
PROMPT_SITES = ("input_embeddings", "patch_embeddings")
TASKS = ("classification", "causal-lm", "image-classification", "image-text-matching", "question-answering")
ATTENTION_KEYWORD = "attention"  # --lora-targets attention: every attention projection of the family
DEFAULT_KEYWORD = "default"  # --lora-targets default: the family's query and value projections

ShapeFn = Callable[[Mapping[str, Any]], dict[str, ModelDims]]


@dataclass(frozen=True)
class ModelFamily:
    """One architecture: its configs' ``model_type`` values and where each PEFT kind attaches."""

    name: str
    model_types: tuple[str, ...] = field(metadata={"help": "config.json model_type values it covers"})
    lora_targets: tuple[str, ...] = field(metadata={"help": "default LoRA modules (query and value)"})
    attention_modules: tuple[str, ...] = field(metadata={"help": "every attention projection"})
    adapter_sites: str = field(
        metadata={"help": "regex over module names: output projections adapters follow; group 1: layer"}
    )
    prompt_site: str = field(metadata={"help": "where soft prompts are prepended"})
    pooling: str = field(metadata={"help": "how a classification head reads features"})
    tasks: tuple[str, ...] = field(metadata={"help": "task heads the architecture supports"})
    trains: tuple[str, ...] = field(metadata={"help": "tasks the torch engine trains today"})
    shapes: ShapeFn = field(repr=False, compare=False, metadata={"help": "config dict -> dims per tower"})

    def __post_init__(self) -> None:
        if not self.name or not self.model_types:
            raise ConfigError("a model family needs a name and at least one model_type")
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"ModelFamily.pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}"
            )
        if self.prompt_site not in PROMPT_SITES:
            raise ConfigError(
                f"ModelFamily.prompt_site must be one of {', '.join(PROMPT_SITES)}, got {self.prompt_site!r}"
            )
        unknown = [t for t in (*self.tasks, *self.trains) if t not in TASKS]
        if unknown or not set(self.trains) <= set(self.tasks):
            raise ConfigError(f"ModelFamily {self.name!r}: bad tasks {unknown or list(self.trains)}")
        re.compile(self.adapter_sites)

    def adapter_site(self, module_name: str) -> int | None:
        """The layer index if ``module_name`` is a projection an adapter follows, else None."""
        match = re.search(self.adapter_sites, module_name)
        return int(match.group(1)) if match else None

    def lora_modules(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """``names`` with the keywords ``attention`` and ``default`` replaced by this family's modules."""
        if names == (ATTENTION_KEYWORD,):
            return self.attention_modules
        if names == (DEFAULT_KEYWORD,):
            return self.lora_targets
        if ATTENTION_KEYWORD in names or DEFAULT_KEYWORD in names:
            raise ConfigError(f"--lora-targets {ATTENTION_KEYWORD!r} or {DEFAULT_KEYWORD!r} stand alone")
        return names


def _config_dict(config: Any) -> dict[str, Any]:
    """A config.json dict from a dict or a transformers config object."""
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        data = to_dict()
        if isinstance(data, dict):
            return data
    raise ConfigError(f"not a model configuration: {type(config).__name__}")


def _get(config: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = config.get(name, default)
    if value is None:
        raise ConfigError(f"the model configuration has no {name!r}")
    return int(value)


def _layer_params(hidden: int, inter: int) -> int:
    """One BERT-layout layer: Q, K, V and output with biases, a two-matrix FFN, two LayerNorms."""
    return 4 * (hidden * hidden + hidden) + (2 * hidden * inter + inter + hidden) + 4 * hidden


def _bert_shapes(config: Mapping[str, Any]) -> dict[str, ModelDims]:
    return {"text": ModelDims.from_hf_config(config)}


def _distilbert_shapes(config: Mapping[str, Any]) -> dict[str, ModelDims]:
    # DistilBERT's config.json says dim, hidden_dim, n_layers and n_heads
    hidden, inter = _get(config, "dim"), _get(config, "hidden_dim")
    layers, vocab = _get(config, "n_layers"), _get(config, "vocab_size")
    positions = _get(config, "max_position_embeddings")
    embeddings = (vocab + positions) * hidden + 2 * hidden  # no token types; one LayerNorm
    return {
        "text": ModelDims(
            hidden=hidden,
            layers=layers,
            intermediate=inter,
            vocab=vocab,
            heads=_get(config, "n_heads"),
            total_params=embeddings + layers * _layer_params(hidden, inter),  # no pooler
            max_positions=positions,
        )
    }


def _llama_shapes(config: Mapping[str, Any]) -> dict[str, ModelDims]:
    hidden, inter = _get(config, "hidden_size"), _get(config, "intermediate_size")
    layers, vocab = _get(config, "num_hidden_layers"), _get(config, "vocab_size")
    heads = _get(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads", heads)
    head_dim = _get(config, "head_dim", hidden // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = hidden * q + 2 * hidden * kv + q * hidden
    if config.get("attention_bias"):
        attention += q + 2 * kv + hidden
    mlp = 3 * hidden * inter + (2 * inter + hidden if config.get("mlp_bias") else 0)
    # the decoder as AutoModel loads it: embeddings, blocks with two RMSNorms, the final RMSNorm;
    # no LM head (classification reads the last token's hidden state)
    total = vocab * hidden + layers * (attention + mlp + 2 * hidden) + hidden
    return {
        "text": ModelDims(
            hidden=hidden,
            layers=layers,
            intermediate=inter,
            vocab=vocab,
            heads=heads,
            total_params=total,
            max_positions=_get(config, "max_position_embeddings"),
            kv_hidden=kv,
            gated_ffn=True,
        )
    }


def _vit_tower(config: Mapping[str, Any], *, clip: bool) -> ModelDims:
    hidden, inter = _get(config, "hidden_size"), _get(config, "intermediate_size")
    layers = _get(config, "num_hidden_layers")
    channels, patch = _get(config, "num_channels", 3), _get(config, "patch_size")
    positions = (_get(config, "image_size") // patch) ** 2 + 1  # the patches and the class token
    if clip:  # class embedding, patch conv without bias, positions, pre- and post-LayerNorm
        embeddings = hidden + channels * patch * patch * hidden + positions * hidden + 4 * hidden
    else:  # CLS token, patch conv with bias, positions; final LayerNorm and the pooler
        embeddings = hidden + channels * patch * patch * hidden + hidden + positions * hidden
        embeddings += 2 * hidden + hidden * hidden + hidden
    return ModelDims(
        hidden=hidden,
        layers=layers,
        intermediate=inter,
        vocab=0,
        heads=_get(config, "num_attention_heads"),
        total_params=embeddings + layers * _layer_params(hidden, inter),
        max_positions=positions,
    )


def _vit_shapes(config: Mapping[str, Any]) -> dict[str, ModelDims]:
    return {"vision": _vit_tower(config, clip=False)}


def _clip_shapes(config: Mapping[str, Any]) -> dict[str, ModelDims]:
    text_cfg = config.get("text_config") or {}
    vision_cfg = config.get("vision_config") or {}
    if not isinstance(text_cfg, Mapping) or not isinstance(vision_cfg, Mapping):
        raise ConfigError("a CLIP configuration needs text_config and vision_config")
    projection = _get(config, "projection_dim", 512)
    hidden, inter = _get(text_cfg, "hidden_size", 512), _get(text_cfg, "intermediate_size", 2048)
    layers, vocab = _get(text_cfg, "num_hidden_layers", 12), _get(text_cfg, "vocab_size", 49408)
    positions = _get(text_cfg, "max_position_embeddings", 77)
    # token and position embeddings, the blocks, the final LayerNorm, the text projection and the
    # logit scale (counted with the text tower)
    text_total = (vocab + positions) * hidden + layers * _layer_params(hidden, inter) + 2 * hidden
    text = ModelDims(
        hidden=hidden,
        layers=layers,
        intermediate=inter,
        vocab=vocab,
        heads=_get(text_cfg, "num_attention_heads", 8),
        total_params=text_total + hidden * projection + 1,
        max_positions=positions,
    )
    vision_defaults = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
    vision_defaults |= {"num_attention_heads": 12, "image_size": 224, "patch_size": 32}
    tower = _vit_tower({**vision_defaults, **vision_cfg}, clip=True)
    vision = ModelDims(
        hidden=tower.hidden,
        layers=tower.layers,
        intermediate=tower.intermediate,
        vocab=0,
        heads=tower.heads,
        total_params=tower.total_params + tower.hidden * projection,
        max_positions=tower.max_positions,
    )
    return {"text": text, "vision": vision}


# BERT-layout blocks: the attention block's output.dense and the feed-forward block's output.dense
_BERT_SITES = r"(?:^|\.)layer\.(\d+)\.(?:attention\.output|output)\.dense$"

FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family; its name and its model_type values must be new."""
    if family.name in FAMILIES:
        raise ConfigError(f"model family {family.name!r} is already registered")
    taken = {t for f in FAMILIES.values() for t in f.model_types} & set(family.model_types)
    if taken:
        raise ConfigError(f"model_type {sorted(taken)} already belongs to another family")
    FAMILIES[family.name] = family
    return family


register_family(
    ModelFamily(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta"),
        lora_targets=("query", "value"),
        attention_modules=("query", "key", "value", "attention.output.dense"),
        adapter_sites=_BERT_SITES,
        prompt_site="input_embeddings",
        pooling="mean",
        tasks=("classification", "question-answering"),
        trains=("classification", "question-answering"),
        shapes=_bert_shapes,
    )
)
register_family(
    ModelFamily(
        name="distilbert",
        model_types=("distilbert",),
        lora_targets=("q_lin", "v_lin"),
        attention_modules=("q_lin", "k_lin", "v_lin", "out_lin"),
        adapter_sites=r"(?:^|\.)layer\.(\d+)\.(?:attention\.out_lin|ffn\.lin2)$",
        prompt_site="input_embeddings",
        pooling="mean",
        tasks=("classification", "question-answering"),
        trains=("classification", "question-answering"),
        shapes=_distilbert_shapes,
    )
)
register_family(
    ModelFamily(
        name="llama",
        model_types=("llama", "mistral"),
        lora_targets=("q_proj", "v_proj"),
        attention_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        adapter_sites=r"(?:^|\.)layers\.(\d+)\.(?:self_attn\.o_proj|mlp\.down_proj)$",
        prompt_site="input_embeddings",
        pooling="last_token",
        tasks=("classification", "causal-lm"),
        trains=("classification", "causal-lm"),
        shapes=_llama_shapes,
    )
)
register_family(
    ModelFamily(
        name="vit",
        model_types=("vit",),
        lora_targets=("query", "value"),
        attention_modules=("query", "key", "value", "attention.output.dense"),
        adapter_sites=_BERT_SITES,
        prompt_site="patch_embeddings",
        pooling="cls",
        tasks=("image-classification",),
        trains=("image-classification",),
        shapes=_vit_shapes,
    )
)
register_family(
    ModelFamily(
        name="clip",
        model_types=("clip",),
        lora_targets=("q_proj", "v_proj"),
        attention_modules=("q_proj", "k_proj", "v_proj", "out_proj"),
        adapter_sites=r"(?:^|\.)layers\.(\d+)\.(?:self_attn\.out_proj|mlp\.fc2)$",
        prompt_site="input_embeddings",  # the text tower's; the vision tower would take patches
        pooling="projection",
        tasks=("image-text-matching", "image-classification"),
        trains=("image-text-matching",),
        shapes=_clip_shapes,
    )
)


def supported() -> str:
    """The registered families and their model_type values, for error messages."""
    return "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES.values())


def family_of(config: Any) -> ModelFamily:
    """The family of a transformers config object or a ``config.json`` dict, by its model_type."""
    model_type = _config_dict(config).get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise ConfigError(f"model type {model_type!r} is not supported; supported families: {supported()}")


TRAINED_TASKS = ("classification", "image-classification")
"""The classification tasks the torch engine trains: of texts and of images."""

QA_TASK = "question-answering"
QA_FAMILIES = "BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa, DistilBERT)"
ITM_TASK = "image-text-matching"
LM_TASK = "causal-lm"
CLASSLESS_TASKS = (QA_TASK, ITM_TASK, LM_TASK)
"""Tasks without classes: no class-mean head, no label prior, no label skew, no distillation."""
TASK_NAMES = {
    QA_TASK: "question answering",
    ITM_TASK: "image-text matching",
    LM_TASK: "causal-LM fine-tuning",
}
TASK_FIGURES = {
    ITM_TASK: (
        "text_to_image_recall@1",
        "image_to_text_recall@1",
        "text_to_image_recall@5",
        "image_to_text_recall@5",
        "mean_recall@1",
        "mean_recall@5",
    ),
    LM_TASK: ("next_token_accuracy", "perplexity"),
}
"""The figures a task reports by name beside ``accuracy`` and ``macro_f1``
(:attr:`~edge_runtime.engines.base.EvalResult.extra`)."""
TASK_FAMILIES = {
    QA_TASK: QA_FAMILIES,
    ITM_TASK: "CLIP models (both towers)",
    LM_TASK: "LLaMA-style decoders (LLaMA, Mistral)",
}


def trained_task(family: ModelFamily, model: str = "") -> str:
    """The classification task a model of ``family`` trains (``classification`` or
    ``image-classification``); a family that trains neither is refused with the reason."""
    for task in TRAINED_TASKS:
        if task in family.trains:
            return task
    what = f"model {model!r} is a {family.name} model" if model else f"a {family.name} model"
    trains = ", ".join(TASK_NAMES.get(t, t) for t in family.trains)
    raise ConfigError(
        f"{what}: it does not train classification (it trains {trains}); text classification "
        "trains BERT, RoBERTa, DistilBERT and LLaMA-style models, image classification trains ViT"
    )


def engine_task(family: ModelFamily, config_task: str, model: str = "") -> str:
    """The task the torch engine trains for a model of ``family`` under ``TrainConfig.task``:
    the family's classification task, or a classless task where the family trains it."""
    if config_task not in CLASSLESS_TASKS:
        return trained_task(family, model)
    if config_task in family.trains:
        return config_task
    what = f"model {model!r} is a {family.name} model" if model else f"a {family.name} model"
    raise ConfigError(
        f"{what}: {TASK_NAMES[config_task]} trains {TASK_FAMILIES[config_task]} on the torch "
        f"engine, not {family.name} (its tasks: {', '.join(family.tasks)})"
    )


def check_data_task(family: ModelFamily, data_task: str, model: str = "") -> None:
    """Raise :class:`ConfigError` unless a model of ``family`` trains the task of the data
    (``classification`` for texts, ``image-classification`` for images, or a classless task)."""
    what = f"model {model!r}" if model else "the model"
    if data_task in CLASSLESS_TASKS:
        if data_task in family.trains:
            return
        raise ConfigError(
            f"the data folder holds {TASK_NAMES[data_task]} data, but {what} is a {family.name} "
            f"model: {TASK_NAMES[data_task]} trains {TASK_FAMILIES[data_task]}"
        )
    task = trained_task(family, model)
    if task == data_task:
        return
    if data_task == "image-classification":
        raise ConfigError(
            f"the data folder holds images, but {what} is a {family.name} model for text "
            "classification: give a ViT model folder with --model"
        )
    raise ConfigError(
        f"the data folder holds texts, but {what} is a {family.name} model for image "
        "classification: give an image data folder (train/<class>/*.png, test/<class>/*.png)"
    )


def family_named(name: str) -> ModelFamily:
    """A family by its registry name."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; supported families: {supported()}")
    return FAMILIES[name]


def tower_dims(config: Any) -> dict[str, ModelDims]:
    """The cost model's shape numbers of every tower (``text``, ``vision``) of a model's config."""
    data = _config_dict(config)
    return family_of(data).shapes(data)


def model_dims(config: Any) -> ModelDims:
    """The shape numbers of a one-tower model (the cost model sizes one tower at a time)."""
    towers = tower_dims(config)
    if len(towers) != 1:
        raise ConfigError(
            f"a {family_of(config).name} model has {len(towers)} towers ({', '.join(towers)}); "
            "its training cost is not modelled yet"
        )
    return next(iter(towers.values()))


def read_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a local model folder, without importing transformers."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the model configuration {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def family_of_dir(folder: str | Path) -> ModelFamily:
    """The family of a local model folder."""
    return family_of(read_config(folder))


def dims_of_dir(folder: str | Path) -> ModelDims:
    """The cost model's shape numbers of a local one-tower model folder."""
    return model_dims(read_config(folder))


def lora_targets_for(name_or_path: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """LoRA target names for a model: the keywords ``attention`` (every attention projection) and
    ``default`` (query and value) become the model family's module names; other names stay."""
    if ATTENTION_KEYWORD not in names and DEFAULT_KEYWORD not in names:
        return names
    path = Path(resolve_model(name_or_path))
    if not path.is_dir():
        raise ConfigError(
            f"--lora-targets {','.join(names)} needs the model's config.json to know its family; "
            f"{name_or_path!r} is not a local folder: name the modules (e.g. query,value)"
        )
    return family_of_dir(path).lora_modules(names)
