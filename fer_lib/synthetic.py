"""Small generated FER2013 look-alikes, in every file layout `fer_lib.data` reads.

Used by the tests and by notebook smoke runs when the real data is absent. Images carry a
class-dependent pattern (a bright blob at a class-specific place on a circle, plus stripes
at a class-specific angle) under noise, so a small CNN can learn them in a few steps, while
the noise and jitter keep them from being trivially identical.
"""
from __future__ import annotations

import csv
import gzip as gzip_module
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from fer_lib.data import FOLDER_NAMES, NUM_PIXELS, USAGES, VOTE_COLUMNS

DEFAULT_SPLIT_SIZES = (70, 21, 21)  # Training, PublicTest, PrivateTest: 10/3/3 per class


def make_images(n: int, seed: int = 0, num_classes: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 48, 48), labels int64 (n,)); every class appears when n >= num_classes."""
    if n < 0 or num_classes < 1:
        raise ValueError(f"need n >= 0 and num_classes >= 1, got n={n}, num_classes={num_classes}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % num_classes  # balanced, so small n keeps every class
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:48, 0:48].astype(np.float32)
    # A dim face-like oval everywhere, so images look like something and the class signal is local.
    face = 70.0 + 50.0 * np.exp(-(((xx - 23.5) / 16.0) ** 2 + ((yy - 23.5) / 20.0) ** 2))
    angle = 2.0 * np.pi * labels / num_classes
    cx = 23.5 + 13.0 * np.cos(angle) + rng.uniform(-1.5, 1.5, n)
    cy = 23.5 + 13.0 * np.sin(angle) + rng.uniform(-1.5, 1.5, n)
    blob = np.exp(-((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2) / (2 * 4.0 ** 2))
    theta = np.pi * labels / num_classes
    phase = rng.uniform(0, 2 * np.pi, n)
    stripes = np.sin((xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None])
                     * (2 * np.pi / 9.0) + phase[:, None, None])
    contrast = rng.uniform(0.8, 1.2, n)[:, None, None]
    images = face[None] + contrast * (110.0 * blob + 18.0 * stripes) + rng.normal(0.0, 12.0, (n, 48, 48))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels


def make_dataset(n_per_split: Sequence[int] = DEFAULT_SPLIT_SIZES, seed: int = 0, num_classes: int = 7
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, usage codes int8: 0 Training, 1 PublicTest, 2 PrivateTest), row order.

    The writers below all use this, so a test can recompute what a file holds from its seed.
    """
    if len(n_per_split) != 3:
        raise ValueError(f"n_per_split needs 3 sizes (Training, PublicTest, PrivateTest), got {n_per_split}")
    if min(n_per_split) < num_classes:
        raise ValueError(f"every split needs >= {num_classes} rows to hold every class, got {n_per_split}")
    parts = [make_images(n, seed=seed * 1000 + k, num_classes=num_classes) for k, n in enumerate(n_per_split)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    usage = np.concatenate([np.full(n, k, dtype=np.int8) for k, n in enumerate(n_per_split)])
    return images, labels, usage


def _pixels_text(image: np.ndarray) -> str:
    return " ".join(map(str, image.reshape(NUM_PIXELS).tolist()))


def _open_text(path: Path, compress: bool):
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        return gzip_module.open(path, "wt", newline="", encoding="utf-8")
    return open(path, "w", newline="", encoding="utf-8")


def write_fer2013_csv(path: str | os.PathLike, n_per_split: Sequence[int] = DEFAULT_SPLIT_SIZES,
                      seed: int = 0, gzip: bool | None = None) -> Path:
    """The original layout: ``emotion,pixels,Usage``; gzipped when ``gzip`` or the name ends .gz."""
    path = Path(path)
    compress = path.name.endswith(".gz") if gzip is None else gzip
    images, labels, usage = make_dataset(n_per_split, seed)
    with _open_text(path, compress) as handle:
        handle.write("emotion,pixels,Usage\n")
        for image, label, code in zip(images, labels, usage):
            handle.write(f"{label},{_pixels_text(image)},{USAGES[code]}\n")
    return path


def write_icml_csv(path: str | os.PathLike, n_per_split: Sequence[int] = DEFAULT_SPLIT_SIZES,
                   seed: int = 0) -> Path:
    """Kaggle's ``icml_face_data.csv``: header ``emotion, Usage, pixels`` (leading spaces)."""
    path = Path(path)
    images, labels, usage = make_dataset(n_per_split, seed)
    with _open_text(path, path.name.endswith(".gz")) as handle:
        handle.write("emotion, Usage, pixels\n")
        for image, label, code in zip(images, labels, usage):
            handle.write(f"{label},{USAGES[code]},{_pixels_text(image)}\n")
    return path


def write_kaggle_train_test(directory: str | os.PathLike, n_per_split: Sequence[int] = DEFAULT_SPLIT_SIZES,
                            seed: int = 0, quote_pixels: bool = False) -> Path:
    """Kaggle's ``train.csv`` (emotion,pixels: Training) + ``test.csv`` (pixels only: PublicTest
    rows then PrivateTest rows). PublicTest and PrivateTest sizes must be equal, as in the real
    files, because test.csv does not say where one ends."""
    directory = Path(directory)
    if n_per_split[1] != n_per_split[2]:
        raise ValueError(f"test.csv needs equal PublicTest/PrivateTest sizes, got {n_per_split}")
    images, labels, usage = make_dataset(n_per_split, seed)
    quote = '"' if quote_pixels else ""
    with _open_text(directory / "train.csv", False) as handle:
        handle.write("emotion,pixels\n")
        for image, label in zip(images[usage == 0], labels[usage == 0]):
            handle.write(f"{label},{quote}{_pixels_text(image)}{quote}\n")
    with _open_text(directory / "test.csv", False) as handle:
        handle.write("pixels\n")
        for image in images[usage > 0]:
            handle.write(f"{quote}{_pixels_text(image)}{quote}\n")
    return directory


def write_image_folders(directory: str | os.PathLike, n_per_split: Sequence[int] = DEFAULT_SPLIT_SIZES,
                        seed: int = 0, with_usage_prefix: bool = True, ext: str = "png",
                        size: int = 48, mode: str = "L") -> Path:
    """The images version: ``train/<emotion>/Training_<row>.<ext>``, ``test/<emotion>/PublicTest_<row>``
    and ``PrivateTest_<row>`` (just ``<row>.<ext>`` without prefixes). ``size``/``mode`` make
    off-spec images (e.g. 224 or RGB) to exercise resizing and conversion."""
    from PIL import Image

    directory = Path(directory)
    images, labels, usage = make_dataset(n_per_split, seed)
    for split_name in ("train", "test"):
        for folder in FOLDER_NAMES:
            (directory / split_name / folder).mkdir(parents=True, exist_ok=True)
    for row, (image, label, code) in enumerate(zip(images, labels, usage)):
        split_name = "train" if code == 0 else "test"
        name = f"{USAGES[code]}_{row}.{ext}" if with_usage_prefix else f"{row}.{ext}"
        img = Image.fromarray(image, mode="L")
        if size != 48:
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        if mode != "L":
            img = img.convert(mode)
        img.save(directory / split_name / FOLDER_NAMES[label] / name)
    return directory


# FER2013 class index -> FER+ vote column (inverse of data.FERPLUS_TO_FER2013 for the 7 classes)
_CLASS_TO_VOTE_COLUMN = (4, 5, 6, 1, 3, 2, 0)
_CONTEMPT, _UNKNOWN, _NF = 7, 8, 9


def make_ferplus_votes(labels: np.ndarray, usage: np.ndarray, seed: int = 0) -> np.ndarray:
    """Plausible FER+ votes (N, 10), 10 voters per row, whose majority is mostly ``labels``.

    In every (usage, class) group of 5+ rows, every 5th row is a special case, cycling through:
    all "not a face", a 5/5 tie (-> unknown), a contempt majority, an "unknown" majority. Groups
    keep at least 4 ordinary rows, so every class stays in every split after FER+ filtering.
    Ordinary rows also carry single votes, which the majority rule must ignore.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    votes = np.zeros((len(labels), len(VOTE_COLUMNS)), dtype=np.int64)
    special = np.full(len(labels), -1)
    next_kind = 0  # one counter across groups, so every kind of special row occurs
    for code in np.unique(usage):
        for label in np.unique(labels):
            group = np.flatnonzero((usage == code) & (labels == label))
            for row in group[4::5]:
                special[row] = next_kind % 4
                next_kind += 1
    for row, label in enumerate(labels.tolist()):
        own = _CLASS_TO_VOTE_COLUMN[label]
        others = [c for c in range(8) if c != own]
        kind = special[row]
        if kind == 0:
            votes[row, _NF] = 10
        elif kind == 1:
            votes[row, own] = 5
            votes[row, rng.choice(others)] = 5
        elif kind == 2:
            votes[row, _CONTEMPT] = 6
            votes[row, own] = 4
        elif kind == 3:
            votes[row, _UNKNOWN] = 6
            votes[row, own] = 4
        else:
            top = int(rng.integers(6, 11))
            votes[row, own] = top
            rest = 10 - top
            for column in rng.choice([c for c in range(10) if c != own], size=rest):
                votes[row, column] += 1  # mostly single votes: outliers the majority rule removes
    return votes


def write_ferplus_csv(path: str | os.PathLike, n_rows: int | None = None, seed: int = 0, *,
                      n_per_split: Sequence[int] = DEFAULT_SPLIT_SIZES,
                      labels: np.ndarray | None = None, usage: np.ndarray | None = None) -> Path:
    """A FER+ ``fer2013new.csv`` aligned row by row with ``write_fer2013_csv(..., n_per_split, seed)``.

    Pass ``labels`` (and ``usage`` codes, default all Training) to write votes for other rows;
    ``n_rows`` only checks the row count.
    """
    path = Path(path)
    if labels is None:
        _, labels, default_usage = make_dataset(n_per_split, seed)
        usage = default_usage if usage is None else usage
    labels = np.asarray(labels, dtype=np.int64)
    usage = np.zeros(len(labels), dtype=np.int8) if usage is None else np.asarray(usage)
    if n_rows is not None and n_rows != len(labels):
        raise ValueError(f"n_rows={n_rows} but there are {len(labels)} rows (n_per_split={tuple(n_per_split)})")
    votes = make_ferplus_votes(labels, usage, seed)
    with _open_text(path, False) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["Usage", "Image name", *VOTE_COLUMNS])
        for row, (code, row_votes) in enumerate(zip(usage.tolist(), votes.tolist())):
            name = "" if row_votes[_NF] == 10 else f"fer{row:07d}.png"  # FER+ leaves NF rows unnamed
            writer.writerow([USAGES[code], name, *row_votes])
    return path
