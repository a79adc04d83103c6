"""FER2013 loading: find the data, detect its format, parse it fast, cache it, split it.

Supported layouts (detected from the files, never configured):

* ``fer2013.csv`` (``emotion,pixels,Usage``), plain or gzipped (gzip detected by magic bytes);
* Kaggle ``icml_face_data.csv`` (``emotion, Usage, pixels``: column names with leading spaces);
* Kaggle ``train.csv`` (``emotion,pixels``) + ``test.csv`` (``pixels`` only, PublicTest rows then
  PrivateTest rows, without labels);
* the Kaggle images version: ``<root>/train/<emotion>/*.png|jpg`` and ``<root>/test/<emotion>/*``.

The CSV parser works on the whole decompressed byte buffer with numpy (no Python work per pixel)
so that the real 300 MB file parses in a few seconds; the parsed arrays are cached as ``.npz``
keyed by the source's path, size and mtime, so later loads take well under a second.

Every problem with the input raises one :class:`DatasetError` naming the file, the line/data row
or image, and what is wrong.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from fer_lib.fileio import atomic_path, checkout_root

if TYPE_CHECKING:  # pandas is imported lazily: a cached load should not pay for it
    import pandas as pd

CLASS_NAMES: tuple[str, ...] = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
CONTEMPT = "Contempt"  # 8th class name when FER+ contempt is kept as a class
USAGES: tuple[str, ...] = ("Training", "PublicTest", "PrivateTest")
IMAGE_SIZE = 48
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE

# Bump when parsing changes what ends up in the arrays: old cache files then stop matching.
PARSER_VERSION = 1

# FER+ (microsoft/FERPlus fer2013new.csv) vote columns, in file order.
VOTE_COLUMNS: tuple[str, ...] = (
    "neutral", "happiness", "surprise", "sadness", "anger",
    "disgust", "fear", "contempt", "unknown", "NF",
)
# FER+ vote column -> FER2013 class index; contempt becomes 7 only with ferplus_contempt="class",
# unknown and NF ("not a face") never become a class.
FERPLUS_TO_FER2013: tuple[int, ...] = (6, 3, 5, 4, 0, 1, 2, 7, -1, -1)

# Emotion folder names of the images version (lowercase in the Kaggle copy; aliases are cheap).
FOLDER_NAMES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
_FOLDER_ALIASES = {
    "angry": 0, "anger": 0, "disgust": 1, "disgusted": 1, "fear": 2, "fearful": 2,
    "happy": 3, "happiness": 3, "sad": 4, "sadness": 4, "surprise": 5, "surprised": 5,
    "neutral": 6,
}
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm"}
_USAGE_PREFIX = re.compile(r"^(Training|PublicTest|PrivateTest)_(\d+)")

_USAGE_CODES = {name.lower(): code for code, name in enumerate(USAGES)}
UNSPLIT_TEST = 3  # usage code of image-folder test/ images without PublicTest_/PrivateTest_ prefix
_CSV_NAMES = ("fer2013.csv", "fer2013.csv.gz", "icml_face_data.csv", "icml_face_data.csv.gz")
_ROWS_PER_CHUNK = 128  # ~1 MB of pixel text per numpy pass: stays in the CPU cache
_KAGGLE_COMPETITION = "challenges-in-representation-learning-facial-expression-recognition-challenge"


class DatasetError(ValueError):
    """Missing or malformed FER2013 data. The message names the file, the row/image and the problem."""


# --------------------------------------------------------------------------------------------
# Public data containers
# --------------------------------------------------------------------------------------------
@dataclass(eq=False, repr=False)
class Split:
    """One split: ``images`` uint8 (N, 48, 48), ``labels`` int64 (N,), ``rows`` int64 (N,).

    ``rows`` is the 0-based data row of each image in the source CSV (-1 where the source has no
    row order, e.g. image folders). ``votes`` (N, 10) holds the FER+ votes (``VOTE_COLUMNS``
    order) when the labels come from FER+. A split may have no labels (Kaggle's test.csv): then
    reading ``labels`` raises :class:`DatasetError` and ``has_labels`` is False.
    """

    images: np.ndarray
    labels: np.ndarray | None
    rows: np.ndarray | None = None
    name: str = ""
    votes: np.ndarray | None = None
    unlabeled_reason: str = ""

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        n = len(self.images)
        if self.rows is None:
            self.rows = np.full(n, -1, dtype=np.int64)
        self.rows = np.asarray(self.rows, dtype=np.int64)
        for what, array in (("labels", self.__dict__["_labels"]), ("rows", self.rows), ("votes", self.votes)):
            if array is not None and len(array) != n:
                raise ValueError(f"Split {self.name!r}: {len(array)} {what} for {n} images")

    @property
    def has_labels(self) -> bool:
        return self.__dict__["_labels"] is not None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray, name: str | None = None) -> "Split":
        """The split restricted to ``index`` (integer or boolean array)."""
        labels = self.__dict__["_labels"]
        return Split(
            images=self.images[index],
            labels=None if labels is None else labels[index],
            rows=self.rows[index],
            name=self.name if name is None else name,
            votes=None if self.votes is None else self.votes[index],
            unlabeled_reason=self.unlabeled_reason,
        )

    def __repr__(self) -> str:
        labels = "labels" if self.has_labels else "no labels"
        votes = ", FER+ votes" if self.votes is not None else ""
        return f"Split({self.name!r}, {len(self)} images {tuple(self.images.shape[1:])}, {labels}{votes})"


def _get_labels(split: Split) -> np.ndarray:
    labels = split.__dict__["_labels"]
    if labels is None:
        raise DatasetError(split.unlabeled_reason or f"split {split.name!r} has no labels")
    return labels


def _set_labels(split: Split, value) -> None:
    split.__dict__["_labels"] = None if value is None else np.asarray(value, dtype=np.int64)


# A property over the dataclass field: the generated __init__ assigns through the setter, and
# reading the labels of an unlabeled split raises a clear DatasetError instead of handing out None.
Split.labels = property(_get_labels, _set_labels)  # type: ignore[assignment]


def equalize_histogram(images: np.ndarray) -> np.ndarray:
    """Per-image histogram equalisation of uint8 faces (N, H, W), as OpenCV's equalizeHist.

    Each image's grey levels are mapped through its own cumulative histogram, so every face
    spans 0..255 with a near-flat histogram (Tang's 2013 winning entry normalised each image
    similarly). A constant image is returned unchanged. Vectorised over the whole array.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"equalize_histogram needs uint8 images (N, H, W), got {images.dtype} {images.shape}")
    count = len(images)
    flat = images.reshape(count, -1).astype(np.int64)
    pixels = flat.shape[1]
    hist = np.bincount((flat + 256 * np.arange(count)[:, None]).ravel(), minlength=256 * count).reshape(count, 256)
    cdf = hist.cumsum(axis=1)
    cdf_min = cdf[np.arange(count), (hist > 0).argmax(axis=1)]
    constant = cdf_min == pixels
    scale = 255.0 / np.where(constant, 1, pixels - cdf_min)
    lut = np.clip(np.round((cdf - cdf_min[:, None]) * scale[:, None]), 0, 255).astype(np.uint8)
    out = np.take_along_axis(lut, flat, axis=1)
    out[constant] = flat[constant].astype(np.uint8)
    return out.reshape(images.shape)


