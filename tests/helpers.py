"""Shared helpers for tests: synthetic data folders and payload surgery."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

WORDS = {
    0: "goal match team score league player coach season win striker",
    1: "stock market shares profit bank earnings investor trade price fund",
    2: "rocket orbit planet nasa telescope launch moon space star galaxy",
}


def write_text_folder(
    folder: Path, *, per_class_train: int = 20, per_class_test: int = 10, seed: int = 0
) -> Path:
    """A small 3-class JSONL data folder whose classes differ by vocabulary."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.txt").write_text("sport\nfinance\nspace\n")
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for label, words in WORDS.items():
                vocab = words.split()
                for _ in range(n):
                    text = " ".join(rng.choice(vocab, size=8))
                    f.write(json.dumps({"text": text, "label": label}) + "\n")
    return folder


def rehash(payload: bytes) -> bytes:
    """Recompute the SHA-256 trailer after editing a payload's body."""
    body = payload[:-32]
    return body + hashlib.sha256(body).digest()


def with_schema_version(payload: bytes, version: int) -> bytes:
    """The same payload claiming another schema version (hash kept valid)."""
    return rehash(payload[:4] + struct.pack("<H", version) + payload[6:])


def replace_float(payload: bytes, old: float, new: float) -> bytes:
    """Replace every float32 ``old`` in the payload's body by ``new`` (hash kept valid)."""
    body = payload[:-32].replace(struct.pack("<f", old), struct.pack("<f", new))
    assert body != payload[:-32], "sentinel value not found in payload"
    return rehash(body + payload[-32:])


IMAGE_CLASSES = ("rows", "columns", "diagonal")


def pattern_images(label: int, n: int, *, size: int = 12, seed: int = 0) -> np.ndarray:
    """``n`` grey ``size x size`` uint8 images of class ``label``: stripes across, stripes down,
    or a diagonal band, each with a random phase and noise."""
    rng = np.random.default_rng([seed, label])
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        phase = int(rng.integers(0, 4))
        coord = (yy, xx, yy + xx)[label]
        base = ((coord + phase) % 4 < 2).astype(np.float64) * 200.0
        out[i] = np.clip(base + rng.normal(0.0, 25.0, (size, size)) + 20.0, 0, 255).astype(np.uint8)
    return out


def write_image_folder_for_tests(
    folder: Path, *, per_class_train: int = 12, per_class_test: int = 6, size: int = 12, seed: int = 0
) -> Path:
    """A small 3-class image folder (``train/<class>/*.png``, ``test/<class>/*.png``, labels.txt)."""
    from edge_runtime.image_data import write_image_folder

    splits = {}
    for split, n, offset in (("train", per_class_train, 0), ("test", per_class_test, 1000)):
        images = np.concatenate([pattern_images(c, n, size=size, seed=seed + offset) for c in range(3)])
        labels = np.repeat(np.arange(3), n)
        splits[split] = (images, labels)
    return write_image_folder(folder, splits, IMAGE_CLASSES)


QA_COLOURS = ("red", "blue", "green", "black", "white", "yellow")
QA_NAMES = ("anna", "bob", "carl", "dora", "eve", "fred")
QA_TEMPLATES = (
    "the car of {name} is {colour} and it is fast .",
    "{name} has a {colour} car .",
    "yesterday {name} painted the old fence {colour} again .",
)


def qa_record(i: int) -> dict[str, object]:
    """The ``i``-th synthetic question: what colour belongs to a name, in one of three templates;
    the second template's questions also accept the colour with its noun."""
    colour, name = QA_COLOURS[i % 6], QA_NAMES[(i // 6) % 6]
    template = QA_TEMPLATES[(i // 36 + i) % 3]
    context = template.format(name=name, colour=colour)
    start = context.index(f" {colour}") + 1
    answers = [{"text": colour, "answer_start": start}]
    if template.startswith("{name} has"):
        answers.append({"text": f"{colour} car", "answer_start": start})
    return {
        "id": f"q{i}",
        "context": context,
        "question": f"what colour is it for {name} ?",
        "answers": answers,
    }


def write_qa_folder(folder: Path, *, train: int = 48, test: int = 12) -> Path:
    """A small SQuAD-style JSON-lines folder: ``train`` questions, then ``test`` others."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", range(train)), ("test", range(train, train + test))):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in rows:
                f.write(json.dumps(qa_record(i)) + "\n")
    return folder


COLOURS = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (30, 40, 230),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "yellow": (240, 220, 20),
}


def write_pair_folder(
    folder: Path, *, train_per_colour: int = 4, test_per_colour: int = 1, seed: int = 0
) -> Path:
    """Image-text pairs: a 12 x 12 PNG of one colour (with noise) and the caption naming it, in
    ``images/``; ``train.jsonl`` and ``test.jsonl`` list them (every colour in both splits)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train_per_colour), ("test", test_per_colour)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for k in range(n):
                for name, rgb in COLOURS.items():
                    noise = rng.integers(-10, 11, (12, 12, 3))
                    pixels = np.clip(np.asarray(rgb) + noise, 0, 255).astype(np.uint8)
                    rel = f"images/{split}-{name}-{k}.png"
                    Image.fromarray(pixels).save(folder / rel)
                    f.write(json.dumps({"image": rel, "text": f"a {name} square"}) + "\n")
    return folder


LM_SENTENCES = (
    "the cat sat on the mat",
    "the dog ran in the park",
    "one two three four five six",
    "red green blue red green blue",
)


def write_lm_folder(folder: Path, *, train: int = 24, test: int = 8) -> Path:
    """Unlabelled texts for causal-LM fine-tuning: four short sentences repeated in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        lines = [json.dumps({"text": LM_SENTENCES[i % len(LM_SENTENCES)]}) for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder
