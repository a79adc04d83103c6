"""Hostile input and faults: huge photos, lying weights metadata, broken checkpoints, CLI misuse.

Every case must end in a result or in one clear error naming the file, within bounded memory,
without overwriting anything. Large images are built cheaply: mostly uniform pixels compress
to a few MB as JPEG, and `png_uniform` streams a 30000x30000 PNG of under 1 MB without ever
holding its 900 MB of pixels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import random_model  # tests/ is on sys.path

from fer_lib import checkpoint
from fer_lib.models import create_model

MODEL_NAME = "exp3_cnn"


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("name,content,message", [
    ("last.pt", b"", "last.pt: empty file"),
    ("best.pt", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
     "best.pt: not a fer_lib checkpoint (not a PyTorch zip archive)"),
])
def test_empty_or_random_checkpoints_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_truncated_and_code_carrying_checkpoints_say_why(tmp_path):
    whole = checkpoint.save_checkpoint(tmp_path / "whole.pt", random_model())
    cut = tmp_path / "last.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="last.pt: not a fer_lib checkpoint, or truncated"):
        checkpoint.load_checkpoint(cut)
    pickled = tmp_path / "model.pt"
    torch.save({"model_state": {}, "extra": Path("x")}, pickled)  # a pickled Python object
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_checkpoint(pickled)
    assert "model.pt: not a fer_lib checkpoint: it holds pickled Python objects" in str(info.value)
    assert "weights_only=False" not in str(info.value)  # never advise running the file's code


def test_loading_into_another_model_names_the_file_and_both_models(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path / "best.pt", create_model(MODEL_NAME))
    other = create_model("fernet_small")
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_checkpoint_into(other, path)
    message = str(info.value)
    assert message.startswith(f"{path}: weights of model 'exp3_cnn") and "fernet_small" in message
    assert "missing" in message and "\n" not in message
    # a checkpoint whose recorded kwargs do not fit its weights: load_model says so
    payload = torch.load(path, weights_only=True)
    payload["model_kwargs"]["hidden_dim"] = 64
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"edited.pt: weights of model 'exp3_cnn.*shape"):
        checkpoint.load_model(tmp_path / "edited.pt")
