"""ONNX export: parity with PyTorch across the registry, dynamic batch, metadata, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from fer_lib import weights_io
from fer_lib.__main__ import EXIT_OK, main
from fer_lib.augment import to_float
from fer_lib.data import CLASS_NAMES
from fer_lib.export import benchmark_latency, check_onnx_parity, export_onnx
from fer_lib.models import create_model, list_models

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# Every registry model under 5M parameters (the bigger ones, e.g. the 30M-parameter VGG, use
# the same layer types and would only make the test slow).
MAX_PARAMS = 5_000_000


def _small_models() -> list[str]:
    names = []
    for name in list_models():
        with torch.device("meta"):  # count parameters without allocating them
            count = sum(p.numel() for p in create_model(name).parameters())
        if count < MAX_PARAMS:
            names.append(name)
    return names


def perturbed_model(name: str, seed: int = 0) -> nn.Module:
    """Registry model with random weights AND random BatchNorm statistics.

    Fresh BatchNorm has mean 0 / var 1, which makes folding it into the conv trivially right;
    random statistics and weights test the real arithmetic and give logits of order 1.
    """
    torch.manual_seed(seed)
    model = create_model(name)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        for module in model.modules():
            is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
            if is_bn and module.running_mean is not None:
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                if module.affine:  # some models zero-initialise the last BN of each block
                    module.weight.uniform_(0.5, 1.5)
    return model.eval()


def batch(n: int = 6, size: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def faces(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", _small_models())
def test_onnx_matches_pytorch(name, tmp_path):
    model = perturbed_model(name)
    x = faces()
    with torch.no_grad():
        logit_range = float(model(to_float(x)).abs().max())
    assert logit_range > 0.02  # non-trivial logits (fernet scales its logits by 1/9)
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    diff = check_onnx_parity(model, path, x)
    assert diff < 1e-4 and diff / logit_range < 1e-4


def test_dynamic_and_static_batch(tmp_path):
    model = perturbed_model("exp3_cnn")
    dynamic = export_onnx(model, tmp_path / "dynamic.onnx")
    session = ort.InferenceSession(str(dynamic), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        assert session.run(["logits"], {"input": batch(n).numpy()})[0].shape == (n, 7)
    static = export_onnx(model, tmp_path / "static.onnx", dynamic_batch=False)
    session = ort.InferenceSession(str(static), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 1, 48, 48]


def test_export_has_no_side_effects(tmp_path):
    model = perturbed_model("exp3_cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path / "m.onnx")
    assert model.training  # the caller's model keeps its mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob(".tmp-*")) and path.exists()


def test_export_cli_with_metadata(tmp_path, capsys):
    model = perturbed_model("fernet_small")
    weights = weights_io.save_weights(
        tmp_path, model, model_name="fernet_small", model_kwargs={}, class_names=CLASS_NAMES,
        mean=0.5, std=0.25, metrics={"accuracy": 0.5, "split": "PrivateTest"}, notes="cli")
    out = tmp_path / "model.onnx"
    assert main(["export-onnx", "--weights", str(weights), "--out", str(out)]) == EXIT_OK
    diff = float(capsys.readouterr().out.strip().split()[-1])
    assert diff < 1e-4
    props = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert props["class_names"] == list(CLASS_NAMES)
    assert props["normalization"]["mean"] == 0.5 and props["input_size"] == 48
    assert props["model"]["name"] == "fernet_small"


def test_export_cli_reports_bad_weights(tmp_path, capsys):
    code = main(["export-onnx", "--weights", str(tmp_path / "none.safetensors"),
                 "--out", str(tmp_path / "m.onnx")])
    assert code == 1 and "none.safetensors" in capsys.readouterr().err


def test_benchmark_latency_reports_both_runtimes(tmp_path):
    model = perturbed_model("exp3_cnn")
    path = export_onnx(model, tmp_path / "m.onnx")
    figures = benchmark_latency(model, path, n=3, warmup=1)
    assert set(figures) >= {"torch_ms_per_face", "onnxruntime_ms_per_face"}
    assert figures["torch_ms_per_face"] > 0 and figures["onnxruntime_ms_per_face"] > 0
    assert np.isfinite(list(figures.values())).all()
