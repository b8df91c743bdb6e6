"""What both data layouts share: ``labels.txt`` and class-stratified sampling."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from edge_runtime.errors import DataFormatError


def read_labels_file(folder: Path) -> tuple[str, ...] | None:
    """Class names from ``folder/labels.txt``, or None when there is no such file."""
    path = folder / "labels.txt"
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, f"not valid UTF-8 ({exc.reason})") from None
    while lines and not lines[-1].strip():  # trailing blank lines are harmless
        lines.pop()
    if not lines:
        raise DataFormatError(path, "labels.txt is empty")
    names: list[str] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(lines, start=1):
        name = raw.strip()
        # Line i names label i, so a blank line in the middle would shift every later class.
        if not name:
            raise DataFormatError(path, "blank class name (line i names label i-1)", n)
        if name in seen:
            raise DataFormatError(path, f"class name {name!r} repeats line {seen[name]}", n)
        seen[name] = n
        names.append(name)
    return tuple(names)


def stratified_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """``limit`` row indices, each class in proportion to its size, in file order."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    total = len(labels)
    # Largest-remainder apportionment in exact integers; a random tie-break keeps it unbiased.
    quota = counts * limit // total
    remainder = counts * limit % total
    rest = limit - int(quota.sum())
    order = np.lexsort((rng.random(len(classes)), -remainder))
    quota[order[:rest]] += 1
    picks = [
        rng.choice(np.flatnonzero(labels == c), size=int(q), replace=False)
        for c, q in zip(classes, quota, strict=True)
        if q > 0
    ]
    return np.sort(np.concatenate(picks))


class OneClass:
    """The label side of a task without classes (question answering, image-text pairs, causal-LM
    texts): every row carries the one pseudo-class :attr:`PSEUDO_CLASS`, so that partitions, hellos
    and reports that count labels see one. Subclasses set ``PSEUDO_CLASS`` and define ``__len__``."""

    PSEUDO_CLASS: ClassVar[str]

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def labels(self) -> np.ndarray:
        """The pseudo-label of every row: 0."""
        return np.zeros(len(self), dtype=np.int64)

    @property
    def label_names(self) -> tuple[str, ...]:
        """The one pseudo-class."""
        return (self.PSEUDO_CLASS,)

    @property
    def num_classes(self) -> int:
        """1: the pseudo-class."""
        return 1

    def label_histogram(self) -> np.ndarray:
        """Rows per pseudo-class: ``[len(self)]``."""
        return np.asarray([len(self)], dtype=np.int64)
