"""Data folders: labelled texts, image folders, questions, image-text pairs or unlabelled texts.

:func:`folder_task` tells a folder's task from its files. Image folders are read by
:mod:`edge_runtime.image_data`, question answering folders (SQuAD-style JSON lines) by
:mod:`edge_runtime.qa_data`, image-text pairs by :mod:`edge_runtime.pair_data`, unlabelled texts
for causal language modelling by :mod:`edge_runtime.lm_data`; the rest of this module reads
labelled texts.

A data folder holds one file per split, ``{split}.jsonl`` (``{"text": str, "label": int}`` a line)
or else ``{split}.csv`` (header ``text,label``; a label is an integer or a class name from
``labels.txt``), and ``labels.txt`` (line *i* names label *i*). Loading is strict: a malformed line
raises :class:`DataFormatError` naming the file and the 1-based line, because a silently skipped
row would change a federated experiment without anyone noticing.

Usenet posts (20 Newsgroups) can lose their headers, signature blocks and quoted replies exactly as
scikit-learn's ``fetch_20newsgroups(remove=("headers", "footers", "quotes"))`` does, so accuracies
are comparable with the literature. The port below keeps scikit-learn out of the edge install.
When cleaning leaves a post empty (about 3% of 20 Newsgroups train: posts that are only quotes or
only a signature), the row is kept with :data:`EMPTY_TEXT` (one space) instead of being dropped:
row counts stay those of the published splits, scikit-learn keeps such rows too (as ``""``, which
some tokenizers reject), and a placeholder such as the subject line would bring back the header
text that the removal is meant to hide.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import ConfigError, DataFormatError
from edge_runtime.image_data import ImageDataset, image_labels, load_image_folder, load_image_split
from edge_runtime.jsonl import first_record, json_objects, text_field
from edge_runtime.labels import read_labels_file as _read_labels_file
from edge_runtime.labels import stratified_sample as _stratified_sample
from edge_runtime.lm_data import LM_TASK, LMDataset, is_lm_record, load_lm_folder, load_lm_split
from edge_runtime.pair_data import ITM_TASK, PairDataset, is_pair_record, load_pair_folder, load_pair_split
from edge_runtime.qa_data import QA_TASK, QADataset, load_qa_folder, load_qa_split

CLEAN_MODES = ("auto", "newsgroups", "none")
EMPTY_TEXT = " "
"""What a text that cleaning left empty becomes (see the module docstring for why)."""

# Without labels.txt the class names are "0".."max"; a huge label is a typo, not 10**9 classes.
_MAX_DERIVED_CLASSES = 1 << 16
_INT_RE = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Texts with integer labels and the names of the classes."""

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if labels.ndim != 1:
            raise ConfigError(f"TextDataset.labels must be 1-D, got shape {labels.shape}")
        if len(self.texts) != len(labels):
            raise ConfigError(f"TextDataset has {len(self.texts)} texts but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ConfigError(
                f"TextDataset.labels must lie in [0, {len(self.label_names)}), "
                f"got {labels.min()}..{labels.max()}"
            )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Number of classes (from the label names, so absent classes count too)."""
        return len(self.label_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """The rows at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return TextDataset(tuple(self.texts[i] for i in idx), self.labels[idx], self.label_names)

    def label_histogram(self) -> np.ndarray:
        """Samples per class, an int64 array of length ``num_classes``."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    @property
    def task(self) -> str:
        """The task this data trains: ``classification`` (of texts)."""
        return "classification"


Dataset = TextDataset | ImageDataset | QADataset | PairDataset | LMDataset
"""Data of any kind (texts, images, questions, image-text pairs, unlabelled texts); engines read
``task`` to know which they were given."""

DATASET_TYPES = (TextDataset, ImageDataset, QADataset, PairDataset, LMDataset)
"""The classes of :data:`Dataset`, for ``isinstance``."""

FOLDER_TASKS = ("classification", "image-classification", QA_TASK, ITM_TASK, LM_TASK)


# --- where data lives ---------------------------------------------------------------------------


def datasets_root() -> Path:
    """Where named datasets live: ``$FEDPEFT_DATASETS``, else ``../shared/datasets`` beside the repo."""
    env = os.environ.get("FEDPEFT_DATASETS")
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "datasets"


def resolve_data_dir(spec: str | Path) -> Path:
    """A data folder given as a path, or as a bare dataset name under :func:`datasets_root`."""
    text = str(spec)
    if not text.strip():
        raise ConfigError("the data folder is empty; give a path or a dataset name")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"data folder {text!r} is a file; give the folder that holds it")
        return path
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if any(sep in text for sep in separators):
        raise ConfigError(f"data folder {text!r} not found (tried {path.absolute()})")
    named = datasets_root() / text
    if named.is_dir():
        return named
    raise ConfigError(
        f"data folder {text!r} not found: tried {path.absolute()} and {named} "
        "(set FEDPEFT_DATASETS to the folder that holds the named datasets)"
    )


# --- labels -------------------------------------------------------------------------------------


def _derived_names(max_label: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(max_label + 1))


def load_labels(folder: str | Path) -> tuple[str, ...]:
    """Class names from ``labels.txt``, else ``"0".."K-1"`` from the largest label in the splits."""
    folder = Path(folder)
    task = folder_task(folder)
    if task == "image-classification":
        return image_labels(folder)
    if task == QA_TASK:
        return ("answer",)  # question answering has no classes: the one pseudo-class
    if task == ITM_TASK:
        return ("pair",)
    if task == LM_TASK:
        return ("text",)
    names = _read_labels_file(folder)
    if names is not None:
        return names
    files = _split_files(folder)
    if not files:
        raise DataFormatError(folder, "no labels.txt and no .jsonl or .csv split to derive labels from")
    top = -1
    for path in files:
        for _text, label in _rows(path, None):
            top = max(top, label)
    if top < 0:
        raise DataFormatError(folder, "no labels.txt and every split is empty")
    return _derived_names(top)


# --- 20 Newsgroups cleaning (port of scikit-learn's strip_newsgroup_* functions) -------------

# scikit-learn searches each line with the regex
#   (writes in|writes:|wrote:|says:|said:|^In article|^Quoted from|^\||^>)
# where ^ anchors at the start of the line. Plain substring and prefix tests decide the same
# lines about ten times faster, which keeps cleaning 20 Newsgroups well under a second.
_QUOTE_MARKERS = ("writes in", "writes:", "wrote:", "says:", "said:")
_QUOTE_PREFIXES = ("In article", "Quoted from", "|", ">")
_FROM_RE = re.compile(r"^From:", re.MULTILINE)
_SUBJECT_RE = re.compile(r"^Subject:", re.MULTILINE)


def strip_newsgroup_header(text: str) -> str:
    """Drop everything up to the first blank line (the Usenet headers), as scikit-learn does."""
    _before, _blank, after = text.partition("\n\n")
    return after


def _is_quote_line(line: str) -> bool:
    return line.startswith(_QUOTE_PREFIXES) or any(m in line for m in _QUOTE_MARKERS)


def strip_newsgroup_quoting(text: str) -> str:
    """Drop quoted lines and the lines that introduce quotes ('... writes:'), as scikit-learn does."""
    return "\n".join(line for line in text.split("\n") if not _is_quote_line(line))


def strip_newsgroup_footer(text: str) -> str:
    """Drop the signature block after the last blank or all-hyphen line, as scikit-learn does."""
    lines = text.strip().split("\n")
    line_num = len(lines) - 1
    while line_num >= 0 and lines[line_num].strip().strip("-") != "":
        line_num -= 1
    # scikit-learn's loop leaves line_num at 0 when no separator is found; > 0 covers both cases.
    if line_num > 0:
        return "\n".join(lines[:line_num])
    return text


def strip_newsgroup_text(text: str) -> str:
    """Headers, then footers, then quotes removed: ``remove=('headers','footers','quotes')``."""
    return strip_newsgroup_quoting(strip_newsgroup_footer(strip_newsgroup_header(text)))


def looks_like_usenet(texts: Sequence[str]) -> bool:
    """True when at least 80% of the first 50 texts open with a header block holding From: and Subject:."""
    sample = texts[:50]
    if not sample:
        return False
    hits = 0
    for text in sample:
        block = text.partition("\n\n")[0]
        if _FROM_RE.search(block) and _SUBJECT_RE.search(block):
            hits += 1
    return hits >= 0.8 * len(sample)


def _clean_texts(texts: Sequence[str]) -> list[str]:
    out = []
    for text in texts:
        cleaned = strip_newsgroup_text(text)
        out.append(cleaned if cleaned.strip() else EMPTY_TEXT)
    return out


# --- reading ------------------------------------------------------------------------------------


def _split_files(folder: Path) -> list[Path]:
    """Every split file in the folder, ``.jsonl`` winning over a ``.csv`` of the same split."""
    chosen: dict[str, Path] = {}
    for suffix in (".csv", ".jsonl"):
        for path in sorted(folder.glob(f"*{suffix}")):
            if path.is_file():
                chosen[path.stem] = path
    return [chosen[k] for k in sorted(chosen)]


def _split_file(folder: Path, split: str) -> Path:
    if not folder.is_dir():
        raise DataFormatError(folder, "data folder not found")
    for suffix in (".jsonl", ".csv"):
        path = folder / f"{split}{suffix}"
        if path.is_file():
            return path
    raise DataFormatError(
        folder,
        f"no {split}.jsonl or {split}.csv in this folder (nor a {split}/ folder of class folders of images)",
    )


def _check_label(value: int, path: Path, line: int, names: tuple[str, ...] | None, given: object) -> int:
    if value < 0:
        raise DataFormatError(path, f"label {given!r} is negative (out of range)", line)
    if names is not None and value >= len(names):
        hint = ""
        if isinstance(given, str) and given in names:
            hint = f"; integer labels are indices, class {given!r} is label {names.index(given)}"
        raise DataFormatError(
            path,
            f"label {value} is out of range: labels.txt has {len(names)} classes (0..{len(names) - 1}){hint}",
            line,
        )
    if names is None and value >= _MAX_DERIVED_CLASSES:
        raise DataFormatError(
            path, f"label {value} is too large to number classes by; add a labels.txt", line
        )
    return value


def _json_label(value: object, path: Path, line: int, names: tuple[str, ...] | None) -> int:
    # type() rather than isinstance(): True is an int to Python but never a class index.
    if type(value) is not int:
        raise DataFormatError(path, f"label {value!r} is not an integer", line)
    return _check_label(value, path, line, names, value)


def _csv_label(value: str, path: Path, line: int, names: tuple[str, ...] | None) -> int:
    text = value.strip()
    # An integer-looking label is an index even when labels.txt names a class "3": JSONL labels
    # are indices too, and the out-of-range message points at the clash.
    if _INT_RE.fullmatch(text):
        return _check_label(int(text), path, line, names, text)
    if names is not None and text in names:
        return names.index(text)
    if names is None:
        raise DataFormatError(
            path, f"label {value!r} is not an integer (no labels.txt to look names up in)", line
        )
    raise DataFormatError(path, f"label {value!r} is neither an integer nor a class name in labels.txt", line)


def _jsonl_rows(path: Path, names: tuple[str, ...] | None) -> Iterator[tuple[str, int]]:
    # streamed a line at a time by edge_runtime.jsonl: bad bytes and bad JSON name their own line
    for n, obj in json_objects(path, "'text' and 'label'"):
        text = text_field(obj, "text", path, n)
        if "label" not in obj:
            raise DataFormatError(path, "'label' is missing", n)
        yield text, _json_label(obj["label"], path, n, names)


def _read_csv_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataFormatError(path, f"not valid UTF-8 (byte {exc.start})", line) from None


def _csv_rows(path: Path, names: tuple[str, ...] | None) -> Iterator[tuple[str, int]]:
    # newline="" keeps line breaks inside quoted texts, which the csv module then joins.
    reader = csv.reader(io.StringIO(_read_csv_text(path), newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise DataFormatError(path, f"bad CSV header ({exc})", 1) from None
    if header is None:
        return
    columns = [h.strip() for h in header]
    if "text" not in columns or "label" not in columns:
        raise DataFormatError(path, f"the CSV header must name 'text' and 'label' columns, got {header!r}", 1)
    i_text, i_label = columns.index("text"), columns.index("label")
    while True:
        start = reader.line_num + 1  # a quoted text may span lines: report where the row starts
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataFormatError(path, f"bad CSV ({exc})", start) from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(columns):
            raise DataFormatError(
                path,
                f"expected {len(columns)} fields ({','.join(columns)}), got {len(row)}; "
                "quote texts that contain commas",
                start,
            )
        text = row[i_text]
        if not text.strip():
            raise DataFormatError(path, "'text' is empty", start)
        yield text, _csv_label(row[i_label], path, start, names)


def _rows(path: Path, names: tuple[str, ...] | None) -> Iterator[tuple[str, int]]:
    if path.suffix == ".jsonl":
        return _jsonl_rows(path, names)
    return _csv_rows(path, names)


def _check_options(limit: int | None, clean: str, name: str = "limit") -> None:
    if clean not in CLEAN_MODES:
        raise ConfigError(f"clean must be one of {', '.join(CLEAN_MODES)}; got {clean!r}")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1
    ):
        raise ConfigError(f"{name} must be a positive integer or None; got {limit!r}")


def _load_split(
    folder: Path,
    split: str,
    names: tuple[str, ...] | None,
    limit: int | None,
    seed: int,
    clean: str,
) -> tuple[list[str], np.ndarray, bool]:
    """Texts, labels and whether they were cleaned; names None means labels are only range-checked."""
    if not split or any(sep in split for sep in ("/", "\\")):
        raise ConfigError(f"split must be a plain name such as 'train'; got {split!r}")
    path = _split_file(folder, split)
    texts: list[str] = []
    label_list: list[int] = []
    for text, label in _rows(path, names):
        texts.append(text)
        label_list.append(label)
    if not texts:
        raise DataFormatError(path, "the file holds no rows")
    labels = np.asarray(label_list, dtype=np.int64)
    if limit is not None and limit < len(texts):
        idx = _stratified_sample(labels, limit, seed)
        texts = [texts[i] for i in idx]
        labels = labels[idx]
    cleaned = clean == "newsgroups" or (clean == "auto" and looks_like_usenet(texts))
    if cleaned:
        texts = _clean_texts(texts)
    return texts, labels, cleaned


def is_image_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is laid out as images: a ``train/`` or ``test/`` folder and no split file.

    A folder with both (``train.jsonl`` and ``train/``) is ambiguous and refused.
    """
    folder = Path(folder)
    dirs = [s for s in ("train", "test") if (folder / s).is_dir()]
    if not dirs:
        return False
    files = [p.name for p in _split_files(folder) if p.stem in ("train", "test")]
    if files:
        raise DataFormatError(
            folder,
            f"holds both split files ({', '.join(files)}) and split folders "
            f"({', '.join(d + '/' for d in dirs)}): keep text files or image folders, not both",
        )
    return True


