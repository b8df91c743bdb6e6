"""Extractive question answering data: SQuAD-style JSON lines in ``train.jsonl`` and ``test.jsonl``.

Each line of a split file is one question about one context::

    {"id": "q1", "context": "Paris is the capital of France.", "question": "What is the capital of France?",
     "answers": [{"text": "Paris", "answer_start": 0}]}

``answers`` lists one or more gold answers (SQuAD's dev set gives several); each is a span of the
context: ``context[answer_start:answer_start + len(text)] == text``. Training reads the first
answer; evaluation scores a prediction against all of them (the best exact match and F1).
Unanswerable questions (SQuAD 2.0's empty ``answers``) are not supported and are refused.

A folder is read as question answering when the first record of its ``train.jsonl`` (or, without
one, of its ``test.jsonl``) is a JSON object with ``context`` and ``question`` keys; every record
is then held to the format above. Loading is strict, as for the other layouts: a malformed record
raises :class:`DataFormatError` naming the file, the 1-based line and the fault, because a
silently skipped question would change an experiment without anyone noticing. ``labels.txt`` and
CSV files do not apply to this layout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edge_runtime.errors import ConfigError, DataFormatError
from edge_runtime.jsonl import first_record, json_objects, text_field
from edge_runtime.labels import OneClass

QA_TASK = "question-answering"
QA_SPLITS = ("train", "test")
QA_KEYS = ("id", "context", "question", "answers")


@dataclass(frozen=True)
class Answer:
    """One gold answer: its text and the character offset where it starts in the context."""

    text: str
    start: int

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text:
            raise ConfigError(f"Answer.text must be a non-empty string, got {self.text!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ConfigError(f"Answer.start must be a non-negative integer, got {self.start!r}")

    @property
    def end(self) -> int:
        """The character offset one past the answer's last character."""
        return self.start + len(self.text)