@dataclass(eq=False, repr=False)
class FER2013:
    """The three splits plus where they came from (``format`` names the detected layout)."""

    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]
    source: Path
    format: str
    label_source: str = "fer2013"
    protocol: str = "standard"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def summary(self) -> "pd.DataFrame":
        """Per-split per-class counts (rows: classes + total; columns: splits)."""
        import pandas as pd

        columns = {}
        for name, split in self.splits().items():
            if split.has_labels:
                counts = np.bincount(split.labels, minlength=self.num_classes).tolist()
            else:
                counts = [None] * self.num_classes
            columns[name] = pd.array(counts + [len(split)], dtype="Int64")
        return pd.DataFrame(columns, index=list(self.class_names) + ["total"])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits().items())
        return (f"FER2013({sizes}; {self.num_classes} classes; labels={self.label_source}, "
                f"protocol={self.protocol}, format={self.format}, source={self.source})")


@dataclass
class _Parsed:
    """The whole source, protocol-independent: this is what the cache stores."""

    images: np.ndarray  # uint8 (N, 48, 48)
    labels: np.ndarray  # int64 (N,), -1 where the source has no label (Kaggle test.csv)
    usage: np.ndarray  # int8 (N,): 0 Training, 1 PublicTest, 2 PrivateTest, 3 unsplit test folder
    rows: np.ndarray  # int64 (N,): 0-based row in row-ordered sources, else -1
    format: str
    unlabeled_file: str = ""  # the file whose rows carry no labels


# --------------------------------------------------------------------------------------------
# Locating the data
# --------------------------------------------------------------------------------------------
def _default_search_dirs() -> list[Path]:
    """Folders searched when neither ``source`` nor ``$FER2013_PATH`` is given (tests patch this)."""
    repo = checkout_root()
    cwd = Path.cwd()
    candidates = [cwd / "data", cwd.parent / "data"]  # cwd.parent: notebooks run from notebooks/
    if repo is not None:  # a checkout (not an installed package): its data/ first, shared/ last
        candidates = [repo / "data", repo / "data" / "fer2013", *candidates,
                      repo.parent / "shared" / "data" / "fer2013"]
    unique: list[Path] = []
    for path in candidates:
        if path not in unique:
            unique.append(path)
    return unique


def find_in_dir(directory: Path) -> Path | None:
    """The FER2013 file or image-folder root directly inside `directory`, or None."""
    for name in _CSV_NAMES:
        if (directory / name).is_file():
            return directory / name
    if (directory / "train.csv").is_file() and (directory / "test.csv").is_file():
        return directory
    if (directory / "train").is_dir() and (directory / "test").is_dir():
        return directory
    return None


_EXPECTED_IN_DIR = ("fer2013.csv(.gz), icml_face_data.csv, train.csv + test.csv, "
                    "or train/ + test/ image folders")


def _how_to_get() -> str:
    return (
        "How to get FER2013:\n"
        f"  - Kaggle competition \"{_KAGGLE_COMPETITION}\": fer2013.csv (inside fer2013.tar.gz), or "
        "icml_face_data.csv, or train.csv + test.csv\n"
        f"    (kaggle competitions download -c {_KAGGLE_COMPETITION})\n"
        "  - the Kaggle images version (dataset \"msambare/fer2013\": train/<emotion>/*.jpg, "
        "test/<emotion>/*.jpg)\n"
        "Then put it in the repository's data/ folder, set FER2013_PATH to the file or folder, "
        "or call load_fer2013(source=...)."
    )


def find_fer2013(source: str | os.PathLike | None = None) -> Path:
    """Where the FER2013 data is: a CSV file, or a folder (train.csv+test.csv / image folders).

    Order: ``source``, ``$FER2013_PATH``, the repository's ``data/`` folder, the shared data
    folder beside the repository. Raises one DatasetError listing every place looked at.
    """
    if source is not None:
        return _resolve_given(Path(source).expanduser(), "source")
    looked: list[str] = []
    env = os.environ.get("FER2013_PATH")
    if env:
        env_path = Path(env).expanduser()
        if env_path.exists():
            return _resolve_given(env_path, "FER2013_PATH")
        looked.append(f"$FER2013_PATH={env_path}: does not exist")
    else:
        looked.append("$FER2013_PATH: not set")
    for directory in _default_search_dirs():
        found = find_in_dir(directory) if directory.is_dir() else None
        if found is not None:
            if env:
                warnings.warn(f"FER2013_PATH={env} does not exist; using {found}", stacklevel=2)
            return found
        state = "no " + _EXPECTED_IN_DIR if directory.is_dir() else "folder does not exist"
        looked.append(f"{directory}: {state}")
    raise DatasetError(
        "FER2013 data not found. Looked at:\n" + "\n".join(f"  - {line}" for line in looked)
        + "\n" + _how_to_get()
    )


