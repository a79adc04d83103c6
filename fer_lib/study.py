"""One sweep, many workers: the reports' sweeps spread over processes, GPUs and machines.

Coordination is Optuna's and the database's, nothing home-made: every worker opens the same
Optuna storage and study (`load_if_exists`), asks it for its next trial and writes the result
back; the database decides who gets which trial.

    # machine A and machine B (same command; the study is created by whoever comes first)
    python -m fer_lib sweep exp4 --storage postgresql+psycopg://user:pw@db-host/sweeps \\
        --study exp4-may --trials 40
    # one machine, one worker per GPU (or CPU workers sharing the cores)
    python -m fer_lib sweep exp4 --storage sweeps.journal --study exp4-may --trials 40 --workers 4

NAME is a key of fer_lib.sweeps.REPORT_SWEEPS (exp3..exp6: trials train like notebooks 04-07,
through fer_lib.experiment.ReportExperiment), a W&B sweep config file (.json/.yaml, with
--model), or with --seeds a recipe of fer_lib.recipes (a grid study over the seeds: the
`reproduce` seeds spread over workers). The last stdout line is one JSON object: study,
n_complete, n_failed, best_value, best_params (and a few more).

Storage: an SQLAlchemy URL (PostgreSQL through psycopg 3: `postgresql+psycopg://...`; any URL
Optuna's RDBStorage accepts) or a plain file path, which becomes Optuna's JournalStorage with
a JournalFileBackend (several processes on one machine or a shared file system).

--trials N is the study's TOTAL: a worker starts a trial only while fewer than N are finished
or running, and stops when N are finished (complete or pruned; optuna's MaxTrialsCallback).
A worker whose last trials are still running elsewhere waits for them, because one of them
may die and come back as a retry. Two workers that look at the same instant could both start
the last trial; the database's trial numbers settle it: a trial that finds N trials finished
or running among those numbered before it ends at once as "surplus" (Optuna state FAIL, user
attr `surplus`), so the study has exactly N finished trials.

Faults, Optuna's mechanisms:
- RDB storages record a heartbeat per running trial (RDBStorage heartbeat_interval /
  grace_period). A worker killed mid-trial stops beating; the next worker that looks marks
  that trial FAIL and RetryHeartbeatStaleTrialCallback queues a copy (same parameters,
  system attr `failed_trial`), which the next free worker runs.
- JournalStorage has no heartbeat in optuna 5 (it does not implement BaseHeartbeat), so a
  killed worker's trial stays RUNNING there: use a database for fault tolerance.
- A trial whose training raises is recorded as FAIL with its error as user attr `error`;
  that worker and the others go on. A study that has failed N trials stops its workers.
- A worker that loses the database prints one line `error: lost the study storage ...` and
  exits with 1 (its current trial is left to the heartbeat check of the others).

Every trial is a W&B run through fer_lib.tracking (offline unless logged in), grouped by the
study name, with user attrs `worker` (host:pid) and `run_dir`. `study_table` gives the
study's trials (params, value, state, worker, duration) as a DataFrame; the command writes it
as sweep_trials.csv.

Test-only knob: FER_LIB_SWEEP_TRIAL_SLEEP=<seconds> makes every trial of a shared study sleep
that long after its parameters are drawn and before it trains, so a test can SIGKILL a
worker while its trial is RUNNING. Nothing else reads it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from fer_lib.experiment import ReportExperiment
    from fer_lib.sweeps import SweepSpace

DEFAULT_HEARTBEAT_S = 60
DEFAULT_MAX_RETRY = 3
TRIAL_SLEEP_ENV = "FER_LIB_SWEEP_TRIAL_SLEEP"
TABLE_FILE = "sweep_trials.csv"

# The notebooks' ReportExperiment settings (their parameters cells), by report sweep, so
# that `python -m fer_lib sweep exp4` trains exactly what notebook 05's sweep trains.
# tests/test_study.py checks them against the notebooks.
REPORT_EXPERIMENTS: dict[str, dict[str, Any]] = {
    "exp3": dict(name="04_cnn_augmentation_sweep", model="exp3_cnn", report_sweep_epochs=20,
                 epochs=30, lr=0.001, batch_size=128, weight_decay=1e-6, dropout_rate=0.2,
                 hidden_dim=64, augment="exp3", plateau_patience=2),
    "exp4": dict(name="05_resnet", model="exp4_resnet", report_sweep_epochs=25, epochs=25,
                 lr=0.00111, batch_size=128, weight_decay=7.04e-5, dropout_rate=0.336,
                 label_smoothing=0.156, patience=8, augment="exp4"),
    "exp5": dict(name="06_resnet_regularized", model="exp5_resnet3", report_sweep_epochs=30,
                 epochs=30, lr=0.000351, batch_size=32, weight_decay=7.07e-4, dropout_rate=0.548,
                 label_smoothing=0.222, patience=8, augment="exp5"),
    "exp6": dict(name="07_resnet_small", model="exp6_resnet_small", report_sweep_epochs=20,
                 epochs=25, lr=0.00409, batch_size=64, weight_decay=2.27e-3, dropout_rate=0.361,
                 label_smoothing=0.224, patience=4, augment="exp6", optimizer="adamw"),
}

_STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed",
                "RUNNING": "running", "WAITING": "waiting"}


class StorageError(RuntimeError):
    """The study storage cannot be opened or was lost; str() is one line naming it."""


class SurplusTrial(Exception):
    """The study had its N trials finished or running when this one started."""


# --------------------------------------------------------------------------------------
# storage and study
# --------------------------------------------------------------------------------------
def redact(storage: Any) -> str:
    """A storage for messages: URLs without their password, objects by class name."""
    if storage is None:
        return "memory"
    if not isinstance(storage, (str, os.PathLike)):
        return type(storage).__name__
    text = str(storage)
    if "://" not in text:
        return text
    try:
        from sqlalchemy.engine import make_url

        return make_url(text).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL is shown without its user part
        scheme, _, rest = text.partition("://")
        return f"{scheme}://{rest.rsplit('@', 1)[-1]}"


def root_cause(error: BaseException) -> str:
    """The first line of the innermost cause (the driver's own message for database errors)."""
    while True:
        inner = getattr(error, "orig", None) or error.__cause__ or error.__context__
        if not isinstance(inner, BaseException) or inner is error:
            break
        error = inner
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def is_storage_error(error: BaseException | None) -> bool:
    """Whether an exception came from the study's database (not from training), looking
    through its causes: Optuna may raise something else while handling the lost database."""
    import optuna

    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # journal storages only
        SQLAlchemyError = optuna.exceptions.StorageInternalError  # noqa: N806
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, (optuna.exceptions.StorageInternalError, SQLAlchemyError)):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def open_storage(storage: Any, *, heartbeat_interval: int | None = DEFAULT_HEARTBEAT_S,
                 grace_period: int | None = None, max_retry: int | None = DEFAULT_MAX_RETRY) -> Any:
    """An Optuna storage from a URL, a journal file path or a storage object (returned as is).

    None stays None (an in-memory study). A URL ("dialect+driver://...") opens an RDBStorage
    with heartbeats every `heartbeat_interval` s (None: no heartbeats), a trial silent for
    `grace_period` s (default 2x the interval) counting as dead and retried up to `max_retry`
    times. Anything else is a file path for a JournalStorage (no heartbeats in optuna 5).
    Raises StorageError with one line naming the storage when it cannot be opened.
    """
    if storage is None or not isinstance(storage, (str, os.PathLike)):
        return storage
    import optuna

    text = str(storage)
    shown = redact(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if "://" not in text:
            from optuna.storages.journal import JournalFileBackend

            try:
                Path(text).expanduser().parent.mkdir(parents=True, exist_ok=True)
                return optuna.storages.JournalStorage(JournalFileBackend(str(Path(text).expanduser())))
            except OSError as error:
                raise StorageError(f"cannot open the journal file {shown}: {root_cause(error)}") from error
        kwargs: dict[str, Any] = {}
        if heartbeat_interval is not None:
            kwargs.update(heartbeat_interval=int(heartbeat_interval),
                          grace_period=int(grace_period or 2 * heartbeat_interval))
            # optuna 4.9 renamed RetryFailedTrialCallback / failed_trial_callback
            retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
            if retry is not None:
                kwargs["heartbeat_stale_trial_callback"] = retry(max_retry=max_retry)
            else:
                kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(
                    max_retry=max_retry)
        for attempt in range(3):
            try:
                # pre_ping: a pooled connection the server closed is replaced, not an error
                return optuna.storages.RDBStorage(text, engine_kwargs={"pool_pre_ping": True},
                                                  **kwargs)
            except Exception as error:  # noqa: BLE001 - sorted out below
                # Workers that start together on an empty database all create Optuna's
                # tables and enum types; PostgreSQL's CREATE ... IF NOT EXISTS is not atomic,
                # so all but one may hit a unique violation or "type ... already exists".
                # The schema exists then: open it again.
                if attempt == 2 or not _created_concurrently(error):
                    raise _storage_error(error, shown) from error
                time.sleep(0.5 * (attempt + 1))
    return None  # not reached: the loop returns or raises


# SQLSTATEs of "another session created it first": unique_violation, duplicate_object (an
# enum type such as Optuna's studydirection), duplicate_table
_CREATED_CONCURRENTLY = {"23505", "42710", "42P07"}


def _created_concurrently(error: BaseException | None) -> bool:
    """A unique violation or an already existing type/table anywhere in the chain
    (SQLAlchemy's IntegrityError, the driver's errors with their SQLSTATE)."""
    while error is not None:
        if (type(error).__name__ in ("IntegrityError", "UniqueViolation")
                or getattr(error, "sqlstate", None) in _CREATED_CONCURRENTLY):
            return True
        error = error.__cause__ or error.__context__
    return False


def _storage_error(error: BaseException, shown: str) -> StorageError:
    """The one-line StorageError for an RDBStorage that could not be opened."""
    if isinstance(error, ImportError):  # optuna re-raises the driver's ModuleNotFoundError
        missing: BaseException | None = error
        while missing is not None and not getattr(missing, "name", None):
            missing = missing.__cause__ or missing.__context__
        driver = repr(getattr(missing, "name", None) or "module")
        return StorageError(f"cannot open the study storage {shown}: its database driver "
                            f"{driver} is not installed (PostgreSQL: pip install "
                            "'psycopg[binary]' and use postgresql+psycopg://...)")
    # bad URL, unknown dialect, server unreachable, wrong password...
    return StorageError(f"cannot open the study storage {shown}: {root_cause(error)}")


def heartbeat_interval(storage: Any) -> int | None:
    """The storage's heartbeat interval in seconds, None when it has no heartbeats."""
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if callable(getter) else None


def worker_id() -> str:
    """This process as the study's trials name it: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_sampler(space: SweepSpace, seed: int = 0, worker: str | None = None) -> Any:
    """The sweep's sampler for one worker of a shared study.

    Every worker seeded alike would draw the same parameters, so the seed is mixed with the
    worker id; TPE runs with constant_liar (running trials count as bad guesses) so
    concurrent workers do not all try the same promising point.
    """
    import optuna

    mixed = zlib.crc32(f"{seed}:{worker or worker_id()}".encode()) % 2**31
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if space.method == "grid":
            grid = {name: list(dist.choices) for name, dist in space.distributions.items()}
            return optuna.samplers.GridSampler(grid, seed=mixed)
        if space.method == "random":
            return optuna.samplers.RandomSampler(seed=mixed)
        return optuna.samplers.TPESampler(seed=mixed, constant_liar=True)


def open_study(space: SweepSpace, storage: Any, study_name: str, *, seed: int = 0,
               initial_params: Mapping[str, Any] | None = None) -> optuna.Study:
    """Create the study, or join it when another worker already did (load_if_exists).

    initial_params (Optuna's raw values) are enqueued only by the worker that created the
    study: the database's unique study name decides which one, so they run once.
    """
    import optuna

    kwargs = dict(storage=storage, sampler=worker_sampler(space, seed),
                  pruner=space.pruner or optuna.pruners.NopPruner(), study_name=study_name,
                  direction=space.goal)
    try:
        study = optuna.create_study(**kwargs)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.create_study(**kwargs, load_if_exists=True)
        created = False
    direction = study.direction.name.lower()
    if direction != space.goal:
        from fer_lib.sweeps import SweepConfigError

        raise SweepConfigError(f"study {study_name!r} in {redact(storage)} was created to "
                               f"{direction}; this sweep's goal is {space.goal}")
    if created and initial_params:
        study.enqueue_trial(dict(initial_params))
    return study


def with_test_delay(train_fn: Callable[..., Any]) -> Callable[..., Any]:
    """train_fn, sleeping FER_LIB_SWEEP_TRIAL_SLEEP seconds first when that (test-only) variable is set."""
    delay = float(os.environ.get(TRIAL_SLEEP_ENV) or 0)
    if delay <= 0:
        return train_fn

    def delayed(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return train_fn(*args, **kwargs)

    return delayed


def _fail_stale_trials(study: optuna.Study) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def optimize_shared(study: optuna.Study, objective: Callable[[Any], float], n_trials: int, *,
                    heartbeat_s: int | None = None, catch: tuple[type[Exception], ...] = (),
                    callbacks: Sequence[Callable[..., None]] = (),
                    max_failed: int | None = None) -> None:
    """Run trials of a shared study until it has `n_trials` finished (complete or pruned).

    This worker starts a trial only while finished + running < n_trials (MaxTrialsCallback
    over those states stops its optimize loop), so workers together run N trials, not N
    each. When the last trials run elsewhere and the storage has heartbeats, it waits for
    them, failing stale ones (Optuna's check), so a dead worker's trial is retried here.
    Without heartbeats it stops instead: nothing could tell a dead trial from a slow one.
    It also stops when the study has failed `max_failed` trials (default n_trials) or a
    grid is exhausted.
    """
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    taken = finished + (TrialState.RUNNING,)
    max_failed = n_trials if max_failed is None else max_failed

    def guarded(trial: Any) -> float:
        # trial numbers come from the database in creation order: if the trials created
        # before this one already fill the study, another worker took the last slot first
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        if sum(t.state in taken for t in earlier) >= n_trials:
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("error", f"surplus: the study had {n_trials} trials finished "
                                         "or running when this one started")
            study.stop()
            raise SurplusTrial(trial.number)
        return objective(trial)

    stops = [MaxTrialsCallback(n_trials, states=taken),
             MaxTrialsCallback(max_failed, states=(TrialState.FAIL,))]
    poll_s = 1.0  # one query a second while waiting for the trials of others
    grid = isinstance(study.sampler, optuna.samplers.GridSampler)
    while True:
        _fail_stale_trials(study)
        states = [trial.state for trial in study.get_trials(deepcopy=False)]
        done = sum(state in finished for state in states)
        running = states.count(TrialState.RUNNING)
        if done >= n_trials or states.count(TrialState.FAIL) >= max_failed:
            return
        # the last trials run elsewhere (or the grid has no point left but running ones)
        others_finishing = running > 0 and done + running >= n_trials
        if grid and not states.count(TrialState.WAITING) and study.sampler.is_exhausted(study):
            if not running:
                return
            others_finishing = True
        if others_finishing:
            if heartbeat_s is None:
                return
            time.sleep(poll_s)
            continue
        study.optimize(guarded, catch=(*catch, SurplusTrial), callbacks=[*callbacks, *stops])


# --------------------------------------------------------------------------------------
# the study's table
# --------------------------------------------------------------------------------------
def study_rows(study: optuna.Study, space: SweepSpace | None = None
               ) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """(rows like run_sweep's table, trial number -> params as train_fn got them).

    Parameters are decoded with `space` (categorical choices that Optuna stores as indices
    become their values); without it, or for a trial that died before drawing them, they
    are Optuna's raw values.
    """
    rows: list[dict[str, Any]] = []
    nested: dict[int, dict[str, Any]] = {}
    metric = space.metric_name if space is not None else "value"
    for trial in study.get_trials(deepcopy=False):
        raw = dict(trial.params)
        params, flat = raw, raw
        if space is not None:
            try:
                params, flat = space.decode(raw)
            except (KeyError, IndexError, TypeError, ValueError):
                pass
        nested[trial.number] = params
        state = _STATE_NAMES.get(trial.state.name, trial.state.name.lower())
        if trial.user_attrs.get("surplus"):
            state = "surplus"
        value = trial.value
        if value is None and trial.intermediate_values:  # a pruned trial: its last report
            value = trial.intermediate_values[max(trial.intermediate_values)]
        error = trial.user_attrs.get("error")
        if state == "failed" and not error:
            error = "no result recorded: its worker stopped (killed, lost its heartbeat or was interrupted)"
        rows.append({
            "trial": trial.number, "name": f"{study.study_name}-{trial.number + 1}", **flat,
            metric: value, **(trial.user_attrs.get("metrics") or {}), "state": state,
            "worker": trial.user_attrs.get("worker"),
            "retry_of": trial.system_attrs.get("failed_trial"),
            "duration_s": round(trial.duration.total_seconds(), 3) if trial.duration else None,
            "run_dir": trial.user_attrs.get("run_dir"), "error": error,
        })
    return rows, nested


def study_table(study: optuna.Study, space: SweepSpace | None = None) -> pd.DataFrame:
    """The study's trials: trial, name, params, metric, metrics, state, worker, retry_of,
    duration_s, run_dir, error (one row per trial, all workers)."""
    import pandas as pd

    rows, _ = study_rows(study, space)
    return pd.DataFrame(rows)


def study_summary(study: optuna.Study, space: SweepSpace | None = None) -> dict[str, Any]:
    """The command's closing JSON: counts by state and the best complete trial's params."""
    rows, nested = study_rows(study, space)
    metric = space.metric_name if space is not None else "value"
    complete = [row for row in rows if row["state"] == "complete" and row[metric] is not None]
    best = None
    if complete:
        pick = min if study.direction.name == "MINIMIZE" else max
        best = pick(complete, key=lambda row: row[metric])
    count = {state: sum(row["state"] == state for row in rows)
             for state in (*_STATE_NAMES.values(), "surplus")}
    return {"study": study.study_name, "metric": metric, "n_trials": len(rows),
            "n_complete": count["complete"], "n_pruned": count["pruned"],
            "n_failed": count["failed"], "n_running": count["running"],
            "n_surplus": count["surplus"],
            "best_value": None if best is None else float(best[metric]),
            "best_params": None if best is None else nested[best["trial"]],
            "best_trial": None if best is None else best["trial"]}


# --------------------------------------------------------------------------------------
# what a worker runs
# --------------------------------------------------------------------------------------
def report_experiment(sweep: str, **overrides: Any) -> ReportExperiment:
    """The ReportExperiment a notebook builds for a report sweep (exp3..exp6), with overrides."""
    from fer_lib.experiment import ReportExperiment

    if sweep not in REPORT_EXPERIMENTS:
        raise ValueError(f"unknown report sweep {sweep!r}; known: {', '.join(REPORT_EXPERIMENTS)}")
    return ReportExperiment(sweep=sweep, **{**REPORT_EXPERIMENTS[sweep], **overrides})


def load_sweep_config(path: str | os.PathLike) -> dict[str, Any]:
    """A W&B sweep config from a .json or .yaml/.yml file; ValueError with one line otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"cannot read sweep config {path}: {error.strerror or error}") from error
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            config = yaml.safe_load(text)
        else:
            config = json.loads(text)
    except Exception as error:  # noqa: BLE001 - JSON and YAML parse errors alike
        raise ValueError(f"sweep config {path} is not valid "
                         f"{'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: "
                         f"{root_cause(error)}") from error
    if not isinstance(config, dict):
        raise ValueError(f"sweep config {path} must hold a mapping (method, metric, parameters)")
    return config


def seeds_config(seeds: Sequence[int], study_name: str) -> dict[str, Any]:
    """A grid sweep over seeds (a recipe trained once per seed, ranked on PublicTest)."""
    return {"name": study_name, "method": "grid",
            "metric": {"name": "val_accuracy", "goal": "maximize"},
            "parameters": {"seed": {"values": [int(seed) for seed in seeds]}}}


def _kind(args: argparse.Namespace) -> str:
    """'seeds', 'report' or 'file' for the command's NAME; ValueError naming what is wrong."""
    from fer_lib.recipes import RECIPES
    from fer_lib.sweeps import REPORT_SWEEPS

    if args.seeds:
        if args.name not in RECIPES:
            raise ValueError(f"--seeds needs a recipe as NAME, got {args.name!r}; recipes: "
                             f"{', '.join(RECIPES)}")
        return "seeds"
    if args.name in REPORT_SWEEPS:
        return "report"
    if Path(args.name).suffix.lower() in (".json", ".yaml", ".yml") or Path(args.name).exists():
        if args.model is None:
            raise ValueError(f"sweep config {args.name}: give --model NAME (a registry model)")
        return "file"
    raise ValueError(f"unknown sweep {args.name!r}: give one of {', '.join(REPORT_SWEEPS)}, a "
                     "sweep config file (.json/.yaml) or, with --seeds, a recipe")


def _study_name(args: argparse.Namespace) -> str:
    return args.study or Path(args.name).stem


def _sweep_config(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    from fer_lib.sweeps import REPORT_SWEEPS

    if kind == "seeds":
        return seeds_config(args.seeds, _study_name(args))
    if kind == "report":
        return REPORT_SWEEPS[args.name]
    return load_sweep_config(args.name)


def _out_dir(args: argparse.Namespace) -> Path:
    from fer_lib.results import runs_folder

    return Path(args.out) if args.out else runs_folder() / "sweeps" / _study_name(args)


def _run_worker(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """One worker: load the data, fill the study, return the study's summary."""
    import torch

    from fer_lib.data import load_fer2013
    from fer_lib.sweeps import run_sweep, sweep_config_to_optuna

    if args.threads:
        torch.set_num_threads(args.threads)
    storage = open_storage(args.storage, heartbeat_interval=args.heartbeat,
                           grace_period=args.grace, max_retry=args.retries)
    config = _sweep_config(args, kind)
    space = sweep_config_to_optuna(config)  # a bad config fails before the data is loaded
    study_name = _study_name(args)
    out = _out_dir(args)
    if kind == "report" and not args.trials:
        raise ValueError(f"give --trials N (the study's total) for sweep {args.name}")
    data = load_fer2013(args.data, fraction=args.data_fraction, seed=args.seed)
    if kind == "report":
        overrides = {key: value for key, value in (
            ("sweep_epochs", args.epochs), ("max_steps_per_epoch", args.max_steps_per_epoch),
            ("model", args.model)) if value is not None}
        experiment = report_experiment(args.name, sweep_count=args.trials,
                                       sweep_fraction=args.fraction, seed=args.seed,
                                       device=args.device, precision=args.precision,
                                       sweep_storage=storage,
                                       sweep_study=study_name, **overrides)
        result = experiment.sweep_trials(data, run_dir=out, wandb_mode=args.wandb_mode,
                                         project=args.project)
    else:
        if kind == "seeds":
            train_fn = _seed_trainer(args, data, out)
        else:
            from fer_lib.experiment import sweep_objective
            from fer_lib.training import TrainConfig

            base = TrainConfig(device=args.device, precision=args.precision, seed=args.seed,
                               max_steps_per_epoch=args.max_steps_per_epoch,
                               checkpoint_every_epoch=False)
            train_fn = sweep_objective(data, args.model, base, epochs=args.epochs,
                                       train_fraction=args.fraction)
        result = run_sweep(config, train_fn, count=args.trials, project=args.project or "fer2013-sweeps",
                           mode=args.wandb_mode, run_dir=out, seed=args.seed, storage=storage,
                           study_name=study_name)
    summary = study_summary(result.study, space)
    summary["table"] = str(out / TABLE_FILE)
    return summary


def _seed_trainer(args: argparse.Namespace, data: Any, out: Path) -> Callable[..., dict[str, Any]]:
    """train_fn for a seeds study: the recipe under the standard protocol, one seed a trial."""
    from fer_lib.recipes import train_recipe

    overrides = {key: value for key, value in (("epochs", args.epochs), ("device", args.device),
                 ("precision", args.precision),
                 ("max_steps_per_epoch", args.max_steps_per_epoch)) if value is not None}

    def train_fn(params: dict[str, Any], tracker: Any = None) -> dict[str, Any]:
        seed = int(params["seed"])
        result = train_recipe(args.name, data, run_dir=out / f"seed{seed}", seed=seed,
                              wandb_mode=args.wandb_mode, **overrides)
        return {key: result.results[key] for key in
                ("val_accuracy", "test_accuracy", "test_macro_f1", "epochs_run", "seconds")}

    return train_fn


def _worker_argv(args: argparse.Namespace, threads: int) -> list[str]:
    """The command line of one local worker: the same sweep, one worker, its share of cores."""
    argv = [args.name, "--workers", "1", "--threads", str(threads)]
    options = {"--storage": args.storage, "--study": _study_name(args), "--trials": args.trials,
               "--fraction": args.fraction, "--data-fraction": args.data_fraction,
               "--epochs": args.epochs, "--max-steps-per-epoch": args.max_steps_per_epoch,
               "--data": args.data, "--model": args.model, "--device": args.device,
               "--precision": args.precision,
               "--seed": args.seed, "--out": str(_out_dir(args)), "--project": args.project,
               "--wandb-mode": args.wandb_mode, "--heartbeat": args.heartbeat,
               "--grace": args.grace, "--retries": args.retries}
    for option, value in options.items():
        if value is not None:
            argv += [option, str(value)]
    if args.seeds:
        argv += ["--seeds", *map(str, args.seeds)]
    return argv


def _launch_workers(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """Start args.workers local workers (one per visible GPU, else CPU workers splitting the
    cores), wait for them and return the study's summary."""
    import optuna

    from fer_lib.sweeps import sweep_config_to_optuna

    space = sweep_config_to_optuna(_sweep_config(args, kind))
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [item.strip() for item in (listed or "").split(",") if item.strip()]
    if listed is not None and not [item for item in visible if item != "-1"]:
        gpus = 0  # CUDA hidden on purpose: no need to import torch to know
    else:
        import torch

        gpus = torch.cuda.device_count()
        visible = visible or [str(index) for index in range(gpus)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.workers)
    processes = []
    try:
        for index in range(args.workers):
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = visible[index % len(visible)]
            command = [sys.executable, "-m", "fer_lib", "sweep", *_worker_argv(args, threads)]
            processes.append(subprocess.Popen(command, env=env))
        codes = [process.wait() for process in processes]
    finally:
        for process in processes:  # only ours, and only those still running (Ctrl-C)
            if process.poll() is None:
                process.terminate()
                process.wait()
    failed = sum(code != 0 for code in codes)
    storage = open_storage(args.storage, heartbeat_interval=None)
    try:
        study = optuna.load_study(study_name=_study_name(args), storage=storage)
    except KeyError as error:
        raise StorageError(f"study {_study_name(args)!r} is not in {redact(args.storage)}: "
                           "no worker created it") from error
    out = _out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    study_table(study, space).to_csv(out / TABLE_FILE, index=False)
    summary = study_summary(study, space)
    summary.update(table=str(out / TABLE_FILE), workers=args.workers, failed_workers=failed)
    return summary


def _quiet_storage_errors_in_threads() -> Callable[[], None]:
    """Optuna's heartbeat thread dies with a traceback when the database goes away; the main
    thread reports that loss in one line when its trial ends, so the thread stays quiet.
    Returns the function that puts the previous hook back."""
    import threading

    previous = threading.excepthook

    def hook(hook_args: Any) -> None:
        if hook_args.exc_value is not None and is_storage_error(hook_args.exc_value):
            return
        previous(hook_args)

    threading.excepthook = hook

    def restore() -> None:
        threading.excepthook = previous

    return restore


def run_command(args: argparse.Namespace) -> int:
    """`python -m fer_lib sweep ...`: 0 when the study finished, 1 with one `error:` line."""
    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1

    if args.workers < 1:
        return fail(f"--workers must be >= 1, got {args.workers}")
    if args.trials is not None and args.trials < 1:
        return fail(f"--trials must be >= 1, got {args.trials}")
    if args.workers > 1 and args.storage is None:
        return fail("several --workers need --storage: an in-memory study lives in one process")
    restore = _quiet_storage_errors_in_threads()
    try:
        kind = _kind(args)
        summary = _launch_workers(args, kind) if args.workers > 1 else _run_worker(args, kind)
    except StorageError as error:
        return fail(str(error))
    except Exception as error:  # noqa: BLE001 - one line for the person at the terminal
        if is_storage_error(error):
            return fail(f"lost the study storage {redact(args.storage)}: {root_cause(error)}")
        if isinstance(error, (ValueError, OSError, KeyError, RuntimeError)):
            return fail(str(error).strip().splitlines()[0] if str(error).strip() else repr(error))
        raise
    finally:
        restore()
    print(json.dumps(summary, default=str), flush=True)
    return 0 if not summary.get("failed_workers") else 1


def add_sweep_parser(subparsers: Any) -> None:
    """The `sweep` sub-command (fer_lib.__main__ registers it)."""
    parser = subparsers.add_parser(
        "sweep", help="run a report sweep on many workers through an Optuna storage",
        description="Run (or join) a sweep study. Every process started with the same --storage "
                    "and --study fills one study; the last stdout line is a JSON summary.")
    parser.add_argument("name", metavar="NAME",
                        help="a report sweep (exp3..exp6), a W&B sweep config file (.json/.yaml) "
                             "or, with --seeds, a recipe")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="SQLAlchemy URL (postgresql+psycopg://user:pw@host/db) or a journal "
                             "file path; default: in memory, one process")
    parser.add_argument("--study", default=None, help="study name (default: NAME)")
    parser.add_argument("--trials", type=int, default=None, metavar="N",
                        help="finished trials the study needs in total (all workers together)")
    parser.add_argument("--workers", type=int, default=1, metavar="K",
                        help="local worker processes: one per visible GPU, else CPU workers "
                             "sharing the cores (default 1)")
    parser.add_argument("--fraction", type=float, default=1.0, metavar="F",
                        help="share of Training each trial trains on (default 1)")
    parser.add_argument("--data-fraction", type=float, default=1.0,
                        help="seeded stratified subsample of every split (quick runs)")
    parser.add_argument("--epochs", type=int, default=None, metavar="E", help="epochs per trial")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, metavar="S")
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="FER2013 source (default: found as usual)")
    parser.add_argument("--model", default=None,
                        help="registry model (required with a config file; a report sweep "
                             "uses its notebook's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="a grid study over these seeds of recipe NAME")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="sampler and training seed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of this worker (default: torch's, or the cores "
                             "split between --workers)")
    parser.add_argument("--out", default=None,
                        help="folder of the trials' runs and sweep_trials.csv "
                             "(default runs/sweeps/STUDY)")
    parser.add_argument("--project", default=None, help="W&B project")
    parser.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"])
    parser.add_argument("--heartbeat", type=int, default=DEFAULT_HEARTBEAT_S, metavar="SECONDS",
                        help="database storages: heartbeat interval of running trials "
                             f"(default {DEFAULT_HEARTBEAT_S})")
    parser.add_argument("--grace", type=int, default=None, metavar="SECONDS",
                        help="a trial silent this long is failed and retried (default 2x heartbeat)")
    parser.add_argument("--retries", type=int, default=DEFAULT_MAX_RETRY,
                        help=f"retries of a dead worker's trial (default {DEFAULT_MAX_RETRY})")
    parser.set_defaults(func=run_command)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fer_lib.study ...` works too (same as `python -m fer_lib sweep ...`)."""
    parser = argparse.ArgumentParser(prog="python -m fer_lib")
    add_sweep_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
