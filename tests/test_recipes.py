"""Recipes train under the standard protocol and the reproduce command prints mean +- std."""
import json

import pytest

from fer_lib.models import list_models
from fer_lib.recipes import RECIPES, get_recipe, main
from fer_lib.training import TrainConfig


def test_every_recipe_names_a_registered_model():
    assert {"fast_cpu", "cpu_record", "record"} <= set(RECIPES)
    for recipe in RECIPES.values():
        assert recipe.model in list_models()
    with pytest.raises(ValueError, match="fast_cpu"):
        get_recipe("nope")


@pytest.mark.slow
def test_reproduce_command_trains_each_seed_and_prints_the_table(fer2013_csv, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    csv = fer2013_csv((140, 35, 35))
    out = tmp_path / "runs"
    assert main(["--recipe", "fast_cpu", "--seeds", "0", "1", "--epochs", "1",
                 "--max-steps-per-epoch", "2", "--set", "label_smoothing=0.2", "--data", str(csv),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # what differs from the recipe is said on the report's first line and kept in the JSON
    assert "PrivateTest accuracy" in printed and "+-" in printed and "over 2 seeds" in printed
    saved = json.loads((out / "fast_cpu-fer2013" / "reproduce.json").read_text())
    assert [r["seed"] for r in saved["runs"]] == [0, 1]
    assert 0 <= saved["summary"]["test_accuracy"]["mean"] <= 100
    assert (out / "fast_cpu-fer2013" / "seed1" / "results.json").exists()
    assert saved["summary"]["overrides"] == {"epochs": 1, "label_smoothing": 0.2, "max_steps_per_epoch": 2}
    config = json.loads((out / "fast_cpu-fer2013" / "seed1" / "results.json").read_text())["config"]
    assert config["label_smoothing"] == 0.2
    ensemble = saved["summary"]["ensemble"]
    assert ensemble["members"] == 2 and 0 <= ensemble["test_accuracy"] <= 100
    assert "Ensemble of the 2 seeds" in printed
    # the markdown report is what was printed, kept beside the JSON for the README
    report = (out / "fast_cpu-fer2013" / "reproduce.md").read_text()
    assert report.strip() in printed and "machine:" in report
    # what differs from the recipe is said on the report's first line
    assert report.splitlines()[0].endswith("; changed: epochs=1, label_smoothing=0.2, max_steps_per_epoch=2")
    # time to accuracy: one row per seed, '-' where a threshold was never reached
    assert "| seed | s to 60% | PrivateTest @60 | s to 65%" in report
    for run in saved["runs"]:
        assert run["probe_seconds"] > 0 and run["wall_seconds"] > 0
    # the last line is one JSON object for scripts
    line = json.loads(printed.strip().splitlines()[-1])
    assert line["recipe"] == "fast_cpu" and line["seeds"] == [0, 1]
    for key in ("test_accuracy_mean", "test_accuracy_std", "wall_seconds_mean", "ensemble_test_accuracy",
                "machine"):
        assert key in line
    assert line["test_accuracy_mean"] == pytest.approx(saved["summary"]["test_accuracy"]["mean"])
    assert set(line["time_to_accuracy"]) == {"60", "65", "68"}


def test_ensemble_of_seeds_averages_softmax_over_members(monkeypatch, tmp_path):
    """reproduce's ensemble row comes from the members' logits, not from their accuracies."""
    import types

    import numpy as np
    import torch

    from fer_lib import recipes
    from fer_lib.data import CLASS_NAMES

    labels = np.array([0, 1, 2, 3])
    # seed 0 is right on items 0,1 and confidently wrong on 2,3; seed 1 the other way
    # round but only mildly wrong on 0,1: the ensemble gets all four right.
    member_logits = {
        0: torch.tensor([[9., 0, 0, 0, 0, 0, 0], [0, 9., 0, 0, 0, 0, 0],
                         [0, 0, 1., 0, 0, 0, 2.], [0, 0, 0, 1., 0, 0, 2.]]),
        1: torch.tensor([[1., 0, 0, 0, 0, 0, 2.], [0, 1., 0, 0, 0, 0, 2.],
                         [0, 0, 9., 0, 0, 0, 0], [0, 0, 0, 9., 0, 0, 0]]),
    }
    split = types.SimpleNamespace(images=torch.zeros(4, 48, 48, dtype=torch.uint8), labels=labels)
    data = types.SimpleNamespace(val=split, test=split, class_names=CLASS_NAMES)

    def fake_train(name, data, *, run_dir, seed, wandb_mode=None, **overrides):
        results = {"val_accuracy": 0.5, "test_accuracy": 0.5, "test_macro_f1": 0.4,
                   "seconds": 1.0, "epochs_run": 1, "device": "cpu", "tta": "none"}
        return types.SimpleNamespace(results=results, val_logits=member_logits[seed],
                                     test_logits=member_logits[seed])

    monkeypatch.setattr(recipes, "train_recipe", fake_train)
    run = recipes.reproduce("fast_cpu", [0, 1], data, out_dir=tmp_path)
    table, summary = run.table, run.summary
    assert [100 * m.results["test_accuracy"] for m in run.members] == list(table["test_accuracy"])
    assert list(table["test_accuracy"]) == [50.0, 50.0]
    assert summary["ensemble"]["test_accuracy"] == 100.0
    assert summary["test_accuracy"]["mean"] == 50.0


def test_machine_description_names_the_hardware_and_torch():
    import os

    import torch

    from fer_lib.device import machine_description

    text = machine_description()
    assert torch.__version__ in text
    if not torch.cuda.is_available():
        assert f"{os.cpu_count()} cores" in text and not text.startswith(" ")


def _tiny_split(n=14):
    import types

    import numpy as np

    rng = np.random.default_rng(0)
    return types.SimpleNamespace(images=rng.integers(0, 256, (n, 48, 48), dtype=np.uint8),
                                 labels=np.arange(n) % 7)


def _tiny_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48 * 48, 7))


def test_epoch_probe_records_time_to_accuracy_and_stops_at_the_budget():
    import math
    import time

    from fer_lib.recipes import BudgetExceeded, EpochProbe

    probe = EpochProbe(_tiny_split(), epochs=3, precision="fp32")
    model = _tiny_model()
    for epoch, seconds, val in ((1, 10.0, 0.55), (2, 12.0, 0.62), (3, 11.0, 0.66)):
        probe({"epoch": epoch, "seconds": seconds, "val_accuracy": val}, model)
    assert [p["seconds"] for p in probe.points] == [10.0, 22.0, 33.0]
    assert probe.probe_seconds > 0
    seconds, test = probe.time_to(60)
    assert seconds == 22.0 and 0 <= test <= 100
    assert probe.time_to(65)[0] == 33.0
    assert all(math.isnan(v) for v in probe.time_to(68))
    # a deadline the next epoch would pass stops the run between epochs, never after the last
    late = EpochProbe(_tiny_split(), epochs=3, precision="fp32", deadline=time.perf_counter() + 5)
    with pytest.raises(BudgetExceeded, match="after epoch 1/3"):
        late({"epoch": 1, "seconds": 60.0, "val_accuracy": 0.5}, model)
    last = EpochProbe(_tiny_split(), epochs=1, precision="fp32", deadline=0.0)
    last({"epoch": 1, "seconds": 60.0, "val_accuracy": 0.5}, model)


def test_the_private_test_probe_does_not_change_training():
    from fer_lib.recipes import EpochProbe
    from fer_lib.training import TrainConfig, fit

    config = TrainConfig(epochs=2, batch_size=4, lr=0.05, optimizer="sgd", augment="fast", ema_decay=0.9,
                         progress=False, checkpoint_every_epoch=False, precision="fp32")
    split = _tiny_split(16)
    plain = fit(_tiny_model(), split, split, config)
    probe = EpochProbe(split, epochs=2, precision="fp32")
    probed = fit(_tiny_model(), split, split, config, on_epoch_end=probe)
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    assert [[row[k] for k in keys] for row in plain.history] == [[row[k] for k in keys] for row in probed.history]
    assert [p["epoch"] for p in probe.points] == [1, 2]


def test_reproduce_budget_stops_a_run_and_skips_the_rest_with_notes(monkeypatch, tmp_path):
    import types

    from fer_lib import recipes
    from fer_lib.data import CLASS_NAMES

    split = _tiny_split()
    data = types.SimpleNamespace(train=split, val=split, test=split, class_names=CLASS_NAMES)

    def fake_train(name, data, *, run_dir, seed, wandb_mode=None, on_epoch_end=None, **overrides):
        # one epoch "took" 100 s and reached 61% PublicTest; the budget has room for no second one
        on_epoch_end({"epoch": 1, "seconds": 100.0, "val_accuracy": 0.61}, _tiny_model())
        raise AssertionError("the probe should have stopped this run")

    monkeypatch.setattr(recipes, "train_recipe", fake_train)
    run = recipes.reproduce("fast_cpu", [0, 1], data, out_dir=tmp_path, budget_seconds=50)
    table, summary = run.table, run.summary
    assert run.members == []
    assert len(table) == 0 and summary["seeds"] == []
    first, second = summary["skipped"]
    assert first.startswith("seed 0: stopped after epoch 1/") and "60% at 100 s" in first
    assert second == "seed 1: not started, the budget ran out"
    report = recipes.summary_markdown(table, summary)
    assert "Not run in full: seed 0" in report
    line = recipes.summary_line_json(summary)
    assert line["test_accuracy_mean"] is None and line["ensemble_test_accuracy"] is None


def test_reproduce_resume_continues_seeds_that_have_a_checkpoint_and_starts_the_others(monkeypatch, tmp_path):
    """--resume: a seed with a last checkpoint continues it; a seed without one starts afresh."""
    import types

    import fer_lib.experiment
    from fer_lib import recipes

    calls = []

    def fake_train(name, data, *, run_dir, seed, wandb_mode=None, resume=False, on_epoch_end=None, **overrides):
        calls.append((seed, resume))
        results = {"val_accuracy": 0.5, "test_accuracy": 0.5, "test_macro_f1": 0.4,
                   "seconds": 1.0, "epochs_run": 1, "device": "cpu"}
        return types.SimpleNamespace(results=results)

    monkeypatch.setattr(recipes, "train_recipe", fake_train)
    (tmp_path / "seed1").mkdir()
    (tmp_path / "seed1" / "last.pt").write_bytes(b"checkpoint")
    split = types.SimpleNamespace(images=None, labels=None)
    data = types.SimpleNamespace(test=split)
    monkeypatch.setattr(fer_lib.experiment, "ensemble_metrics", lambda members, data: {})
    recipes.reproduce("fast_cpu", [0, 1], data, out_dir=tmp_path, resume=True)
    assert calls == [(0, False), (1, True)]
    calls.clear()
    recipes.reproduce("fast_cpu", [0, 1], data, out_dir=tmp_path)
    assert calls == [(0, False), (1, False)]


def test_epoch_probe_saves_its_points_and_a_resumed_probe_continues_them(tmp_path):
    from fer_lib.recipes import EpochProbe

    path = tmp_path / "seed0" / "time_to_accuracy.json"
    model = _tiny_model()
    first = EpochProbe(_tiny_split(), epochs=3, precision="fp32", path=path)
    for epoch, seconds, val in ((1, 10.0, 0.55), (2, 12.0, 0.62)):
        first({"epoch": epoch, "seconds": seconds, "val_accuracy": val}, model)
    assert json.loads(path.read_text())["points"] == first.points
    # a later call resumed from the checkpoint after epoch 2 keeps epochs 1-2 and adds 3
    resumed = EpochProbe(_tiny_split(), epochs=3, precision="fp32", path=path, resume=True)
    assert resumed.points == first.points and resumed.probe_seconds == first.probe_seconds
    assert resumed.time_to(60)[0] == 22.0
    resumed({"epoch": 3, "seconds": 11.0, "val_accuracy": 0.66}, model)
    assert [p["seconds"] for p in resumed.points] == [10.0, 22.0, 33.0]
    assert resumed.probe_seconds > first.probe_seconds
    # resumed from an earlier checkpoint (after epoch 1): epoch 2 is trained again and replaces
    # the saved epochs from 2 on, time and probe time included (the saved probe times of
    # epochs 2-3 are made 1000 s longer, so keeping them could not pass for timing noise)
    saved = json.loads(path.read_text())
    for point in saved["points"][1:]:
        point["probe_seconds"] += 1000.0
    path.write_text(json.dumps(saved))
    again = EpochProbe(_tiny_split(), epochs=3, precision="fp32", path=path, resume=True)
    again({"epoch": 2, "seconds": 20.0, "val_accuracy": 0.58}, model)
    assert [(p["epoch"], p["seconds"]) for p in again.points] == [(1, 10.0), (2, 30.0)]
    assert again.probe_seconds < 1000.0 < saved["points"][1]["probe_seconds"]
    # without resume the file is not read: a fresh run starts from nothing
    assert EpochProbe(_tiny_split(), epochs=3, path=path).points == []
    path.write_text('{"points": [{"epoch": 1}]}')
    with pytest.raises(ValueError, match="time_to_accuracy.json: not a time-to-accuracy probe file"):
        EpochProbe(_tiny_split(), epochs=3, path=path, resume=True)


@pytest.mark.slow
def test_reproduce_resume_of_finished_seeds_keeps_their_wall_time_and_time_to_accuracy(
        fer2013_csv, tmp_path, capsys, monkeypatch):
    from fer_lib.checkpoint import load_checkpoint

    monkeypatch.setenv("WANDB_MODE", "disabled")
    csv = fer2013_csv((140, 35, 35))
    out = tmp_path / "runs"
    args = ["--recipe", "fast_cpu", "--seeds", "0", "--epochs", "2", "--max-steps-per-epoch", "2",
            "--data", str(csv), "--out", str(out)]
    assert main(args) == 0
    folder = out / "fast_cpu-fer2013"
    trained = json.loads((folder / "reproduce.json").read_text())["runs"][0]
    train_state = load_checkpoint(folder / "seed0" / "last.pt")["train_state"]
    assert 0 < train_state["wall_seconds"] < trained["wall_seconds"] + trained["probe_seconds"]
    assert main(args + ["--resume"]) == 0
    assert "resuming from seed0/last.pt" in capsys.readouterr().out
    resumed = json.loads((folder / "reproduce.json").read_text())["runs"][0]
    # no epoch ran again: the probe's points come from the saved file, the wall time from last.pt
    assert resumed["probe_seconds"] == trained["probe_seconds"]
    for key in ("s_to_60", "test_at_60", "val_accuracy", "test_accuracy", "epochs"):
        assert resumed[key] == trained[key]
    assert resumed["wall_seconds"] > train_state["wall_seconds"] - trained["probe_seconds"]
    results = json.loads((folder / "seed0" / "results.json").read_text())
    assert results["seconds"] >= round(train_state["wall_seconds"], 1)


def test_set_reads_json_values_and_names_a_bad_item():
    from fer_lib.recipes import parse_settings

    assert parse_settings(["optimizer=muon", "muon_lr=0.03", "nesterov=false", "augment_early=null"]) == {
        "optimizer": "muon", "muon_lr": 0.03, "nesterov": False, "augment_early": None}
    with pytest.raises(ValueError, match="--set 'lr': expected FIELD=VALUE"):
        parse_settings(["lr"])
    with pytest.raises(ValueError, match="--set 'learning_rate=0.1': TrainConfig has no field 'learning_rate'"):
        parse_settings(["learning_rate=0.1"])


def test_a_recipes_early_epochs_follow_the_epochs_of_each_call():
    from dataclasses import replace

    from fer_lib.recipes import Recipe

    crop = [["RandomCrop", {"size": 40}]]
    recipe = Recipe("p", "fernet_small", "progressive", TrainConfig(epochs=12, augment_early=crop,
                                                                    augment_early_epochs=6), early_fraction=0.5)
    early = {epochs: recipe.config_for(epochs=epochs).augment_early_epochs for epochs in (12, 10, 5, 2, 1)}
    assert early == {12: 6, 10: 5, 5: 2, 2: 1, 1: 0}  # floor(epochs / 2): a 1-epoch smoke run has none
    assert recipe.config_for(epochs=5, augment_early_epochs=0).augment_early_epochs == 0  # a call's own wins
    assert recipe.config_for(lr=0.1).lr == 0.1 and recipe.config_for().epochs == 12
    fixed = replace(recipe, early_fraction=0.0)
    assert fixed.config_for(epochs=5).augment_early_epochs == 6  # without a fraction: the config's count
    with pytest.raises(ValueError, match="early_fraction"):
        Recipe("q", "fernet_small", "no crops", TrainConfig(), early_fraction=0.5)
    with pytest.raises(ValueError, match="early_fraction"):
        replace(recipe, early_fraction=1.0)


def test_fast_cpu_at_its_measured_budgets_trains_half_its_epochs_on_crops():
    # docs/measurements.md: 12 epochs (6 on 40x40 crops) and --epochs 5 (2 on crops)
    recipe = get_recipe("fast_cpu")
    assert recipe.config_for().augment_early_epochs == 6
    assert recipe.config_for(epochs=5).augment_early_epochs == 2
    assert recipe.config_for(epochs=5).eval_precision == "auto"
    assert get_recipe("cpu_record").config_for(epochs=5).augment_early_epochs == 0  # no crops there


def test_fast_fp32_is_fast_cpu_with_downscaled_early_epochs_in_fp32(fer2013_csv, tmp_path, monkeypatch, capsys):
    # docs/measurements.md: --epochs 5 (2 at 32x32) and 11 epochs (5 at 32x32), AVX2 kernels
    from dataclasses import replace

    import torch

    from fer_lib.augment import build_augment

    fast, fp32 = get_recipe("fast_cpu"), get_recipe("fast_fp32")
    assert fp32.config_for().augment_early_epochs == 5 and fp32.config_for(epochs=5).augment_early_epochs == 2
    assert fp32.config_for().precision == "fp32" and fp32.model == fast.model and fp32.prepare == fast.prepare
    early = build_augment(fp32.config.augment_early)
    faces = torch.rand(4, 1, 48, 48)
    assert early(faces).shape == (4, 1, 32, 32)
    # everything but the early augmentation, the epochs and the precision is fast_cpu's
    same = {"augment_early": None, "epochs": 1, "precision": "auto", "augment_early_epochs": 0}
    assert replace(fp32.config, **same) == replace(fast.config, **same)
    # and it trains: one epoch on 32x32 faces, one at 48x48, in fp32 whatever the CPU has
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "runs"
    assert main(["--recipe", "fast_fp32", "--seeds", "0", "--epochs", "2", "--max-steps-per-epoch", "2",
                 "--data", str(fer2013_csv((140, 35, 35))), "--out", str(out)]) == 0
    results = json.loads((out / "fast_fp32-fer2013" / "seed0" / "results.json").read_text())
    assert results["config"]["augment_early_epochs"] == 1 and results["epochs_run"] == 2
    assert results["config"]["precision"] == "fp32" and "training on cpu fp32" in capsys.readouterr().out


def test_a_run_can_replace_or_drop_the_recipes_model_preparation(monkeypatch, tmp_path):
    import types

    import fer_lib.experiment
    from fer_lib import recipes
    from fer_lib.data import CLASS_NAMES

    seen = []
    monkeypatch.setattr(fer_lib.experiment, "run_experiment",
                        lambda *args, prepare=None, **kwargs: seen.append(prepare))
    for prepare in (None, "none", "whiten_stem_frozen_bn"):
        recipes.train_recipe("fast_cpu", None, run_dir=tmp_path, prepare=prepare)
    assert seen == ["whiten_stem", None, "whiten_stem_frozen_bn"]
    assert recipes.recipe_preparation(recipes.get_recipe("cpu_record"), "whiten_stem") == "whiten_stem"
    with pytest.raises(ValueError, match="unknown model preparation 'whiten'; known: none, whiten_stem"):
        recipes.recipe_preparation(recipes.get_recipe("cpu_record"), "whiten")

    # reproduce hands it to every seed and names it among the summary's overrides
    split = _tiny_split()
    data = types.SimpleNamespace(train=split, val=split, test=split, class_names=CLASS_NAMES)
    handed = []

    def fake_train(name, data, *, run_dir, seed, prepare=None, on_epoch_end=None, **overrides):
        handed.append(prepare)
        on_epoch_end({"epoch": 1, "seconds": 100.0, "val_accuracy": 0.61}, _tiny_model())

    monkeypatch.setattr(recipes, "train_recipe", fake_train)
    run = recipes.reproduce("cpu_record", [0], data, out_dir=tmp_path, budget_seconds=50, prepare="whiten_stem")
    assert handed == ["whiten_stem"] and run.summary["overrides"] == {"prepare": "whiten_stem"}
    with pytest.raises(ValueError, match="unknown model preparation"):
        recipes.reproduce("cpu_record", [0], data, out_dir=tmp_path, prepare="whiten")
    assert handed == ["whiten_stem"]  # checked before any seed trained
