"""A pure-Python WordPiece tokenizer that gives the ids Hugging Face ``tokenizers`` gives (BERT family).

It reads the ``tokenizer.json`` the server ships with the training artifacts and runs, in order,
what ``tokenizers`` runs for one sequence:

1. added tokens: the text is split on the literal contents of ``added_tokens`` (``[CLS]``,
   ``[SEP]``, ``[MASK]``...; leftmost, then longest), which become their own ids;
2. ``BertNormalizer``: ``clean_text`` (drop control and format characters, NUL and U+FFFD, turn
   whitespace into spaces), ``handle_chinese_chars`` (spaces around CJK ideographs),
   ``strip_accents`` (NFD, then drop non-spacing marks; ``null`` follows ``lowercase``) and
   ``lowercase`` (per character, so no final-sigma rule);
3. ``BertPreTokenizer``: split on whitespace (dropped) and isolate each punctuation character;
4. ``WordPiece``: greedy longest match from the left, ``##`` (the file's prefix) on continuing
   pieces; a word longer than ``max_input_chars_per_word`` characters, or with a part no
   vocabulary entry matches, is one ``[UNK]``;
5. truncation to ``max_length`` (right side, room left for the special tokens), then the
   post-processor (``TemplateProcessing`` or ``BertProcessing``: ``[CLS] ... [SEP]``).

The character classes come from :mod:`edge_runtime.wordpiece_tables`, measured from
``tokenizers`` itself, because its Rust crates and Python's ``unicodedata`` follow different
Unicode versions. The file's ``truncation`` and ``padding`` sections are not applied: callers pass
``max_length`` and pad batches themselves, as the engines do with ``tokenizers``. Anything else in
the file (another model, normalizer, pre-tokenizer or post-processor; added tokens that strip
whitespace, match single words or are normalized) raises :class:`UnsupportedTokenizer` naming it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_runtime import wordpiece_tables as tables
from edge_runtime.errors import ConfigError, UnsupportedTokenizer

# CJK ideograph blocks that handle_chinese_chars surrounds with spaces (tokenizers' is_chinese_char).
CHINESE_RANGES: tuple[tuple[int, int], ...] = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
WORD_CACHE_LIMIT = 200_000  # words of one text corpus repeat; the cache is cleared when full


def _char_class(ranges: Iterable[tuple[int, int]]) -> str:
    """The body of a regular-expression character class for inclusive code point ranges."""
    return "".join(f"\\U{a:08X}" if a == b else f"\\U{a:08X}-\\U{b:08X}" for a, b in ranges)


_REMOVED = re.compile(f"[{_char_class(tables.CLEAN_REMOVED)}\\ud800-\\udfff]+")  # lone surrogates too
_TO_SPACE = re.compile(f"[{_char_class(tables.CLEAN_TO_SPACE)}]")
_CHINESE = re.compile(f"[{_char_class(CHINESE_RANGES)}]")
_MARKS = re.compile(f"[{_char_class(tables.NONSPACING_MARKS)}]+")
_NFD_KEPT = re.compile(f"([{_char_class((c, c) for c in tables.NFD_KEPT)}])") if tables.NFD_KEPT else None
_PUNCT = _char_class(tables.PUNCTUATION)
_WORDS = re.compile(f"[{_PUNCT}]|[^{_char_class(tables.SPLIT_WHITESPACE)}{_PUNCT}]+")
_LOWER: dict[int, str] = dict(tables.LOWERCASE)


def _nfd(text: str) -> str:
    """Canonical decomposition as tokenizers does it (it leaves a few newer characters whole)."""
    if _NFD_KEPT is None or not _NFD_KEPT.search(text):
        return unicodedata.normalize("NFD", text)
    parts = _NFD_KEPT.split(text)  # the kept characters at odd indices
    return "".join(p if i % 2 else unicodedata.normalize("NFD", p) for i, p in enumerate(parts))


class BertNormalization:
    """tokenizers' ``BertNormalizer``: cleaning, CJK spacing, accent stripping, lowercasing."""

    def __init__(
        self, *, clean_text: bool, handle_chinese_chars: bool, strip_accents: bool | None, lowercase: bool
    ) -> None:
        self.clean_text = clean_text
        self.handle_chinese_chars = handle_chinese_chars
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.lowercase = lowercase

    def __call__(self, text: str) -> str:
        """The normalized text."""
        if self.clean_text:
            text = _TO_SPACE.sub(" ", _REMOVED.sub("", text))
        if text.isascii():  # nothing below but lowercasing touches ASCII, and str.lower agrees there
            return text.lower() if self.lowercase else text
        if self.handle_chinese_chars:
            text = _CHINESE.sub(r" \g<0> ", text)
        if self.strip_accents:
            text = _MARKS.sub("", _nfd(text))
        if self.lowercase:
            text = text.translate(_LOWER)
        return text


