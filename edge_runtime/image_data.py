"""Image data folders: a folder per split, a folder per class, one file per image.

The layout follows the text folders' split convention (``train`` and ``test``, an optional
``labels.txt``), with a folder where the text layout has a file::

    DATA/
      labels.txt            optional: line i names class i (each name a class folder)
      train/<class>/*.png   one image a file
      test/<class>/*.png

Without ``labels.txt`` the classes are the class folders of ``train/`` and ``test/`` together,
sorted by name (as torchvision's ``ImageFolder`` numbers them), so both splits number a class the
same even when one of them lacks it. Images are read with Pillow (``.png``, ``.jpg``/``.jpeg``,
``.bmp``, ``.gif``, ``.pgm``/``.ppm``/``.pbm``, ``.tif``/``.tiff``, ``.webp``) and converted to
RGB; ``.npy`` files (a uint8 array, ``height x width`` or ``height x width x 1|3``) need numpy
only, for devices without Pillow. Images keep their own size here: the engine resizes them to its
model's input size.

Loading is strict, as for text: a file that is not an image, a class folder that is empty or not
in ``labels.txt``, a file where a class folder belongs, raises :class:`DataFormatError` naming
the path. Names starting with a dot (``.DS_Store``) are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import ConfigError, DataFormatError
from edge_runtime.labels import read_labels_file, stratified_sample

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp")
IMAGE_SUFFIXES = (*PILLOW_SUFFIXES, ".npy")
SPLITS = ("train", "test")


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images (each ``height x width x 3``, uint8 RGB, at its own size) with integer labels."""

    images: tuple[np.ndarray, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int64)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        if labels.ndim != 1:
            raise ConfigError(f"ImageDataset.labels must be 1-D, got shape {labels.shape}")
        if len(self.images) != len(labels):
            raise ConfigError(f"ImageDataset has {len(self.images)} images but {len(labels)} labels")
        for i, image in enumerate(self.images):
            if not (
                isinstance(image, np.ndarray)
                and image.dtype == np.uint8
                and image.ndim == 3
                and image.shape[2] == 3
                and image.shape[0] > 0
                and image.shape[1] > 0
            ):
                shape = getattr(image, "shape", None)
                dtype = getattr(image, "dtype", type(image).__name__)
                raise ConfigError(
                    f"ImageDataset.images[{i}] must be a uint8 array of shape (height, width, 3), "
                    f"got {dtype} {shape}"
                )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise ConfigError(
                f"ImageDataset.labels must lie in [0, {len(self.label_names)}), "
                f"got {labels.min()}..{labels.max()}"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """Number of classes (from the label names, so absent classes count too)."""
        return len(self.label_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The rows at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ImageDataset(tuple(self.images[i] for i in idx), self.labels[idx], self.label_names)

    def label_histogram(self) -> np.ndarray:
        """Samples per class, an int64 array of length ``num_classes``."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    @property
    def task(self) -> str:
        """The task this data trains: ``image-classification``."""
        return "image-classification"


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _class_folders(split_dir: Path) -> list[Path]:
    """The class folders of one split folder; anything else there is an error."""
    entries = _visible(split_dir)
    stray = [p for p in entries if not p.is_dir()]
    if stray:
        raise DataFormatError(
            stray[0],
            f"a file directly in {split_dir.name}/: images go in a folder per class "
            f"({split_dir.name}/<class>/{stray[0].name})",
        )
    return entries


def image_labels(folder: str | Path) -> tuple[str, ...]:
    """Class names: ``labels.txt``, else the sorted class folders of ``train/`` and ``test/``."""
    folder = Path(folder)
    names = read_labels_file(folder)
    if names is not None:
        return names
    found = {p.name for s in SPLITS if (folder / s).is_dir() for p in _class_folders(folder / s)}
    if not found:
        raise DataFormatError(folder, "no class folders in train/ or test/ (and no labels.txt)")
    return tuple(sorted(found))


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataFormatError(path, f"not a readable .npy array ({exc})") from None
    if array.dtype != np.uint8:
        raise DataFormatError(path, f"a .npy image must be uint8 (0..255), got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise DataFormatError(
            path, f"a .npy image must be height x width (x 1 or 3), got shape {array.shape}"
        )
    return np.ascontiguousarray(array)


def _read_pillow(path: Path) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ConfigError(
            f"reading {path.suffix} images needs Pillow (pip install pillow); "
            "or store each image as a uint8 .npy array"
        ) from None
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataFormatError(path, f"not a readable image ({exc})") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def read_image(path: str | Path) -> np.ndarray:
    """One image file as a ``height x width x 3`` uint8 RGB array."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path)
    if suffix in PILLOW_SUFFIXES:
        return _read_pillow(path)
    raise DataFormatError(path, f"not an image file: its suffix is not one of {', '.join(IMAGE_SUFFIXES)}")


def _split_entries(folder: Path, split: str, names: tuple[str, ...]) -> tuple[list[Path], np.ndarray]:
    """Every image file of one split and its label, class by class, files sorted by name."""
    if not split or any(sep in split for sep in ("/", "\\")):
        raise ConfigError(f"split must be a plain name such as 'train'; got {split!r}")
    split_dir = folder / split
    if not split_dir.is_dir():
        raise DataFormatError(folder, f"no {split}/ folder (of class folders of images) in this folder")
    index = {name: i for i, name in enumerate(names)}
    paths: list[Path] = []
    labels: list[int] = []
    for class_dir in _class_folders(split_dir):
        if class_dir.name not in index:
            raise DataFormatError(
                class_dir,
                f"class folder {class_dir.name!r} is not a class in labels.txt ({len(names)} classes)",
            )
        files = _visible(class_dir)
        if not files:
            raise DataFormatError(class_dir, "class folder holds no images")
        for path in files:
            if path.is_dir():
                raise DataFormatError(path, "a folder inside a class folder: images go directly in it")
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataFormatError(
                    path, f"not an image file: its suffix is not one of {', '.join(IMAGE_SUFFIXES)}"
                )
            paths.append(path)
            labels.append(index[class_dir.name])
    if not paths:
        raise DataFormatError(split_dir, "no class folders with images in this split")
    return paths, np.asarray(labels, dtype=np.int64)


def _check_limit(limit: int | None, name: str) -> None:
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1
    ):
        raise ConfigError(f"{name} must be a positive integer or None; got {limit!r}")


def _load(folder: Path, split: str, names: tuple[str, ...], limit: int | None, seed: int) -> ImageDataset:
    paths, labels = _split_entries(folder, split, names)
    if limit is not None and limit < len(paths):
        idx = stratified_sample(labels, limit, seed)
        paths = [paths[i] for i in idx]
        labels = labels[idx]
    return ImageDataset(tuple(read_image(p) for p in paths), labels, names)


def load_image_split(
    folder: str | Path, split: str, *, limit: int | None = None, seed: int = 0
) -> ImageDataset:
    """Read one split of an image folder; with ``limit``, a seeded class-stratified sample."""
    _check_limit(limit, "limit")
    folder = Path(folder)
    return _load(folder, split, image_labels(folder), limit, seed)


def load_image_folder(
    folder: str | Path, *, train_limit: int | None = None, test_limit: int | None = None, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """The train and test splits of an image folder, with the same class names."""
    _check_limit(train_limit, "train_limit")
    _check_limit(test_limit, "test_limit")
    folder = Path(folder)
    names = image_labels(folder)
    # the same seeds as the text loader's: seed for train, seed + 1 for test
    return _load(folder, "train", names, train_limit, seed), _load(
        folder, "test", names, test_limit, seed + 1
    )


def write_image_folder(
    folder: str | Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    label_names: tuple[str, ...],
    *,
    suffix: str = ".png",
) -> Path:
    """Write images in the layout above: ``splits[name] = (images, labels)``, images uint8
    ``N x H x W`` (grey) or ``N x H x W x 3``; with ``labels.txt`` naming the classes in order."""
    folder = Path(folder)
    if suffix not in (".png", ".npy"):
        raise ConfigError(f"write_image_folder writes .png or .npy, not {suffix!r}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.txt").write_text("".join(f"{n}\n" for n in label_names))
    for split, (images, labels) in splits.items():
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            class_dir = folder / split / label_names[int(label)]
            class_dir.mkdir(parents=True, exist_ok=True)
            array = np.asarray(image, dtype=np.uint8)
            if suffix == ".npy":
                np.save(class_dir / f"{i:05d}.npy", array)
            else:
                from PIL import Image

                Image.fromarray(array).save(class_dir / f"{i:05d}.png")
    return folder
