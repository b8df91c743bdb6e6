"""Generate ``edge_runtime/wordpiece_tables.py`` by probing the installed ``tokenizers`` package.

The BERT normalizer and pre-tokenizer of Hugging Face tokenizers classify characters with the Rust
crates ``unicode_categories`` and ``unicode-normalization-alignments`` (old Unicode versions) and
Rust's own ``char`` methods (a newer one); Python's ``unicodedata`` is yet another version. To give
the same ids everywhere, the pure-Python tokenizer carries these classes as data, measured here
from ``tokenizers`` itself, one code point at a time (about 10 s):

    PYTHONPATH=. .venv/bin/python scripts/gen_wordpiece_tables.py
    .venv/bin/ruff format edge_runtime/wordpiece_tables.py

``tests/test_wordpiece.py`` checks the tables against the installed ``tokenizers``.
"""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import normalizers, pre_tokenizers

OUT = Path(__file__).resolve().parents[1] / "edge_runtime" / "wordpiece_tables.py"
CHUNK = 20000


def code_points() -> list[int]:
    """Every scalar value Rust strings can hold, except NUL (the probes' separator)."""
    return [c for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]


def normalize_each(normalizer: normalizers.Normalizer, points: list[int]) -> dict[int, str]:
    """What ``normalizer`` makes of each code point on its own, probed in chunks."""
    out: dict[int, str] = {}
    for i in range(0, len(points), CHUNK):
        chunk = [c for c in points[i : i + CHUNK] if chr(c) not in "a|"]
        pieces = normalizer.normalize_str("|".join("a" + chr(c) for c in chunk)).split("|")
        assert len(pieces) == len(chunk), "a probe changed the separator"
        for c, piece in zip(chunk, pieces, strict=True):
            assert piece.startswith("a"), (hex(c), piece)
            out[c] = piece[1:]
    for c in (ord("a"), ord("|")):
        out[c] = normalizer.normalize_str(chr(c))
    return out


def ranges(points: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted code points as inclusive (first, last) ranges."""
    result: list[tuple[int, int]] = []
    for c in sorted(points):
        if result and result[-1][1] == c - 1:
            result[-1] = (result[-1][0], c)
        else:
            result.append((c, c))
    return result


def measure() -> dict[str, Any]:
    """Every class the pure-Python tokenizer needs, probed from the installed ``tokenizers``."""
    points = code_points()
    bert = normalizers.BertNormalizer
    clean = normalize_each(
        bert(clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False), points
    )
    removed = {0} | {c for c, s in clean.items() if s == ""}
    to_space = {c for c, s in clean.items() if s == " " and c != 0x20}
    assert all(s in ("", " ", chr(c)) for c, s in clean.items())

    split = pre_tokenizers.BertPreTokenizer()
    whitespace, punctuation = set(), set()
    for c in points:
        if c == ord("a"):
            continue
        n = len(split.pre_tokenize_str("a" + chr(c) + "a"))
        if n == 2:
            whitespace.add(c)
        elif n == 3:
            punctuation.add(c)

    lower = normalize_each(
        bert(clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=True), points
    )
    lowercase = {c: s for c, s in lower.items() if s != chr(c)}

    strip = normalize_each(
        bert(clean_text=False, handle_chinese_chars=False, strip_accents=True, lowercase=False), points
    )
    trivial = [c for c in points if unicodedata.normalize("NFD", chr(c)) == chr(c)]
    marks = {c for c in trivial if strip[c] == ""}
    assert all(strip[c] in ("", chr(c)) for c in trivial)
    nfd_kept = []
    for c in points:
        python = "".join(x for x in unicodedata.normalize("NFD", chr(c)) if ord(x) not in marks)
        if strip[c] != python:
            kept = "" if c in marks else chr(c)
            assert strip[c] == kept, (hex(c), strip[c], python)
            nfd_kept.append(c)
    return {
        "CLEAN_REMOVED": ranges(removed),
        "CLEAN_TO_SPACE": ranges(to_space),
        "SPLIT_WHITESPACE": ranges(whitespace),
        "PUNCTUATION": ranges(punctuation),
        "NONSPACING_MARKS": ranges(marks),
        "NFD_KEPT": tuple(nfd_kept),
        "LOWERCASE": lowercase,
    }


def main() -> None:
    """Probe every class and write the module."""
    found = measure()

    def table(name: str, comment: str) -> str:
        rows = ", ".join(f"(0x{a:04X}, 0x{b:04X})" for a, b in found[name])
        return f"# {comment}\n{name}: tuple[tuple[int, int], ...] = ({rows},)\n"

    lines = [
        '"""Character classes of Hugging Face tokenizers\' BERT normalizer and pre-tokenizer (generated).',
        "",
        "Measured from ``tokenizers`` "
        + tokenizers.__version__
        + " on Python "
        + ".".join(map(str, sys.version_info[:3]))
        + f" (Unicode {unicodedata.unidata_version}) by",
        "``scripts/gen_wordpiece_tables.py``; do not edit by hand. Ranges are inclusive code points.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        f'TOKENIZERS_VERSION = "{tokenizers.__version__}"',
        "",
        table(
            "CLEAN_REMOVED",
            "clean_text drops these (Rust's is_other minus tab, LF, CR; NUL, U+FFFD)",
        ),
        table("CLEAN_TO_SPACE", "clean_text turns these into a space"),
        table(
            "SPLIT_WHITESPACE",
            "the pre-tokenizer splits on these and drops them (Rust's char::is_whitespace)",
        ),
        table(
            "PUNCTUATION",
            "the pre-tokenizer isolates these (ASCII punctuation and unicode_categories' P*)",
        ),
        table("NONSPACING_MARKS", "strip_accents drops these after NFD (unicode_categories' Mn)"),
        "# Python's NFD decomposes these, tokenizers' does not",
        f"NFD_KEPT: tuple[int, ...] = ({', '.join(f'0x{c:04X}' for c in found['NFD_KEPT'])},)",
        "# lowercase maps each of these code points to this string (Rust's char::to_lowercase)",
        "LOWERCASE: dict[int, str] = {"
        + ", ".join(f"0x{c:04X}: {s!a}" for c, s in sorted(found["LOWERCASE"].items()))
        + "}",
        "",
    ]
    OUT.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
