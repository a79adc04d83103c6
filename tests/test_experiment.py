"""fer_lib.experiment: a run is a function of its config and seed, not of the process's past."""
import pytest
import torch

from fer_lib.data import load_fer2013
from fer_lib.experiment import run_experiment, sweep_objective
from fer_lib.synthetic import write_fer2013_csv
from fer_lib.training import TrainConfig


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_LIB_CACHE", str(tmp_path / "cache"))
    csv = tmp_path / "fer2013.csv"
    write_fer2013_csv(csv, n_per_split=(70, 21, 21), seed=0)
    return load_fer2013(csv)


CONFIG = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2, progress=False, seed=3)


def test_run_experiment_does_not_depend_on_earlier_random_draws(data, tmp_path):
    first = run_experiment("a", data, "exp3_cnn", CONFIG, run_dir=tmp_path / "a", wandb_mode="disabled")
    torch.rand(1000)  # what a notebook's earlier cells or a previous seed would consume
    second = run_experiment("b", data, "exp3_cnn", CONFIG, run_dir=tmp_path / "b", wandb_mode="disabled")
    assert first.fit.history[0]["train_loss"] == second.fit.history[0]["train_loss"]
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


def test_sweep_trials_with_equal_params_score_equally(data):
    train_fn = sweep_objective(data, "exp3_cnn", CONFIG)
    first = train_fn({"learning_rate": 1e-3})
    torch.rand(1000)
    second = train_fn({"learning_rate": 1e-3})
    assert first["best_val_accuracy"] == second["best_val_accuracy"]


def test_ensemble_of_one_run_is_that_run_and_needs_its_logits(data, tmp_path):
    from fer_lib.experiment import ensemble_metrics

    run = run_experiment("a", data, "exp3_cnn", CONFIG, run_dir=tmp_path / "a", wandb_mode="disabled")
    assert run.test_logits.shape == (len(data.test), len(data.class_names))
    metrics = ensemble_metrics([run], data)
    assert metrics["test"]["accuracy"] == run.test["accuracy"]
    assert metrics["val"]["accuracy"] == run.val["accuracy"]
    run.val_logits = None
    with pytest.raises(ValueError, match="no val logits"):
        ensemble_metrics([run], data)
