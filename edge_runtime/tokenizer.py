"""The device's tokenizer: the ``tokenizers`` package when installed, the built-in WordPiece otherwise.

The one place that chooses. Both give the same ids for the BERT-family ``tokenizer.json`` files
the server ships (``tests/test_wordpiece.py``); ``tokenizers`` is faster and reads every model
type, the built-in :class:`~edge_runtime.wordpiece.WordPieceTokenizer` keeps ``tokenizers`` and
its Hugging Face Hub dependencies off the slim ``fedpeft[edge]`` install.

``FEDPEFT_TOKENIZER=wordpiece`` (or ``tokenizers``) in the environment forces one of them, for
tests and for checking a device install; the default ``auto`` prefers ``tokenizers``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import ConfigError, EngineError
from edge_runtime.wordpiece import WordPieceTokenizer

BACKEND_ENV = "FEDPEFT_TOKENIZER"
BACKENDS = ("auto", "tokenizers", "wordpiece")


@dataclass(frozen=True)
class DeviceTokenizer:
    """Texts to input ids (special tokens included, truncated to ``max_length``, not padded)."""

    backend: str  # "tokenizers" or "wordpiece": which implementation runs
    max_length: int
    _encode_batch: Callable[[list[str]], list[list[int]]]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """The input ids of each text."""
        return self._encode_batch(list(texts))


def chosen_backend(backend: str | None = None) -> str:
    """``tokenizers`` or ``wordpiece``: ``backend``, else ``$FEDPEFT_TOKENIZER``, else what is installed."""
    choice = backend or os.environ.get(BACKEND_ENV) or "auto"
    if choice not in BACKENDS:
        raise ConfigError(
            f"tokenizer backend {choice!r} is not one of {', '.join(BACKENDS)} (from ${BACKEND_ENV}?)"
        )
    if choice == "auto":
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            return "wordpiece"
        return "tokenizers"
    return choice


def load_tokenizer(path: str | Path, max_length: int, *, backend: str | None = None) -> DeviceTokenizer:
    """The tokenizer in ``path`` (a ``tokenizer.json``), truncating to ``max_length`` ids."""
    which = chosen_backend(backend)
    if which == "tokenizers":
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise EngineError(
                "the tokenizers package is not installed (FEDPEFT_TOKENIZER=tokenizers)"
            ) from None
        try:
            native = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception type for every failure
            raise EngineError(f"cannot load tokenizer {path}: {exc}") from None
        native.no_padding()
        native.enable_truncation(max_length=max_length)
        return DeviceTokenizer(
            "tokenizers", max_length, lambda texts: [list(e.ids) for e in native.encode_batch(texts)]
        )
    builtin = WordPieceTokenizer.from_file(path)  # UnsupportedTokenizer says to install tokenizers
    builtin.encode("", max_length)  # checks that max_length leaves room for the special tokens
    return DeviceTokenizer("wordpiece", max_length, lambda texts: builtin.encode_batch(texts, max_length))
