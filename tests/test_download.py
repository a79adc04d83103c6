"""fer_lib.download.ensure_fer2013: explicit path, $FER2013_PATH, local search, kagglehub download.

Offline: kagglehub.dataset_download is replaced by a function that returns a folder laid out as
kagglehub leaves a download (``<cache>/datasets/<owner>/<slug>/versions/<n>/...``), built with
fer_lib.synthetic in each supported dataset's layout.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import kagglehub
import numpy as np
import pytest
import requests

from fer_lib import data as fer_data
from fer_lib import synthetic
from fer_lib.data import DatasetError, load_fer2013
from fer_lib.download import KAGGLE_DATASETS, ensure_fer2013

SIZES = (70, 14, 21)  # Training, PublicTest, PrivateTest: unequal, so val and test cannot be swapped
CSV_HANDLE, IMAGES_HANDLE = "deadskull7/fer2013", "msambare/fer2013"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No real data, cache or $FER2013_PATH of the shell: only what each test lays out."""
    monkeypatch.setenv("FER_LIB_CACHE", str(tmp_path / "cache"))
    # setenv first, so that monkeypatch restores the shell's state even though ensure_fer2013
    # writes os.environ["FER2013_PATH"] itself (delenv of an unset name records nothing)
    monkeypatch.setenv("FER2013_PATH", "")
    monkeypatch.delenv("FER2013_PATH")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(fer_data, "_default_search_dirs", lambda: [empty])
    monkeypatch.chdir(empty)


def _version_dir(root: Path, handle: str) -> Path:
    owner, slug = handle.split("/")
    return root / "kagglehub" / "datasets" / owner / slug / "versions" / "1"


def _csv_download(root: Path, subdir: str = "") -> Path:
    """deadskull7/fer2013 as downloaded: fer2013.csv (emotion,pixels,Usage) in the version folder."""
    folder = _version_dir(root, CSV_HANDLE)
    synthetic.write_fer2013_csv(folder / subdir / "fer2013.csv", n_per_split=SIZES)
    return folder


def _images_download(root: Path, with_usage_prefix: bool = True) -> Path:
    """msambare/fer2013 as downloaded: train/<emotion>/Training_*.jpg, test/<emotion>/Public|PrivateTest_*.jpg."""
    folder = _version_dir(root, IMAGES_HANDLE)
    synthetic.write_image_folders(folder, n_per_split=SIZES, ext="jpg", with_usage_prefix=with_usage_prefix)
    return folder


class FakeKaggle:
    """Stands in for kagglehub.dataset_download: a folder per handle, or an error to raise."""

    def __init__(self, results: dict):
        self.results = results
        self.calls: list[str] = []

    def __call__(self, handle, path=None, *, force_download=False, output_dir=None):
        self.calls.append(handle)
        result = self.results.get(handle, requests.exceptions.ConnectionError(
            f"HTTPSConnectionPool(host='api.kaggle.com', port=443): Max retries exceeded ({handle})"))
        if isinstance(result, BaseException):
            raise result
        return str(result)


def _fake(monkeypatch, results: dict) -> FakeKaggle:
    fake = FakeKaggle(results)
    monkeypatch.setattr(kagglehub, "dataset_download", fake)
    return fake


def _assert_standard_splits(path: Path, fmt: str):
    assert os.environ["FER2013_PATH"] == str(path)
    data = load_fer2013()  # no path: must find what ensure_fer2013 settled on
    assert data.source == path
    assert data.format == fmt
    assert (len(data.train), len(data.val), len(data.test)) == SIZES
    _, labels, usage = synthetic.make_dataset(SIZES)
    for code, split in enumerate((data.train, data.val, data.test)):
        np.testing.assert_array_equal(np.bincount(split.labels, minlength=7),
                                      np.bincount(labels[usage == code], minlength=7))


# ------------------------------------------------------------------ downloads
def test_default_is_the_csv_dataset_and_its_split_loads(tmp_path, monkeypatch, capsys):
    assert KAGGLE_DATASETS[0] == CSV_HANDLE and IMAGES_HANDLE in KAGGLE_DATASETS
    fake = _fake(monkeypatch, {CSV_HANDLE: _csv_download(tmp_path), IMAGES_HANDLE: _images_download(tmp_path)})
    path = ensure_fer2013()
    assert path == _version_dir(tmp_path, CSV_HANDLE) / "fer2013.csv"
    assert fake.calls == [CSV_HANDLE]  # the fallback is not downloaded when the default works
    assert "downloading Kaggle dataset deadskull7/fer2013" in capsys.readouterr().out
    _assert_standard_splits(path, "fer2013_csv")


def test_csv_one_folder_down_is_found(tmp_path, monkeypatch):
    _fake(monkeypatch, {CSV_HANDLE: _csv_download(tmp_path, subdir="archive")})
    path = ensure_fer2013()
    assert path == _version_dir(tmp_path, CSV_HANDLE) / "archive" / "fer2013.csv"
    _assert_standard_splits(path, "fer2013_csv")


@pytest.mark.parametrize("default_fails", ["network", "empty download", "broken csv"])
def test_image_folder_dataset_is_the_fallback(tmp_path, monkeypatch, capsys, default_fails):
    results = {IMAGES_HANDLE: _images_download(tmp_path)}
    if default_fails == "empty download":
        results[CSV_HANDLE] = _version_dir(tmp_path, CSV_HANDLE)
        results[CSV_HANDLE].mkdir(parents=True)
    elif default_fails == "broken csv":
        results[CSV_HANDLE] = _version_dir(tmp_path, CSV_HANDLE)
        results[CSV_HANDLE].mkdir(parents=True)
        (results[CSV_HANDLE] / "fer2013.csv").write_text("emotion,pixels,Usage\n9,1 2 3,Training\n")
    fake = _fake(monkeypatch, results)
    path = ensure_fer2013()
    assert fake.calls == [CSV_HANDLE, IMAGES_HANDLE]
    assert path == _version_dir(tmp_path, IMAGES_HANDLE)
    _assert_standard_splits(path, "image_folders")


