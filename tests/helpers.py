"""Shared helpers for tests: synthetic data folders and payload surgery."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

WORDS = {
    0: "goal match team score league player coach season win striker",
    1: "stock market shares profit bank earnings investor trade price fund",
    2: "rocket orbit planet nasa telescope launch moon space star galaxy",
}


def write_text_folder(
    folder: Path, *, per_class_train: int = 20, per_class_test: int = 10, seed: int = 0
) -> Path:
    """A small 3-class JSONL data folder whose classes differ by vocabulary."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.txt").write_text("sport\nfinance\nspace\n")
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for label, words in WORDS.items():
                vocab = words.split()
                for _ in range(n):
                    text = " ".join(rng.choice(vocab, size=8))
                    f.write(json.dumps({"text": text, "label": label}) + "\n")
    return folder


def rehash(payload: bytes) -> bytes:
    """Recompute the SHA-256 trailer after editing a payload's body."""
    body = payload[:-32]
    return body + hashlib.sha256(body).digest()


def with_schema_version(payload: bytes, version: int) -> bytes:
    """The same payload claiming another schema version (hash kept valid)."""
    return rehash(payload[:4] + struct.pack("<H", version) + payload[6:])


def replace_float(payload: bytes, old: float, new: float) -> bytes:
    """Replace every float32 ``old`` in the payload's body by ``new`` (hash kept valid)."""
    body = payload[:-32].replace(struct.pack("<f", old), struct.pack("<f", new))
    assert body != payload[:-32], "sentinel value not found in payload"
    return rehash(body + payload[-32:])
