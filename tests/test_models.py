"""The model zoo: every registered model builds, runs forward/backward and is documented."""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn

from fer_lib.model_table import count_macs, model_table
from fer_lib.models import create_model, list_models, model_info
from fer_lib.models.registry import _REGISTRY

ALL_MODELS = list_models()


def _build(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, **kwargs)


def _images(batch: int, size: int = 48, channels: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, channels, size, size, generator=generator)


def test_zoo_has_every_required_name() -> None:
    required = {
        "exp1_mlp", "exp2_cnn", "exp3_cnn", "exp4_resnet", "exp5_resnet3", "exp6_resnet_small",
        "basic_cnn", "enhanced_net", "advanced_net", "emotion_recognition_net",
        "cnn4", "improved_face_cnn", "advanced_face_cnn",
        "baseline_model", "improved_model", "giga_model",
        "simple_cnn", "improved_cnn_v1", "better_cnn",
        "vgg_khaireddin", "resnet18_48", "fernet", "fernet_small", "fernet_large",
    }
    assert required <= set(ALL_MODELS)
    assert ALL_MODELS == sorted(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_train_and_eval(name: str) -> None:
    model = _build(name)
    model.train()
    train_out = model(_images(2))
    model.eval()
    with torch.no_grad():
        eval_out = model(_images(2))
        single = model(_images(1))
    for out, batch in ((train_out, 2), (eval_out, 2), (single, 1)):
        assert out.shape == (batch, 7)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()
    # eval mode is deterministic (no dropout, BN running stats)
    with torch.no_grad():
        assert torch.equal(model(_images(2)), eval_out)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = _build(name)
    model.train()
    loss = nn.functional.cross_entropy(model(_images(2)), torch.tensor([0, 3]))
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.requires_grad, param_name
        assert param.grad is not None, f"{name}: no gradient reaches {param_name}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient in {param_name}"
        # seeded input: a parameter whose gradient is exactly zero sits in a dead branch
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient for {param_name}"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_num_classes_and_in_chans(name: str) -> None:
    model = _build(name, num_classes=8, in_chans=3).eval()
    with torch.no_grad():
        out = model(_images(2, channels=3))
    assert out.shape == (2, 8)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_channels_last_matches_contiguous(name: str) -> None:
    model = _build(name).eval()
    images = _images(2)
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        got = model(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_info_and_docstring(name: str) -> None:
    info = model_info(name)
    assert info["name"] == name
    assert info["source"]
    assert len(info["description"]) > 20
    doc = inspect.getdoc(_REGISTRY[name].factory)
    assert doc and doc == info["details"]
    # each docstring either quotes its report or says it is not from one
    assert "Report" in doc or "Paper" in doc or "Not from a report" in doc or "ResNet-18" in doc


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as excinfo:
        create_model("no_such_net")
    message = str(excinfo.value)
    assert "no_such_net" in message
    for name in ALL_MODELS:
        assert name in message
    with pytest.raises(ValueError, match="valid names"):
        model_info("no_such_net")


def test_unknown_kwarg_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        create_model("exp3_cnn", hidden_size=64)


def test_registry_holds_only_functions() -> None:
    for name, entry in _REGISTRY.items():
        assert inspect.isfunction(entry.factory), name
        assert not isinstance(entry.factory, nn.Module)


def test_import_builds_no_model() -> None:
    """Importing the zoo in a fresh interpreter must not construct any nn.Module."""
    code = (
        "import torch.nn as nn\n"
        "calls = []\n"
        "original = nn.Module.__init__\n"
        "def counting(self, *a, **k):\n"
        "    calls.append(type(self).__name__)\n"
        "    original(self, *a, **k)\n"
        "nn.Module.__init__ = counting\n"
        "import fer_lib.models, fer_lib.model_table\n"
        "assert len(fer_lib.models.list_models()) > 20\n"
        "print(len(calls))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "0", result.stdout + result.stderr


def test_vgg_khaireddin_on_40_and_48() -> None:
    model = _build("vgg_khaireddin").eval()
    with torch.no_grad():
        assert model(_images(2, size=40)).shape == (2, 7)
        assert model(_images(2, size=48)).shape == (2, 7)
        # 40x40 crops leave exactly 2x2x512 before the FC layers, as in the paper
        assert model.features(_images(1, size=40)).shape == (1, 512, 2, 2)
        assert model.features(_images(1, size=48)).shape == (1, 512, 3, 3)
    assert model.classifier[1].in_features == 2048
    assert model.classifier[1].out_features == 4096
    params = sum(p.numel() for p in model.parameters())
    assert 29_000_000 < params < 31_000_000


def test_report_stated_shapes() -> None:
    mlp = _build("exp1_mlp")
    assert sum(p.numel() for p in mlp.parameters()) == 2304 * 64 + 64 + 64 * 7 + 7
    exp4 = _build("exp4_resnet")
    stem = exp4.conv1
    assert (stem.out_channels, stem.kernel_size, stem.stride) == (64, (7, 7), (2, 2))
    assert exp4.fc.in_features == 512
    assert _build("exp5_resnet3").fc.in_features == 256
    stem32 = _build("exp5_resnet3_stem32")
    assert stem32.conv1.out_channels == 32
    same = _build("exp5_resnet3", stem_channels=32)
    assert sum(p.numel() for p in same.parameters()) == sum(p.numel() for p in stem32.parameters())
    exp3 = {h: _build("exp3_cnn", hidden_dim=h) for h in (64, 128, 256)}
    assert [exp3[h].classifier[2].out_features for h in (64, 128, 256)] == [64, 128, 256]
    assert _build("exp3_cnn", dropout_rate=0.2).classifier[1].p == 0.2


def test_improved_and_giga_stages() -> None:
    sizes = []
    for stage in (1, 2, 3, 4):
        model = _build("improved_model", stage=stage).eval()
        with torch.no_grad():
            assert model(_images(2)).shape == (2, 7)
        sizes.append(sum(p.numel() for p in model.parameters()))
        has_dropout = any(isinstance(m, nn.Dropout) for m in model.modules())
        assert has_dropout == (stage >= 2)
    assert sizes[0] == sizes[1]          # dropout adds no parameters
    assert sizes[3] > sizes[2]           # the 512->256->128 head
    for stage in (1, 2):
        with torch.no_grad():
            assert _build("giga_model", stage=stage).eval()(_images(2)).shape == (2, 7)
    with pytest.raises(ValueError, match="stage"):
        create_model("improved_model", stage=5)
    with pytest.raises(ValueError, match="stage"):
        create_model("giga_model", stage=0)


def test_fernet_sizes() -> None:
    counts = {name: sum(p.numel() for p in _build(name).parameters())
              for name in ("fernet_small", "fernet", "fernet_large")}
    assert 500_000 <= counts["fernet"] <= 3_000_000
    assert counts["fernet_small"] < counts["fernet"] < counts["fernet_large"]
    wide = _build("fernet", widths=(48, 96, 192), pool="avgmax", dropout_rate=0.1)
    assert wide.head.in_features == 192 and wide.head.bias is None
    with pytest.raises(ValueError, match="pool"):
        create_model("fernet", pool="median")


def test_fernet_bf16_autocast_channels_last_cpu() -> None:
    model = _build("fernet").to(memory_format=torch.channels_last)
    images = _images(4).contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    assert low.dtype == torch.bfloat16
    assert low.shape == (4, 7) and torch.isfinite(low.float()).all()
    torch.testing.assert_close(low.float(), reference, rtol=0.1, atol=0.05)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_count_macs_of_known_layers() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 48 * 48, 7))
    assert count_macs(conv) == 48 * 48 * 8 * 9 + 8 * 48 * 48 * 7
    assert conv.training  # restored


def test_model_table_rows_and_params() -> None:
    table = model_table()
    assert list(table["name"]) == ALL_MODELS
    assert list(table.columns) == ["name", "source", "params", "mflops"]
    for row in table.itertuples(index=False):
        model = _build(row.name)
        assert row.params == sum(p.numel() for p in model.parameters()), row.name
        assert row.mflops > 0
    mlp = table.set_index("name").loc["exp1_mlp"]
    assert mlp.mflops == pytest.approx(2 * (2304 * 64 + 64 * 7) / 1e6)


def test_model_table_command_reads_its_arguments(capsys) -> None:
    from fer_lib.model_table import main

    assert main(["--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "name,source,params,mflops" and len(lines) == len(ALL_MODELS) + 1
    with pytest.raises(SystemExit) as info:
        main(["--no-such-option"])
    assert info.value.code == 2
