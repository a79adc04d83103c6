"""Hostile input and faults: huge photos, lying weights metadata, broken checkpoints, CLI misuse.

Every case must end in a result or in one clear error naming the file, within bounded memory,
without overwriting anything. Large images are built cheaply: mostly uniform pixels compress
to a few MB as JPEG, and `png_uniform` streams a 30000x30000 PNG of under 1 MB without ever
holding its 900 MB of pixels.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_predict import photo_with_face, random_model  # tests/ is on sys.path

from fer_lib import checkpoint, weights_io
from fer_lib.__main__ import EXIT_ERROR, main
from fer_lib.data import CLASS_NAMES
from fer_lib.export import export_onnx
from fer_lib.models import create_model

MODEL_NAME = "exp3_cnn"


# --------------------------------------------------------------------------- helpers

def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("weights")
    return weights_io.save_weights(
        folder, random_model(), model_name=MODEL_NAME, model_kwargs={},
        class_names=CLASS_NAMES, mean=0.5, std=0.25, metrics={"accuracy": 0.0}, notes="test")


# --------------------------------------------------------------------------- weights metadata

def _drop(key):
    def edit(meta):
        *parents, last = key.split(".")
        target = meta
        for part in parents:
            target = target[part]
        del target[last]
    return edit


def _set(key, value):
    def edit(meta):
        *parents, last = key.split(".")
        target = meta
        for part in parents:
            target = target[part]
        target[last] = value
    return edit


@pytest.mark.parametrize("edit,field,problem", [
    (_set("normalization.std", 0), "normalization.std", "must be positive"),
    (_set("normalization.std", [0.2, -1.0]), "normalization.std", "must be positive"),
    (_set("normalization.std", float("nan")), "normalization.std", "must be finite"),
    (_set("normalization.mean", "0.5"), "normalization.mean", "number or a list"),
    (_drop("normalization.mean"), "normalization.mean", "is missing"),
    (_set("class_names", "ADFHSSN"), "class_names", "must be a list"),
    (_set("class_names", ["a", "b", "c"]), "model.kwargs.num_classes", "is 7 but 'class_names' has 3"),
    (_set("class_names", ["a", "a", "b", "c", "d", "e", "f"]), "class_names", "repeats"),
    (_drop("model.name"), "model.name", "missing"),
    (_set("model.name", "no_such_net"), "model.name", "not a registry model"),
    (_set("model.kwargs.num_classes", 10**12), "model.kwargs.num_classes", "1-1000"),
    (_set("model.kwargs.in_chans", 2), "model.kwargs.in_chans", "must be 1 or 3"),
    (_set("input_size", 0), "input_size", "8-512"),
    (_set("input_size", 48.5), "input_size", "whole number"),
    (_set("model", "exp3_cnn"), "model", "must be an object"),
])
def test_lying_metadata_is_one_error_naming_file_and_field(weights_file, tmp_path, edit, field,
                                                            problem):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(weights_file.read_bytes())
    meta = json.loads(weights_file.with_suffix(".json").read_text())
    edit(meta)
    bad.with_suffix(".json").write_text(json.dumps(meta))  # json writes NaN as NaN
    with pytest.raises(weights_io.WeightsError) as info:
        weights_io.load_weights(bad)
    message = str(info.value)
    assert message.startswith(f"{bad.with_suffix('.json')}: ") and "\n" not in message
    assert f"'{field}'" in message and problem in message


def test_metadata_in_a_lone_safetensors_header_is_validated_too(tmp_path):
    from safetensors.torch import load_file, save_file

    model = random_model()
    path = weights_io.save_weights(tmp_path, model, model_name=MODEL_NAME, model_kwargs={},
                                   class_names=CLASS_NAMES, mean=0.5, std=0.25, metrics={},
                                   notes="")
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["normalization"]["std"] = 0
    path.with_suffix(".json").unlink()
    save_file(load_file(str(path)), str(path),
              metadata={"format": "pt", weights_io.HEADER_KEY: json.dumps(meta)})
    with pytest.raises(weights_io.WeightsError, match=rf"{path.name}: .*'normalization.std'"):
        weights_io.load_weights(path)


def test_outputs_must_match_class_names_and_weights_must_be_finite(weights_file, tmp_path):
    bad = tmp_path / "three.safetensors"
    bad.write_bytes(weights_file.read_bytes())
    meta = json.loads(weights_file.with_suffix(".json").read_text())
    meta["class_names"] = ["a", "b", "c"]
    del meta["model"]["kwargs"]["num_classes"]  # the registry default (7) is built
    bad.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(weights_io.WeightsError, match=r"three.safetensors: .*shape \(1, 7\).*3 names"):
        weights_io.load_weights(bad)

    model = random_model()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")  # a diverged training
    nan_path = weights_io.save_weights(tmp_path / "nan", model, model_name=MODEL_NAME,
                                       model_kwargs={}, class_names=CLASS_NAMES, mean=0.5,
                                       std=0.25, metrics={}, notes="")
    with pytest.raises(weights_io.WeightsError, match=r"exp3_cnn.safetensors: tensor .* NaN"):
        weights_io.load_weights(nan_path)


def test_absurd_model_kwargs_fail_on_shapes_without_allocating(weights_file, tmp_path):
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(weights_file.read_bytes())
    meta = json.loads(weights_file.with_suffix(".json").read_text())
    meta["model"]["kwargs"]["hidden_dim"] = 10**9  # an 18 TB first linear layer if built
    bad.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(weights_io.WeightsError, match="huge.safetensors: tensors do not match"):
        weights_io.load_weights(bad)


def test_a_checkpoint_or_onnx_file_given_as_weights_says_what_it_is(tmp_path, capsys):
    best = tmp_path / "best.pt"
    checkpoint.save_checkpoint(best, random_model())
    with pytest.raises(weights_io.WeightsError,
                       match=r"best.pt: not a .safetensors weights file \(a training checkpoint"):
        weights_io.load_weights(best)
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    with pytest.raises(weights_io.WeightsError, match=r"m.onnx: not a .safetensors.*ONNX"):
        weights_io.load_weights(tmp_path / "m.onnx")
    with pytest.raises(weights_io.WeightsError, match=r"gone.pt: weights file not found"):
        weights_io.load_weights(tmp_path / "gone.pt")
    photo = tmp_path / "p.png"
    cv2.imwrite(str(photo), photo_with_face())
    assert main(["predict", str(photo), "--weights", str(best)]) == EXIT_ERROR
    line = one_error_line(capsys.readouterr().err)
    assert "best.pt: not a .safetensors weights file" in line and "best.pt.safetensors" not in line


def test_std_zero_is_exit_1_not_nan_probabilities(weights_file, tmp_path, capsys):
    bad = tmp_path / "std0.safetensors"
    bad.write_bytes(weights_file.read_bytes())
    meta = json.loads(weights_file.with_suffix(".json").read_text())
    meta["normalization"]["std"] = 0
    bad.with_suffix(".json").write_text(json.dumps(meta))
    photo = tmp_path / "p.png"
    cv2.imwrite(str(photo), photo_with_face())
    assert main(["predict", str(photo), "--weights", str(bad), "--json"]) == EXIT_ERROR
    captured = capsys.readouterr()
    assert captured.out == "" and "'normalization.std'" in one_error_line(captured.err)


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


# --------------------------------------------------------------------------- file permissions

def test_weights_and_onnx_files_are_readable_by_others(tmp_path):
    pytest.importorskip("onnx")
    old = os.umask(0o022)
    try:
        path = weights_io.save_weights(tmp_path, random_model(), model_name=MODEL_NAME,
                                       model_kwargs={}, class_names=CLASS_NAMES, mean=0.5,
                                       std=0.25, metrics={}, notes="")
        onnx_path = export_onnx(random_model(), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    for written in (path, path.with_suffix(".json"), onnx_path):
        assert written.stat().st_mode & 0o777 == 0o644, written