def _resolve_given(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"FER2013 {what} {path} does not exist.\n" + _how_to_get())
    if path.is_dir():
        found = find_in_dir(path)
        if found is None:
            raise DatasetError(f"FER2013 {what} {path} is a folder without {_EXPECTED_IN_DIR}.\n"
                               + _how_to_get())
        return found
    # A train.csv or test.csv given directly means the Kaggle pair in its folder.
    if path.name in ("train.csv", "test.csv") and (path.parent / "train.csv").is_file() \
            and (path.parent / "test.csv").is_file():
        return path.parent
    return path


# --------------------------------------------------------------------------------------------
# CSV parsing
# --------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> tuple[bytes, bool]:
    """File contents, gunzipped when the file starts with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read file ({exc})") from None
    if not raw:
        raise DatasetError(f"{path}: the file is empty")
    if raw[:4] == b"PK\x03\x04":
        raise DatasetError(f"{path}: this is a zip archive; unzip it and point at the CSV inside")
    if raw[:2] != b"\x1f\x8b":
        return raw, False
    parts = []
    rest = raw
    try:
        while rest:  # a gzip file may hold several members
            inflater = zlib.decompressobj(wbits=31)
            parts.append(inflater.decompress(rest))
            if not inflater.eof:
                raise DatasetError(f"{path}: truncated gzip file (the compressed data ends early)")
            rest = inflater.unused_data.lstrip(b"\0")
    except zlib.error as exc:
        raise DatasetError(f"{path}: corrupt gzip data ({exc})") from None
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if not data:
        raise DatasetError(f"{path}: the file is empty (after gunzip)")
    if data[257:262] == b"ustar":
        raise DatasetError(f"{path}: this is a tar archive; extract it (tar xzf) and point at the CSV inside")
    return data, True


def _find_byte(arr: np.ndarray, value: int, step: int = 1 << 22) -> np.ndarray:
    """Positions of ``value`` in ``arr``; chunked so the temporary mask stays in the CPU cache."""
    parts = [np.flatnonzero(arr[start:start + step] == value) + start for start in range(0, arr.size, step)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _where(path: Path, row: int) -> str:
    return f"{path} line {row + 2} (data row {row})"


@dataclass
class _Table:
    """A CSV as byte offsets: ``starts``/``ends`` (rows, columns) into ``data``; no copies."""

    path: Path
    data: bytes
    arr: np.ndarray
    columns: list[str]  # normalised: stripped, lowercase
    raw_columns: list[str]
    starts: np.ndarray
    ends: np.ndarray
    compressed: bool

    def __len__(self) -> int:
        return len(self.starts)

    def column(self, name: str) -> int:
        return self.columns.index(name)

    def strings(self, col: int) -> list[bytes]:
        data = self.data
        return [data[s:e].strip(b' \t\r"') for s, e in zip(self.starts[:, col].tolist(), self.ends[:, col].tolist())]


def _read_table(path: Path) -> _Table:
    data, compressed = _read_bytes(path)
    arr = np.frombuffer(data, dtype=np.uint8)
    line_ends = _find_byte(arr, ord("\n"))
    if not data.endswith(b"\n"):
        line_ends = np.append(line_ends, len(data))
    line_starts = np.concatenate(([0], line_ends[:-1] + 1))
    # Blank lines at the end are harmless (editors add them); blank lines inside are row errors.
    last = len(line_ends) - 1
    while last >= 0 and not data[line_starts[last]:line_ends[last]].strip():
        last -= 1
    if last < 0:
        raise DatasetError(f"{path}: the file is empty (no header line)")
    line_starts, line_ends = line_starts[:last + 1], line_ends[:last + 1]
    header = data[:line_ends[0]].decode("utf-8-sig", errors="replace").rstrip("\r")
    raw_columns = header.split(",")
    columns = [c.strip().strip('"').strip().lower() for c in raw_columns]
    if len(line_ends) < 2:
        raise DatasetError(f"{path}: the file has a header ({header[:80]!r}) but no data rows")
    ncols = len(columns)
    if ncols > 1:
        commas = _find_byte(arr, ord(","))
        commas = commas[commas < line_ends[-1]]
        per_line = np.bincount(np.searchsorted(line_ends, commas), minlength=len(line_ends))
        bad = np.flatnonzero(per_line != ncols - 1)
        if bad.size:
            row = int(bad[0]) - 1
            raise DatasetError(
                f"{_where(path, row)}: {per_line[bad[0]] + 1} comma-separated fields, expected "
                f"{ncols} ({','.join(raw_columns)})")
        commas = commas.reshape(len(line_ends), ncols - 1)
        starts = np.column_stack([line_starts, commas + 1])
        ends = np.column_stack([commas, line_ends])
    else:
        starts, ends = line_starts[:, None], line_ends[:, None]
    starts, ends = starts[1:].copy(), ends[1:].copy()
    last_col = ends[:, -1]
    has_cr = (last_col > starts[:, -1]) & (arr[np.maximum(last_col - 1, 0)] == ord("\r"))
    last_col -= has_cr  # \r\n line endings
    return _Table(path, data, arr, columns, raw_columns, starts, ends, compressed)


def _require_columns(table: _Table, names: Sequence[str]) -> None:
    missing = [name for name in names if name.lower() not in table.columns]
    if missing:
        raise DatasetError(
            f"{table.path}: missing column(s) {', '.join(missing)}; the header has "
            f"{','.join(table.raw_columns)!r}")


def _parse_emotions(table: _Table, col: int) -> np.ndarray:
    fields = table.strings(col)
    labels = np.empty(len(fields), dtype=np.int64)
    for row, field in enumerate(fields):
        if not field.isdigit():
            raise DatasetError(f"{_where(table.path, row)}: emotion {field.decode(errors='replace')!r} "
                               f"is not an integer label 0..{len(CLASS_NAMES) - 1}")
        labels[row] = int(field)
    bad = np.flatnonzero(labels >= len(CLASS_NAMES))
    if bad.size:
        row = int(bad[0])
        raise DatasetError(f"{_where(table.path, row)}: unknown emotion label {labels[row]} "
                           f"(expected 0..6 = {', '.join(CLASS_NAMES)})")
    return labels


def _parse_usage(table: _Table, col: int) -> np.ndarray:
    codes = np.empty(len(table), dtype=np.int8)
    for row, field in enumerate(table.strings(col)):
        code = _USAGE_CODES.get(field.decode(errors="replace").lower())
        if code is None:
            raise DatasetError(f"{_where(table.path, row)}: unknown Usage {field.decode(errors='replace')!r} "
                               f"(expected one of {', '.join(USAGES)})")
        codes[row] = code
    return codes


def _parse_pixels(table: _Table, col: int) -> np.ndarray:
    """(N, 48, 48) uint8 from the pixel column, validated, without a Python loop per pixel.

    Rows are joined in chunks into one space-separated buffer; separators are found with numpy,
    and each value (1-3 digits) is assembled from the digits just before its separator. Row
    lengths, characters, empty values and the 0..255 range are checked on whole chunks; only
    when a chunk is bad is it re-read row by row to name the first bad row and value.
    """
    data, arr = table.data, table.arr
    starts = table.starts[:, col].copy()
    ends = table.ends[:, col].copy()
    n = len(starts)
    # Quotes or spaces around the field are rare (some re-exports quote it): strip those rows in Python.
    nonempty = ends > starts
    first = np.where(nonempty, arr[np.minimum(starts, arr.size - 1)], 0)
    last = np.where(nonempty, arr[np.maximum(ends - 1, 0)], 0)
    padded = np.isin(first, (32, 34, 9)) | np.isin(last, (32, 34, 9))
    for row in np.flatnonzero(padded).tolist():
        field = data[starts[row]:ends[row]]
        stripped = field.strip(b' \t"')
        offset = field.find(stripped) if stripped else 0
        starts[row] += offset
        ends[row] = starts[row] + len(stripped)

    view = memoryview(data)
    out = np.empty((n, NUM_PIXELS), dtype=np.uint8)
    zero, space = np.uint8(ord("0")), ord(" ")
    for r0 in range(0, n, _ROWS_PER_CHUNK):
        r1 = min(n, r0 + _ROWS_PER_CHUNK)
        s, e = starts[r0:r1], ends[r0:r1]
        buf = b" ".join([view[a:b] for a, b in zip(s.tolist(), e.tolist())]) + b" "
        chunk = np.frombuffer(buf, dtype=np.uint8)
        row_end = np.cumsum(e - s + 1) - 1  # position of each row's terminating space
        is_sep = chunk == space
        digits = chunk - zero  # wraps to >= 10 for non-digits
        seps = np.flatnonzero(is_sep)
        ok = (np.count_nonzero(digits < 10) + seps.size == chunk.size
              and seps.size == (r1 - r0) * NUM_PIXELS
              and np.array_equal(seps[NUM_PIXELS - 1::NUM_PIXELS], row_end))
        if ok:
            length = np.diff(seps, prepend=-1) - 1
            ok = length.min() >= 1 and length.max() <= 3
        if ok:
            values = digits[seps - 1].astype(np.uint16)
            values += (length >= 2) * digits[seps - 2].astype(np.uint16) * np.uint16(10)
            values += (length >= 3) * digits[seps - 3].astype(np.uint16) * np.uint16(100)
            ok = values.max() <= 255
        if not ok:
            _raise_pixel_error(table, starts, ends, r0, r1)
        out[r0:r1] = values.reshape(r1 - r0, NUM_PIXELS)
    return out.reshape(n, IMAGE_SIZE, IMAGE_SIZE)


def _raise_pixel_error(table: _Table, starts: np.ndarray, ends: np.ndarray, r0: int, r1: int) -> None:
    """Slow path: find the first bad row in rows r0..r1 and raise a DatasetError about it."""
    for row in range(r0, r1):
        where = _where(table.path, row)
        tokens = table.data[starts[row]:ends[row]].split(b" ")
        for index, token in enumerate(tokens):
            if not token:
                if tokens == [b""]:
                    raise DatasetError(f"{where}: empty pixels field, expected {NUM_PIXELS} values")
                raise DatasetError(f"{where}: empty pixel value #{index + 1} (pixel values must be "
                                   "separated by single spaces)")
            text = token.decode(errors="replace")
            if not token.isdigit():
                raise DatasetError(f"{where}: pixel value #{index + 1} {text!r} is not an integer 0..255")
            if len(token) > 3 or int(token) > 255:
                raise DatasetError(f"{where}: pixel value #{index + 1} = {text} is out of range 0..255")
        if len(tokens) != NUM_PIXELS:
            raise DatasetError(f"{where}: {len(tokens)} pixel values, expected {NUM_PIXELS} (48x48)")
    raise DatasetError(f"{table.path} lines {r0 + 2}-{r1 + 1}: malformed pixels field")  # not expected


def _parse_csv(path: Path) -> _Parsed:
    table = _read_table(path)
    suffix = "_gz" if table.compressed else ""
    columns = set(table.columns)
    if "usage" not in columns and "pixels" in columns:
        raise DatasetError(
            f"{path}: missing column Usage (header {','.join(table.raw_columns)!r}); a Kaggle "
            "train.csv needs its test.csv beside it, any other CSV needs emotion,pixels,Usage")
    _require_columns(table, ("emotion", "pixels", "Usage"))
    # icml_face_data.csv is recognised by its header, whose names carry leading spaces.
    is_icml = any(c != c.lstrip() for c in table.raw_columns) or path.name.startswith("icml")
    labels = _parse_emotions(table, table.column("emotion"))
    usage = _parse_usage(table, table.column("usage"))
    images = _parse_pixels(table, table.column("pixels"))
    rows = np.arange(len(table), dtype=np.int64)
    return _Parsed(images, labels, usage, rows, ("icml_csv" if is_icml else "fer2013_csv") + suffix)


def _parse_kaggle_pair(directory: Path) -> _Parsed:
    train = _read_table(directory / "train.csv")
    _require_columns(train, ("emotion", "pixels"))
    test = _read_table(directory / "test.csv")
    _require_columns(test, ("pixels",))
    train_images = _parse_pixels(train, train.column("pixels"))
    train_labels = _parse_emotions(train, train.column("emotion"))
    test_images = _parse_pixels(test, test.column("pixels"))
    n_train, n_test = len(train), len(test)
    if "emotion" in test.columns:  # some re-exports keep the labels; use them when present
        test_labels = _parse_emotions(test, test.column("emotion"))
        unlabeled = ""
    else:
        test_labels = np.full(n_test, -1, dtype=np.int64)
        unlabeled = str(directory / "test.csv")
    # test.csv holds the PublicTest rows, then the PrivateTest rows (3,589 each in the real file).
    n_public = (n_test + 1) // 2
    usage = np.concatenate([np.zeros(n_train, np.int8), np.ones(n_public, np.int8),
                            np.full(n_test - n_public, 2, np.int8)])
    return _Parsed(
        images=np.concatenate([train_images, test_images]),
        labels=np.concatenate([train_labels, test_labels]),
        usage=usage,
        rows=np.arange(n_train + n_test, dtype=np.int64),
        format="kaggle_train_test",
        unlabeled_file=unlabeled,
    )


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------
@dataclass
class ImageEntry:
    path: Path
    label: int
    usage: int
    number: int  # the N of Training_N.png or N.png (ordering only), else -1
    size: int
    mtime_ns: int


def list_image_folders(root: Path) -> list[ImageEntry]:
    """Every image under root/train/<emotion>/ and root/test/<emotion>/, with the split its
    file-name prefix gives (UNSPLIT_TEST for a test/ image without one)."""
    entries: list[ImageEntry] = []
    for split_dir in (root / "train", root / "test"):
        class_dirs = {}
        for child in sorted(split_dir.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            label = _FOLDER_ALIASES.get(child.name.lower())
            if label is None:
                raise DatasetError(f"{child}: unknown emotion folder {child.name!r} (expected "
                                   f"{', '.join(FOLDER_NAMES)})")
            if label in class_dirs:
                raise DatasetError(f"{child}: a second folder for class {CLASS_NAMES[label]} "
                                   f"(already {class_dirs[label].name})")
            class_dirs[label] = child
        missing = [FOLDER_NAMES[c] for c in range(len(CLASS_NAMES)) if c not in class_dirs]
        if missing:
            raise DatasetError(f"{split_dir}: missing class folder(s) {', '.join(missing)} "
                               f"(expected {', '.join(FOLDER_NAMES)})")
        split_entries = []
        for label, class_dir in sorted(class_dirs.items()):
            with os.scandir(class_dir) as scan:
                files = [f for f in scan if not f.name.startswith(".")
                         and os.path.splitext(f.name)[1].lower() in _IMAGE_EXTS and f.is_file()]
            if not files:
                warnings.warn(f"{class_dir}: no images in this class folder", stacklevel=3)
            for f in files:
                match = _USAGE_PREFIX.match(f.name)
                usage = _USAGE_CODES[match.group(1).lower()] if match else -1
                stat = f.stat()
                stem = os.path.splitext(f.name)[0]
                number = int(match.group(2)) if match else int(stem) if stem.isdigit() else -1
                split_entries.append(ImageEntry(Path(f.path), label, usage, number,
                                                 stat.st_size, stat.st_mtime_ns))
        if split_dir.name == "train":
            for entry in split_entries:
                if entry.usage < 0:
                    entry.usage = 0
        else:
            prefixed = [e for e in split_entries if e.usage >= 0]
            if prefixed and len(prefixed) != len(split_entries):
                plain = next(e for e in split_entries if e.usage < 0)
                raise DatasetError(f"{plain.path}: no PublicTest_/PrivateTest_ prefix, while other "
                                   f"images in {split_dir} have one; the split cannot be recovered")
            for entry in split_entries:
                if entry.usage < 0:
                    entry.usage = UNSPLIT_TEST
        entries.extend(split_entries)
    entries.sort(key=lambda e: (e.usage, e.number, e.path.name, e.label))
    return entries


def _to_8bit_gray(img: Any) -> Any:
    """A PIL image as mode "L". 16-bit grayscale (I;16, I;16B...) is scaled by 255/65535:
    PIL's own convert("L") clips every value above 255 to white."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        wide = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    return img.convert("L")


