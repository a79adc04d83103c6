"""Hyperparameter sweeps from W&B sweep configs, run by W&B or locally by Optuna.

The notebooks keep the reports' W&B sweep configs as they were written, e.g.

    {"method": "bayes",
     "metric": {"name": "best_val_accuracy", "goal": "maximize"},
     "parameters": {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
                    "batch_size": {"values": [32, 64, 128]},
                    "epochs": {"value": 25}}}

`run_sweep` runs such a config with `wandb.sweep` + `wandb.agent` when W&B is online and
logged in. Everywhere else (offline, CI, no API key: `wandb.agent` cannot work offline) the
same config runs locally with Optuna, translated by `sweep_config_to_optuna`:

    method grid   -> GridSampler (all combinations of `values`; int_uniform/q_uniform ranges
                     are expanded; continuous distributions are an error)
    method random -> RandomSampler(seed)
    method bayes  -> TPESampler(seed)   (W&B uses a Gaussian process; TPE is Optuna's default
                     Bayesian optimiser and needs no extra package)

    values                 -> CategoricalDistribution (lists/dicts as choices are allowed)
    value / constant       -> fixed, passed to train_fn but not searched
    uniform                -> FloatDistribution(min, max)
    int_uniform            -> IntDistribution(min, max)
    q_uniform              -> IntDistribution(min, max, step=q) when min, max, q are ints,
                              else FloatDistribution(min, max, step=q)  (q defaults to 1)
    log_uniform_values     -> FloatDistribution(min, max, log=True)
    log_uniform            -> FloatDistribution(e**min, e**max, log=True) (W&B gives min/max
                              as natural logs for this one)
    q_log_uniform_values   -> a log distribution (IntDistribution(log=True) for ints) whose
    q_log_uniform             samples are rounded to a multiple of q (Optuna cannot combine
                              log and step)
    no distribution        -> W&B's rule: values -> categorical, value -> constant, int
                              min/max -> int_uniform, float min/max -> uniform
    normal, log_normal, q_normal, q_log_normal, beta, q_beta, inv_log_uniform(_values)
                           -> ValueError naming the parameter (no Optuna equivalent)
    nested "parameters"    -> flattened to "outer.inner" for Optuna, nested again for train_fn

`early_terminate: {type: hyperband, min_iter, max_iter, eta, s}` becomes Optuna's
HyperbandPruner(min_resource=min_iter, max_resource=max_iter, reduction_factor=eta).
Intermediate values reach it through the trial's tracker: every `tracker.log(...)` that
contains the sweep metric counts as one iteration (as W&B's hyperband counts logged values),
or train_fn calls `tracker.report(step, value)` itself. When the pruner stops a trial these
calls raise `optuna.TrialPruned`; train_fn should let it propagate (W&B kills the run instead).

`run_sweep(..., storage=URL or journal file, study_name=...)` runs the Optuna sweep in a shared
study instead of in memory: every process started with the same storage and study adds
trials to it until it has `count` finished trials in total, and each gets the whole study's
result (fer_lib.study: heartbeats, retries, the `sweep` command).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fer_lib import tracking
from fer_lib.fileio import atomic_write_text, to_jsonable

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    from matplotlib.figure import Figure

METHODS = ("grid", "random", "bayes")
SUPPORTED_DISTRIBUTIONS = (
    "constant", "categorical", "uniform", "int_uniform", "q_uniform", "log_uniform",
    "log_uniform_values", "q_log_uniform", "q_log_uniform_values",
)
UNSUPPORTED_DISTRIBUTIONS = (
    "normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta", "inv_log_uniform",
    "inv_log_uniform_values",
)
TRIAL_JOB_TYPE = "sweep-trial"


# The reports' sweeps as W&B sweep configs (what report-003 passed to wandb.sweep), by the
# experiment preset they belong to. exp3's was not printed in the report: it is rebuilt from
# the values its logged runs used. `epochs` and `patience` are left out: the notebooks set
# them (see fer_lib.experiment.ReportExperiment).
REPORT_SWEEPS: dict[str, dict[str, Any]] = {
    "exp3": {
        "method": "random",
        "metric": {"name": "best_val_accuracy", "goal": "maximize"},
        "parameters": {
            "batch_size": {"values": [32, 64, 128]},
            "dropout_rate": {"values": [0.2, 0.3]},
            "hidden_dim": {"values": [64, 128, 256]},
            "learning_rate": {"values": [0.001, 0.005, 0.01]},
            "weight_decay": {"values": [1e-6, 1e-5, 1e-4]},
        },
    },
    "exp4": {
        "method": "bayes",
        "metric": {"name": "best_val_accuracy", "goal": "maximize"},
        "parameters": {
            "learning_rate": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
            "batch_size": {"values": [32, 64, 128]},
            "dropout_rate": {"distribution": "uniform", "min": 0.3, "max": 0.7},
            "weight_decay": {"distribution": "log_uniform_values", "min": 1e-6, "max": 1e-3},
            "label_smoothing": {"distribution": "uniform", "min": 0.0, "max": 0.2},
        },
    },
    "exp5": {
        "method": "bayes",
        "metric": {"name": "best_val_accuracy", "goal": "maximize"},
        "parameters": {
            "learning_rate": {"distribution": "log_uniform_values", "min": 5e-5, "max": 5e-3},
            "batch_size": {"values": [32, 64, 128]},
            "dropout_rate": {"distribution": "uniform", "min": 0.5, "max": 0.8},
            "weight_decay": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
            "label_smoothing": {"distribution": "uniform", "min": 0.1, "max": 0.3},
        },
    },
    "exp6": {
        "method": "bayes",
        "metric": {"name": "best_val_accuracy", "goal": "maximize"},
        "parameters": {
            "learning_rate": {"distribution": "log_uniform_values", "min": 5e-4, "max": 5e-3},
            "batch_size": {"values": [64, 128]},
            "dropout_rate": {"distribution": "uniform", "min": 0.3, "max": 0.6},
            "weight_decay": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
            "label_smoothing": {"distribution": "uniform", "min": 0.1, "max": 0.3},
        },
    },
}


class SweepConfigError(ValueError):
    """A sweep config that cannot be run; the message names the key or parameter."""


class _TrialFailed(Exception):
    """train_fn raised: the trial is recorded as failed and the sweep goes on."""


# --------------------------------------------------------------------------------------
# config translation
# --------------------------------------------------------------------------------------
@dataclass
class _Param:
    """One (flattened) sweep parameter."""

    name: str  # "outer.inner" for nested parameters
    path: tuple[str, ...]
    distribution: Any = None  # optuna distribution, None for fixed parameters
    fixed: Any = None
    choices: list | None = None  # categorical choices when they are encoded as indices
    quantum: float | None = None  # round samples to a multiple of this (q_log_* distributions)
    is_fixed: bool = False

    def decode(self, raw: Any) -> Any:
        if self.is_fixed:
            return copy.deepcopy(self.fixed)
        if self.choices is not None:
            return copy.deepcopy(self.choices[int(raw)])
        if self.quantum is not None:
            low, high = self.distribution.low, self.distribution.high
            step = self.quantum
            value = round(raw / step) * step
            value = min(max(value, math.ceil(low / step - 1e-9) * step),
                        math.floor(high / step + 1e-9) * step)
            return int(round(value)) if isinstance(self.distribution.low, int) and float(
                step).is_integer() else float(value)
        return raw


@dataclass
class SweepSpace:
    """A W&B sweep config translated for Optuna (see the module docstring)."""

    method: str
    metric_name: str
    goal: str  # "maximize" | "minimize"
    sampler: Any  # optuna sampler
    pruner: Any  # optuna pruner, None without early_terminate
    distributions: dict[str, Any]  # flat name -> optuna distribution (searched parameters)
    fixed: dict[str, Any]  # flat name -> constant value
    params: list[_Param] = field(repr=False, default_factory=list)
    grid_size: int | None = None  # number of combinations for method "grid"

    @property
    def direction(self) -> str:
        return self.goal

    @property
    def param_names(self) -> list[str]:
        return [param.name for param in self.params]

    def decode(self, raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Optuna's raw values -> (nested params for train_fn, flat params for the table)."""
        nested: dict[str, Any] = {}
        flat: dict[str, Any] = {}
        for param in self.params:
            value = param.decode(None if param.is_fixed else raw[param.name])
            flat[param.name] = value
            target = nested
            for key in param.path[:-1]:
                target = target.setdefault(key, {})
            target[param.path[-1]] = value
        return nested, flat

    def encode(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """Flat parameter values -> Optuna's raw values (for enqueueing a known configuration).

        Names not given are left for the sampler; an unknown name, a value outside a
        parameter's range or not among its `values` raises SweepConfigError naming it.
        """
        by_name = {param.name: param for param in self.params}
        raw: dict[str, Any] = {}
        for name, value in flat.items():
            param = by_name.get(name)
            if param is None:
                raise SweepConfigError(f"initial parameter {name!r} is not in the sweep config "
                                       f"(parameters: {', '.join(by_name)})")
            if param.is_fixed:
                if value != param.fixed:
                    raise SweepConfigError(f"initial parameter {name!r}={value!r} differs from the "
                                           f"config's fixed value {param.fixed!r}")
                continue
            value = _plain(value)
            distribution = param.distribution
            # `values` are either the distribution's own choices or, when they are not plain
            # types, indices into param.choices
            choices = param.choices if param.choices is not None else getattr(distribution, "choices", None)
            if choices is not None:
                if value not in choices:
                    raise SweepConfigError(f"initial parameter {name!r}={value!r} is not one of "
                                           f"its values {list(choices)}")
            elif not distribution.low <= value <= distribution.high:
                raise SweepConfigError(f"initial parameter {name!r}={value!r} is outside its range "
                                       f"[{distribution.low}, {distribution.high}]")
            raw[name] = list(param.choices).index(value) if param.choices is not None else value
        return raw


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_primitive(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (Optuna and JSON want plain types)."""
    return value.item() if isinstance(value, np.generic) else value


def _bounds(name: str, spec: Mapping[str, Any], distribution: str) -> tuple[Any, Any]:
    if "min" not in spec or "max" not in spec:
        raise SweepConfigError(
            f"sweep parameter {name!r}: distribution {distribution!r} needs 'min' and 'max'")
    low, high = _plain(spec["min"]), _plain(spec["max"])
    for key, value in (("min", low), ("max", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SweepConfigError(f"sweep parameter {name!r}: '{key}' must be a number, got {value!r}")
    if low > high:
        raise SweepConfigError(f"sweep parameter {name!r}: min ({low}) is larger than max ({high})")
    return low, high


def _infer_distribution(name: str, spec: Mapping[str, Any]) -> str:
    """W&B's defaults when a parameter names no distribution."""
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "min" in spec and "max" in spec:
        return "int_uniform" if _is_int(spec["min"]) and _is_int(spec["max"]) else "uniform"
    raise SweepConfigError(
        f"sweep parameter {name!r}: give 'value', 'values', 'min'/'max' or 'distribution' "
        f"(got keys {sorted(spec)})")


def _categorical(param: _Param, values: Sequence[Any]) -> None:
    import optuna

    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise SweepConfigError(f"sweep parameter {param.name!r}: 'values' must be a non-empty list")
    choices = [_plain(value) for value in values]
    if all(_is_primitive(value) for value in choices):
        param.distribution = optuna.distributions.CategoricalDistribution(choices)
    else:  # lists/dicts as choices: Optuna only stores primitives, so search over indices
        param.choices = choices
        param.distribution = optuna.distributions.CategoricalDistribution(list(range(len(choices))))


def _grid_values(param: _Param) -> list:
    """The grid of a parameter (_translate_parameter makes every grid parameter categorical)."""
    return list(param.distribution.choices)


def _translate_parameter(name: str, path: tuple[str, ...], spec: Any, method: str) -> _Param:
    import optuna

    if not isinstance(spec, Mapping):
        raise SweepConfigError(
            f"sweep parameter {name!r}: expected a dict such as {{'values': [...]}} or "
            f"{{'min': ..., 'max': ...}}, got {spec!r}")
    param = _Param(name=name, path=path)
    distribution = spec.get("distribution") or _infer_distribution(name, spec)
    if distribution in UNSUPPORTED_DISTRIBUTIONS:
        raise SweepConfigError(
            f"sweep parameter {name!r}: distribution {distribution!r} has no Optuna equivalent "
            f"and is not supported by the local sweep; use one of {SUPPORTED_DISTRIBUTIONS}")
    if distribution not in SUPPORTED_DISTRIBUTIONS:
        raise SweepConfigError(
            f"sweep parameter {name!r}: unknown distribution {distribution!r}; "
            f"supported: {SUPPORTED_DISTRIBUTIONS}")

    if distribution == "constant":
        if "value" not in spec:
            raise SweepConfigError(f"sweep parameter {name!r}: 'constant' needs 'value'")
        param.is_fixed, param.fixed = True, _plain(spec["value"])
        return param
    if distribution == "categorical":
        if "values" not in spec:
            raise SweepConfigError(f"sweep parameter {name!r}: 'categorical' needs 'values'")
        if "probabilities" in spec:
            warnings.warn(f"sweep parameter {name!r}: 'probabilities' are ignored by the local "
                          "Optuna sweep (choices are equally likely)", stacklevel=4)
        _categorical(param, spec["values"])
        return param

    low, high = _bounds(name, spec, distribution)
    quantum = _plain(spec.get("q", 1))
    if distribution.startswith("q_") and (isinstance(quantum, bool) or not isinstance(
            quantum, (int, float)) or quantum <= 0):
        raise SweepConfigError(f"sweep parameter {name!r}: 'q' must be a positive number, got {quantum!r}")
    all_ints = _is_int(low) and _is_int(high) and _is_int(quantum)

    if method == "grid":
        # W&B's grid accepts only finite sets: values, value, and integer / quantised ranges
        if distribution == "int_uniform":
            if not (_is_int(low) and _is_int(high)):
                raise SweepConfigError(f"sweep parameter {name!r}: int_uniform needs integer min/max")
            _categorical(param, list(range(int(low), int(high) + 1)))
            return param
        if distribution == "q_uniform":
            count = int(math.floor((high - low) / quantum + 1e-9)) + 1
            values = [low + i * quantum for i in range(count)]
            values = [int(v) for v in values] if all_ints else [round(float(v), 12) for v in values]
            _categorical(param, values)
            return param
        raise SweepConfigError(
            f"sweep parameter {name!r}: grid search needs 'values' or 'value' (or an int_uniform"
            f" / q_uniform range), got distribution {distribution!r}; use method 'random' or "
            "'bayes' for continuous distributions")

    if distribution == "int_uniform":
        if not (_is_int(low) and _is_int(high)):
            raise SweepConfigError(f"sweep parameter {name!r}: int_uniform needs integer min/max, "
                                   f"got {low!r} and {high!r}")
        param.distribution = optuna.distributions.IntDistribution(int(low), int(high))
    elif distribution == "uniform":
        param.distribution = optuna.distributions.FloatDistribution(float(low), float(high))
    elif distribution == "q_uniform":
        if all_ints:
            param.distribution = optuna.distributions.IntDistribution(int(low), int(high), step=int(quantum))
        else:
            param.distribution = optuna.distributions.FloatDistribution(
                float(low), float(high), step=float(quantum))
    else:  # the log family
        if distribution in ("log_uniform", "q_log_uniform"):
            low, high = math.exp(low), math.exp(high)
            all_ints = False
        if low <= 0:
            raise SweepConfigError(f"sweep parameter {name!r}: {distribution} needs min > 0, got {low}")
        if distribution.startswith("q_") and all_ints:
            param.distribution = optuna.distributions.IntDistribution(int(low), int(high), log=True)
            param.quantum = None if quantum == 1 else int(quantum)
        else:
            param.distribution = optuna.distributions.FloatDistribution(float(low), float(high), log=True)
            param.quantum = float(quantum) if distribution.startswith("q_") else None
    return param


def _flatten_parameters(parameters: Mapping[str, Any], method: str,
                        prefix: tuple[str, ...] = ()) -> list[_Param]:
    params = []
    for key, spec in parameters.items():
        path = prefix + (str(key),)
        name = ".".join(path)
        if isinstance(spec, Mapping) and "parameters" in spec:
            nested = spec["parameters"]
            if not isinstance(nested, Mapping) or not nested:
                raise SweepConfigError(f"sweep parameter {name!r}: 'parameters' must be a non-empty dict")
            params.extend(_flatten_parameters(nested, method, path))
        else:
            params.append(_translate_parameter(name, path, spec, method))
    return params


def _pruner(early_terminate: Any) -> Any:
    import optuna

    if not early_terminate:
        return None
    if not isinstance(early_terminate, Mapping) or early_terminate.get("type") != "hyperband":
        raise SweepConfigError(
            f"early_terminate: only {{'type': 'hyperband', ...}} is supported, got {early_terminate!r}")
    eta = int(early_terminate.get("eta", 3))
    if eta < 2:
        raise SweepConfigError(f"early_terminate: eta must be >= 2, got {eta}")
    max_iter = early_terminate.get("max_iter")
    min_iter = early_terminate.get("min_iter")
    if min_iter is None and max_iter is not None:
        # W&B: with max_iter and s, the first bracket is at max_iter / eta**s
        min_iter = max(1, int(int(max_iter) / eta ** int(early_terminate.get("s", 0))))
    return optuna.pruners.HyperbandPruner(
        min_resource=int(min_iter or 1),
        max_resource=int(max_iter) if max_iter is not None else "auto",
        reduction_factor=eta,
    )


def sweep_config_to_optuna(sweep_config: Mapping[str, Any], *, seed: int = 0) -> SweepSpace:
    """Translate a W&B sweep config into an Optuna sampler, distributions and pruner.

    Raises SweepConfigError (a ValueError) naming the key or parameter for anything that
    cannot be run (unknown method, grid over a continuous distribution, unsupported
    distribution, min > max, missing metric name, ...).
    """
    import optuna

    if not isinstance(sweep_config, Mapping):
        raise SweepConfigError(f"sweep_config must be a dict, got {type(sweep_config).__name__}")
    method = sweep_config.get("method")
    if method not in METHODS:
        raise SweepConfigError(f"sweep_config['method'] must be one of {METHODS}, got {method!r}")
    metric = sweep_config.get("metric")
    if not isinstance(metric, Mapping) or not metric.get("name"):
        raise SweepConfigError("sweep_config['metric']['name'] is required to rank the trials")
    goal = metric.get("goal", "minimize")  # W&B's default goal
    if goal not in ("maximize", "minimize"):
        raise SweepConfigError(f"sweep_config['metric']['goal'] must be 'maximize' or "
                               f"'minimize', got {goal!r}")
    parameters = sweep_config.get("parameters")
    if not isinstance(parameters, Mapping) or not parameters:
        raise SweepConfigError("sweep_config['parameters'] must be a non-empty dict")

    params = _flatten_parameters(parameters, method)
    searched = [param for param in params if not param.is_fixed]
    distributions = {param.name: param.distribution for param in searched}
    fixed = {param.name: param.fixed for param in params if param.is_fixed}
    grid_size = None
    if method == "grid":
        search_space = {param.name: _grid_values(param) for param in searched}
        grid_size = int(np.prod([len(values) for values in search_space.values()], dtype=np.int64))
        sampler = optuna.samplers.GridSampler(search_space, seed=seed)
    elif method == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    return SweepSpace(method=method, metric_name=str(metric["name"]), goal=goal, sampler=sampler,
                      pruner=_pruner(sweep_config.get("early_terminate")),
                      distributions=distributions, fixed=fixed, params=params, grid_size=grid_size)


def _suggest(trial: optuna.Trial, name: str, distribution: Any) -> Any:
    import optuna

    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high,
                                 step=distribution.step, log=distribution.log)
    return trial.suggest_float(name, distribution.low, distribution.high,
                               step=distribution.step, log=distribution.log)


# --------------------------------------------------------------------------------------
# per-trial tracker
# --------------------------------------------------------------------------------------
class TrialTracker:
    """What train_fn receives as `tracker` in a sweep: a Tracker plus `report()`.

    Everything (log, log_summary, log_figure, ...) goes to the trial's own tracker. A log()
    that contains the sweep metric also reports it as an intermediate value for early
    termination; with early termination configured that call raises optuna.TrialPruned
    when the pruner stops the trial.
    """

    def __init__(self, tracker: Any, trial: Any, metric_name: str, *, prune: bool) -> None:
        self.tracker = tracker
        self.trial = trial
        self.metric_name = metric_name
        self.prune = prune
        self.reports = 0
        self.last_value: float | None = None

    def __getattr__(self, name: str) -> Any:  # only called for names not defined here
        if name == "tracker":  # not set yet (e.g. during copy): avoid endless recursion
            raise AttributeError(name)
        return getattr(self.tracker, name)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.tracker.log(metrics, step=step)
        value = tracking.scalar(metrics.get(self.metric_name))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.report(self.reports + 1, value)

    def report(self, step: int, value: Any) -> None:
        """Report the sweep metric after `step` iterations (e.g. epochs)."""
        import optuna

        value = float(value)
        self.reports = max(self.reports, int(step))
        self.last_value = value
        if self.prune and self.trial is not None and math.isfinite(value):
            self.trial.report(value, int(step))
            if self.trial.should_prune():
                self.tracker.log_summary({"sweep_state": "pruned", "pruned_at_step": int(step)})
                raise optuna.TrialPruned(f"pruned at step {step} ({self.metric_name}={value:.4g})")

    def __enter__(self) -> TrialTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.tracker.finish(exit_code=1 if exc_type is not None else None)


# --------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """The outcome of run_sweep.

    table: one row per trial (trial, name, the parameters, the metric, other scalar metrics
    returned by train_fn, state complete/pruned/failed, duration_s, run_dir).
    best_params: the (nested) params of the best completed trial, as train_fn got them.
    """

    table: pd.DataFrame
    best_params: dict[str, Any]
    best_value: float
    metric_name: str
    goal: str
    method: str = "random"
    sweep_name: str = ""
    engine: str = "optuna"  # "optuna" (local) or "wandb" (wandb.agent)
    param_names: list[str] = field(default_factory=list)
    run_dir: Path | None = None
    sweep_id: str | None = None
    study: Any = field(default=None, repr=False)

    @property
    def best_trial(self) -> pd.Series:
        """The table row of the best trial."""
        complete = self.table[self.table["state"] == "complete"]
        values = complete[self.metric_name].astype(float)
        return complete.loc[values.idxmax() if self.goal == "maximize" else values.idxmin()]


TrackerFactory = Callable[..., Any]


def _default_tracker_factory(project: str, config: Mapping[str, Any], **kwargs: Any) -> Any:
    return tracking.init_tracker(project, config, **kwargs)


def _result_columns(row: dict[str, Any], metrics: Mapping[str, Any], reserved: set[str]) -> None:
    """Add train_fn's scalar metrics to a table row (names clashing with params get 'metric.')."""
    for key, value in metrics.items():
        scalar = tracking.scalar(value)
        if scalar is None or isinstance(scalar, str):
            continue
        row[f"metric.{key}" if key in reserved else str(key)] = scalar


def run_sweep(
    sweep_config: Mapping[str, Any],
    train_fn: Callable[[dict[str, Any], Any], Mapping[str, Any]],
    *,
    count: int | None = None,
    project: str = "fer2013",
    mode: str | None = None,
    run_dir: str | Path,
    seed: int = 0,
    progress: bool = True,
    tracker_factory: TrackerFactory | None = None,
    raise_on_error: bool = False,
    initial_params: Mapping[str, Any] | None = None,
    storage: Any = None,
    study_name: str | None = None,
) -> SweepResult:
    """Run a W&B sweep config: W&B's agent when online and logged in, else Optuna locally.

    train_fn(params, tracker) trains one configuration and returns a dict of metrics that
    contains the sweep metric (sweep_config['metric']['name']). `tracker` is the trial's own
    W&B run (job_type "sweep-trial", grouped under the sweep name, folder
    run_dir/trial-NNN) wrapped in a TrialTracker; log epochs to it.

    count: number of trials; for grid, None runs the whole grid (and larger counts stop at
    the grid size); for random/bayes it is required unless the config has run_cap.
    A trial whose train_fn raises is recorded as "failed" with a warning and the sweep goes
    on (raise_on_error=True re-raises instead); if no trial completes, RuntimeError.
    tracker_factory(project, config, *, mode, run_dir, name, group, job_type, tags) replaces
    init_tracker (tests use it to avoid starting W&B runs).
    initial_params: flat parameter values (e.g. the report's best run) tried as the first
    trial, parameters left out being sampled. Why: a 2-3 trial sweep on a budget can
    otherwise miss every good region and hand the final run a configuration that does not
    learn; starting from the known one means the sweep can only improve on it (on the
    validation split). Optuna path only (random/bayes); W&B's agent cannot be seeded, so
    there it is ignored with a warning.
    storage: None runs the study in memory. A database URL, a journal file path or an Optuna
    storage (fer_lib.study.open_storage) holds a study shared by every process that passes
    the same storage and study_name (required then; also the W&B group): `count` is the
    study's total of finished trials, the initial params run once (by whoever created the
    study), Optuna is used even when W&B is online, and the result (table, best params) is
    the whole study's, all workers' trials included.
    """
    space = sweep_config_to_optuna(sweep_config, seed=seed)
    initial_raw = None
    if initial_params:
        if space.method == "grid":
            raise SweepConfigError("initial_params: a grid sweep already runs every combination")
        initial_raw = space.encode(initial_params)
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    resolved = tracking.resolve_mode(mode)
    if storage is not None and not (study_name or sweep_config.get("name")):
        raise ValueError("a sweep in a shared storage needs study_name (every worker joins it by name)")
    sweep_name = str(study_name or sweep_config.get("name") or
                     f"{space.method}-sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    n_trials = _trial_count(space, count, sweep_config.get("run_cap"))

    if resolved == "online" and tracking.has_api_key() and tracker_factory is None and storage is None:
        if initial_raw is not None:
            warnings.warn("initial_params are not passed to W&B's sweep agent; its first trial "
                          "is sampled like the others", tracking.TrackingWarning, stacklevel=2)
        try:
            result = _run_with_wandb_agent(sweep_config, space, train_fn, n_trials, project,
                                           folder, sweep_name, raise_on_error)
        except _AgentUnavailable as error:
            warnings.warn(f"W&B sweep could not start ({error.__cause__}); running it locally "
                          "with Optuna instead", tracking.TrackingWarning, stacklevel=2)
        else:
            _save_result(result)
            return result
    trial_mode = "offline" if resolved == "online" and storage is None else resolved
    result = _run_with_optuna(space, train_fn, n_trials, project, trial_mode, folder, sweep_name,
                              progress, tracker_factory or _default_tracker_factory,
                              raise_on_error, initial_raw, storage=storage, seed=seed)
    _save_result(result)
    return result


def _trial_count(space: SweepSpace, count: int | None, run_cap: Any) -> int:
    if count is not None and (not _is_int(count) or count < 1):
        raise ValueError(f"count must be a positive integer or None, got {count!r}")
    limits = [int(value) for value in (count, run_cap) if value is not None]
    if space.method == "grid":
        limits.append(int(space.grid_size))
    if not limits:
        raise ValueError(f"method {space.method!r} samples forever: give count= (or run_cap in "
                         "the sweep config)")
    return min(limits)


def _metric_value(metrics: Mapping[str, Any], metric_name: str) -> float:
    scalar = tracking.scalar(metrics[metric_name])
    if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
        raise ValueError(f"train_fn returned {metric_name}={metrics[metric_name]!r}; the sweep "
                         "metric must be a number")
    return float(scalar)


def _run_with_optuna(
    space: SweepSpace,
    train_fn: Callable[..., Mapping[str, Any]],
    n_trials: int,
    project: str,
    trial_mode: str,
    folder: Path,
    sweep_name: str,
    progress: bool,
    tracker_factory: TrackerFactory,
    raise_on_error: bool,
    initial_raw: dict[str, Any] | None = None,
    storage: Any = None,
    seed: int = 0,
) -> SweepResult:
    import optuna

    from fer_lib import study as shared
    from fer_lib.device import progress_mode

    storage = shared.open_storage(storage)
    if storage is not None:
        train_fn = shared.with_test_delay(train_fn)
    worker = shared.worker_id()

    metric_name = space.metric_name
    rows: list[dict[str, Any]] = []
    nested_params: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []
    reserved = set(space.param_names) | {"trial", "name", "state", "duration_s", "run_dir", "error"}

    def objective(trial: optuna.Trial) -> float:
        raw = {name: _suggest(trial, name, dist) for name, dist in space.distributions.items()}
        params, flat = space.decode(raw)
        number = trial.number
        trial_name = f"{sweep_name}-{number + 1}"
        trial_dir = folder / f"trial-{number:03d}"
        nested_params[number] = params
        row: dict[str, Any] = {"trial": number, "name": trial_name, **flat, metric_name: None}
        # on the trial too: a shared study's table is built from its trials, not from rows
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("run_dir", str(trial_dir))
        tracker = tracker_factory(project, params, mode=trial_mode, run_dir=trial_dir,
                                  name=trial_name, group=sweep_name, job_type=TRIAL_JOB_TYPE,
                                  tags=["sweep", space.method])
        trial_tracker = TrialTracker(tracker, trial, metric_name, prune=space.pruner is not None)
        started = time.perf_counter()
        try:
            metrics = train_fn(copy.deepcopy(params), trial_tracker)
        except optuna.TrialPruned:
            row.update(state="pruned")
            row[metric_name] = trial_tracker.last_value
            tracker.finish()
            raise
        except Exception as error:
            row.update(state="failed", error=f"{type(error).__name__}: {error}")
            errors.append(error)
            trial.set_user_attr("error", row["error"][:2000])
            tracker.log_summary({"sweep_state": "failed"})
            tracker.finish(exit_code=1)
            if raise_on_error:
                raise
            warnings.warn(f"sweep trial {trial_name} failed with params {flat}: "
                          f"{type(error).__name__}: {error}", stacklevel=2)
            raise _TrialFailed(str(error)) from error
        finally:
            row["duration_s"] = round(time.perf_counter() - started, 3)
            row["run_dir"] = str(trial_dir)
            rows.append(row)

        if not isinstance(metrics, Mapping) or metric_name not in metrics:
            tracker.finish(exit_code=1)
            got = sorted(metrics) if isinstance(metrics, Mapping) else type(metrics).__name__
            raise ValueError(f"train_fn must return a dict containing the sweep metric "
                             f"{metric_name!r}; got {got}")
        value = _metric_value(metrics, metric_name)
        extra: dict[str, Any] = {}
        _result_columns(extra, metrics, reserved)
        row.update(extra)
        trial.set_user_attr("metrics", extra)
        row[metric_name] = value
        tracker.log_summary({**{k: v for k, v in metrics.items() if tracking.scalar(v) is not None},
                             "sweep_state": "complete" if math.isfinite(value) else "failed"})
        tracker.finish()
        if not math.isfinite(value):
            row.update(state="failed", error=f"{metric_name} is {value}")
            trial.set_user_attr("error", row["error"])
            warnings.warn(f"sweep trial {trial_name}: {metric_name} is {value}; recorded as failed",
                          stacklevel=2)
            raise _TrialFailed(f"{metric_name} is {value}")
        row["state"] = "complete"
        return value

    # Same progress mode as training: a bar only in an interactive Jupyter (a widget in an
    # executed notebook would store its state in the file), plain lines everywhere else.
    mode = progress_mode(progress)
    bar = None
    if mode == "bar":
        from tqdm.auto import tqdm

        bar = tqdm(total=n_trials, desc=sweep_name)

    def on_trial_end(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        complete = [row[metric_name] for row in rows if row.get("state") == "complete"]
        best = (max(complete) if space.goal == "maximize" else min(complete)) if complete else None
        if bar is not None:
            bar.update(1)
            if best is not None:
                bar.set_postfix({metric_name: f"{best:.4g}"})
        elif mode == "plain":
            state = (rows[-1].get("state", "?") if rows and rows[-1]["trial"] == frozen.number
                     else frozen.state.name.lower())
            shown = f", best {metric_name} {best:.4g}" if best is not None else ""
            print(f"{sweep_name}: trial {frozen.number + 1}/{n_trials} {state}{shown}", flush=True)

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own warnings report failures
    try:
        if storage is None:
            study = optuna.create_study(direction=space.goal, sampler=space.sampler,
                                        pruner=space.pruner or optuna.pruners.NopPruner(),
                                        study_name=sweep_name)
            if initial_raw:
                study.enqueue_trial(initial_raw)
            study.optimize(objective, n_trials=n_trials, catch=(_TrialFailed,),
                           callbacks=[on_trial_end])
        else:
            study = shared.open_study(space, storage, sweep_name, seed=seed,
                                      initial_params=initial_raw)
            shared.optimize_shared(study, objective, n_trials,
                                   heartbeat_s=shared.heartbeat_interval(storage),
                                   catch=(_TrialFailed,), callbacks=[on_trial_end])
    finally:
        optuna.logging.set_verbosity(verbosity)
        if bar is not None:
            bar.close()
    if storage is not None:  # every worker's trials, not only this process's
        rows, nested_params = shared.study_rows(study, space)
    return _build_result(rows, nested_params, space, sweep_name, folder, "optuna", errors,
                         study=study)


class _AgentUnavailable(Exception):
    """wandb.sweep could not create the sweep (no network, bad key...)."""


def _run_with_wandb_agent(
    sweep_config: Mapping[str, Any],
    space: SweepSpace,
    train_fn: Callable[..., Mapping[str, Any]],
    n_trials: int,
    project: str,
    folder: Path,
    sweep_name: str,
    raise_on_error: bool,
) -> SweepResult:
    """wandb.sweep + wandb.agent; needs network and a W&B login (not testable offline)."""
    import wandb

    metric_name = space.metric_name
    rows: list[dict[str, Any]] = []
    nested_params: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []
    reserved = set(space.param_names) | {"trial", "name", "state", "duration_s", "run_dir", "error"}
    config = dict(sweep_config)
    config.setdefault("name", sweep_name)

    def agent_function() -> None:
        number = len(rows)
        trial_dir = folder / f"trial-{number:03d}"
        tracker = tracking.init_tracker(project, {}, mode="online", run_dir=trial_dir,
                                        job_type=TRIAL_JOB_TYPE)
        if tracker.run is None:
            raise RuntimeError("W&B init failed inside the sweep agent") from tracker.error
        params = _to_plain_dict(tracker.run.config)
        flat = {name: _get_path(params, param.path) for name, param in
                zip(space.param_names, space.params)}
        nested_params[number] = params
        row: dict[str, Any] = {"trial": number, "name": tracker.run.name, **flat,
                               metric_name: None}
        started = time.perf_counter()
        try:
            metrics = train_fn(copy.deepcopy(params), TrialTracker(tracker, None, metric_name,
                                                                   prune=False))
            value = _metric_value(metrics, metric_name)
            _result_columns(row, metrics, reserved)
            row.update({metric_name: value, "state": "complete" if math.isfinite(value) else "failed"})
            tracker.log_summary({k: v for k, v in metrics.items()
                                 if tracking.scalar(v) is not None})
            tracker.finish()
        except Exception as error:
            row.update(state="failed", error=f"{type(error).__name__}: {error}")
            errors.append(error)
            tracker.finish(exit_code=1)
            if raise_on_error:
                raise
        finally:
            row["duration_s"] = round(time.perf_counter() - started, 3)
            row["run_dir"] = str(trial_dir)
            rows.append(row)

    with tracking.scoped_env(tracking.wandb_env(folder)):
        try:
            sweep_id = wandb.sweep(config, project=project)
        except Exception as error:  # noqa: BLE001 - fall back to the local sweep
            raise _AgentUnavailable(str(error)) from error
        wandb.agent(sweep_id, function=agent_function, count=n_trials, project=project)
    result = _build_result(rows, nested_params, space, sweep_name, folder, "wandb", errors)
    result.sweep_id = sweep_id
    return result


def _to_plain_dict(config: Any) -> dict[str, Any]:
    items = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    return {key: value for key, value in items.items() if not str(key).startswith("_")}


def _get_path(params: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = params
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _build_result(rows: list[dict[str, Any]], nested_params: dict[int, dict[str, Any]],
                  space: SweepSpace, sweep_name: str, folder: Path, engine: str,
                  errors: list[BaseException], study: Any = None) -> SweepResult:
    import pandas as pd

    metric_name = space.metric_name
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values("trial").reset_index(drop=True)
        first = ["trial", "name", *space.param_names, metric_name]
        last = [column for column in ("state", "duration_s", "run_dir", "error") if column in table]
        middle = [c for c in table.columns if c not in first and c not in last]
        table = table[[c for c in first if c in table] + middle + last]
    complete = [row for row in rows if row.get("state") == "complete"]
    if not complete:
        message = f"no sweep trial of {sweep_name} completed ({len(rows)} run)"
        if errors:
            raise RuntimeError(f"{message}; first error: {type(errors[0]).__name__}: "
                               f"{errors[0]}") from errors[0]
        raise RuntimeError(message)
    pick = max if space.goal == "maximize" else min
    best = pick(complete, key=lambda row: row[metric_name])
    return SweepResult(table=table, best_params=copy.deepcopy(nested_params[best["trial"]]),
                       best_value=float(best[metric_name]), metric_name=metric_name,
                       goal=space.goal, method=space.method, sweep_name=sweep_name,
                       engine=engine, param_names=space.param_names, run_dir=folder,
                       study=study)


def _save_result(result: SweepResult) -> None:
    """sweep_trials.csv + sweep.json in the sweep folder, for notebooks that come later."""
    import json

    if result.run_dir is None:
        return
    try:
        atomic_write_text(result.run_dir / "sweep_trials.csv", result.table.to_csv(index=False))
        summary = {"sweep_name": result.sweep_name, "method": result.method,
                   "engine": result.engine, "sweep_id": result.sweep_id,
                   "metric": result.metric_name, "goal": result.goal,
                   "best_value": result.best_value,
                   "best_params": to_jsonable(result.best_params),
                   "trials": int(len(result.table))}
        atomic_write_text(result.run_dir / "sweep.json", json.dumps(summary, indent=2))
    except OSError as error:
        warnings.warn(f"could not save the sweep summary in {result.run_dir}: {error}",
                      tracking.TrackingWarning, stacklevel=3)


def best_config(result: SweepResult) -> dict[str, Any]:
    """A copy of the best trial's params (nested like the sweep config), ready to train with."""
    return copy.deepcopy(result.best_params)


# --------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------
def plot_sweep(result: SweepResult) -> Figure:
    """Two panels: the metric per trial with the running best, and parallel coordinates.

    Parallel coordinates: one vertical axis per parameter that varied (scaled to 0..1; log
    scale for positive ranges spanning over 20x; categories by their order) and the metric
    last, one line per completed trial coloured by its metric.
    """
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    table = result.table
    metric = result.metric_name
    fig = plt.figure(figsize=(14, 4.5))
    ax_trials, ax_params = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})

    values = pd.to_numeric(table[metric], errors="coerce")
    colours = {"complete": "tab:blue", "pruned": "tab:grey", "failed": "tab:red"}
    for state, colour in colours.items():
        mask = (table["state"] == state) & values.notna()
        if mask.any():
            ax_trials.scatter(table.loc[mask, "trial"], values[mask], color=colour, label=state, s=20)
    complete = values.where(table["state"] == "complete")
    running = complete.cummax() if result.goal == "maximize" else complete.cummin()
    ax_trials.plot(table["trial"], running.ffill(), "-", color="tab:orange", label="best so far")
    ax_trials.set_xlabel("trial")
    ax_trials.set_ylabel(metric)
    ax_trials.set_title(f"{result.sweep_name or 'sweep'} ({result.method}, {result.goal})")
    ax_trials.grid(alpha=0.3)
    ax_trials.legend(fontsize=8)

    done = table[(table["state"] == "complete") & values.notna()]
    varying = [name for name in result.param_names
               if name in done and done[name].astype(str).nunique() > 1]
    if done.empty or not varying:
        ax_params.axis("off")
        ax_params.text(0.5, 0.5, "no parameter varied across completed trials",
                       ha="center", va="center")
    else:
        columns = []
        labels = []
        for name in varying + [metric]:
            column = done[name]
            numeric = pd.to_numeric(column, errors="coerce")
            if numeric.notna().all():
                data = numeric.to_numpy(dtype=float)
                if name != metric and data.min() > 0 and data.max() / data.min() > 20:
                    data = np.log10(data)
                    name = f"{name} (log10)"
            else:
                order = {value: rank for rank, value in
                         enumerate(dict.fromkeys(column.astype(str)))}
                data = column.astype(str).map(order).to_numpy(dtype=float)
            span = data.max() - data.min()
            columns.append((data - data.min()) / span if span > 0 else np.full_like(data, 0.5))
            labels.append(name)
        matrix = np.stack(columns, axis=1)
        metric_values = done[metric].to_numpy(dtype=float)
        norm = Normalize(vmin=metric_values.min(), vmax=metric_values.max())
        cmap = colormaps["viridis"]
        xs = np.arange(len(labels))
        for row, value in zip(matrix, metric_values):
            ax_params.plot(xs, row, "-o", color=cmap(norm(value)), alpha=0.8, markersize=3)
        ax_params.set_xticks(xs, labels=labels, rotation=20, ha="right")
        ax_params.set_yticks([0, 1], labels=["min", "max"])
        ax_params.set_title("Parameters of completed trials (colour = metric)")
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax_params, label=metric)
    fig.tight_layout()
    return fig


def show_sweep(sweep: SweepResult | None) -> pd.DataFrame | None:
    """A notebook's view of a sweep: the plot and the trial table, or a line when it was skipped."""
    if sweep is None:
        print("sweep skipped (sweep_count=0): the final run used the report's best configuration")
        return None
    print(f"best {sweep.metric_name}: {sweep.best_value:.4f} with {sweep.best_params}")
    plot_sweep(sweep)
    return sweep.table
