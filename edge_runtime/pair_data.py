"""Image-text matching data: pairs of an image file and its caption in ``train.jsonl``/``test.jsonl``.

One pair a line::

    {"image": "images/cat-01.png", "text": "a grey cat asleep on a red chair"}

``image`` is a path relative to the data folder (the folder holding the JSON-lines file), to a
file :func:`~edge_runtime.image_data.read_image` reads (PNG, JPEG and the other Pillow formats,
or a uint8 ``.npy``); it may not be absolute or lead out of the folder. ``text`` is the caption.
Pairs have no classes: each pair's own image is the match of its own caption and every other image
in the batch (in training) or in the split (in evaluation) is a non-match.

A folder is read as image-text pairs when the first record of its ``train.jsonl`` (else of its
``test.jsonl``) is a JSON object with ``image`` and ``text`` keys. Loading is strict: a record
without one of the keys, an empty caption, an image that is missing or not readable, and a file
without any pair raise :class:`DataFormatError` naming the JSON-lines file, the 1-based line and
the fault. Images are read when the split loads (they keep their own size; the engine resizes).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from edge_runtime.errors import ConfigError, DataFormatError
from edge_runtime.image_data import read_image
from edge_runtime.jsonl import first_record, json_objects, text_field
from edge_runtime.labels import OneClass

ITM_TASK = "image-text-matching"
PAIR_SPLITS = ("train", "test")


@dataclass(frozen=True, eq=False)
class PairDataset(OneClass):
    """Images (``height x width x 3`` uint8 RGB) and their captions, pair ``i`` matching ``i``.

    As with question answering, every row carries the one pseudo-class ``pair`` (label 0), so the
    label-based parts of a run (the iid partition, the hello's histogram) see a consistent shape.
    """

    images: tuple[np.ndarray, ...]
    texts: tuple[str, ...]
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "paths", tuple(self.paths) or tuple("" for _ in self.images))
        if not (len(self.images) == len(self.texts) == len(self.paths)):
            raise ConfigError(
                f"PairDataset has {len(self.images)} images, {len(self.texts)} texts and "
                f"{len(self.paths)} paths; they must be as many"
            )
        for i, image in enumerate(self.images):
            if not (
                isinstance(image, np.ndarray)
                and image.dtype == np.uint8
                and image.ndim == 3
                and image.shape[2] == 3
            ):
                raise ConfigError(
                    f"PairDataset.images[{i}] must be a uint8 array of shape (height, width, 3)"
                )

    PSEUDO_CLASS: ClassVar[str] = "pair"

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> PairDataset:
        """The pairs at ``indices``, in that order."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        return PairDataset(
            tuple(self.images[i] for i in idx),
            tuple(self.texts[i] for i in idx),
            tuple(self.paths[i] for i in idx),
        )

    @property
    def task(self) -> str:
        """The task this data trains: ``image-text-matching``."""
        return ITM_TASK


def _image(obj: dict[str, object], root: Path, path: Path, n: int) -> tuple[np.ndarray, str]:
    """The record's image, read; its path must be relative and stay inside ``root``."""
    rel = text_field(obj, "image", path, n)
    if Path(rel).is_absolute():
        raise DataFormatError(path, f"'image' {rel!r} must be a path relative to {root}", n)
    file = root / rel
    try:
        inside = file.resolve().is_relative_to(root.resolve())
    except OSError:
        inside = False
    if not inside:
        raise DataFormatError(path, f"'image' {rel!r} leads out of the data folder {root}", n)
    if not file.is_file():
        raise DataFormatError(path, f"image {rel!r} not found (looked for {file})", n)
    try:
        return read_image(file), rel
    except DataFormatError as exc:
        raise DataFormatError(path, f"image {rel!r}: {exc.reason}", n) from None


def read_pair_file(path: str | Path) -> PairDataset:
    """Every pair of one JSON-lines file, its images read (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    root = path.parent
    images: list[np.ndarray] = []
    texts: list[str] = []
    paths: list[str] = []
    for n, obj in json_objects(path, "'image' and 'text'"):
        image, rel = _image(obj, root, path, n)
        texts.append(text_field(obj, "text", path, n))
        images.append(image)
        paths.append(rel)
    if not texts:
        raise DataFormatError(path, "the file holds no image-text pairs")
    return PairDataset(tuple(images), tuple(texts), tuple(paths))


def is_pair_record(obj: object) -> bool:
    """Whether a first record says image-text pairs: an object with ``image`` and ``text``."""
    return isinstance(obj, dict) and "image" in obj and "text" in obj


def is_pair_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds image-text pairs (its first ``train.jsonl`` record, else
    ``test.jsonl``'s, has ``image`` and ``text``)."""
    for split in PAIR_SPLITS:
        path = Path(folder) / f"{split}.jsonl"
        if path.is_file():
            return is_pair_record(first_record(path))
    return False


def _check_limit(limit: int | None, name: str) -> None:
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1
    ):
        raise ConfigError(f"{name} must be a positive integer or None; got {limit!r}")


def load_pair_split(
    folder: str | Path, split: str, *, limit: int | None = None, seed: int = 0
) -> PairDataset:
    """One split (``{split}.jsonl``); with ``limit``, a seeded random sample of that many pairs."""
    _check_limit(limit, "limit")
    if not split or any(sep in split for sep in ("/", "\\")):
        raise ConfigError(f"split must be a plain name such as 'train'; got {split!r}")
    path = Path(folder) / f"{split}.jsonl"
    if not path.is_file():
        raise DataFormatError(folder, f"no {split}.jsonl in this image-text folder")
    data = read_pair_file(path)
    if limit is None or limit >= len(data):
        return data
    return data.subset(np.sort(np.random.default_rng(seed).choice(len(data), size=limit, replace=False)))


def load_pair_folder(
    folder: str | Path, *, train_limit: int | None = None, test_limit: int | None = None, seed: int = 0
) -> tuple[PairDataset, PairDataset]:
    """The train and test splits of an image-text folder (seeds as the other loaders': seed, seed + 1)."""
    return (
        load_pair_split(folder, "train", limit=train_limit, seed=seed),
        load_pair_split(folder, "test", limit=test_limit, seed=seed + 1),
    )


def write_pair_file(path: str | Path, pairs: Sequence[tuple[str, str]]) -> Path:
    """Write ``(image path, text)`` pairs as the JSON lines :func:`read_pair_file` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for image, text in pairs:
            f.write(json.dumps({"image": image, "text": text}, ensure_ascii=False) + "\n")
    return path