def folder_task(folder: str | Path) -> str:
    """The task of a data folder, from its files (one of :data:`FOLDER_TASKS`).

    The first record of ``train.jsonl`` (else of ``test.jsonl``) decides among the JSON-lines
    layouts: ``context`` and ``question`` keys say question answering, ``image`` and ``text`` say
    image-text matching, ``text`` without ``label`` says causal-LM texts, anything else (and a
    first line that is not JSON, which the text loader then reports with its line) says labelled
    texts. Without a ``.jsonl`` split, ``train/`` or ``test/`` folders say image classification,
    and CSV splits say labelled texts. The loaders then hold every record to the layout chosen.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(folder, "data folder not found")
    for split in ("train", "test"):
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            continue
        record = first_record(path)
        if isinstance(record, dict) and "context" in record and "question" in record:
            return QA_TASK
        if is_pair_record(record):
            return ITM_TASK
        if is_lm_record(record):
            return LM_TASK
        break
    if is_image_folder(folder):
        return "image-classification"
    return "classification"


def load_split(
    folder: str | Path, split: str, *, limit: int | None = None, seed: int = 0, clean: str = "auto"
) -> Dataset:
    """Read one split; with ``limit``, a seeded class-stratified sample of that many rows."""
    _check_options(limit, clean)
    folder = Path(folder)
    task = folder_task(folder)
    if task == "image-classification":
        return load_image_split(folder, split, limit=limit, seed=seed)
    if task == QA_TASK:
        return load_qa_split(folder, split, limit=limit, seed=seed)
    if task == ITM_TASK:
        return load_pair_split(folder, split, limit=limit, seed=seed)
    if task == LM_TASK:
        return load_lm_split(folder, split, limit=limit, seed=seed)
    names = _read_labels_file(folder)
    texts, labels, _ = _load_split(folder, split, names, limit, seed, clean)
    # Without labels.txt the names come from this split alone; load_folder unifies both splits.
    return TextDataset(tuple(texts), labels, names or _derived_names(int(labels.max())))


def load_folder(
    folder: str | Path,
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    clean: str = "auto",
) -> tuple[Dataset, Dataset]:
    """The train and test splits of a data folder, with the same class names and cleaning (texts)."""
    _check_options(train_limit, clean, "train_limit")
    _check_options(test_limit, clean, "test_limit")
    folder = Path(folder)
    task = folder_task(folder)
    if task == "image-classification":
        return load_image_folder(folder, train_limit=train_limit, test_limit=test_limit, seed=seed)
    if task == QA_TASK:
        return load_qa_folder(folder, train_limit=train_limit, test_limit=test_limit, seed=seed)
    if task == ITM_TASK:
        return load_pair_folder(folder, train_limit=train_limit, test_limit=test_limit, seed=seed)
    if task == LM_TASK:
        return load_lm_folder(folder, train_limit=train_limit, test_limit=test_limit, seed=seed)
    names = _read_labels_file(folder)
    train_texts, train_labels, cleaned = _load_split(folder, "train", names, train_limit, seed, clean)
    # The test split follows the train split's "auto" decision so both look alike to the model.
    test_clean = clean if clean != "auto" else ("newsgroups" if cleaned else "none")
    test_texts, test_labels, _ = _load_split(folder, "test", names, test_limit, seed + 1, test_clean)
    if names is None:
        names = _derived_names(int(max(train_labels.max(), test_labels.max())))
    return (
        TextDataset(tuple(train_texts), train_labels, names),
        TextDataset(tuple(test_texts), test_labels, names),
    )