class WordPieceTokenizer:
    """Texts to input ids with a BERT-style ``tokenizer.json``, identical to ``tokenizers``."""

    def __init__(self, spec: Mapping[str, Any], *, source: str = "tokenizer.json") -> None:
        self.source = source
        model = _section(spec, "model", source)
        if model is None or model.get("type", "WordPiece") != "WordPiece" or "vocab" not in model:
            kind = None if model is None else model.get("type")
            raise UnsupportedTokenizer(
                f"{source}: the built-in tokenizer runs WordPiece models only, not {kind!r}; "
                "install the tokenizers package for this model"
            )
        self.vocab: dict[str, int] = {str(k): int(v) for k, v in model["vocab"].items()}
        self.prefix = str(model.get("continuing_subword_prefix", "##"))
        self.max_word_chars = int(model.get("max_input_chars_per_word", 100))
        unk = str(model.get("unk_token", "[UNK]"))
        if unk not in self.vocab:
            raise ConfigError(f"{source}: the unknown token {unk!r} is not in the vocabulary")
        self.unk_id = self.vocab[unk]
        self._longest = max((len(k) for k in self.vocab), default=1)
        self.normalize = _normalizer(_section(spec, "normalizer", source), source)
        pre = _section(spec, "pre_tokenizer", source)
        if pre is None or pre.get("type") != "BertPreTokenizer":
            raise UnsupportedTokenizer(
                f"{source}: pre-tokenizer {_kind(pre)} is not supported by the built-in tokenizer "
                "(BertPreTokenizer only); install the tokenizers package for this model"
            )
        self.prefix_ids, self.suffix_ids = _post_processor(_section(spec, "post_processor", source), source)
        self._added, self._added_ids = _added_tokens(spec.get("added_tokens") or [], source)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> WordPieceTokenizer:
        """Read a ``tokenizer.json``."""
        try:
            spec = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read tokenizer {path}: {exc}") from None
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: a tokenizer.json holds a JSON object")
        return cls(spec, source=str(path))

    @property
    def special_count(self) -> int:
        """How many ids the post-processor adds around one sequence."""
        return len(self.prefix_ids) + len(self.suffix_ids)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """The input ids of ``text``, special tokens included, at most ``max_length`` of them."""
        budget = None
        if max_length is not None:
            if max_length < self.special_count:
                raise ConfigError(
                    f"max_length {max_length} leaves no room for {self.special_count} special tokens"
                )
            budget = max_length - self.special_count
        ids: list[int] = []
        for piece in self._added.split(text) if self._added is not None else (text,):
            if budget is not None and len(ids) >= budget:
                break
            if not piece:
                continue
            added = self._added_ids.get(piece)
            if added is not None:
                ids.append(added)
                continue
            for word in _WORDS.finditer(self.normalize(piece)):
                ids.extend(self._word_ids(word.group()))
                if budget is not None and len(ids) >= budget:
                    break
        if budget is not None:
            del ids[budget:]
        return self.prefix_ids + ids + self.suffix_ids

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """:meth:`encode` for each text."""
        return [self.encode(t, max_length) for t in texts]

    def _word_ids(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = self._wordpiece(word)
            if len(self._cache) >= WORD_CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first, as tokenizers' ``WordPiece::tokenize``."""
        n = len(word)
        if n > self.max_word_chars:
            return [self.unk_id]
        ids: list[int] = []
        start = 0
        while start < n:
            end = min(n, start + self._longest)  # no vocabulary entry is longer
            found = None
            while start < end:
                found = self.vocab.get(word[start:end] if start == 0 else self.prefix + word[start:end])
                if found is not None:
                    break
                end -= 1
            if found is None:
                return [self.unk_id]
            ids.append(found)
            start = end
        return ids


def _section(spec: Mapping[str, Any], name: str, source: str) -> dict[str, Any] | None:
    value = spec.get(name)
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{source}: {name} is not a JSON object")
    return value


def _kind(section: Mapping[str, Any] | None) -> str:
    return "null" if section is None else repr(section.get("type"))


def _normalizer(section: Mapping[str, Any] | None, source: str) -> BertNormalization:
    if section is None or section.get("type") != "BertNormalizer":
        raise UnsupportedTokenizer(
            f"{source}: normalizer {_kind(section)} is not supported by the built-in tokenizer "
            "(BertNormalizer only); install the tokenizers package for this model"
        )
    strip = section.get("strip_accents")
    return BertNormalization(
        clean_text=bool(section.get("clean_text", True)),
        handle_chinese_chars=bool(section.get("handle_chinese_chars", True)),
        strip_accents=None if strip is None else bool(strip),
        lowercase=bool(section.get("lowercase", True)),
    )


def _post_processor(section: Mapping[str, Any] | None, source: str) -> tuple[list[int], list[int]]:
    """The ids before and after a single sequence."""
    if section is None:
        return [], []
    kind = section.get("type")
    if kind == "BertProcessing":
        return [int(section["cls"][1])], [int(section["sep"][1])]
    if kind == "TemplateProcessing":
        specials = section.get("special_tokens", {})
        before: list[int] = []
        after: list[int] = []
        seen_sequence = False
        for item in section.get("single", []):
            if "Sequence" in item:
                if item["Sequence"].get("id") != "A" or seen_sequence:
                    raise UnsupportedTokenizer(f"{source}: a single-sequence template with {item!r}")
                seen_sequence = True
            elif "SpecialToken" in item:
                name = item["SpecialToken"]["id"]
                if name not in specials:
                    raise ConfigError(f"{source}: the template names {name!r}, which special_tokens lacks")
                (after if seen_sequence else before).extend(int(i) for i in specials[name]["ids"])
            else:
                raise UnsupportedTokenizer(f"{source}: a template item {item!r}")
        return before, after
    raise UnsupportedTokenizer(
        f"{source}: post-processor {kind!r} is not supported by the built-in tokenizer "
        "(TemplateProcessing and BertProcessing only); install the tokenizers package for this model"
    )


def _added_tokens(
    entries: Sequence[Mapping[str, Any]], source: str
) -> tuple[re.Pattern[str] | None, dict[str, int]]:
    """A pattern that splits text around added tokens (leftmost, then longest), and their ids."""
    ids: dict[str, int] = {}
    for entry in entries:
        flags = [f for f in ("single_word", "lstrip", "rstrip", "normalized") if entry.get(f)]
        if flags:
            raise UnsupportedTokenizer(
                f"{source}: added token {entry.get('content')!r} sets {', '.join(flags)}, which the built-in "
                "tokenizer does not implement; install the tokenizers package for this model"
            )
        content = str(entry["content"])
        if content:
            ids[content] = int(entry["id"])
    if not ids:
        return None, ids
    alternatives = "|".join(re.escape(c) for c in sorted(ids, key=len, reverse=True))
    return re.compile(f"({alternatives})"), ids
