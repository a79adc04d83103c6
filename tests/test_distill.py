"""Distillation: soft targets from teachers, the tempered KL loss, and its wiring into fit/reproduce."""
import json
import math

import pytest
import torch
from torch import nn

from fer_lib.distill import check_soft_targets, distillation_loss, load_teachers, teacher_probs, temper
from fer_lib.synthetic import make_images
from fer_lib.training import TrainConfig, fit


class ConstantLogits(nn.Module):
    """A 'teacher' that answers the same logits for every face."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_temper_keeps_t1_and_softens_above_sharpens_below():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert torch.allclose(temper(probs, 1.0), probs, atol=1e-6)
    soft, sharp = temper(probs, 4.0), temper(probs, 0.5)
    assert torch.allclose(soft.sum(1), torch.ones(2)) and torch.allclose(sharp.sum(1), torch.ones(2))
    assert soft.max() < probs.max() < sharp.max()
    # T = 0.5 squares the probabilities before renormalising
    assert torch.allclose(sharp[0], probs[0] ** 2 / (probs[0] ** 2).sum(), atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        temper(probs, 0.0)


def test_distillation_loss_is_zero_at_the_targets_and_cross_entropy_for_one_hot():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    for temperature in (1.0, 3.0):
        # a student whose logits are the targets' log-probabilities matches them at every T
        zero = distillation_loss(torch.log(probs), temper(probs, temperature), temperature)
        assert zero.abs() < 1e-6
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    assert distillation_loss(logits, probs, 1.0) > 0.01
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    ce = nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    assert distillation_loss(logits, one_hot, 1.0) == pytest.approx(float(ce), rel=1e-6)
    # T^2 scaling: at T the loss is T^2 times the KL of the tempered distributions
    kl = (one_hot * (one_hot.clamp_min(1e-12).log() - torch.log_softmax(logits / 2, 1))).sum(1).mean()
    assert distillation_loss(logits, one_hot, 2.0) == pytest.approx(4 * float(kl), rel=1e-5)


def test_check_soft_targets_names_the_shape_or_the_bad_row():
    good = torch.full((4, 7), 1 / 7)
    assert check_soft_targets(good.double(), 4, 7).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(4, 7\), got shape \(3, 7\)"):
        check_soft_targets(good[:3], 4, 7)
    bad = good.clone()
    bad[2, 0] = -0.1
    with pytest.raises(ValueError, match="row 2 "):
        check_soft_targets(bad, 4, 7)
    nan = good.clone()
    nan[1, 3] = math.nan
    with pytest.raises(ValueError, match="row 1 "):
        check_soft_targets(nan, 4, 7)


def test_teacher_probs_average_the_teachers_softmax():
    images, _ = make_images(10, seed=0)
    a, b = [2.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]
    probs = teacher_probs([ConstantLogits(a), ConstantLogits(b)], images)
    expected = (torch.softmax(torch.tensor(a), 0) + torch.softmax(torch.tensor(b), 0)) / 2
    assert probs.shape == (10, 7)
    assert torch.allclose(probs, expected.expand(10, -1), atol=1e-5)


def test_load_teachers_names_a_folder_without_best_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="seed7: no best.pt"):
        load_teachers([tmp_path / "seed7"])
    with pytest.raises(ValueError, match="at least one"):
        load_teachers([])


def _fit(config, soft=None, n=96):
    images, labels = make_images(n, seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48 * 48, 7))
    result = fit(model, (images, labels), None, config, soft_targets=soft)
    return result.model, labels


BASE = dict(epochs=2, batch_size=32, lr=0.05, optimizer="sgd", device="cpu", precision="fp32",
            channels_last=False, progress=False)


def test_fit_with_one_hot_targets_at_full_weight_trains_exactly_like_cross_entropy():
    plain, labels = _fit(TrainConfig(**BASE))
    one_hot = nn.functional.one_hot(torch.as_tensor(labels).long(), 7).float()
    distilled, _ = _fit(TrainConfig(**BASE, distill_weight=1.0), soft=one_hot)
    for p, q in zip(plain.parameters(), distilled.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    # other targets move the weights elsewhere: the targets are really used
    uniform, _ = _fit(TrainConfig(**BASE, distill_weight=1.0), soft=torch.full((96, 7), 1 / 7))
    assert not torch.allclose(plain[1].weight, uniform[1].weight, atol=1e-4)


def test_soft_targets_at_weight_zero_are_checked_warned_about_and_not_used():
    plain, _ = _fit(TrainConfig(**BASE))
    with pytest.warns(UserWarning, match="distill_weight=0"):
        ignored, _ = _fit(TrainConfig(**BASE), soft=torch.full((96, 7), 1 / 7))
    for p, q in zip(plain.parameters(), ignored.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="row 0 "):  # still checked: a bad file is named, not ignored
        _fit(TrainConfig(**BASE), soft=torch.zeros(96, 7))


def test_fit_refuses_distillation_without_targets_or_with_upsampling():
    with pytest.raises(ValueError, match="needs fit\\(soft_targets"):
        _fit(TrainConfig(**BASE, distill_weight=0.5))
    with pytest.raises(ValueError, match="upsample"):
        _fit(TrainConfig(**BASE, distill_weight=0.5, upsample=True), soft=torch.full((96, 7), 1 / 7))
    with pytest.raises(ValueError, match="distill_weight"):
        TrainConfig(distill_weight=1.5)


@pytest.mark.slow
def test_reproduce_distils_from_a_finished_run(fer2013_csv, tmp_path, capsys, monkeypatch):
    from fer_lib.recipes import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    csv = fer2013_csv((140, 35, 35))
    smoke = ["--recipe", "fast_cpu", "--epochs", "1", "--max-steps-per-epoch", "2", "--data", str(csv)]
    assert main([*smoke, "--seeds", "0", "--out", str(tmp_path / "teacher")]) == 0
    teacher = tmp_path / "teacher" / "fast_cpu-fer2013" / "seed0"
    with pytest.raises(ValueError, match="distill_weight is 0"):
        main([*smoke, "--seeds", "1", "--teacher", str(teacher), "--out", str(tmp_path / "student")])
    capsys.readouterr()
    assert main([*smoke, "--seeds", "1", "--teacher", str(teacher), "--distill-weight", "0.5",
                 "--distill-temperature", "2", "--out", str(tmp_path / "student")]) == 0
    printed = capsys.readouterr().out
    assert "Distilled from 1 teachers' flip-TTA ensemble (seed0)" in printed
    saved = json.loads((tmp_path / "student" / "fast_cpu-fer2013" / "reproduce.json").read_text())
    assert saved["summary"]["teachers"] == [str(teacher)] and saved["summary"]["teacher_seconds"] > 0
    config = json.loads((tmp_path / "student" / "fast_cpu-fer2013" / "seed1" / "results.json").read_text())["config"]
    assert config["distill_weight"] == 0.5 and config["distill_temperature"] == 2.0
    # a second student with the same teachers reads their targets from the folder's cache
    assert (tmp_path / "student" / "fast_cpu-fer2013" / "teacher_targets.pt").is_file()
    assert main([*smoke, "--seeds", "2", "--teacher", str(teacher), "--distill-weight", "0.5",
                 "--out", str(tmp_path / "student")]) == 0
    assert "soft targets read from teacher_targets.pt" in capsys.readouterr().out


def test_teacher_targets_are_cached_per_teachers_faces_and_tta(tmp_path, monkeypatch, capsys):
    import fer_lib.distill as distill

    loaded = []

    def fake_load(run_dirs):
        loaded.append(list(run_dirs))
        return [ConstantLogits([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0])]

    monkeypatch.setattr(distill, "load_teachers", fake_load)
    run = tmp_path / "seed0"
    run.mkdir()
    (run / "best.pt").write_bytes(b"weights v1")
    images, cache = make_images(12, seed=0)[0], tmp_path / "targets.pt"
    first = distill.teacher_targets([run], images, cache=cache)
    assert len(loaded) == 1 and "teacher 1/1: 12 faces (flip TTA)" in capsys.readouterr().out
    assert torch.equal(distill.teacher_targets([run], images, cache=cache), first) and len(loaded) == 1
    assert "soft targets read from targets.pt" in capsys.readouterr().out
    # other faces, another TTA, or a retrained teacher (other best.pt bytes) run the teachers again
    distill.teacher_targets([run], make_images(12, seed=1)[0], cache=cache)
    distill.teacher_targets([run], make_images(12, seed=1)[0], cache=cache, tta="none")
    (run / "best.pt").write_bytes(b"weights v2")
    distill.teacher_targets([run], make_images(12, seed=1)[0], cache=cache, tta="none")
    assert len(loaded) == 4
    # a damaged cache is recomputed (and rewritten) with a warning naming it
    cache.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="targets.pt: not a readable soft-target cache"):
        again = distill.teacher_targets([run], images, cache=cache)
    assert torch.equal(again, first) and len(loaded) == 5
    assert torch.equal(distill.teacher_targets([run], images, cache=cache), first) and len(loaded) == 5
