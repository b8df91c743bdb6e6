"""JSON lines as every record-per-line loader reads them: line numbers, UTF-8 and JSON errors.

A blank line is skipped but still counted, so the 1-based line a :class:`DataFormatError` names is
the one an editor shows; a UTF-8 byte order mark on the first line is dropped. Records are parsed
one line at a time (the file is streamed), and a bad byte or bad JSON is reported on its own line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_runtime.errors import DataFormatError


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded text) of every non-blank line of ``path``."""
    path = Path(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(path, f"not valid UTF-8 (byte {exc.start})", n) from None
            if n == 1 and line.startswith("\ufeff"):
                line = line[1:]
            yield n, line


def parse_line(path: str | Path, n: int, line: str) -> Any:
    """The JSON value of line ``n``, or :class:`DataFormatError` naming the file and the line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"invalid JSON ({exc.msg} at column {exc.colno})", n) from None
    except RecursionError:
        raise DataFormatError(path, "invalid JSON (nested too deeply)", n) from None


def json_objects(path: str | Path, keys: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every record; a record that is not a JSON object is refused,
    the message saying it should hold ``keys`` (e.g. ``'image' and 'text'``)."""
    for n, line in text_lines(path):
        obj = parse_line(path, n, line)
        if not isinstance(obj, dict):
            raise DataFormatError(path, f"expected a JSON object with {keys}, got {type(obj).__name__}", n)
        yield n, obj


def text_field(obj: dict[str, Any], key: str, path: str | Path, n: int) -> str:
    """``obj[key]`` if it is a string with more than whitespace; else a :class:`DataFormatError`."""
    if key not in obj:
        raise DataFormatError(path, f"{key!r} is missing", n)
    value = obj[key]
    if not isinstance(value, str):
        raise DataFormatError(path, f"{key!r} must be a string, got {type(value).__name__}", n)
    if not value.strip():
        raise DataFormatError(path, f"{key!r} is empty", n)
    return value


def first_record(path: str | Path) -> Any:
    """The first record of a JSON-lines file, or None if it has none or its first line is not
    JSON (the loader then reports the fault with its line)."""
    try:
        for _n, line in text_lines(path):
            return json.loads(line)
    except (OSError, DataFormatError, ValueError, RecursionError):
        return None
    return None
