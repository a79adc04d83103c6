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
