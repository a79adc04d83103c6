"""The ablation ideas do what they claim, and the ablation table compares with base fairly."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from fer_lib.ablation import ABLATIONS, ablation_table, get_ablation, main, run_ablation
from fer_lib.data import equalize_histogram
from fer_lib.models import create_model
from fer_lib.models.fernet import PREPARATIONS, freeze_bn_scales_, identity_init_, prepare_model, whiten_stem_
from fer_lib.optim import Muon, orthogonalize, orthogonalize_many
from fer_lib.training import Engine, TrainConfig, fit, make_optimizer


def test_equalize_histogram_matches_opencv_and_leaves_constant_faces_alone():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    faces = rng.integers(40, 140, size=(6, 48, 48), dtype=np.uint8)
    faces[1] = rng.integers(0, 256, size=(48, 48), dtype=np.uint8)
    faces[2] = 77  # constant
    ours = equalize_histogram(faces)
    for face, mine in zip(faces[[0, 1, 3, 4, 5]], ours[[0, 1, 3, 4, 5]]):
        np.testing.assert_array_equal(mine, cv2.equalizeHist(face))
    np.testing.assert_array_equal(ours[2], faces[2])
    assert ours[0].min() == 0 and ours[0].max() == 255
    with pytest.raises(ValueError, match="uint8"):
        equalize_histogram(faces.astype(np.float32))


def test_whitened_stem_decorrelates_training_patches_and_is_frozen():
    from fer_lib.augment import to_float

    rng = np.random.default_rng(1)
    # smooth faces: neighbouring pixels strongly correlated, as in real photos
    base = rng.integers(0, 256, size=(64, 12, 12)).astype(np.float32)
    images = torch.nn.functional.interpolate(torch.from_numpy(base)[:, None], size=48, mode="bilinear")
    images = images[:, 0].clamp(0, 255).to(torch.uint8)
    model = whiten_stem_(create_model("fernet_small"), images, eps=1e-8)
    conv = model.stem[0]
    assert not conv.weight.requires_grad
    pairs = conv.out_channels // 2
    np.testing.assert_allclose(conv.weight[:pairs].detach(), -conv.weight[pairs:2 * pairs].detach())
    x = to_float(images[:, None])
    with torch.no_grad():
        out = nn.functional.conv2d(x, conv.weight[:pairs], padding=0)  # valid patches only
    features = out.permute(0, 2, 3, 1).reshape(-1, pairs).double()
    cov = torch.cov(features.T)
    np.testing.assert_allclose(cov.numpy(), np.eye(pairs), atol=1e-3)
    # the frozen weight is left out of training
    optimizer_params = [p for p in model.parameters() if p.requires_grad]
    assert all(p is not conv.weight for p in optimizer_params)


def test_whitened_stem_with_frozen_bn_ends_backward_at_stage_one():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 48, 48), dtype=torch.uint8)
    model = prepare_model("whiten_stem_frozen_bn", create_model("fernet_small"), images)
    stem_conv, stem_bn = model.stem[0], model.stem[1]
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert all(p.requires_grad for p in model.stages.parameters())
    x = torch.randn(8, 1, 48, 48)
    stem_out = model.stem(x)
    # nothing before stage 1 is in the graph, so autograd never computes stage 1's input gradient
    assert not stem_out.requires_grad
    # the BN still normalises each batch and tracks its statistics
    before = stem_bn.running_mean.clone()
    model(x).logsumexp(1).sum().backward()
    assert not torch.equal(stem_bn.running_mean, before)
    assert model.stages[0].layers[0].weight.grad is not None
    assert stem_conv.weight.grad is None and stem_bn.weight.grad is None and stem_bn.bias.grad is None
    torch.testing.assert_close(stem_bn.weight, torch.ones_like(stem_bn.weight))
    # the plain whitened stem keeps its BN trained: the full backward
    plain = prepare_model("whiten_stem", create_model("fernet_small"), images)
    assert plain.stem(x).requires_grad and plain.stem[1].weight.requires_grad


def test_identity_init_passes_the_input_through_and_keeps_the_stem_random():
    torch.manual_seed(0)
    model = create_model("fernet_small")
    stem_before = model.stem[0].weight.detach().clone()
    identity_init_(model)
    torch.testing.assert_close(model.stem[0].weight, stem_before)
    square = model.stages[1].layers[4]  # stage 2's second conv: 64 -> 64
    assert isinstance(square, nn.Conv2d) and square.in_channels == square.out_channels
    x = torch.randn(2, square.in_channels, 6, 6)
    torch.testing.assert_close(square(x), x)
    widening = model.stages[1].layers[0]  # 32 -> 64: the first 32 outputs copy the input
    out = widening(torch.randn(2, 32, 6, 6).requires_grad_(False))
    assert out.shape[1] == 64
    x = torch.randn(2, 32, 6, 6)
    torch.testing.assert_close(widening(x)[:, :32], x)


@pytest.fixture
def data(fer2013_csv):
    from fer_lib.data import load_fer2013

    return load_fer2013(fer2013_csv((96, 32, 32)))


def test_frozen_bn_scales_stay_one_while_biases_learn(data):
    model = freeze_bn_scales_(create_model("fernet_small"))
    bias_before = model.stem[1].bias.detach().clone()
    config = TrainConfig(epochs=1, batch_size=32, lr=0.05, optimizer="sgd", progress=False,
                         checkpoint_every_epoch=False, precision="fp32")
    fitted = fit(model, data.train, data.val, config)
    for module in fitted.model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and not module.weight.requires_grad
    assert not torch.equal(fitted.model.stem[1].bias.detach(), bias_before)


def test_alternating_flip_mirrors_each_image_in_exactly_one_of_two_epochs():
    from fer_lib.device import resolve_device

    config = TrainConfig(alternating_flip=True, seed=3, progress=False)
    engine = Engine(create_model("fernet_small"), config, resolve_device("cpu", "fp32", False), 4)
    odd, even = engine.flip_mask(1000, 1), engine.flip_mask(1000, 2)
    assert torch.all(odd ^ even)  # every image flipped in one of the two
    assert 400 < int(odd.sum()) < 600  # about half each epoch
    assert torch.equal(engine.flip_mask(1000, 3), odd)  # the pattern repeats, from the seed alone
    other = Engine(create_model("fernet_small"), TrainConfig(alternating_flip=True, seed=4),
                   resolve_device("cpu", "fp32", False), 4)
    assert not torch.equal(other.flip_mask(1000, 1), odd)


@pytest.mark.parametrize("change", [{"mixup_alpha": 0.4}, {"alternating_flip": True},
                                    {"augment_early": [("RandomCrop", {"size": 40})], "augment_early_epochs": 1}])
def test_training_options_change_training_and_are_deterministic(change, data):
    base = TrainConfig(epochs=2, batch_size=32, lr=0.05, optimizer="sgd", progress=False,
                       checkpoint_every_epoch=False, precision="fp32", augment="fast", seed=0)

    def train(config):
        torch.manual_seed(0)
        return fit(create_model("fernet_small"), data.train, data.val, config).history[-1]["train_loss"]

    changed = TrainConfig(**{**base.__dict__, **change})
    assert train(changed) == train(changed)  # reproducible from the seed
    assert train(changed) != train(base)  # and it does change what is trained


def test_training_option_errors_say_what_is_missing():
    with pytest.raises(ValueError, match="augment_early"):
        TrainConfig(augment_early_epochs=2)
    with pytest.raises(ValueError, match="mixup_alpha"):
        TrainConfig(mixup_alpha=-1)


def test_every_ablation_is_one_known_change():
    names = [a.name for a in ABLATIONS]
    assert names[0] == "base" and len(set(names)) == len(names)
    for ablation in ABLATIONS:
        early = {"augment_early_epochs": 1} if "augment_early" in ablation.config else {}
        TrainConfig(**{**ablation.config, **early})  # every override is a valid TrainConfig field
        assert ablation.prepare is None or ablation.prepare in PREPARATIONS
        if ablation.tta_only:  # its trained variant comes earlier, so one call can run both
            assert names.index(ablation.tta_only) < names.index(ablation.name)
            assert not ablation.config and not ablation.prepare
    with pytest.raises(ValueError, match="base"):
        get_ablation("nope")


def test_table_compares_each_variant_with_base_on_the_seeds_both_ran():
    runs = [
        {"variant": "base", "seed": 0, "val_accuracy": 60.0, "test_accuracy": 61.0, "wall_seconds": 100, "epochs": 4},
        {"variant": "base", "seed": 1, "val_accuracy": 62.0, "test_accuracy": 63.0, "wall_seconds": 110, "epochs": 4},
        {"variant": "crop40", "seed": 1, "val_accuracy": 63.5, "test_accuracy": 62.0, "wall_seconds": 70, "epochs": 3},
    ]
    table = ablation_table(runs).set_index("variant")
    assert table.loc["base", "PublicTest"] == 61.0 and table.loc["base", "dPublic"] == 0
    # crop40 ran seed 1 only: compared with base's seed 1 (62.0), not base's mean (61.0)
    assert table.loc["crop40", "dPublic"] == pytest.approx(1.5)
    assert table.loc["crop40", "dPrivate"] == pytest.approx(-1.0)
    assert table.loc["crop40", "seeds"] == 1 and table.loc["crop40", "wall_s"] == 70
    assert table.loc["crop40", "epochs"] == 3
    assert list(table.columns[:7]) == ["seeds", "epochs", "PublicTest", "dPublic", "PrivateTest", "dPrivate",
                                       "wall_s"]


def test_tta_only_variant_reevaluates_the_trained_models(data):
    trained = {}
    fast = {"max_steps_per_epoch": 2, "precision": "fp32"}
    row = run_ablation(get_ablation("crop40"), data, epochs=1, trained=trained, **fast)
    assert ("crop40", 0) in trained and row["variant"] == "crop40"
    again = run_ablation(get_ablation("crop40_tencrop"), data, epochs=1, trained=trained, **fast)
    assert again["best_epoch"] == row["best_epoch"]
    # the re-evaluation's wall time counts the training it reuses
    assert again["wall_seconds"] >= trained[("crop40", 0)][1] > 0
    with pytest.raises(ValueError, match="run that variant first"):
        run_ablation(get_ablation("flip_translate_tta"), data, epochs=1, trained=trained, **fast)


def test_command_writes_the_table_and_resumes(tmp_path, capsys, fer2013_csv):
    csv = fer2013_csv((64, 32, 32))
    args = ["--data", str(csv), "--epochs", "1", "--max-steps-per-epoch", "1", "--out", str(tmp_path / "abl"),
            "--only", "base", "hist_eq"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| base " in printed and "| hist_eq " in printed and "dPublic" in printed
    record = json.loads((tmp_path / "abl" / "fast_cpu-1ep" / "ablation.json").read_text())
    assert [r["variant"] for r in record["runs"]] == ["base", "hist_eq"]
    assert main(args + ["--resume"]) == 0  # nothing left to run
    assert "ablation base seed 0" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--only", "crop40_tencrop", "--data", str(csv)])
    assert exit_info.value.code == 2


def test_muon_orthogonalises_conv_updates_and_is_sgd_elsewhere():
    torch.manual_seed(0)
    matrix = torch.randn(16, 72) @ torch.diag(torch.logspace(-2, 1, 72))  # badly conditioned
    singular = torch.linalg.svdvals(orthogonalize(matrix))
    assert singular.min() > 0.6 and singular.max() < 1.25  # all pushed towards 1
    conv = torch.randn(16, 8, 3, 3, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    reference = bias.detach().clone().requires_grad_(True)
    optimizer = Muon([{"params": [conv], "orthogonalize": True}, {"params": [bias], "orthogonalize": False}],
                     lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    sgd = torch.optim.SGD([reference], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    before = conv.detach().clone()
    for _ in range(3):
        grad_conv, grad_bias = torch.randn_like(conv), torch.randn_like(bias)
        conv.grad, bias.grad, reference.grad = grad_conv, grad_bias, grad_bias.clone()
        optimizer.step()
        sgd.step()
    torch.testing.assert_close(bias, reference)  # the other group is exactly torch's SGD
    step = (before * (1 - 0.1 * 0.01) ** 3 - conv.detach()).reshape(16, -1)
    assert torch.linalg.svdvals(step).max() < 3 * 0.1 * 1.25  # each step's spectral norm ~ lr
    with pytest.raises(ValueError, match="momentum"):
        Muon([conv], momentum=1.5)


def test_batched_newton_schulz_matches_one_matrix_at_a_time_padded_or_not():
    torch.manual_seed(0)
    # two of one shape (one batch), a tall one (turned wide), a lone one, a tiny stem-like one
    matrices = [torch.randn(16, 72), torch.randn(16, 72), torch.randn(90, 24), torch.randn(32, 144),
                torch.randn(8, 9)]
    alone = [orthogonalize(m) for m in matrices]
    for pad in (False, True):
        batched = orthogonalize_many(matrices, pad=pad)
        for one, many, m in zip(alone, batched, matrices):
            assert many.shape == m.shape
            torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-4)
    assert orthogonalize_many([], pad=True) == []


def test_muon_step_is_the_per_parameter_rule_it_replaced():
    """The foreach + batched step against the plain loop over parameters (written out here)."""
    torch.manual_seed(1)
    shapes = [(16, 8, 3, 3), (16, 16, 3, 3), (32, 16, 3, 3), (8, 1, 3, 3), (16,), (7, 32), (7,)]
    params = [torch.randn(shape) for shape in shapes]
    mine = [p.clone() for p in params]
    lr, momentum, decay, muon_lr = 0.05, 0.9, 5e-4, 0.02
    optimizer = Muon([{"params": mine[:4], "lr": muon_lr, "orthogonalize": True},
                      {"params": mine[4:], "lr": lr, "orthogonalize": False}],
                     momentum=momentum, nesterov=True, weight_decay=decay)
    buffers = [torch.zeros_like(p) for p in params]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(mine, grads):
            p.grad = g.clone()
        optimizer.step()
        for index, (p, g, buf) in enumerate(zip(params, grads, buffers)):
            orthogonal = index < 4
            if not orthogonal:
                g = g + decay * p
            buf.mul_(momentum).add_(g)
            update = g + momentum * buf
            if orthogonal:
                matrix = update.reshape(update.shape[0], -1)
                scale = max(1.0, matrix.shape[0] / matrix.shape[1]) ** 0.5
                update = orthogonalize(matrix).view_as(p) * scale
                p.mul_(1 - muon_lr * decay)
            p.add_(update, alpha=-(muon_lr if orthogonal else lr))
    for reference, p in zip(params, mine):
        torch.testing.assert_close(p, reference, atol=1e-5, rtol=1e-4)


def test_muon_option_trains_the_convs_with_muon(data):
    from dataclasses import replace

    config = TrainConfig(epochs=1, batch_size=32, lr=0.05, optimizer="muon", muon_lr=0.02, scheduler="onecycle",
                         progress=False, checkpoint_every_epoch=False, precision="fp32", max_steps_per_epoch=2)
    fitted = fit(create_model("fernet_small"), data.train, data.val, config)
    assert np.isfinite(fitted.history[-1]["train_loss"])
    optimizer = make_optimizer(create_model("fernet_small"), config, torch.device("cpu"))
    assert isinstance(optimizer, Muon)
    conv_group, rest_group = optimizer.param_groups
    assert conv_group["orthogonalize"] and all(p.ndim == 4 for p in conv_group["params"])
    assert conv_group["lr"] == 0.02 and rest_group["lr"] == 0.05 and not rest_group["orthogonalize"]
    assert conv_group["weight_decay"] == rest_group["weight_decay"] == config.weight_decay
    own = make_optimizer(create_model("fernet_small"), replace(config, weight_decay=5e-4, muon_weight_decay=0.01),
                         torch.device("cpu"))
    assert [g["weight_decay"] for g in own.param_groups] == [0.01, 5e-4]
    with pytest.raises(ValueError, match="muon_weight_decay must be >= 0"):
        TrainConfig(muon_weight_decay=-1.0)


def test_muon_precision_auto_orthogonalises_in_bf16_only_under_bf16_autocast():
    torch.manual_seed(0)
    matrix = torch.randn(32, 288)
    low = orthogonalize(matrix, dtype=torch.bfloat16)
    assert low.dtype == torch.float32  # returned in the input's dtype
    assert (low - orthogonalize(matrix)).abs().max() < 0.05  # bf16 rounding, not another result
    singular = torch.linalg.svdvals(low)
    assert singular.min() > 0.6 and singular.max() < 1.25
    model = create_model("fernet_small")
    auto = TrainConfig(optimizer="muon", muon_precision="auto")
    dtypes = {amp: make_optimizer(model, config, torch.device("cpu"), amp).param_groups[0]["ns_dtype"]
              for config in (auto,) for amp in (torch.bfloat16, torch.float16, None)}
    assert dtypes == {torch.bfloat16: torch.bfloat16, torch.float16: torch.float32, None: torch.float32}
    fp32 = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"), torch.bfloat16)
    assert fp32.param_groups[0]["ns_dtype"] == torch.float32  # the default keeps fp32
    with pytest.raises(ValueError, match="muon_precision"):
        TrainConfig(optimizer="muon", muon_precision="bf16")


def test_a_costlier_variant_trains_fewer_epochs_and_a_wider_model(data):
    fast = {"max_steps_per_epoch": 1, "precision": "fp32"}
    trained = {}
    row = run_ablation(get_ablation("width_2x_fewer_epochs"), data, epochs=4, trained=trained, **fast)
    assert row["epochs"] == 3
    model = trained[("width_2x_fewer_epochs", 0)][0]
    assert model.head.in_features == 256  # fernet_small's head sees 128 channels


def test_a_recipe_prepares_its_model_before_training(data, tmp_path, monkeypatch):
    from dataclasses import replace

    from fer_lib import recipes

    base = recipes.get_recipe("fast_cpu")
    monkeypatch.setitem(recipes.RECIPES, "prepared", replace(base, name="prepared", prepare="frozen_bn_scales"))
    result = recipes.train_recipe("prepared", data, run_dir=tmp_path / "run", wandb_mode="disabled", epochs=1,
                                  max_steps_per_epoch=2, progress=False)
    scales = [m.weight for m in result.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert scales and all(torch.all(w == 1) for w in scales)  # trained, yet never moved
    with pytest.raises(ValueError, match="whiten_stem"):
        prepare_model("nope", create_model("fernet_small"), data.train.images)


def test_ablation_base_is_the_recipe_with_its_preparation_and_a_variant_adds_its_own(data, monkeypatch):
    from dataclasses import replace

    from fer_lib import recipes

    base = recipes.get_recipe("fast_cpu")
    monkeypatch.setitem(recipes.RECIPES, "prepared", replace(base, name="prepared", prepare="frozen_bn_scales"))
    fast = {"max_steps_per_epoch": 1, "precision": "fp32"}
    trained = {}
    for name in ("base", "whiten_stem"):
        run_ablation(get_ablation(name), data, recipe="prepared", epochs=1, trained=trained, **fast)
    for name in ("base", "whiten_stem"):
        model = trained[(name, 0)][0]
        scales = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(torch.all(w == 1) for w in scales)  # the recipe's frozen BN scales, in both
    assert trained[("base", 0)][0].stem[0].weight.requires_grad  # base: no whitened stem
    assert not trained[("whiten_stem", 0)][0].stem[0].weight.requires_grad  # the variant's, frozen


def test_a_variant_whose_preparation_includes_the_recipes_applies_only_its_own(data, monkeypatch):
    from fer_lib.models import fernet

    assert fernet.combine_preparations("whiten_stem", "whiten_stem_frozen_bn") == ["whiten_stem_frozen_bn"]
    assert fernet.combine_preparations("whiten_stem", None) == ["whiten_stem"]
    assert fernet.combine_preparations("whiten_stem", "whiten_stem") == ["whiten_stem"]
    assert fernet.combine_preparations("frozen_bn_scales", "whiten_stem") == ["frozen_bn_scales", "whiten_stem"]
    applied = []
    def counted(name, prepare):
        return lambda model, images: applied.append(name) or prepare(model, images)

    for name, prepare in list(fernet.PREPARATIONS.items()):
        monkeypatch.setitem(fernet.PREPARATIONS, name, counted(name, prepare))
    fast = {"max_steps_per_epoch": 1, "precision": "fp32"}
    trained = {}
    run_ablation(get_ablation("whiten_stem_frozen_bn"), data, recipe="fast_cpu", epochs=1, trained=trained, **fast)
    assert applied == ["whiten_stem_frozen_bn"]  # fast_cpu whitens its stem: once, not twice
    model = trained[("whiten_stem_frozen_bn", 0)][0]
    assert not any(p.requires_grad for p in model.stem.parameters())


def test_fernet_activation_and_downsampling_options(data):
    relu_avg = create_model("fernet_small", act="relu", downsample="avg")
    kinds = {type(m).__name__ for m in relu_avg.modules()}
    assert {"ReLU", "AvgPool2d"} <= kinds and not {"GELU", "MaxPool2d"} & kinds
    default = create_model("fernet_small")
    assert default.state_dict().keys() == relu_avg.state_dict().keys()  # same weights, other ops
    x = torch.rand(2, 1, 48, 48)
    assert relu_avg(x).shape == (2, 7)
    for act, kind in (("silu", nn.SiLU), ("hardswish", nn.Hardswish)):
        model = create_model("fernet_small", act=act)
        assert sum(isinstance(m, kind) for m in model.modules()) == 7  # stem + 2 per stage
        assert not any(isinstance(m, nn.GELU) for m in model.modules())
    # stem_act: the stem's activation alone; the stages keep act
    relu_stem = create_model("fernet_small", stem_act="relu")
    assert isinstance(relu_stem.stem[2], nn.ReLU)
    assert sum(isinstance(m, nn.GELU) for m in relu_stem.stages.modules()) == 6
    assert not any(isinstance(m, nn.ReLU) for m in relu_stem.stages.modules())
    assert relu_stem.state_dict().keys() == default.state_dict().keys()
    assert isinstance(create_model("fernet_small", act="silu").stem[2], nn.SiLU)  # None follows act
    for bad in ({"act": "swish"}, {"downsample": "blur"}, {"stem_act": "swish"}):
        with pytest.raises(ValueError, match=f"fernet: {next(iter(bad))} must be"):
            create_model("fernet_small", **bad)


def test_fernet_strided_downsampling_replaces_the_pooling():
    strided = create_model("fernet_small", downsample="stride")
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in strided.modules())
    firsts = [stage.layers[0] for stage in strided.stages]
    assert [conv.stride for conv in firsts] == [(2, 2)] * 3
    # the same tensors as the pooled net, in order (the keys move: no pooling layer between),
    # so the variant changes the ops and the FLOPs, not the parameters
    assert [v.shape for v in strided.state_dict().values()] == \
        [v.shape for v in create_model("fernet_small").state_dict().values()]
    for side in (48, 40, 32):  # progressive resizing feeds smaller faces early
        x = torch.rand(2, 1, side, side)
        assert strided.stages(strided.stem(x)).shape[-1] == side // 8
        assert strided(x).shape == (2, 7)


@pytest.mark.parametrize("name", ["fernet_small", "fernet", "fernet_large"])
def test_every_fernet_size_takes_the_activation_and_downsampling_options(name):
    model = create_model(name, act="relu", downsample="avg")
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    assert any(isinstance(m, nn.AvgPool2d) for m in model.modules())
