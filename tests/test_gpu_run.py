"""gpu-run: packed data round-trips, the dry run writes its few files, budgets cut with notes."""
import json
import re

import numpy as np
import pytest

from fer_lib import gpu_run


@pytest.fixture
def fer_csv(fer2013_csv, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return fer2013_csv((70, 21, 21))


def test_pack_writes_two_xz_files_that_load_back_as_the_same_splits(fer_csv, tmp_path):
    from fer_lib.data import load_fer2013

    packed = tmp_path / "packed"
    assert gpu_run.main(["--pack", str(packed), "--source", str(fer_csv)]) == 0
    assert sorted(p.name for p in packed.iterdir()) == sorted([gpu_run.TRAIN_FILE, gpu_run.TEST_FILE])
    original, loaded = load_fer2013(fer_csv), gpu_run.load_packed(packed)
    for name in ("train", "val", "test"):
        a, b = getattr(original, name), getattr(loaded, name)
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert loaded.class_names == original.class_names and loaded.format == "packed"


def test_missing_or_swapped_packed_files_fail_with_one_clear_message(fer_csv, tmp_path):
    with pytest.raises(FileNotFoundError, match="--pack"):
        gpu_run.load_packed(tmp_path / "nothing")
    packed = tmp_path / "packed"
    gpu_run.pack_fer2013(packed, fer_csv, verbose=False)
    train, test = packed / gpu_run.TRAIN_FILE, packed / gpu_run.TEST_FILE
    train_bytes = train.read_bytes()
    train.write_bytes(test.read_bytes())
    test.write_bytes(train_bytes)
    with pytest.raises(ValueError, match="swapped"):
        gpu_run.load_packed(packed)


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_at_most_eight_files(fer_csv, tmp_path, capsys):
    packed, out = tmp_path / "packed", tmp_path / "out"
    gpu_run.pack_fer2013(packed, fer_csv, verbose=False)
    assert gpu_run.main(["--dry-run", "--data", str(packed), "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir())
    # what the device tool brings back: at most 8 plain files with plain names
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert all((out / f).is_file() for f in files)
    assert {"summary.json", "gpu_run.log", "gpu_run.md", "bench_peak.png", "tta_fast_gpu.png",
            "tta_record.png", "record_best.safetensors", "record_best.json"} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    steps = {step["name"]: step for step in summary["steps"]}
    assert list(steps) == ["tests", "bench", "fast", "record"]
    assert all(step["status"] == "ok" for step in steps.values()), steps
    assert [row["model"] for row in steps["bench"]["result"]["rows"]] == list(gpu_run.BENCH_MODELS)
    assert {"exp3_cnn", "resnet18_48", "vgg_khaireddin", "fernet_small"} <= set(gpu_run.BENCH_MODELS)
    assert steps["fast"]["result"]["line"]["seeds"] == [0, 1, 2]
    assert steps["record"]["result"]["line"]["recipe"] == "record"
    # the record seed with the best PublicTest comes back as loadable weights
    runs = steps["record"]["result"]["runs"]
    best = max(runs, key=lambda row: row["val_accuracy"])
    weights = steps["record"]["result"]["weights"]
    assert weights["seed"] == best["seed"] and weights["val_accuracy"] == pytest.approx(best["val_accuracy"])
    from fer_lib.weights_io import load_weights

    model, meta = load_weights(out / "record_best.safetensors")
    assert model.registry_name == "fernet_large"
    assert meta["metrics"]["val_accuracy"] == pytest.approx(best["val_accuracy"] / 100)
    assert summary["dry_run"] is True and summary["data"].startswith("packed")
    report = (out / "gpu_run.md").read_text()
    assert "fraction of peak" in report and "## fast" in report and "Time to PublicTest accuracy" in report
    log = (out / "gpu_run.log").read_text()
    assert "=== record: ok" in log and "test_cuda.py" in log


def test_a_spent_budget_skips_every_step_with_a_note_and_still_writes(tmp_path, monkeypatch):
    from fer_lib.__main__ import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "out"
    assert main(["gpu-run", "--dry-run", "--minutes", "0.001", "--out", str(out)]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["skipped"] * 4
    assert all(s["note"].startswith("not started") for s in summary["steps"])
    assert "not run in full: tests, bench, fast, record" in (out / "gpu_run.log").read_text()


def test_without_cuda_and_without_dry_run_it_says_so_in_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_run.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: gpu-run needs a CUDA GPU")


def test_fitting_epochs_keeps_the_recipe_when_it_fits_and_cuts_it_when_it_does_not(fer_csv, tmp_path):
    data = gpu_run.load_packed(gpu_run.pack_fer2013(tmp_path / "packed", fer_csv, verbose=False)[0].parent)
    overrides = {"epochs": 3, "batch_size": 16, "progress": False, "checkpoint_every_epoch": False}
    epochs, seconds = gpu_run.fitting_epochs("fast_cpu", data, 1e6, tmp_path / "a", overrides, steps=2)
    assert epochs == 3 and seconds > 0
    # no time at all: one epoch, the least a run can have
    assert gpu_run.fitting_epochs("fast_cpu", data, 0.0, tmp_path / "b", overrides, steps=2)[0] == 1
