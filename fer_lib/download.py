"""Make FER2013 available in a fresh kernel (Colab, a new machine): find it, or download it.

:func:`ensure_fer2013` is what a notebook's setup cell calls when ``fer_lib`` was not installed
yet. It never downloads what is already there, validates whatever it settles on with
:func:`fer_lib.data.load_fer2013` (the same format detection and :class:`DatasetError` messages
as every other load), and sets ``$FER2013_PATH`` so that a later ``load_fer2013()`` without a
path finds the same data.

Where the data comes from, in order:

1. ``path`` if given (an error naming it if it is missing or holds no FER2013 data), else
   ``$FER2013_PATH`` if it exists;
2. what ``load_fer2013()`` finds by itself (the repository's ``data/`` folder and the other
   folders :func:`fer_lib.data.find_fer2013` searches);
3. a public Kaggle copy, downloaded with ``kagglehub.dataset_download`` (public datasets need
   no Kaggle account). Both candidates keep the standard three-way split:

   * ``deadskull7/fer2013`` (the default): the original competition file ``fer2013.csv``
     (``emotion,pixels,Usage``), one file at the top of the download folder. It is chosen
     because it holds the original pixel values (no JPEG re-encoding), keeps the original row
     order (so FER+ labels, ``fer2013new.csv``, align with it row by row, which image folders
     cannot do), and parses in seconds as one file instead of 35,887 image decodes;
   * ``msambare/fer2013`` (the fallback): the images version, ``train/<emotion>/Training_*.jpg``
     and ``test/<emotion>/PublicTest_*.jpg`` + ``PrivateTest_*.jpg``; the file-name prefixes
     give back the three-way split (see :mod:`fer_lib.data`).

If kagglehub is missing, has no network or no access, ``ensure_fer2013`` prints how to upload
or mount the file and returns None instead of raising: the notebook's data cell then raises
the :class:`~fer_lib.data.DatasetError` that lists every place it looked.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

from fer_lib import data as fer_data
from fer_lib.data import DatasetError

# Kaggle dataset handles, tried in order (see the module docstring for why this order).
KAGGLE_DATASETS: tuple[str, ...] = ("deadskull7/fer2013", "msambare/fer2013")

_SEARCH_DEPTH = 3  # how deep inside a download folder the data may sit (e.g. an archive/ folder)


def _say(message: str) -> None:
    print(message, flush=True)


def _upload_help(reasons: Sequence[str]) -> str:
    lines = ["FER2013 could not be downloaded:"]
    lines += [f"  - {reason}" for reason in reasons]
    lines += [
        "Provide the file yourself: fer2013.csv (or .csv.gz) from the Kaggle dataset "
        f"\"{KAGGLE_DATASETS[0]}\", or the train/ + test/ image folders of \"{KAGGLE_DATASETS[1]}\".",
        "  - Colab: upload it in the Files pane (folder icon on the left; it lands in /content), or "
        "mount Google Drive (from google.colab import drive; drive.mount('/content/drive')).",
        "  - Then set os.environ['FER2013_PATH'] = '/content/fer2013.csv' (or the Drive path), or pass "
        "data_path='...' in the notebook's parameters cell, and run the data cell again.",
        "  - Or retry the download with fer_lib.download.ensure_fer2013() once kagglehub can reach "
        "Kaggle (pip install kagglehub; if Kaggle asks for an account: kagglehub.login(), or "
        "KAGGLE_USERNAME / KAGGLE_KEY, in Colab from the Secrets pane).",
    ]
    return "\n".join(lines)


def _validated(path: Path) -> Path:
    """Load ``path`` with fer_lib's loader (parse + cache) and require the standard split.

    Returns the data path as :func:`fer_lib.data.find_fer2013` resolves it (the CSV file, or
    the folder holding ``train/`` + ``test/`` or ``train.csv`` + ``test.csv``).
    """
    found = fer_data.find_fer2013(path)
    with warnings.catch_warnings():
        # An image folder whose test/ images carry no PublicTest_/PrivateTest_ prefix loads with
        # a warning and a made-up val/test split: here that is an error (checked just below).
        warnings.simplefilter("ignore")
        loaded = fer_data.load_fer2013(found)
    if loaded.format == "image_folders":
        unsplit = [e for e in fer_data.list_image_folders(found) if e.usage == fer_data.UNSPLIT_TEST]
        if unsplit:
            raise DatasetError(
                f"{found}: {len(unsplit)} test/ images carry no PublicTest_/PrivateTest_ file-name "
                f"prefix (first: {unsplit[0].path}), so the standard PublicTest/PrivateTest split "
                "cannot be recovered")
    for split in (loaded.train, loaded.val, loaded.test):
        if not split.has_labels:
            raise DatasetError(split.unlabeled_reason)
    _say(f"FER2013: {found} ({loaded.format}: train {len(loaded.train):,}, "
         f"val {len(loaded.val):,}, test {len(loaded.test):,})")
    return found


def _locate(download: Path) -> Path | None:
    """The FER2013 file or folder inside a download folder, searched breadth-first."""
    if download.is_file():
        return download
    level = [download]
    for _ in range(_SEARCH_DEPTH + 1):
        for folder in level:
            found = fer_data.find_in_dir(folder)
            if found is not None:
                return found
        level = [child for folder in level for child in sorted(folder.iterdir())
                 if child.is_dir() and not child.name.startswith(".")]
        if not level:
            break
    return None


def _use(path: Path) -> Path:
    os.environ["FER2013_PATH"] = str(path)
    return path


def ensure_fer2013(path: str | os.PathLike | None = None, *,
                   datasets: Sequence[str] = KAGGLE_DATASETS) -> Path | None:
    """Make FER2013 loadable and return its path (file or folder), or None with instructions.

    path: use this file or folder; a DatasetError names it if it does not exist or holds no
        valid FER2013 data. Without it: ``$FER2013_PATH`` when that exists, then whatever
        ``load_fer2013()`` finds by itself, then a kagglehub download of ``datasets`` (Kaggle
        handles, tried in order; default :data:`KAGGLE_DATASETS`).

    On success ``os.environ["FER2013_PATH"]`` is set to the returned path, so later
    ``load_fer2013()`` calls without a path load the same data (already parsed and cached
    here). When nothing is found and nothing can be downloaded (kagglehub missing, no
    network, no access, or a download without valid data) it prints how to upload or mount
    the file and returns None; it does not raise.
    """
    if path is not None:
        given = Path(path).expanduser()
        if not given.exists():
            raise DatasetError(f"FER2013 path {given} does not exist (ensure_fer2013(path=...)).")
        return _use(_validated(given))

    env = os.environ.get("FER2013_PATH")
    if env:
        env_path = Path(env).expanduser()
        if env_path.exists():
            return _use(_validated(env_path))
        _say(f"FER2013: $FER2013_PATH={env_path} does not exist; looking elsewhere")

    with warnings.catch_warnings():  # the missing $FER2013_PATH was reported just above
        warnings.simplefilter("ignore")
        try:
            local = fer_data.find_fer2013()
        except DatasetError:
            local = None
    if local is not None:
        return _use(_validated(local))

    reasons: list[str] = []
    try:
        import kagglehub
    except ImportError:
        reasons.append("kagglehub is not installed (pip install kagglehub)")
        _say(_upload_help(reasons))
        return None
    for handle in datasets:
        _say(f"FER2013: downloading Kaggle dataset {handle} with kagglehub ...")
        try:
            download = Path(kagglehub.dataset_download(handle))
        except Exception as exc:  # no network, no credentials, not found: tell, never crash the cell
            reasons.append(f"{handle}: {type(exc).__name__}: {_first_line(exc)}")
            continue
        found = _locate(download)
        if found is None:
            reasons.append(f"{handle}: no {fer_data._EXPECTED_IN_DIR} in {download}")
            continue
        try:
            return _use(_validated(found))
        except DatasetError as exc:
            reasons.append(f"{handle}: {_first_line(exc)}")
    _say(_upload_help(reasons))
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
