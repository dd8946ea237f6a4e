"""Labelled images for image classification: the offline digits, an image folder, or a `datasets`
image set. Every source becomes `ImageData(train, evals, label_names)` whose splits are datasets
with an `image` (PIL) and a `label` (int) column; turning images into pixels is the task's job."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import ClassLabel, Dataset, Image

from .data import HELD_OUT_SEED, note_held_out
from .errors import DataError, first_line

log = logging.getLogger("headprune")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DIGITS_EVAL_SIZE = 300


@dataclass
class ImageData:
    train: Dataset
    evals: dict[str, Dataset]  # split name -> dataset
    label_names: list[str]


def digits() -> ImageData:
    """scikit-learn's handwritten digits (1,797 images of 8 x 8 pixels, 16 grey levels; shipped in
    the package, no download), shuffled with seed 0: the first 300 are `validation`, the next 300
    `test`, the other 1,197 train."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError("offline:digits needs scikit-learn: pip install 'headprune[vision]' (or pip install scikit-learn)") from err
    import numpy as np
    from PIL import Image as PILImage

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    images = [PILImage.fromarray((bunch.images[i] * (255 / 16)).round().astype("uint8"), mode="L") for i in order]
    labels = [int(bunch.target[i]) for i in order]
    names = [str(d) for d in range(10)]

    def split(lo: int, hi: int | None) -> Dataset:
        return _dataset(images[lo:hi], labels[lo:hi], names)
    return ImageData(split(2 * DIGITS_EVAL_SIZE, None),
                     {"validation": split(0, DIGITS_EVAL_SIZE), "test": split(DIGITS_EVAL_SIZE, 2 * DIGITS_EVAL_SIZE)},
                     names)


OFFLINE = {"offline:digits": digits}


def _dataset(images: list, labels: list[int], names: list[str]) -> Dataset:
    ds = Dataset.from_dict({"image": images, "label": labels})
    return ds.cast_column("image", Image()).cast_column("label", ClassLabel(names=names))


def _read_folder(folder: Path, names: list[str] | None = None) -> tuple[list, list[int], list[str]]:
    """An image folder: one subfolder per label holding its images (the ImageFolder layout)."""
    from PIL import Image as PILImage, UnidentifiedImageError

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no label folders (expected {folder}/<label>/<image files>)")
    names = names or classes
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise DataError(f"{folder}: labels {unknown} are not among the training labels {names}")
    images, labels = [], []
    for label in classes:
        before = len(images)
        for path in sorted((folder / label).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with PILImage.open(path) as image:
                    images.append(image.convert("RGB"))
            except (OSError, UnidentifiedImageError) as err:
                raise DataError(f"{path}: not a readable image ({err})") from err
            labels.append(names.index(label))
        if names is classes and len(images) == before:  # training: a label with no example to learn
            raise DataError(f"{folder / label}: a label folder without images ({', '.join(IMAGE_SUFFIXES)}); "
                            "remove it or add its images")
    stray = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if stray:
        log.warning("%s: %d image(s) outside the label folders (%s) belong to no label and are left out", folder,
                    len(stray), ", ".join(sorted(stray)[:3]) + (", ..." if len(stray) > 3 else ""))
    if not images:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in its label folders")
    return images, labels, names


def load_images(dataset: str) -> ImageData:
    """`offline:digits`; a folder with `train/` (and `validation/`, `test/`), each in the
    ImageFolder layout (`<split>/<label>/<image>`), or a folder in that layout itself (a held-out
    10% becomes `heldout`); or `hf:<name>[:<config>]`, a `datasets` set with `image` and `label`
    columns (every split but train is evaluated)."""
    if dataset in OFFLINE:
        return OFFLINE[dataset]()
    if dataset.startswith("hf:"):
        return _hub_images(dataset.removeprefix("hf:"))
    root = Path(dataset).expanduser()
    if not root.is_dir():
        raise DataError(f"cannot tell what image set {dataset!r} is: give offline:digits, an image folder "
                        "(<label>/<image> or train/<label>/<image>) or hf:<name>")
    if (root / "train").is_dir():
        images, labels, names = _read_folder(root / "train")
        evals = {}
        for split in ("validation", "test"):
            if (root / split).is_dir():
                e_images, e_labels, _ = _read_folder(root / split, names)
                evals[split] = _dataset(e_images, e_labels, names)
        if not evals:
            raise DataError(f"{root}: a train/ folder but no validation/ or test/ folder to evaluate on")
        return ImageData(_dataset(images, labels, names), evals, names)
    images, labels, names = _read_folder(root)
    split = _dataset(images, labels, names).train_test_split(test_size=0.1, seed=HELD_OUT_SEED)
    note_held_out(root, len(split["train"]), len(split["test"]))
    return ImageData(split["train"], {"heldout": split["test"]}, names)


def _hub_images(name: str) -> ImageData:
    from datasets import load_dataset

    path, _, config = name.partition(":")
    try:
        splits = load_dataset(path, config or None)
    except Exception as err:  # datasets raises many kinds (offline, missing, bad config)
        raise DataError(f"cannot load the image set {name!r}: {first_line(err)}") from err
    if "train" not in splits:
        raise DataError(f"{name!r} has no train split (it has {', '.join(splits)})")
    missing = {"image", "label"} - set(splits["train"].column_names)
    if missing:
        raise DataError(f"{name!r} has no {' or '.join(sorted(missing))} column (it has "
                        f"{', '.join(splits['train'].column_names)})")
    feature = splits["train"].features["label"]
    names = list(feature.names) if isinstance(feature, ClassLabel) else \
        [str(v) for v in sorted(set(splits["train"]["label"]))]
    return ImageData(splits["train"], {s: ds for s, ds in splits.items() if s != "train"}, names)