def test_image_folders_without_usage_prefixes_are_rejected(tmp_path, monkeypatch, capsys):
    """Without PublicTest_/PrivateTest_ names the standard split is lost: not accepted."""
    _fake(monkeypatch, {IMAGES_HANDLE: _images_download(tmp_path, with_usage_prefix=False)})
    assert ensure_fer2013() is None
    out = capsys.readouterr().out
    assert "msambare/fer2013" in out and "PublicTest_/PrivateTest_" in out
    assert "FER2013_PATH" not in os.environ


# ------------------------------------------------------------------ no download possible
def test_no_network_prints_how_to_upload_and_returns_none(monkeypatch, capsys):
    fake = _fake(monkeypatch, {})  # every handle raises requests' ConnectionError
    assert ensure_fer2013() is None
    assert fake.calls == list(KAGGLE_DATASETS)
    out = capsys.readouterr().out
    assert "could not be downloaded" in out
    assert "ConnectionError" in out and "api.kaggle.com" in out
    for hint in ("Files pane", "drive.mount", "FER2013_PATH", "data_path"):
        assert hint in out, hint
    assert "FER2013_PATH" not in os.environ
    # ... and the notebook's data cell then raises fer_lib's error listing where it looked
    with pytest.raises(DatasetError, match="Looked at"):
        load_fer2013()


def test_no_credentials_error_is_reported_not_raised(monkeypatch, capsys):
    from kagglehub.exceptions import UnauthenticatedError

    _fake(monkeypatch, {handle: UnauthenticatedError("You must be authenticated") for handle in KAGGLE_DATASETS})
    assert ensure_fer2013() is None
    out = capsys.readouterr().out
    assert "UnauthenticatedError: You must be authenticated" in out and "Files pane" in out


def test_without_kagglehub_prints_how_to_upload_and_returns_none(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # import kagglehub -> ImportError
    assert ensure_fer2013() is None
    out = capsys.readouterr().out
    assert "kagglehub is not installed" in out
    assert "Files pane" in out and "FER2013_PATH" in out


# ------------------------------------------------------------------ data already there
def test_env_path_is_used_without_download(tmp_path, monkeypatch):
    csv = synthetic.write_fer2013_csv(tmp_path / "mine" / "fer2013.csv.gz", n_per_split=SIZES)
    monkeypatch.setenv("FER2013_PATH", str(csv))
    fake = _fake(monkeypatch, {})
    assert ensure_fer2013() == csv
    assert fake.calls == []
    _assert_standard_splits(csv, "fer2013_csv_gz")


def test_explicit_folder_is_resolved_and_exported(tmp_path, monkeypatch):
    folder = synthetic.write_image_folders(tmp_path / "images", n_per_split=SIZES)
    fake = _fake(monkeypatch, {})
    assert ensure_fer2013(folder) == folder
    assert fake.calls == []
    _assert_standard_splits(folder, "image_folders")


def test_local_search_is_used_without_download(tmp_path, monkeypatch):
    data_dir = tmp_path / "repo_data"
    csv = synthetic.write_fer2013_csv(data_dir / "fer2013.csv", n_per_split=SIZES)
    monkeypatch.setattr(fer_data, "_default_search_dirs", lambda: [data_dir])
    fake = _fake(monkeypatch, {})
    assert ensure_fer2013() == csv
    assert fake.calls == []
    _assert_standard_splits(csv, "fer2013_csv")


def test_missing_env_path_is_reported_then_downloaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FER2013_PATH", str(tmp_path / "not_mounted" / "fer2013.csv"))
    _fake(monkeypatch, {CSV_HANDLE: _csv_download(tmp_path)})
    path = ensure_fer2013()
    assert "not_mounted" in capsys.readouterr().out
    assert path == _version_dir(tmp_path, CSV_HANDLE) / "fer2013.csv"
    _assert_standard_splits(path, "fer2013_csv")


# ------------------------------------------------------------------ explicit bad paths
def test_explicit_missing_path_is_an_error_naming_it(tmp_path, monkeypatch):
    fake = _fake(monkeypatch, {CSV_HANDLE: _csv_download(tmp_path)})
    missing = tmp_path / "typo" / "fer2031.csv"
    with pytest.raises(DatasetError, match="does not exist") as err:
        ensure_fer2013(missing)
    assert str(missing) in str(err.value)
    assert fake.calls == []  # an explicit path is never silently replaced by a download
    assert "FER2013_PATH" not in os.environ


def test_explicit_folder_without_data_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    with pytest.raises(DatasetError) as err:
        ensure_fer2013(folder)
    assert str(folder) in str(err.value)


def test_explicit_malformed_csv_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "fer2013.csv"
    bad.write_text("emotion,pixels\n0,1 2 3\n")
    with pytest.raises(DatasetError, match="Usage") as err:
        ensure_fer2013(bad)
    assert str(bad) in str(err.value)
    assert "FER2013_PATH" not in os.environ


def test_import_does_no_work(tmp_path):
    """Importing the module downloads, loads and prints nothing (checked in a fresh interpreter)."""
    import subprocess

    code = ("import sys, fer_lib.download as d; "
            "assert 'kagglehub' not in sys.modules, 'kagglehub imported at import time'; "
            "assert 'pandas' not in sys.modules")
    package_parent = str(Path(fer_data.__file__).resolve().parents[1])  # the fer_lib under test
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": package_parent})
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
