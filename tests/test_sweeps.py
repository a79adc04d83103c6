"""fer_lib.sweeps: W&B sweep configs translated to Optuna and run locally.

Most tests use a fake tracker factory (no W&B run per trial, so they stay fast); one small
test runs real offline W&B runs to check that every trial is its own run in the sweep group.
"""
import math
import os
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pytest  # noqa: E402
from optuna.distributions import (  # noqa: E402
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from fer_lib import sweeps, tracking  # noqa: E402

# the config of experiment 4 in report-003, verbatim
REPORT_CONFIG = {
    "method": "bayes",
    "metric": {"name": "best_val_accuracy", "goal": "maximize"},
    "parameters": {
        "learning_rate": {"distribution": "log_uniform_values", "min": 0.0001, "max": 0.01},
        "batch_size": {"values": [32, 64, 128]},
        "dropout_rate": {"distribution": "uniform", "min": 0.3, "max": 0.7},
        "weight_decay": {"distribution": "log_uniform_values", "min": 1e-6, "max": 1e-3},
        "label_smoothing": {"distribution": "uniform", "min": 0.0, "max": 0.2},
        "epochs": {"value": 25},
        "patience": {"value": 8},
    },
}


class FakeTracker:
    """Records what a trial logs; created by `factory` below instead of a W&B run."""

    def __init__(self, project, config, **kwargs):
        self.project, self.config, self.kwargs = project, config, kwargs
        self.logged, self.summary, self.finished = [], {}, None

    def log(self, metrics, step=None):
        self.logged.append(dict(metrics))

    def log_summary(self, values):
        self.summary.update(values)

    def finish(self, exit_code=None):
        self.finished = exit_code if exit_code is not None else 0


@pytest.fixture
def factory():
    created = []

    def make(project, config, **kwargs):
        tracker = FakeTracker(project, config, **kwargs)
        created.append(tracker)
        return tracker

    make.created = created
    return make


def _config(method, parameters, goal="minimize", **extra):
    return {"method": method, "metric": {"name": "loss", "goal": goal},
            "parameters": parameters, **extra}


def quadratic(params, tracker):
    """Minimum 0 at x = 1, lr = 1e-2."""
    return {"loss": (params["x"] - 1.0) ** 2 + (math.log10(params["lr"]) + 2.0) ** 2,
            "other": 7}


# ------------------------------------------------------------------------------ translation
@pytest.mark.parametrize("spec, cls, expected", [
    ({"values": [32, 64]}, CategoricalDistribution, {"choices": (32, 64)}),
    ({"distribution": "categorical", "values": ["a", "b"]}, CategoricalDistribution,
     {"choices": ("a", "b")}),
    ({"distribution": "uniform", "min": 0.3, "max": 0.7}, FloatDistribution,
     {"low": 0.3, "high": 0.7, "log": False, "step": None}),
    ({"min": 0.0, "max": 2}, FloatDistribution, {"low": 0.0, "high": 2.0, "log": False}),
    ({"distribution": "int_uniform", "min": 1, "max": 5}, IntDistribution,
     {"low": 1, "high": 5, "step": 1, "log": False}),
    ({"min": 2, "max": 9}, IntDistribution, {"low": 2, "high": 9}),
    ({"distribution": "q_uniform", "min": 16, "max": 128, "q": 16}, IntDistribution,
     {"low": 16, "high": 128, "step": 16}),
    ({"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25}, FloatDistribution,
     {"low": 0.0, "high": 1.0, "step": 0.25, "log": False}),
    ({"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}, FloatDistribution,
     {"low": 1e-4, "high": 1e-2, "log": True, "step": None}),
    ({"distribution": "log_uniform", "min": -2.0, "max": 0.0}, FloatDistribution,
     {"low": math.exp(-2.0), "high": 1.0, "log": True}),
    ({"distribution": "q_log_uniform_values", "min": 8, "max": 256, "q": 8}, IntDistribution,
     {"low": 8, "high": 256, "log": True}),
    ({"distribution": "q_log_uniform_values", "min": 1e-3, "max": 1e-1, "q": 1e-3},
     FloatDistribution, {"low": 1e-3, "high": 1e-1, "log": True}),
])
def test_each_distribution_translates(spec, cls, expected):
    space = sweeps.sweep_config_to_optuna(_config("random", {"p": spec}))
    distribution = space.distributions["p"]
    assert type(distribution) is cls
    for key, value in expected.items():
        assert getattr(distribution, key) == pytest.approx(value) if isinstance(value, float) \
            else getattr(distribution, key) == value


def test_report_config_translation():
    space = sweeps.sweep_config_to_optuna(REPORT_CONFIG, seed=3)
    assert isinstance(space.sampler, optuna.samplers.TPESampler)
    assert space.goal == "maximize" and space.metric_name == "best_val_accuracy"
    assert space.fixed == {"epochs": 25, "patience": 8}
    assert set(space.distributions) == {"learning_rate", "batch_size", "dropout_rate",
                                        "weight_decay", "label_smoothing"}
    assert space.pruner is None
    random_space = sweeps.sweep_config_to_optuna({**REPORT_CONFIG, "method": "random"})
    assert isinstance(random_space.sampler, optuna.samplers.RandomSampler)


def test_hyperband_early_terminate_becomes_a_hyperband_pruner():
    config = _config("random", {"x": {"min": 0.0, "max": 1.0}},
                     early_terminate={"type": "hyperband", "min_iter": 2, "max_iter": 18, "eta": 3})
    pruner = sweeps.sweep_config_to_optuna(config).pruner
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (2, 18, 3)
    with pytest.raises(sweeps.SweepConfigError, match="hyperband"):
        sweeps.sweep_config_to_optuna({**config, "early_terminate": {"type": "median"}})


@pytest.mark.parametrize("parameters, message", [
    ({"lr": {"distribution": "normal", "mu": 0, "sigma": 1}}, "'lr'.*'normal'.*no Optuna"),
    ({"lr": {"distribution": "zipf", "min": 1, "max": 2}}, "'lr'.*unknown distribution"),
    ({"lr": {"distribution": "uniform", "min": 2.0, "max": 1.0}}, "'lr'.*min.*larger"),
    ({"lr": {"distribution": "log_uniform_values", "min": 0.0, "max": 1.0}}, "'lr'.*min > 0"),
    ({"lr": {"distribution": "int_uniform", "min": 0.5, "max": 3}}, "'lr'.*integer"),
    ({"lr": {"values": []}}, "'lr'.*non-empty"),
    ({"lr": {"q": 3}}, "'lr'.*give 'value', 'values'"),
    ({"lr": 0.1}, "'lr'.*expected a dict"),
])
def test_bad_parameters_name_the_parameter(parameters, message):
    with pytest.raises(sweeps.SweepConfigError, match=message):
        sweeps.sweep_config_to_optuna(_config("random", parameters))


def test_bad_config_keys():
    with pytest.raises(sweeps.SweepConfigError, match="method"):
        sweeps.sweep_config_to_optuna(_config("hill_climb", {"x": {"values": [1]}}))
    with pytest.raises(sweeps.SweepConfigError, match="metric"):
        sweeps.sweep_config_to_optuna({"method": "grid", "parameters": {"x": {"values": [1]}}})
    with pytest.raises(sweeps.SweepConfigError, match="goal"):
        sweeps.sweep_config_to_optuna({"method": "grid", "metric": {"name": "m", "goal": "max"},
                                       "parameters": {"x": {"values": [1]}}})
    with pytest.raises(sweeps.SweepConfigError, match="'lr'.*grid search needs"):
        sweeps.sweep_config_to_optuna(_config("grid", {"lr": {"min": 0.1, "max": 1.0}}))


def test_nested_parameters_and_list_choices(factory, tmp_path):
    config = _config("grid", {
        "optimizer": {"parameters": {"name": {"values": ["adam", "sgd"]}, "momentum": {"value": 0.9}}},
        "kernel": {"values": [[3, 3], [5, 5]]},
    })
    space = sweeps.sweep_config_to_optuna(config)
    assert set(space.distributions) == {"optimizer.name", "kernel"}
    assert space.fixed == {"optimizer.momentum": 0.9}
    seen = []

    def train(params, tracker):
        seen.append(params)
        return {"loss": params["kernel"][0] + (params["optimizer"]["name"] == "sgd")}

    result = sweeps.run_sweep(config, train, run_dir=tmp_path, mode="disabled", progress=False,
                              tracker_factory=factory)
    assert len(seen) == 4
    assert {"name": "adam", "momentum": 0.9} in [p["optimizer"] for p in seen]
    assert result.best_params == {"optimizer": {"name": "adam", "momentum": 0.9}, "kernel": [3, 3]}
    assert result.best_value == 3


# ------------------------------------------------------------------------------ running
def test_grid_runs_every_combination_once(factory, tmp_path):
    config = _config("grid", {"a": {"values": [1, 2, 3]}, "b": {"values": ["x", "y"]},
                              "n": {"distribution": "int_uniform", "min": 0, "max": 1},
                              "fixed": {"value": 5}})
    space = sweeps.sweep_config_to_optuna(config)
    assert space.grid_size == 3 * 2 * 2
    result = sweeps.run_sweep(config, lambda p, t: {"loss": p["a"] * 10 + p["n"]},
                              run_dir=tmp_path, mode="disabled", progress=False,
                              tracker_factory=factory)
    table = result.table
    assert len(table) == 12 and (table["state"] == "complete").all()
    assert len(set(zip(table["a"], table["b"], table["n"]))) == 12
    assert (table["fixed"] == 5).all()
    assert result.best_value == 10 and result.best_params["a"] == 1 and result.best_params["n"] == 0
    capped = sweeps.run_sweep(config, lambda p, t: {"loss": 0.0}, count=4, run_dir=tmp_path / "c",
                              mode="disabled", progress=False, tracker_factory=factory)
    assert len(capped.table) == 4


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_random_and_bayes_find_the_minimum_of_a_quadratic(method, factory, tmp_path):
    config = _config(method, {"x": {"min": -4.0, "max": 4.0},
                              "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1.0}})
    result = sweeps.run_sweep(config, quadratic, count=40, seed=0, run_dir=tmp_path,
                              mode="disabled", progress=False, tracker_factory=factory)
    assert len(result.table) == 40
    assert result.best_value == pytest.approx(result.table["loss"].min())
    assert result.best_value < 0.5
    assert abs(result.best_params["x"] - 1.0) < 0.75
    assert result.table["other"].eq(7).all()  # other returned metrics become columns
    assert (tmp_path / "sweep_trials.csv").exists() and (tmp_path / "sweep.json").exists()


def test_goal_maximize_and_minimize_pick_opposite_ends(factory, tmp_path):
    params = {"x": {"values": [-2.0, 0.0, 3.0]}}
    low = sweeps.run_sweep(_config("grid", params, goal="minimize"), lambda p, t: {"loss": p["x"]},
                           run_dir=tmp_path / "a", mode="disabled", progress=False,
                           tracker_factory=factory)
    high = sweeps.run_sweep(_config("grid", params, goal="maximize"), lambda p, t: {"loss": p["x"]},
                            run_dir=tmp_path / "b", mode="disabled", progress=False,
                            tracker_factory=factory)
    assert (low.best_value, high.best_value) == (-2.0, 3.0)
    assert sweeps.best_config(high) == {"x": 3.0}
    assert sweeps.best_config(high) is not high.best_params


def test_count_is_required_for_random(factory, tmp_path):
    config = _config("random", {"x": {"min": 0.0, "max": 1.0}})
    with pytest.raises(ValueError, match="count"):
        sweeps.run_sweep(config, quadratic, run_dir=tmp_path, mode="disabled",
                         tracker_factory=factory)
    capped = sweeps.run_sweep({**config, "run_cap": 2}, lambda p, t: {"loss": p["x"]},
                              run_dir=tmp_path, mode="disabled", progress=False,
                              tracker_factory=factory)
    assert len(capped.table) == 2


def test_each_trial_gets_its_own_tracker_in_the_sweep_group(factory, tmp_path):
    config = _config("grid", {"x": {"values": [1, 2]}}, name="my-sweep")

    def train(params, tracker):
        tracker.log({"epoch": 1, "loss": params["x"]})
        return {"loss": params["x"]}

    sweeps.run_sweep(config, train, run_dir=tmp_path, mode="offline", progress=False,
                     tracker_factory=factory)
    first, second = factory.created
    assert first.kwargs["group"] == second.kwargs["group"] == "my-sweep"
    assert first.kwargs["job_type"] == "sweep-trial" and first.kwargs["mode"] == "offline"
    assert first.kwargs["run_dir"] != second.kwargs["run_dir"]
    assert first.kwargs["name"] == "my-sweep-1"
    assert first.logged == [{"epoch": 1, "loss": first.config["x"]}]
    assert first.summary["loss"] == first.config["x"] and first.finished == 0


def test_failing_trial_is_recorded_and_the_sweep_goes_on(factory, tmp_path):
    def train(params, tracker):
        if params["x"] == 2:
            raise RuntimeError("out of memory")
        return {"loss": float(params["x"])}

    config = _config("grid", {"x": {"values": [1, 2, 3]}})
    with pytest.warns(UserWarning, match="out of memory"):
        result = sweeps.run_sweep(config, train, run_dir=tmp_path, mode="disabled",
                                  progress=False, tracker_factory=factory)
    states = dict(zip(result.table["x"], result.table["state"]))
    assert states == {1: "complete", 2: "failed", 3: "complete"}
    assert result.table.loc[result.table["x"] == 2, "error"].item() == "RuntimeError: out of memory"
    assert [t.finished for t in factory.created if t.config["x"] == 2] == [1]
    with pytest.raises(RuntimeError, match="out of memory"):
        sweeps.run_sweep(config, train, run_dir=tmp_path, mode="disabled", progress=False,
                         tracker_factory=factory, raise_on_error=True)


def test_all_trials_failing_or_missing_metric_raise(factory, tmp_path):
    config = _config("grid", {"x": {"values": [1, 2]}})

    def broken(params, tracker):
        raise ValueError("bad data")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="no sweep trial.*bad data"):
            sweeps.run_sweep(config, broken, run_dir=tmp_path, mode="disabled", progress=False,
                             tracker_factory=factory)
    with pytest.raises(ValueError, match="sweep metric 'loss'.*'accuracy'"):
        sweeps.run_sweep(config, lambda p, t: {"accuracy": 1.0}, run_dir=tmp_path,
                         mode="disabled", progress=False, tracker_factory=factory)


def test_quantised_log_samples_are_multiples_of_q(factory, tmp_path):
    config = _config("random", {
        "width": {"distribution": "q_log_uniform_values", "min": 8, "max": 256, "q": 8},
        "lr": {"distribution": "q_log_uniform_values", "min": 0.001, "max": 0.1, "q": 0.001}})
    result = sweeps.run_sweep(config, lambda p, t: {"loss": p["width"] * p["lr"]}, count=15,
                              run_dir=tmp_path, mode="disabled", progress=False,
                              tracker_factory=factory)
    widths = result.table["width"]
    assert all(isinstance(w, int) and w % 8 == 0 and 8 <= w <= 256 for w in widths.tolist())
    lrs = result.table["lr"].to_numpy()
    assert ((lrs >= 0.001 - 1e-12) & (lrs <= 0.1 + 1e-12)).all()
    assert abs(lrs / 0.001 - (lrs / 0.001).round()).max() < 1e-6


def test_hyperband_prunes_trials_through_tracker_log(factory, tmp_path):
    config = _config("random", {"x": {"min": 0.0, "max": 1.0}}, goal="maximize",
                     early_terminate={"type": "hyperband", "min_iter": 1, "max_iter": 9, "eta": 3})
    config["metric"]["name"] = "val_accuracy"

    def train(params, tracker):
        for epoch in range(1, 10):
            tracker.log({"val_accuracy": params["x"] * epoch / 9}, step=epoch)
        return {"val_accuracy": params["x"]}

    result = sweeps.run_sweep(config, train, count=20, seed=0, run_dir=tmp_path, mode="disabled",
                              progress=False, tracker_factory=factory)
    states = result.table["state"].value_counts()
    assert states.get("pruned", 0) > 0 and states.get("complete", 0) > 0
    pruned = result.table[result.table["state"] == "pruned"]
    assert pruned["val_accuracy"].notna().all()  # the last reported value is kept
    assert result.best_value == result.table.loc[result.table["state"] == "complete",
                                                 "val_accuracy"].max()


def test_plot_sweep_has_trial_and_parameter_panels(factory, tmp_path):
    config = _config("random", {"x": {"min": -4.0, "max": 4.0},
                                "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1.0},
                                "opt": {"values": ["adam", "sgd"]}})
    result = sweeps.run_sweep(config, quadratic, count=6, run_dir=tmp_path, mode="disabled",
                              progress=False, tracker_factory=factory)
    fig = sweeps.plot_sweep(result)
    trials_ax, params_ax = fig.axes[:2]
    assert trials_ax.get_xlabel() == "trial" and trials_ax.get_ylabel() == "loss"
    assert len(params_ax.get_lines()) == 6  # one line per completed trial
    labels = [t.get_text() for t in params_ax.get_xticklabels()]
    assert labels == ["x", "lr (log10)", "opt", "loss"]
    plt.close(fig)


# ------------------------------------------------------------------------------ real W&B
def test_offline_sweep_logs_each_trial_as_its_own_run(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    runs = []

    def train(params, tracker):
        runs.append((tracker.run.id, tracker.run.group, tracker.run.job_type))
        tracker.log({"loss": float(params["x"])}, step=0)
        return {"loss": float(params["x"])}

    config = _config("grid", {"x": {"values": [1, 2]}}, name="offline-sweep")
    with warnings.catch_warnings():
        warnings.simplefilter("error", tracking.TrackingWarning)
        result = sweeps.run_sweep(config, train, mode="offline", run_dir=tmp_path / "sweep",
                                  progress=False)
    assert len({run_id for run_id, _, _ in runs}) == 2
    assert {(group, job) for _, group, job in runs} == {("offline-sweep", "sweep-trial")}
    for trial_dir in result.table["run_dir"]:
        assert len(list((tmp_path / "sweep" / os.path.basename(trial_dir) / "wandb")
                        .glob("offline-run-*"))) == 1
    assert not any(files for _, _, files in os.walk(home))


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_initial_params_run_first_and_others_are_sampled(method, factory, tmp_path):
    config = _config(method, {"x": {"min": -4.0, "max": 4.0},
                              "k": {"values": [[3, 3], [5, 5]]},
                              "bs": {"values": [32, 64]},
                              "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1.0}})
    seen = []

    def train(params, tracker):
        seen.append(params)
        return {"loss": (params["x"] - 1.0) ** 2}

    result = sweeps.run_sweep(config, train, count=3, seed=0, run_dir=tmp_path, mode="disabled",
                              progress=False, tracker_factory=factory,
                              initial_params={"x": 1.0, "k": [5, 5], "bs": 64})
    first = seen[0]
    assert (first["x"], first["k"], first["bs"]) == (1.0, [5, 5], 64)
    assert 1e-4 <= first["lr"] <= 1.0  # left out: sampled
    assert len(seen) == 3 and result.best_value == 0.0 and result.best_params["k"] == [5, 5]


@pytest.mark.parametrize("initial, message", [
    ({"y": 1.0}, "'y' is not in the sweep config"),
    ({"x": 9.0}, r"'x'=9.0 is outside its range \[-4.0, 4.0\]"),
    ({"bs": 48}, "'bs'=48 is not one of its values"),
])
def test_bad_initial_params_name_the_parameter(initial, message, factory, tmp_path):
    config = _config("bayes", {"x": {"min": -4.0, "max": 4.0}, "bs": {"values": [32, 64]}})
    with pytest.raises(sweeps.SweepConfigError, match=message):
        sweeps.run_sweep(config, quadratic, count=2, run_dir=tmp_path, mode="disabled",
                         progress=False, tracker_factory=factory, initial_params=initial)
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written
