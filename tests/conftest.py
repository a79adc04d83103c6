"""Shared test setup.

Tests run on small generated data (fer_lib.synthetic); the real FER2013 file is used only by
tests marked `realdata`, which are skipped unless FER2013_PATH points at it.
"""
import os

import pytest

# Keep tracking offline and inside tmp folders: a test must never reach the network or
# write into the home folder.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """CI runs tests in parallel on 2 cores (pytest -n 2): one intra-op thread per worker."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def real_fer2013_path():
    """Path of the real FER2013 file, or skip the test."""
    path = os.environ.get("FER2013_PATH")
    if not path or not os.path.exists(path):
        pytest.skip("FER2013_PATH is not set to the real FER2013 file")
    return path


@pytest.fixture
def fer2013_csv(tmp_path, monkeypatch):
    """Factory: fer2013_csv((train, public, private), seed=0) writes a generated FER2013 CSV in
    tmp_path and returns its path; the parsed-data cache goes to tmp_path as well."""
    from fer_lib.synthetic import write_fer2013_csv

    monkeypatch.setenv("FER_LIB_CACHE", str(tmp_path / "cache"))

    def make(n_per_split, seed=0):
        csv = tmp_path / f"fer2013-{'-'.join(map(str, n_per_split))}-seed{seed}.csv"
        write_fer2013_csv(csv, n_per_split=n_per_split, seed=seed)
        return csv

    return make