@dataclass(frozen=True, eq=False)
class QADataset(OneClass):
    """Questions about contexts, each with its gold answer spans.

    Question answering has no classes; so that the label-based parts of a run (the iid partition,
    the hello's label histogram) see a consistent shape, every row carries the one pseudo-class
    ``answer`` (label 0).
    """

    ids: tuple[str, ...]
    contexts: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[tuple[Answer, ...], ...]

    def __post_init__(self) -> None:
        for name in ("ids", "contexts", "questions", "answers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "answers", tuple(tuple(a) for a in self.answers))
        n = len(self.ids)
        if not (len(self.contexts) == len(self.questions) == len(self.answers) == n):
            raise ConfigError(
                f"QADataset has {n} ids, {len(self.contexts)} contexts, {len(self.questions)} "
                f"questions and {len(self.answers)} answer lists; they must be as many"
            )
        for i, (context, golds) in enumerate(zip(self.contexts, self.answers, strict=True)):
            if not golds:
                raise ConfigError(f"QADataset.answers[{i}] is empty: every question needs an answer")
            for answer in golds:
                if not isinstance(answer, Answer) or context[answer.start : answer.end] != answer.text:
                    raise ConfigError(f"QADataset.answers[{i}]: {answer!r} is not a span of context {i}")

    PSEUDO_CLASS: ClassVar[str] = "answer"

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int] | np.ndarray) -> QADataset:
        """The rows at ``indices``, in that order."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        return QADataset(
            tuple(self.ids[i] for i in idx),
            tuple(self.contexts[i] for i in idx),
            tuple(self.questions[i] for i in idx),
            tuple(self.answers[i] for i in idx),
        )

    @property
    def task(self) -> str:
        """The task this data trains: ``question-answering`` (extractive)."""
        return QA_TASK


# --- reading ------------------------------------------------------------------------------------


def _answers(obj: dict[str, Any], context: str, path: Path, n: int) -> tuple[Answer, ...]:
    if "answers" not in obj:
        raise DataFormatError(path, "'answers' is missing", n)
    given = obj["answers"]
    if not isinstance(given, list):
        raise DataFormatError(path, f"'answers' must be a list, got {type(given).__name__}", n)
    if not given:
        raise DataFormatError(
            path, "'answers' is empty: unanswerable questions (SQuAD 2.0) are not supported", n
        )
    out = []
    for k, item in enumerate(given):
        where = f"answers[{k}]"
        if not isinstance(item, dict):
            raise DataFormatError(
                path,
                f"{where} must be an object with 'text' and 'answer_start', got {type(item).__name__}",
                n,
            )
        text, start = item.get("text"), item.get("answer_start")
        if not isinstance(text, str) or not text:
            raise DataFormatError(path, f"{where}.text must be a non-empty string, got {text!r}", n)
        # type() rather than isinstance(): True is an int to Python but never an offset
        if type(start) is not int or start < 0:
            raise DataFormatError(
                path, f"{where}.answer_start must be a non-negative integer, got {start!r}", n
            )
        found = context[start : start + len(text)]
        if found != text:
            raise DataFormatError(
                path,
                f"{where}.text {text!r} is not in the context at answer_start {start} "
                f"(the context has {found!r} there)",
                n,
            )
        out.append(Answer(text, start))
    return tuple(out)


def read_qa_file(path: str | Path) -> QADataset:
    """Every record of one SQuAD-style JSON-lines file, validated (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    ids: list[str] = []
    contexts: list[str] = []
    questions: list[str] = []
    answers: list[tuple[Answer, ...]] = []
    seen: dict[str, int] = {}
    for n, obj in json_objects(path, ", ".join(QA_KEYS)):
        qid = text_field(obj, "id", path, n)
        if qid in seen:
            raise DataFormatError(path, f"id {qid!r} repeats line {seen[qid]}", n)
        seen[qid] = n
        context = text_field(obj, "context", path, n)
        questions.append(text_field(obj, "question", path, n))
        answers.append(_answers(obj, context, path, n))
        ids.append(qid)
        contexts.append(context)
    if not ids:
        raise DataFormatError(path, "the file holds no questions")
    return QADataset(tuple(ids), tuple(contexts), tuple(questions), tuple(answers))


def is_qa_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds question answering data: the first record of ``train.jsonl`` (else
    ``test.jsonl``) is an object with ``context`` and ``question`` keys. A first line that is not
    JSON says no: the text loader then reports it."""
    folder = Path(folder)
    for split in QA_SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            continue
        obj = first_record(path)
        return isinstance(obj, dict) and "context" in obj and "question" in obj
    return False


def _sample(data: QADataset, limit: int | None, seed: int) -> QADataset:
    if limit is None or limit >= len(data):
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=limit, replace=False))
    return data.subset(idx)


def _check_limit(limit: int | None, name: str) -> None:
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1
    ):
        raise ConfigError(f"{name} must be a positive integer or None; got {limit!r}")


def load_qa_split(folder: str | Path, split: str, *, limit: int | None = None, seed: int = 0) -> QADataset:
    """One split (``{split}.jsonl``); with ``limit``, a seeded random sample of that many questions."""
    _check_limit(limit, "limit")
    if not split or any(sep in split for sep in ("/", "\\")):
        raise ConfigError(f"split must be a plain name such as 'train'; got {split!r}")
    folder = Path(folder)
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise DataFormatError(folder, f"no {split}.jsonl in this question answering folder")
    return _sample(read_qa_file(path), limit, seed)


def load_qa_folder(
    folder: str | Path, *, train_limit: int | None = None, test_limit: int | None = None, seed: int = 0
) -> tuple[QADataset, QADataset]:
    """The train and test splits of a question answering folder."""
    _check_limit(train_limit, "train_limit")
    _check_limit(test_limit, "test_limit")
    # the same seeds as the other loaders': seed for train, seed + 1 for test
    return (
        load_qa_split(folder, "train", limit=train_limit, seed=seed),
        load_qa_split(folder, "test", limit=test_limit, seed=seed + 1),
    )


def write_qa_file(path: str | Path, data: QADataset) -> Path:
    """Write ``data`` as SQuAD-style JSON lines (the format :func:`read_qa_file` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for qid, context, question, golds in zip(
            data.ids, data.contexts, data.questions, data.answers, strict=True
        ):
            record = {
                "id": qid,
                "context": context,
                "question": question,
                "answers": [{"text": a.text, "answer_start": a.start} for a in golds],
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