def _parse_image_folders(root: Path, entries: list[ImageEntry], resize: bool) -> _Parsed:
    from PIL import Image, UnidentifiedImageError

    images = np.empty((len(entries), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    converted: list[tuple[Path, str]] = []
    for i, entry in enumerate(entries):
        try:
            with Image.open(entry.path) as img:
                img.load()
                if img.mode != "L":
                    converted.append((entry.path, img.mode))
                    img = _to_8bit_gray(img)
                if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                    if not resize:
                        raise DatasetError(
                            f"{entry.path}: image is {img.size[0]}x{img.size[1]}, expected "
                            f"{IMAGE_SIZE}x{IMAGE_SIZE} (pass resize=True to resize it)")
                    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
                images[i] = np.asarray(img, dtype=np.uint8)
        except DatasetError:
            raise
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError,
                Image.DecompressionBombError) as exc:
            raise DatasetError(f"{entry.path}: cannot read image ({exc})") from None
    if converted:
        path, mode = converted[0]
        warnings.warn(f"{len(converted)} image(s) under {root} are not 8-bit grayscale and were "
                      f"converted to grayscale (first: {path}, mode {mode})", stacklevel=3)
    return _Parsed(
        images=images,
        labels=np.array([e.label for e in entries], dtype=np.int64),
        usage=np.array([e.usage for e in entries], dtype=np.int8),
        rows=np.full(len(entries), -1, dtype=np.int64),
        format="image_folders",
    )


# --------------------------------------------------------------------------------------------
# Source dispatch + cache
# --------------------------------------------------------------------------------------------
def _source_kind(path: Path) -> str:
    if path.is_dir():
        return "kaggle_pair" if (path / "train.csv").is_file() else "image_folders"
    return "csv"


def _parse_source(path: Path, kind: str, resize: bool, entries: list[ImageEntry] | None) -> _Parsed:
    """Parse a source from scratch (the expensive step the cache skips)."""
    if kind == "csv":
        return _parse_csv(path)
    if kind == "kaggle_pair":
        return _parse_kaggle_pair(path)
    return _parse_image_folders(path, entries or [], resize)


def _default_cache_dir() -> Path:
    env = os.environ.get("FER_LIB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fer_lib"


def _file_stamp(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _cache_key(path: Path, kind: str, resize: bool, entries: list[ImageEntry] | None) -> str:
    if kind == "csv":
        files = [_file_stamp(path)]
    elif kind == "kaggle_pair":
        files = [_file_stamp(path / "train.csv"), _file_stamp(path / "test.csv")]
    else:  # every image's path, size and mtime, hashed so the key stays short
        digest = hashlib.sha256()
        for e in entries or []:
            digest.update(f"{e.path}\0{e.size}\0{e.mtime_ns}\n".encode())
        files = [str(path.resolve()), len(entries or []), digest.hexdigest()]
    key = {"parser": PARSER_VERSION, "kind": kind, "files": files,
           "resize": bool(resize) if kind == "image_folders" else False}
    return json.dumps(key, sort_keys=True)


def _cache_file(cache_dir: Path, path: Path, key: str) -> Path:
    source_hash = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    key_hash = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / f"fer2013-{source_hash}-{key_hash}.npz"


def _load_cache(file: Path, key: str) -> _Parsed | None:
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            parsed = _Parsed(npz["images"], npz["labels"], npz["usage"], npz["rows"],
                             meta["format"], meta.get("unlabeled_file", ""))
        n = len(parsed.images)
        if meta.get("key") != key or parsed.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) \
                or parsed.images.dtype != np.uint8 \
                or not (len(parsed.labels) == len(parsed.usage) == len(parsed.rows) == n):
            raise ValueError("contents do not match")
        return parsed
    except Exception as exc:  # any damage (truncated zip, wrong keys, bad json): rebuild
        warnings.warn(f"ignoring unreadable FER2013 cache file {file} ({type(exc).__name__}: {exc}); "
                      "re-parsing the source", stacklevel=3)
        return None


def _save_cache(file: Path, key: str, parsed: _Parsed) -> None:
    """Write atomically (fileio.atomic_path); a failure only costs the cache, never the load."""
    try:
        meta = json.dumps({"key": key, "format": parsed.format, "unlabeled_file": parsed.unlabeled_file})
        with atomic_path(file) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, images=parsed.images, labels=parsed.labels, usage=parsed.usage,
                     rows=parsed.rows, meta=np.array(meta))
        # Older cache files of the same source (changed since) are dead weight.
        for old in file.parent.glob(file.name.rsplit("-", 1)[0] + "-*.npz"):
            if old != file:
                old.unlink(missing_ok=True)
    except OSError as exc:
        warnings.warn(f"could not write the FER2013 cache {file} ({exc}); loading still works",
                      stacklevel=3)


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------
def _stratified_order(labels: np.ndarray, seed) -> np.ndarray:
    """A random order in which every class is spread evenly (prefixes are stratified samples).

    Each item gets the key rank/count within its class (rank in a seeded random order), and
    items are sorted by key with random tie-breaks: any prefix holds ~the same fraction of every
    class, and the first items cover every class once.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(labels.size)
    _, codes = np.unique(labels[perm], return_inverse=True)
    counts = np.bincount(codes)
    by_class = np.argsort(codes, kind="stable")
    group_start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(labels.size, dtype=np.int64)
    rank[by_class] = np.arange(labels.size) - np.repeat(group_start, counts)
    key = rank / counts[codes]
    return perm[np.argsort(key, kind="stable")]


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed=0) -> list[np.ndarray]:
    """Seeded stratified partition of ``range(len(labels))`` into parts of the given fractions.

    Part sizes: round(f * n) for all but the first, the first takes the rest (for 28,709
    Training rows and (0.72, 0.18, 0.10): 20,670 / 5,168 / 2,871, as in the experiment reports).
    Each part's indices are returned sorted.
    """
    labels = np.asarray(labels)
    fractions = np.asarray(fractions, dtype=float)
    if fractions.ndim != 1 or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions.tolist()}")
    n = labels.size
    sizes = np.rint(fractions * n).astype(np.int64)
    sizes[0] = n - sizes[1:].sum()
    order = _stratified_order(labels, seed)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def stratified_subsample(labels: np.ndarray, fraction: float, seed=0) -> np.ndarray:
    """Sorted indices of a seeded stratified ``fraction`` of the items, with every class kept."""
    labels = np.asarray(labels)
    n = labels.size
    if fraction >= 1.0:
        return np.arange(n)
    n_keep = max(int(round(fraction * n)), min(n, np.unique(labels).size))
    return np.sort(_stratified_order(labels, seed)[:n_keep])


def _split_arrays(parsed: _Parsed, protocol: str, seed: int) -> dict[str, np.ndarray]:
    usage = parsed.usage
    if protocol == "report":
        training = np.flatnonzero(usage == 0)
        parts = stratified_split(parsed.labels[training], (0.72, 0.18, 0.10), seed)
        return {name: training[part] for name, part in zip(("train", "val", "test"), parts)}
    index = {"train": np.flatnonzero(usage == 0), "val": np.flatnonzero(usage == 1),
             "test": np.flatnonzero(usage == 2)}
    unsplit = np.flatnonzero(usage == UNSPLIT_TEST)
    if unsplit.size:
        warnings.warn(
            "the test/ images carry no PublicTest_/PrivateTest_ file-name prefix, so val and test "
            f"are a seeded (seed={seed}) stratified half/half split of test/; they are not the "
            "official PublicTest/PrivateTest rows", stacklevel=3)
        val_part, test_part = stratified_split(parsed.labels[unsplit], (0.5, 0.5), seed)
        index["val"] = np.sort(np.concatenate([index["val"], unsplit[val_part]]))
        index["test"] = np.sort(np.concatenate([index["test"], unsplit[test_part]]))
    return index


_SPLIT_ORIGIN = {
    "standard": {"train": "Training", "val": "PublicTest", "test": "PrivateTest"},
    "report": {"train": "72% of Training", "val": "18% of Training", "test": "10% of Training"},
}


# --------------------------------------------------------------------------------------------
# FER+
# --------------------------------------------------------------------------------------------
def ferplus_majority(votes: np.ndarray, contempt: str = "drop") -> np.ndarray:
    """FER2013 class index per row from FER+ votes (``VOTE_COLUMNS`` order); -1 = row dropped.

    As the FER+ reference code's "majority" mode: votes of 1 are outliers and removed, then the
    top emotion must hold more than half of the remaining votes, else the row is "unknown".
    Rows that end up unknown or NF are dropped; contempt rows are dropped (``contempt="drop"``)
    or become class 7 (``contempt="class"``).
    """
    if contempt not in ("drop", "class"):
        raise ValueError(f"contempt must be 'drop' or 'class', got {contempt!r}")
    votes = np.asarray(votes, dtype=np.float64)
    if votes.ndim != 2 or votes.shape[1] != len(VOTE_COLUMNS):
        raise ValueError(f"votes must have shape (N, {len(VOTE_COLUMNS)}), got {votes.shape}")
    kept = np.where(votes <= 1.0, 0.0, votes)
    top = kept.max(axis=1)
    winner = kept.argmax(axis=1)
    labels = np.where(top > 0.5 * kept.sum(axis=1), np.asarray(FERPLUS_TO_FER2013)[winner], -1)
    if contempt == "drop":
        labels[labels == 7] = -1
    return labels.astype(np.int64)


def _read_ferplus(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(usage codes int8 (N,), votes float64 (N, 10)) from fer2013new.csv, validated."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read FER+ file ({exc})") from None
    if not lines:
        raise DatasetError(f"{path}: the file is empty")
    header = [c.strip() for c in lines[0]]
    expected = ["Usage", "Image name", *VOTE_COLUMNS]
    if [c.lower() for c in header] != [c.lower() for c in expected]:
        missing = [c for c in expected if c.lower() not in {h.lower() for h in header}]
        raise DatasetError(f"{path}: FER+ header {','.join(header)!r} does not match "
                           f"{','.join(expected)!r}" + (f" (missing {', '.join(missing)})" if missing else ""))
    rows = lines[1:]
    while rows and not rows[-1]:
        rows.pop()
    if not rows:
        raise DatasetError(f"{path}: the file has a header but no data rows")
    usage = np.empty(len(rows), dtype=np.int8)
    votes = np.empty((len(rows), len(VOTE_COLUMNS)), dtype=np.float64)
    for row, fields in enumerate(rows):
        where = _where(path, row)
        if len(fields) != len(expected):
            raise DatasetError(f"{where}: {len(fields)} fields, expected {len(expected)}")
        code = _USAGE_CODES.get(fields[0].strip().lower())
        if code is None:
            raise DatasetError(f"{where}: unknown Usage {fields[0]!r} (expected one of {', '.join(USAGES)})")
        usage[row] = code
        for col, text in enumerate(fields[2:]):
            try:
                value = float(text)
            except ValueError:
                value = -1.0
            if not (0.0 <= value < float("inf")):
                raise DatasetError(f"{where}: vote {VOTE_COLUMNS[col]}={text!r} is not a count >= 0")
            votes[row, col] = value
    return usage, votes


def load_ferplus_votes(path: str | os.PathLike) -> "pd.DataFrame":
    """fer2013new.csv as a DataFrame: Usage, Image name, the 10 vote columns (float) and
    ``majority`` (FER2013 class index by FER+ majority vote, contempt = 7, -1 = dropped)."""
    import pandas as pd

    path = Path(path)
    usage, votes = _read_ferplus(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        names = [fields[1] if len(fields) > 1 else "" for fields in csv.reader(handle)][1:len(usage) + 1]
    frame = pd.DataFrame(votes, columns=list(VOTE_COLUMNS))
    frame.insert(0, "Image name", names)
    frame.insert(0, "Usage", [USAGES[c] for c in usage])
    frame["majority"] = ferplus_majority(votes, contempt="class")
    return frame


def _find_ferplus(source: Path, ferplus_path: str | os.PathLike | None) -> Path:
    looked = []
    if ferplus_path is not None:
        path = Path(ferplus_path).expanduser()
        path = path / "fer2013new.csv" if path.is_dir() else path
        if not path.is_file():
            raise DatasetError(f"FER+ file {path} (ferplus_path) does not exist")
        return path
    env = os.environ.get("FERPLUS_PATH")
    candidates = []
    if env:
        env_path = Path(env).expanduser()
        candidates.append(env_path / "fer2013new.csv" if env_path.is_dir() else env_path)
    else:
        looked.append("$FERPLUS_PATH: not set")
    base = source if source.is_dir() else source.parent
    candidates += [base / "fer2013new.csv", base / "ferplus" / "fer2013new.csv",
                   base.parent / "ferplus" / "fer2013new.csv"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        looked.append(f"{candidate}: not found")
    raise DatasetError(
        "FER+ labels (fer2013new.csv) not found. Looked at:\n"
        + "\n".join(f"  - {line}" for line in looked)
        + "\nGet fer2013new.csv from github.com/microsoft/FERPlus and put it beside the FER2013 "
        "file or in a sibling ferplus/ folder, set FERPLUS_PATH, or pass ferplus_path=.")


def _apply_ferplus(parsed: _Parsed, source: Path, ferplus_file: Path, contempt: str
                   ) -> tuple[_Parsed, np.ndarray]:
    n = len(parsed.images)
    if not np.array_equal(parsed.rows, np.arange(n)):
        raise DatasetError(
            f"FER+ labels ({ferplus_file}) align with FER2013 by row position, but {source} "
            f"({parsed.format}) has no row order; use fer2013.csv, icml_face_data.csv or "
            "train.csv + test.csv with labels='ferplus'")
    usage, votes = _read_ferplus(ferplus_file)
    if len(votes) != n:
        raise DatasetError(f"{ferplus_file}: {len(votes)} FER+ rows but {source} has {n} rows; "
                           "the two files must align row by row")
    known = parsed.usage <= 2
    mismatch = np.flatnonzero(known & (usage != parsed.usage))
    if mismatch.size:
        row = int(mismatch[0])
        raise DatasetError(f"{_where(ferplus_file, row)}: FER+ Usage {USAGES[usage[row]]} but {source} "
                           f"has {USAGES[parsed.usage[row]]} for this row; the files do not align")
    labels = ferplus_majority(votes, contempt)
    keep = labels >= 0
    relabeled = _Parsed(parsed.images[keep], labels[keep], usage[keep], parsed.rows[keep], parsed.format)
    return relabeled, votes[keep]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def load_fer2013(
    source: str | os.PathLike | None = None,
    *,
    labels: str = "fer2013",
    protocol: str = "standard",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    resize: bool = False,
    fraction: float = 1.0,
    ferplus_path: str | os.PathLike | None = None,
    ferplus_contempt: str = "drop",
    cache: bool = True,
) -> FER2013:
    """Load FER2013 as train/val/test :class:`Split` objects.

    source: a file or folder; default ``$FER2013_PATH``, then the repository's ``data/``,
        then ``../shared/data/fer2013/`` beside the repository (see :func:`find_fer2013`).
    labels: "fer2013" (original emotions) or "ferplus" (FER+ majority vote from
        fer2013new.csv, found beside the source, in a sibling ``ferplus/`` folder, via
        ``$FERPLUS_PATH`` or ``ferplus_path``; ``ferplus_contempt`` "drop" or "class").
    protocol: "standard" (Training / PublicTest / PrivateTest) or "report" (seeded stratified
        72/18/10 split of Training, as the experiment reports did).
    fraction: keep a seeded stratified fraction of each split (quick runs).
    resize: resize image-folder images that are not 48x48 (otherwise an error).
    cache_dir: where parsed arrays are cached (default ``$FER_LIB_CACHE`` or
        ``~/.cache/fer_lib``); ``cache=False`` disables caching.
    """
    if labels not in ("fer2013", "ferplus"):
        raise ValueError(f"labels must be 'fer2013' or 'ferplus', got {labels!r}")
    if protocol not in ("standard", "report"):
        raise ValueError(f"protocol must be 'standard' or 'report', got {protocol!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if ferplus_contempt not in ("drop", "class"):
        raise ValueError(f"ferplus_contempt must be 'drop' or 'class', got {ferplus_contempt!r}")

    path = find_fer2013(source)
    kind = _source_kind(path)
    entries = list_image_folders(path) if kind == "image_folders" else None
    if entries is not None and not entries:
        raise DatasetError(f"{path}: no images in train/ and test/")
    key = _cache_key(path, kind, resize, entries)
    cache_file = _cache_file(Path(cache_dir).expanduser() if cache_dir else _default_cache_dir(), path, key)
    parsed = _load_cache(cache_file, key) if cache else None
    from_cache = parsed is not None
    if parsed is None:
        parsed = _parse_source(path, kind, resize, entries)

    votes = None
    class_names = CLASS_NAMES
    if labels == "ferplus":
        ferplus_file = _find_ferplus(path, ferplus_path)
        full = parsed
        parsed, votes = _apply_ferplus(full, path, ferplus_file, ferplus_contempt)
        if ferplus_contempt == "class":
            class_names = CLASS_NAMES + (CONTEMPT,)
    else:
        full = parsed

    origin = _SPLIT_ORIGIN[protocol]
    splits = {}
    for index, (name, rows) in enumerate(_split_arrays(parsed, protocol, seed).items()):
        labelled = parsed.labels[rows]
        has_labels = not (labelled < 0).any()
        if fraction < 1.0:
            if has_labels:
                keep = stratified_subsample(labelled, fraction, seed=(seed, index))
            else:
                rng = np.random.default_rng((seed, index))
                keep = np.sort(rng.choice(rows.size, max(1, int(round(fraction * rows.size))), replace=False))
            rows = rows[keep]
            labelled = labelled[keep]
        if rows.size == 0:
            raise DatasetError(f"{path}: split {name!r} ({origin[name]}) is empty"
                               + (" after FER+ filtering" if labels == "ferplus" else ""))
        reason = ""
        if not has_labels:
            reason = (f"split {name!r} ({origin[name]}) from {parsed.unlabeled_file or path} has no "
                      "labels: Kaggle's test.csv ships pixels only. Use fer2013.csv or "
                      "icml_face_data.csv for labelled PublicTest/PrivateTest rows, or labels='ferplus'.")
        splits[name] = Split(
            images=parsed.images[rows],
            labels=labelled if has_labels else None,
            rows=parsed.rows[rows],
            name=name,
            votes=None if votes is None else votes[rows],
            unlabeled_reason=reason,
        )
    if cache and not from_cache:
        _save_cache(cache_file, key, full)  # only after everything above succeeded
    return FER2013(splits["train"], splits["val"], splits["test"], class_names, path,
                   parsed.format, label_source=labels, protocol=protocol)
