"""Data folders: strict parsing with file and line in errors, limits, cleaning, the real datasets."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.data import (
    EMPTY_TEXT,
    TextDataset,
    datasets_root,
    load_folder,
    load_labels,
    load_split,
    looks_like_usenet,
    resolve_data_dir,
    strip_newsgroup_text,
)
from edge_runtime.errors import ConfigError, DataFormatError
from tests.datasets import shared_dataset
from tests.helpers import write_text_folder

OK = json.dumps({"text": "fine", "label": 0})


def _write(folder: Path, name: str, lines: list[str], labels: str | None = "a\nb\nc\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if labels is not None:
        (folder / "labels.txt").write_text(labels)
    (folder / name).write_text("".join(line + "\n" for line in lines))
    return folder


def _jsonl(rows: list[tuple[str, int]]) -> list[str]:
    return [json.dumps({"text": t, "label": y}) for t, y in rows]


def _post(subject: str, body: str) -> str:
    return f"From: someone@example.org\nSubject: {subject}\nLines: 3\n\n{body}"


# --- TextDataset ------------------------------------------------------------------------------


def test_text_dataset_subset_histogram_and_checks() -> None:
    data = TextDataset(("a", "b", "c", "d"), np.array([0, 2, 2, 0]), ("x", "y", "z", "w"))
    assert len(data) == 4 and data.num_classes == 4 and data.labels.dtype == np.int64
    assert data.label_histogram().tolist() == [2, 0, 2, 0]  # absent classes are counted as 0
    sub = data.subset([3, 1])
    assert sub.texts == ("d", "b") and sub.labels.tolist() == [0, 2] and sub.label_names == data.label_names
    with pytest.raises(ConfigError, match="texts but"):
        TextDataset(("a",), np.array([0, 1]), ("x", "y"))
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        TextDataset(("a",), np.array([2]), ("x", "y"))


# --- reading JSONL and CSV ----------------------------------------------------------------------


def test_jsonl_and_csv_load_the_same(tmp_path: Path) -> None:
    rows = [("hello world", 0), ("good, bye", 2), ('he said "hi"\nand left', 1)]
    _write(tmp_path / "j", "train.jsonl", _jsonl(rows))

    def quoted(t: str) -> str:
        return '"' + t.replace('"', '""') + '"'

    # CSV labels may be indices or class names; a quoted text may hold commas and line breaks.
    csv_rows = [f"{quoted('hello world')},a", f"{quoted('good, bye')},2", f"{quoted(rows[2][0])},b"]
    _write(tmp_path / "c", "train.csv", ["text,label", *csv_rows])
    a, b = load_split(tmp_path / "j", "train"), load_split(tmp_path / "c", "train")
    assert a.texts == b.texts == tuple(t for t, _ in rows)
    assert a.labels.tolist() == b.labels.tolist() == [0, 2, 1]
    assert a.label_names == b.label_names == ("a", "b", "c")
    assert a.label_histogram().tolist() == [1, 1, 1]


def test_jsonl_wins_over_csv_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    _write(tmp_path, "train.jsonl", ["", OK, "   ", OK, ""])
    _write(tmp_path, "train.csv", ["text,label", "other,1"])
    data = load_split(tmp_path, "train")
    assert data.texts == ("fine", "fine")


@pytest.mark.parametrize(
    "bad_line, fragment",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        ('"just a string"', "JSON object"),
        ('{"label": 0}', "'text' is missing"),
        ('{"text": "", "label": 0}', "'text' is empty"),
        ('{"text": "  \\n ", "label": 0}', "'text' is empty"),
        ('{"text": 5, "label": 0}', "'text' must be a string"),
        ('{"text": "x"}', "'label' is missing"),
        ('{"text": "x", "label": 1.5}', "not an integer"),
        ('{"text": "x", "label": 1.0}', "not an integer"),
        ('{"text": "x", "label": true}', "not an integer"),
        ('{"text": "x", "label": "1"}', "not an integer"),
        ('{"text": "x", "label": null}', "not an integer"),
        ('{"text": "x", "label": 3}', "out of range: labels.txt has 3 classes"),
        ('{"text": "x", "label": -1}', "negative"),
    ],
)
def test_malformed_jsonl_lines_name_file_and_line(tmp_path: Path, bad_line: str, fragment: str) -> None:
    folder = _write(tmp_path, "train.jsonl", [OK, "", bad_line, OK])  # the blank line still counts
    with pytest.raises(DataFormatError, match=fragment) as exc:
        load_split(folder, "train")
    assert exc.value.line == 3
    assert str(exc.value).startswith(f"{folder / 'train.jsonl'}:3: ")


def test_invalid_utf8_is_reported_on_its_line(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_bytes(
        (OK + "\n" + OK + "\n").encode() + b'{"text": "caf\xe9", "label": 0}\n'
    )
    with pytest.raises(DataFormatError, match="UTF-8") as exc:
        load_split(tmp_path, "train")
    assert exc.value.line == 3
    (tmp_path / "train.jsonl").unlink()
    (tmp_path / "train.csv").write_bytes(b'text,label\nok,0\n"two\nlines",0\ncaf\xe9,0\n')
    with pytest.raises(DataFormatError, match="UTF-8") as exc:
        load_split(tmp_path, "train")
    assert exc.value.line == 5


def test_huge_label_without_labels_txt_is_an_error(tmp_path: Path) -> None:
    folder = _write(tmp_path, "train.jsonl", [OK, json.dumps({"text": "x", "label": 10**30})], labels=None)
    with pytest.raises(DataFormatError, match=r"labels\.txt") as exc:
        load_split(folder, "train")
    assert exc.value.line == 2


@pytest.mark.parametrize(
    "lines, line, fragment",
    [
        (["text,label", "x,b", "y,nope"], 3, "neither an integer nor a class name"),
        (["text,label", '"multi\nline",0', "y,7"], 4, "out of range"),
        (["text,label", "x,0", "hello, world,1"], 3, "expected 2 fields"),
        (["text,label", "x,0", "x"], 3, "expected 2 fields"),
        (["text,label", " ,0"], 2, "'text' is empty"),
        (["text,label", "x,-2"], 2, "negative"),
        (["text,label", "x,1.0"], 2, "neither an integer"),
        (["words,label", "x,0"], 1, "header"),
    ],
)
def test_malformed_csv_rows_name_file_and_line(
    tmp_path: Path, lines: list[str], line: int, fragment: str
) -> None:
    folder = _write(tmp_path, "train.csv", lines)
    with pytest.raises(DataFormatError, match=fragment) as exc:
        load_split(folder, "train")
    assert exc.value.line == line
    assert str(exc.value).startswith(f"{folder / 'train.csv'}:{line}: ")


def test_csv_integer_labels_are_indices_even_when_a_class_has_that_name(tmp_path: Path) -> None:
    folder = _write(tmp_path, "train.csv", ["text,label", "x,1", "y,3"], labels="1\n2\n3\n")
    with pytest.raises(DataFormatError, match="class '3' is label 2"):
        load_split(folder, "train")
    folder2 = _write(tmp_path / "2", "train.csv", ["id,text,label", "7,x,1", "8,y,0"], labels="a\nb\n")
    assert load_split(folder2, "train").labels.tolist() == [1, 0]  # extra columns are fine


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"no train\.jsonl or train\.csv"):
        load_split(tmp_path, "train")
    with pytest.raises(DataFormatError, match="not found"):
        load_split(tmp_path / "absent", "train")
    for name, lines in (("train.jsonl", []), ("train.jsonl", ["", "  "]), ("train.csv", ["text,label"])):
        folder = _write(tmp_path / name / str(len(lines)), name, lines)
        with pytest.raises(DataFormatError, match="no rows"):
            load_split(folder, "train")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "train.csv").write_text("")
    with pytest.raises(DataFormatError, match="no rows"):
        load_split(tmp_path / "e", "train")


# --- labels -------------------------------------------------------------------------------------


def test_labels_file_and_derived_labels(tmp_path: Path) -> None:
    folder = _write(tmp_path, "train.jsonl", _jsonl([("x", 0), ("y", 2)]), labels=None)
    _write(tmp_path, "test.jsonl", _jsonl([("z", 4)]), labels=None)
    assert load_labels(folder) == ("0", "1", "2", "3", "4")  # the largest label in any split
    assert load_split(folder, "train").label_names == ("0", "1", "2")
    train, test = load_folder(folder)  # both splits get the same, complete names
    assert train.label_names == test.label_names == ("0", "1", "2", "3", "4")
    (folder / "labels.txt").write_text("p\nq\nr\ns\nt\n\n\n")  # trailing blank lines are fine
    assert load_labels(folder) == ("p", "q", "r", "s", "t")


@pytest.mark.parametrize(
    "text, line, fragment",
    [("a\n\nb\n", 2, "blank class name"), ("a\nb\na\n", 3, "repeats line 1"), ("\n\n", None, "empty")],
)
def test_bad_labels_file(tmp_path: Path, text: str, line: int | None, fragment: str) -> None:
    folder = _write(tmp_path, "train.jsonl", [OK], labels=text)
    with pytest.raises(DataFormatError, match=fragment) as exc:
        load_split(folder, "train")
    assert exc.value.line == line


def test_load_labels_without_any_split(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"no labels\.txt"):
        load_labels(tmp_path)


# --- limits -------------------------------------------------------------------------------------


def test_limit_is_seeded_stratified_and_keeps_file_order(tmp_path: Path) -> None:
    rows = [(f"t{i}", i % 4) for i in range(100)]
    folder = _write(tmp_path, "train.jsonl", _jsonl(rows), labels=None)
    a = load_split(folder, "train", limit=20, seed=1)
    assert len(a) == 20 and a.texts == load_split(folder, "train", limit=20, seed=1).texts
    assert a.texts != load_split(folder, "train", limit=20, seed=2).texts
    assert a.label_histogram().tolist() == [5, 5, 5, 5]  # proportional to the class sizes
    positions = [int(t[1:]) for t in a.texts]
    assert positions == sorted(positions)
    assert len(load_split(folder, "train", limit=1000)) == 100
    odd = load_split(folder, "train", limit=7, seed=3)
    assert len(odd) == 7 and sorted(odd.label_histogram().tolist()) == [1, 2, 2, 2]
    for bad in (0, -1, 2.5):
        with pytest.raises(ConfigError, match="limit"):
            load_split(folder, "train", limit=bad)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=120),
    st.integers(1, 130),
    st.integers(0, 1000),
)
def test_limit_sizes_property(labels: list[int], limit: int, seed: int) -> None:
    from edge_runtime.data import _stratified_sample

    y = np.array(labels, dtype=np.int64)
    if limit >= len(y):
        return
    idx = _stratified_sample(y, limit, seed)
    assert len(idx) == limit == len(np.unique(idx)) and np.all(np.diff(idx) > 0)
    got, want = np.bincount(y[idx], minlength=6), np.bincount(y, minlength=6) * limit / len(y)
    assert np.all(np.abs(got - want) < 1)  # every class within one row of its exact share


# --- resolving folders ------------------------------------------------------------------------


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_text_folder(tmp_path / "toy")
    monkeypatch.setenv("FEDPEFT_DATASETS", str(tmp_path))
    assert datasets_root() == tmp_path
    assert resolve_data_dir("toy") == tmp_path / "toy"
    assert resolve_data_dir(tmp_path / "toy") == tmp_path / "toy"
    with pytest.raises(ConfigError, match="not found") as exc:
        resolve_data_dir("nope")
    assert str(tmp_path / "nope") in str(exc.value) and str(Path("nope").absolute()) in str(exc.value)
    with pytest.raises(ConfigError, match="not found"):
        resolve_data_dir("some/where/toy")
    with pytest.raises(ConfigError, match="is a file"):
        resolve_data_dir(tmp_path / "toy" / "labels.txt")
    with pytest.raises(ConfigError, match="clean must be one of"):
        load_split(tmp_path / "toy", "train", clean="sometimes")


def test_default_datasets_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDPEFT_DATASETS", raising=False)
    repo = Path(__file__).resolve().parent.parent
    assert datasets_root() == repo.parent / "shared" / "datasets"


# --- cleaning -----------------------------------------------------------------------------------


def test_cleaning_keeps_rows_with_a_placeholder(tmp_path: Path) -> None:
    posts = [
        _post("keep", "Real words here.\n\n-- \nJohn, my signature"),
        _post("only quotes", "In article <1@x> bob writes:\n> quoted\n> more"),
        _post("third", "Some text.\nMore text."),
    ]
    folder = _write(tmp_path, "train.jsonl", _jsonl([(p, 0) for p in posts]))
    auto = load_split(folder, "train")
    assert auto.texts == (strip_newsgroup_text(posts[0]), EMPTY_TEXT, strip_newsgroup_text(posts[2]))
    assert "Subject" not in auto.texts[0] and "signature" not in auto.texts[0]
    assert load_split(folder, "train", clean="none").texts == tuple(posts)
    plain = _write(tmp_path / "plain", "train.jsonl", _jsonl([("what is x?", 0), ("who is y?", 1)]))
    assert load_split(plain, "train").texts == ("what is x?", "who is y?")  # auto leaves non-Usenet text
    assert load_split(plain, "train", clean="newsgroups").texts == (EMPTY_TEXT, EMPTY_TEXT)


def test_test_split_follows_the_train_split_cleaning_decision(tmp_path: Path) -> None:
    train = [_post(f"s{i}", f"body {i}") for i in range(10)]
    test = ["no header here", _post("t", "body t")]  # on its own this would not look like Usenet
    _write(tmp_path, "train.jsonl", _jsonl([(t, 0) for t in train]))
    _write(tmp_path, "test.jsonl", _jsonl([(t, 1) for t in test]))
    assert not looks_like_usenet(test)
    _, cleaned = load_folder(tmp_path)
    assert cleaned.texts == tuple(strip_newsgroup_text(t) or EMPTY_TEXT for t in test)
    _, raw = load_folder(tmp_path, clean="none")
    assert raw.texts == tuple(test)


_FRAGMENTS = st.sampled_from(
    [
        "\n",
        "\n\n",
        " ",
        "-",
        "--",
        "> ",
        "|",
        "In article",
        "Quoted from",
        "writes:",
        "writes in",
        "wrote:",
        "says:",
        "said:",
        "said",
        "From: a",
        "Subject: b",
        "word",
        "\r",
        "\t",
        "x>y",
        " In article",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=40).map("".join))
def test_cleaning_matches_scikit_learn_on_generated_posts(text: str) -> None:
    twenty = pytest.importorskip("sklearn.datasets._twenty_newsgroups")
    expected = twenty.strip_newsgroup_quoting(
        twenty.strip_newsgroup_footer(twenty.strip_newsgroup_header(text))
    )
    assert strip_newsgroup_text(text) == expected


def test_quote_rule_matches_scikit_learn_regex() -> None:
    twenty = pytest.importorskip("sklearn.datasets._twenty_newsgroups")
    pattern: re.Pattern[str] = twenty._QUOTE_RE
    assert pattern.pattern == r"(writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)"


# --- the real shared datasets -----------------------------------------------------------------


def test_newsgroups_cleaning_matches_scikit_learn_on_real_posts() -> None:
    twenty = pytest.importorskip("sklearn.datasets._twenty_newsgroups")
    folder = shared_dataset("20newsgroups")
    raw = load_split(folder, "train", limit=300, seed=0, clean="none")
    assert looks_like_usenet(raw.texts) and sum(t.startswith("From:") for t in raw.texts) > 250
    expected = [
        twenty.strip_newsgroup_quoting(twenty.strip_newsgroup_footer(twenty.strip_newsgroup_header(t)))
        for t in raw.texts
    ]
    assert [strip_newsgroup_text(t) for t in raw.texts] == expected
    cleaned = load_split(folder, "train", limit=300, seed=0)  # "auto" detects Usenet posts
    assert cleaned.texts == tuple(e if e.strip() else EMPTY_TEXT for e in expected)
    assert np.array_equal(cleaned.labels, raw.labels)


def test_real_newsgroups_loads_fast() -> None:
    folder = shared_dataset("20newsgroups")
    start = time.perf_counter()
    train = load_split(folder, "train")
    elapsed = time.perf_counter() - start
    assert len(train) == 11314 and train.num_classes == 20
    assert train.label_names[0] == "alt.atheism" and train.label_names[-1] == "talk.religion.misc"
    assert train.label_histogram().min() == 377 and train.label_histogram().max() == 600
    # Headers are gone; the few texts still opening with "From:" are forwarded posts quoted in a body.
    assert sum(t.startswith("From:") for t in train.texts) < 100
    assert elapsed < 4.0, f"loading and cleaning 20 Newsgroups train took {elapsed:.2f} s"  # about 0.5 s here
    test = load_split(folder, "test", limit=200, seed=0)
    assert len(test) == 200 and np.all(test.label_histogram() >= 6)  # stratified: every class present


def test_real_trec_banking77_and_ag_news_load() -> None:
    train, test = load_folder(shared_dataset("trec"))
    assert len(train) == 5452 and len(test) == 500 and train.num_classes == 6
    assert not looks_like_usenet(train.texts)
    bank_train, bank_test = load_folder(shared_dataset("banking77"))
    assert len(bank_train) == 10003 and bank_train.num_classes == 77
    assert np.all(bank_test.label_histogram() == 40)
    ag = load_split(shared_dataset("ag_news"), "test")
    assert len(ag) == 7600 and np.all(ag.label_histogram() == 1900)
