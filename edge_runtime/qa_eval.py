"""Scoring extractive answers as SQuAD does, and the span arithmetic between characters and tokens.

:func:`normalize_answer` is the official SQuAD evaluation script's normalisation (v1.1 and 2.0
share it): lower case, punctuation removed, the articles ``a``, ``an`` and ``the`` removed,
whitespace collapsed. :func:`exact_match` and :func:`token_f1` score one prediction against every
gold answer and keep the best, as the script does. F1 follows the 2.0 script where an answer
normalises to no tokens (F1 is 1 if both do, else 0), so that an exact match always has F1 1;
elsewhere it is the 1.1 script's bag-of-tokens F1.

This module needs numpy only, so the edge install keeps it.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from edge_runtime.errors import ConfigError

MAX_ANSWER_TOKENS = 30
"""The longest span (in tokens) a prediction may be; SQuAD's reference scripts use 30."""

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: SQuAD's ``normalize_answer``."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction normalises to the same string as any gold answer, else 0.0."""
    if not answers:
        raise ConfigError("exact_match needs at least one gold answer")
    guess = normalize_answer(prediction)
    return float(any(guess == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    guess, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not guess or not gold:
        return float(guess == gold)
    same = sum((Counter(guess) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(guess), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """The best bag-of-tokens F1 of the normalised prediction against any gold answer."""
    if not answers:
        raise ConfigError("token_f1 needs at least one gold answer")
    return max(_f1(prediction, a) for a in answers)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Mean exact match and mean F1 over questions (fractions in [0, 1])."""
    if len(predictions) != len(answers) or not predictions:
        raise ConfigError(
            f"squad_scores needs one prediction per question and at least one question, "
            f"got {len(predictions)} predictions for {len(answers)} questions"
        )
    em = [exact_match(p, a) for p, a in zip(predictions, answers, strict=True)]
    f1 = [token_f1(p, a) for p, a in zip(predictions, answers, strict=True)]
    return float(np.mean(em)), float(np.mean(f1))


def best_span(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    allowed: np.ndarray,
    max_tokens: int = MAX_ANSWER_TOKENS,
) -> tuple[int, int]:
    """The token span (start, end), inclusive, that maximises ``start_logits[s] + end_logits[e]``
    with both ends ``allowed`` (the context's tokens), ``s <= e`` and at most ``max_tokens`` tokens;
    ties go to the earliest start, then the earliest end."""
    start = np.asarray(start_logits, dtype=np.float64).reshape(-1)
    end = np.asarray(end_logits, dtype=np.float64).reshape(-1)
    ok = np.asarray(allowed, dtype=bool).reshape(-1)
    if not (len(start) == len(end) == len(ok)):
        raise ConfigError(f"best_span: {len(start)} start, {len(end)} end logits, {len(ok)} allowed flags")
    if not ok.any():
        raise ConfigError("best_span: no token is allowed (the context was truncated away)")
    if max_tokens < 1:
        raise ConfigError(f"best_span: max_tokens must be at least 1, got {max_tokens}")
    n = len(start)
    s_idx, e_idx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    valid = (e_idx >= s_idx) & (e_idx - s_idx < max_tokens) & ok[:, None] & ok[None, :]
    scores = np.where(valid, start[:, None] + end[None, :], -np.inf)
    flat = int(np.argmax(scores))  # row-major: the earliest start, then the earliest end
    return flat // n, flat % n


def answer_token_span(
    offsets: Sequence[tuple[int, int]], in_context: Sequence[bool], start_char: int, end_char: int
) -> tuple[int, int] | None:
    """The first and last token (inclusive) that cover characters ``[start_char, end_char)`` of the
    context, given each token's character ``offsets`` in the context and whether it is a context
    token; None when the answer is not wholly inside the (possibly truncated) context tokens."""
    context = [i for i, inside in enumerate(in_context) if inside]
    if not context or end_char <= start_char:
        return None
    if offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None
    first = max(i for i in context if offsets[i][0] <= start_char)
    last = min(i for i in context if offsets[i][1] >= end_char)
    return first, max(first, last)
