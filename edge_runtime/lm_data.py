"""Causal language modelling data: texts without labels in ``train.jsonl``/``test.jsonl``.

One text a line, ``{"text": "..."}``; any other key is ignored except ``label``, which makes the
file a classification file. A decoder learns to predict each next token of its texts.

A folder is read as causal-LM data when the first record of its ``train.jsonl`` (else of its
``test.jsonl``) is a JSON object with ``text`` and without ``label``. Loading is strict: a record
without ``text``, an empty text, a record that has a ``label`` after all, and a file without any
text raise :class:`DataFormatError` naming the file, the 1-based line and the fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from edge_runtime.errors import ConfigError, DataFormatError
from edge_runtime.jsonl import first_record, json_objects, text_field
from edge_runtime.labels import OneClass

LM_TASK = "causal-lm"
LM_SPLITS = ("train", "test")


@dataclass(frozen=True, eq=False)
class LMDataset(OneClass):
    """Texts a decoder learns to continue; every row carries the one pseudo-class ``text``."""

    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(self.texts))
        if not all(isinstance(t, str) for t in self.texts):
            raise ConfigError("LMDataset.texts must be strings")

    PSEUDO_CLASS: ClassVar[str] = "text"

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LMDataset:
        """The texts at ``indices``, in that order."""
        return LMDataset(tuple(self.texts[int(i)] for i in np.asarray(indices, dtype=np.int64).reshape(-1)))

    @property
    def task(self) -> str:
        """The task this data trains: ``causal-lm``."""
        return LM_TASK


def read_lm_file(path: str | Path) -> LMDataset:
    """Every text of one JSON-lines file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    texts: list[str] = []
    for n, obj in json_objects(path, "'text'"):
        text = text_field(obj, "text", path, n)
        if "label" in obj:
            raise DataFormatError(
                path,
                "a causal-LM file has no 'label' (its first record has none); "
                "a labelled file needs a label on every line",
                n,
            )
        texts.append(text)
    if not texts:
        raise DataFormatError(path, "the file holds no texts")
    return LMDataset(tuple(texts))


def is_lm_record(obj: object) -> bool:
    """Whether a first record says causal-LM texts: an object with ``text`` and no ``label``
    (nor ``image``, which makes it an image-text pair)."""
    return isinstance(obj, dict) and "text" in obj and "label" not in obj and "image" not in obj


def is_lm_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds causal-LM texts (its first ``train.jsonl`` record, else ``test.jsonl``'s)."""
    for split in LM_SPLITS:
        path = Path(folder) / f"{split}.jsonl"
        if path.is_file():
            return is_lm_record(first_record(path))
    return False


def load_lm_split(folder: str | Path, split: str, *, limit: int | None = None, seed: int = 0) -> LMDataset:
    """One split (``{split}.jsonl``); with ``limit``, a seeded random sample of that many texts."""
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1
    ):
        raise ConfigError(f"limit must be a positive integer or None; got {limit!r}")
    if not split or any(sep in split for sep in ("/", "\\")):
        raise ConfigError(f"split must be a plain name such as 'train'; got {split!r}")
    path = Path(folder) / f"{split}.jsonl"
    if not path.is_file():
        raise DataFormatError(folder, f"no {split}.jsonl in this causal-LM folder")
    data = read_lm_file(path)
    if limit is None or limit >= len(data):
        return data
    return data.subset(np.sort(np.random.default_rng(seed).choice(len(data), size=limit, replace=False)))


def load_lm_folder(
    folder: str | Path, *, train_limit: int | None = None, test_limit: int | None = None, seed: int = 0
) -> tuple[LMDataset, LMDataset]:
    """The train and test splits of a causal-LM folder (seeds: seed for train, seed + 1 for test)."""
    return (
        load_lm_split(folder, "train", limit=train_limit, seed=seed),
        load_lm_split(folder, "test", limit=test_limit, seed=seed + 1),
    )
