"""fer_lib.experiment: a run is a function of its config and seed, not of the process's past."""
import pytest
import torch

from fer_lib.data import load_fer2013
from fer_lib.experiment import run_experiment, sweep_objective
from fer_lib.training import TrainConfig


@pytest.fixture
def data(fer2013_csv):
    return load_fer2013(fer2013_csv((70, 21, 21)))


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


def _report_experiment(**changes):
    from fer_lib.experiment import ReportExperiment

    kwargs = dict(name="05_resnet", model="exp6_resnet_small", sweep="exp6", report_sweep_epochs=20,
                  epochs=1, lr=4e-3, batch_size=16, weight_decay=1e-3, dropout_rate=0.4,
                  label_smoothing=0.2, augment="none", patience=4, sweep_count=0, seed=1,
                  max_steps_per_epoch=2)
    kwargs.update(changes)
    return ReportExperiment(**kwargs)


def test_report_experiment_epochs_bound_the_sweep_trials():
    assert _report_experiment(epochs=1).trial_epochs == 1  # -p epochs 1 means 1 everywhere
    assert _report_experiment(epochs=30).trial_epochs == 20  # the report's trial length
    assert _report_experiment(epochs=1, sweep_epochs=3).trial_epochs == 3  # explicit wins
    planned = _report_experiment(epochs=5, sweep_count=2, sweep_fraction=0.5).planned_epochs()
    assert planned == 2 * 5 * 0.5 + 5
    assert "fewer than the report's 20" in _report_experiment(epochs=5).describe()


def test_report_experiment_first_trial_is_the_reports_best_run():
    experiment = _report_experiment()
    assert experiment.report_best == {"learning_rate": 4e-3, "batch_size": 16, "weight_decay": 1e-3,
                                      "dropout_rate": 0.4, "label_smoothing": 0.2}
    assert experiment.base.early_stopping_patience == 4 and experiment.base.label_smoothing == 0.2
    with pytest.raises(ValueError, match="dropout_rate"):
        _report_experiment(dropout_rate=None)  # the sweep searches it: its report value is needed
    with pytest.raises(ValueError, match="unknown report sweep"):
        _report_experiment(sweep="exp9")


def test_report_experiment_optimizer_is_adam_unless_decoupled_decay_is_asked_for():
    assert _report_experiment().base.optimizer == "adam"  # the reports' literal reading
    decoupled = _report_experiment(optimizer="adamw")
    assert decoupled.base.optimizer == "adamw" and decoupled.base.weight_decay == 1e-3
    assert "adamw (decoupled weight decay)" in decoupled.describe()
    assert "adamw" not in _report_experiment().describe()
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'adamw', got 'sgd'"):
        _report_experiment(optimizer="sgd")


def test_report_experiment_without_sweep_trains_the_reports_best_run(data, tmp_path):
    sweep, result = _report_experiment(sweep_count=0).run(data, run_dir=tmp_path / "run",
                                                          wandb_mode="disabled")
    assert sweep is None
    assert result.results["params_from"] == "report"
    assert result.results["model_kwargs"] == {"dropout_rate": 0.4}
    assert result.results["config"]["lr"] == 4e-3 and result.results["epochs_run"] == 1
    assert (tmp_path / "run" / "results.json").exists()


def test_report_experiment_sweep_starts_from_the_reports_best_run(data, tmp_path):
    sweep, result = _report_experiment(sweep_count=2, batch_size=64).run(
        data, run_dir=tmp_path / "run", wandb_mode="disabled")
    first = sweep.table.iloc[0]
    assert first["learning_rate"] == pytest.approx(4e-3) and first["dropout_rate"] == pytest.approx(0.4)
    assert len(sweep.table) == 2 and (sweep.table["epochs_run"] == 1).all()
    assert result.results["params_from"] == "sweep"
    assert result.results["final_params"] == sweep.best_params


def test_fit_summary_is_computed_from_the_run(data, tmp_path):
    from fer_lib.experiment import fit_summary

    run = run_experiment("a", data, "exp3_cnn", CONFIG, run_dir=tmp_path / "a", wandb_mode="disabled")
    summary = fit_summary(run, data.class_names)
    preds = run.test_preds.numpy()
    top = max(set(preds.tolist()), key=preds.tolist().count)
    assert summary["top_class"] == data.class_names[top]
    assert summary["top_class_share"] == pytest.approx((preds == top).mean())
    assert summary["train_accuracy_last"] == run.fit.history[-1]["train_accuracy"]


def test_run_experiment_resumes_from_the_last_checkpoint(data, tmp_path):
    from dataclasses import replace

    config = replace(CONFIG, epochs=1)
    run_experiment("a", data, "exp3_cnn", config, run_dir=tmp_path / "a", wandb_mode="disabled")
    resumed = run_experiment("a", data, "exp3_cnn", replace(config, epochs=2), run_dir=tmp_path / "a",
                             wandb_mode="disabled", resume=True)
    fresh = run_experiment("b", data, "exp3_cnn", replace(config, epochs=2), run_dir=tmp_path / "b",
                           wandb_mode="disabled")
    assert len(resumed.fit.history) == 2
    assert resumed.fit.history[0]["train_loss"] == fresh.fit.history[0]["train_loss"]


@pytest.mark.parametrize(("eval_precision", "precision", "expected"),
                         [("fp32", "auto", "fp32"), ("auto", "auto", "auto"), ("auto", "bf16", "bf16"),
                          ("auto", "fp32", "fp32")])
def test_the_final_evaluation_runs_in_the_precision_the_config_asks(data, tmp_path, monkeypatch,
                                                                    eval_precision, precision, expected):
    import fer_lib.experiment as experiment
    from fer_lib.training import evaluate

    seen = []

    def recording_evaluate(*args, **kwargs):
        seen.append(kwargs["precision"])
        return evaluate(*args, **{**kwargs, "precision": "fp32"})  # the CI CPU may lack bf16

    monkeypatch.setattr(experiment, "evaluate", recording_evaluate)
    config = TrainConfig(**{**CONFIG.to_dict(), "eval_precision": eval_precision, "precision": precision})
    run_experiment("p", data, "exp3_cnn", config, run_dir=tmp_path / "p", wandb_mode="disabled")
    assert seen == [expected, expected]  # PublicTest, then PrivateTest
    with pytest.raises(ValueError, match="eval_precision"):
        TrainConfig(eval_precision="bf16")


def test_run_experiment_evaluates_publictest_with_tta_once(data, tmp_path, monkeypatch):
    # fit's own final TTA pass would repeat run_experiment's evaluation (and count in its time)
    import fer_lib.training as training

    ttas = []
    real = training.predict_logits

    def counting(*args, **kwargs):
        ttas.append(kwargs.get("tta", "none"))
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "predict_logits", counting)
    config = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2, progress=False, tta="flip")
    result = run_experiment("a", data, "exp3_cnn", config, run_dir=tmp_path / "a", wandb_mode="disabled")
    # one flip-TTA pass over PublicTest, one over PrivateTest (fit's own pass made it three)
    assert ttas.count("flip") == 2
    assert result.results["tta"] == "flip"
