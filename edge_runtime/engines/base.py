"""The one interface every training engine implements; nothing outside an engine knows which runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edge_runtime.data import Dataset, TextDataset
from edge_runtime.errors import ConfigError

ProgressFn = Callable[[int, int], None]
"""Called with (steps done, steps total) during training."""


EVAL_BATCH = 16
"""Rows of one evaluation (or feature) pass: on all-MiniLM-L6-v2 at 128 tokens, 500 test posts took
0.68x (torch) and 0.60x (ORT) the time of passes of 64, with the same predictions
(``bench/micro_batch.py --only-eval``; bench/results/micro_batch/real-texts.json)."""


@dataclass(frozen=True)
class TrainResult:
    """What one call to :meth:`TrainingEngine.train` did."""

    steps: int
    samples: int
    loss: float
    accuracy: float
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Accuracy, macro F1 and mean loss of the current module on a dataset.

    For ``task == "question-answering"`` the two figures are SQuAD's: ``accuracy`` is the exact
    match and ``macro_f1`` the mean token F1 (both fractions), and ``predictions`` holds the
    predicted answer texts; ``loss`` is the mean of the start and end cross-entropies.

    For ``image-text-matching``, ``accuracy`` is the mean of recall@1 text->image and
    image->text, ``macro_f1`` the mean of their recall@5, and ``loss`` the symmetric InfoNCE
    over the whole split as one batch; ``extra`` holds the four recalls by name. For
    ``causal-lm``, ``accuracy`` is next-token accuracy, ``macro_f1`` the macro F1 of next-token
    predictions over the token ids that occur, ``loss`` the mean next-token cross-entropy, and
    ``extra`` holds ``perplexity`` (exp of that loss) and the token count.
    """

    accuracy: float
    macro_f1: float
    loss: float
    predictions: np.ndarray
    task: str = "classification"
    extra: Mapping[str, float] = field(default_factory=dict)


class TrainingEngine(Protocol):
    """Trains and evaluates one PEFT module on one frozen base model."""

    name: str

    @property
    def total_params(self) -> int:
        """Parameters of the whole model, frozen ones included."""
        ...

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The trainable parameters by canonical name, as float32 arrays (copies)."""
        ...

    def load_trainable_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the trainable parameters; names and shapes must match exactly."""
        ...

    def train(
        self, data: Dataset, *, epochs: int, seed: int, progress: ProgressFn | None = None
    ) -> TrainResult:
        """Train the module in place for ``epochs`` passes over ``data``."""
        ...

    def evaluate(self, data: Dataset, *, batch_size: int = EVAL_BATCH) -> EvalResult:
        """Evaluate the current module on ``data``."""
        ...

    def class_feature_sums(self, data: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """Per-class sums of the frozen model's pooled features, and per-class counts."""
        ...


ORT_IMAGE_REFUSAL = (
    "the ONNX Runtime engines (ort, ort-plain) train text classification only; "
    "image classification trains with --engine torch"
)


ORT_REFUSED_TASKS = {
    "question-answering": "question answering",
    "image-text-matching": "image-text matching",
    "causal-lm": "causal-LM fine-tuning",
}
"""The tasks the ONNX Runtime engines do not train, and their names in refusals."""


def refuse_classless_task(task: str) -> None:
    """Raise :class:`ConfigError` naming ``--engine torch`` if ``task`` is one the ONNX Runtime
    engines do not train (their graphs are a classifier's: token ids in, class logits out)."""
    if task in ORT_REFUSED_TASKS:
        raise ConfigError(
            "the ONNX Runtime engines (ort, ort-plain) train classification only; "
            f"{ORT_REFUSED_TASKS[task]} trains with --engine torch"
        )


def refuse_image_model(model: str) -> None:
    """Raise :class:`ConfigError` naming ``--engine torch`` if ``model`` is a local folder of an
    image model (the ONNX Runtime engines' graphs take token ids)."""
    from pathlib import Path

    from edge_runtime.families import family_of_dir
    from edge_runtime.models import resolve_model

    try:
        path = Path(resolve_model(model))
    except ConfigError:
        return  # the engine's own loading reports a model it cannot find
    # CLIP trains image-text matching only, but its graph takes pixels too
    if path.is_dir() and {"image-classification", "image-text-matching"} & set(family_of_dir(path).trains):
        raise ConfigError(f"{ORT_IMAGE_REFUSAL} (model {model!r} is an image model)")


def require_text(data: Dataset) -> TextDataset:
    """``data`` if it holds texts for classification; images and questions raise
    :class:`ConfigError` naming ``--engine torch`` (the ONNX Runtime engines train classifiers
    whose graphs take token ids)."""
    if data.task in ORT_REFUSED_TASKS:
        raise ConfigError(
            "the ONNX Runtime engines (ort, ort-plain) train classification only; "
            f"{ORT_REFUSED_TASKS[data.task]} trains with --engine torch"
        )
    if not isinstance(data, TextDataset):
        raise ConfigError(ORT_IMAGE_REFUSAL)
    return data


def macro_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    """Macro-averaged F1 over the classes present in labels or predictions."""
    scores = []
    for c in range(num_classes):
        tp = int(np.sum((predictions == c) & (labels == c)))
        fp = int(np.sum((predictions == c) & (labels != c)))
        fn = int(np.sum((predictions != c) & (labels == c)))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


def micro_batches(rows: np.ndarray, size: int, lengths: list[int] | None = None) -> list[np.ndarray]:
    """Split a batch's ``rows`` into micro-batches of at most ``size`` rows.

    With ``lengths`` (the tokens of each of ``rows``), the rows are sorted by length first
    (stable), so each micro-batch pads only to its own longest text: on 20 Newsgroups at 128 tokens
    that leaves 0.84x the padded tokens of whole random batches of 32. A loss that is a mean over
    rows stays the batch's mean when each micro-batch's mean is weighted by its share of the rows
    (:func:`row_shares`), so the summed gradients are the whole batch's.
    """
    if size < 1:
        raise ConfigError(f"a micro-batch needs at least one row, got {size}")
    rows = np.asarray(rows)
    if lengths is not None and len(rows) > size:
        if len(lengths) != len(rows):
            raise ConfigError(f"{len(lengths)} lengths for {len(rows)} rows")
        rows = rows[np.argsort(lengths, kind="stable")]
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def row_shares(chunks: list[np.ndarray]) -> list[float]:
    """Each micro-batch's share of the batch's rows: the weight of its mean loss."""
    total = sum(len(c) for c in chunks)
    return [len(c) / total for c in chunks]
