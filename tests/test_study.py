"""fer_lib.study: one sweep filled by several worker processes through Optuna's storage.

The database tests start a throwaway PostgreSQL cluster on 127.0.0.1 (a free port, a tmp
folder, trust authentication, run as the `postgres` user when the tests run as root) and
stop and delete it at the end; they skip when the PostgreSQL binaries or psycopg are
missing. Workers are real `python -m fer_lib sweep` processes on a tiny generated FER2013
CSV, one epoch of one step per trial. FER_LIB_SWEEP_TRIAL_SLEEP (test-only, see
fer_lib.study) makes their trials last long enough to be shared out or killed mid-trial.
"""
import ast
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import pytest

from fer_lib import study as shared
from fer_lib import sweeps

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {"exp3": "04_cnn_augmentation_sweep", "exp4": "05_resnet",
             "exp5": "06_resnet_regularized", "exp6": "07_resnet_small"}
TRIAL_ARGS = ["--epochs", "1", "--max-steps-per-epoch", "1", "--device", "cpu",
              "--precision", "fp32", "--threads", "1", "--wandb-mode", "disabled"]


# --------------------------------------------------------------------------------------
# a throwaway PostgreSQL server
# --------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(command):
    """Run a server command as `postgres` when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *command]
    return ["su", "postgres", "-c", " ".join(map(str, command))]


def _sql(port, statement, database="postgres"):
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname=database,
                         autocommit=True) as connection:
        connection.execute(statement)


@pytest.fixture(scope="session")
def postgres():
    """(port, url of a fresh database) on a server that lives for the test session."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not on PATH")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install psycopg[binary])")
    folder = Path(tempfile.mkdtemp(prefix="fer_lib_pg_"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", _free_port()
    try:
        subprocess.run(_as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                                     "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True, text=True)
        # -F: no fsync (a throwaway cluster); the socket goes to our folder, TCP to loopback only
        options = f"-h 127.0.0.1 -p {port} -k {folder} -F"
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-o", options, "-l",
                                     str(folder / "server.log"), "-w", "-t", "60", "start"]),
                       check=True, capture_output=True, text=True)
        _sql(port, "CREATE DATABASE sweeps")
        yield port, f"postgresql+psycopg://postgres@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from fer_lib.synthetic import write_fer2013_csv

    folder = tmp_path_factory.mktemp("tiny")
    return write_fer2013_csv(folder / "fer2013.csv", n_per_split=(35, 14, 14), seed=0)


def _env(tmp_path, sleep=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FER_LIB_CACHE": str(tmp_path / "cache"),
           "WANDB_MODE": "disabled", "FER_LIB_PROGRESS": "plain", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop(shared.TRIAL_SLEEP_ENV, None)
    if sleep:
        env[shared.TRIAL_SLEEP_ENV] = str(sleep)
    return env


def _start(args, tmp_path, tag, sleep=None):
    """A `python -m fer_lib sweep` process; its stdout/stderr go to tmp_path/<tag>.out/.err."""
    out = open(tmp_path / f"{tag}.out", "w")
    err = open(tmp_path / f"{tag}.err", "w")
    process = subprocess.Popen([sys.executable, "-m", "fer_lib", "sweep", *map(str, args)],
                               cwd=ROOT, env=_env(tmp_path, sleep), stdout=out, stderr=err)
    out.close()
    err.close()
    return process


def _finish(process, tmp_path, tag, timeout=120):
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    stdout = (tmp_path / f"{tag}.out").read_text()
    stderr = (tmp_path / f"{tag}.err").read_text()
    return code, stdout, stderr


def _summary(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def _trials(url_or_path, name):
    storage = shared.open_storage(url_or_path, heartbeat_interval=None)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        # an RDBStorage keeps a pooled database connection; left to the garbage collector it
        # is deleted while still open (a ResourceWarning, sometimes after the server stopped)
        engine = getattr(storage, "engine", None)
        if engine is not None:
            engine.dispose()


def _wait_for_running(url, name, timeout=90):
    """The first running trial that has drawn its parameters (its worker is then training,
    or sleeping in FER_LIB_SWEEP_TRIAL_SLEEP)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = [t for t in _trials(url, name) if t.state == optuna.trial.TrialState.RUNNING
                       and "worker" in t.user_attrs]
        except KeyError:  # the study is not created yet
            running = []
        if running:
            return running[0]
        time.sleep(0.3)
    raise AssertionError(f"no trial of {name} started within {timeout} s")


def _check_two_workers(trials, n):
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == n, [t.state for t in trials]
    # the rest can only be a trial that two workers started for the last slot at once
    assert all(t.user_attrs.get("surplus") for t in trials if t not in complete)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost, none twice
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) == 2, f"only {workers} ran trials"
    assert all(t.user_attrs["run_dir"] for t in complete)


@pytest.mark.slow
def test_two_workers_fill_one_postgres_study(postgres, tiny_data, tmp_path):
    _, url = postgres
    args = ["exp3", "--storage", url, "--study", "two", "--trials", 6, "--data", tiny_data,
            "--out", tmp_path / "runs", *TRIAL_ARGS]
    workers = [_start(args, tmp_path, f"w{i}", sleep=1) for i in range(2)]
    results = [_finish(worker, tmp_path, f"w{i}") for i, worker in enumerate(workers)]
    for code, stdout, stderr in results:
        assert code == 0, stderr
        summary = _summary(stdout)
        assert summary["study"] == "two" and summary["n_complete"] == 6
        assert summary["n_failed"] == 0 and set(summary["best_params"]) == set(
            sweeps.REPORT_SWEEPS["exp3"]["parameters"])
    _check_two_workers(_trials(url, "two"), 6)
    table = (tmp_path / "runs" / "sweep_trials.csv").read_text().splitlines()
    assert table[0].startswith("trial,name,") and "worker" in table[0] and len(table) == 7


@pytest.mark.slow
def test_two_local_workers_fill_one_journal_file_study(tiny_data, tmp_path):
    journal = tmp_path / "study.journal"
    process = _start(["exp3", "--storage", journal, "--study", "local", "--trials", 6,
                      "--workers", 2, "--data", tiny_data, "--out", tmp_path / "runs",
                      *TRIAL_ARGS], tmp_path, "launcher", sleep=1)
    code, stdout, stderr = _finish(process, tmp_path, "launcher")
    assert code == 0, stderr
    summary = _summary(stdout)
    assert summary["workers"] == 2 and summary["failed_workers"] == 0
    assert summary["n_complete"] == 6 and summary["n_running"] == 0
    _check_two_workers(_trials(str(journal), "local"), 6)


@pytest.mark.slow
def test_a_killed_workers_trial_fails_and_is_retried(postgres, tiny_data, tmp_path):
    _, url = postgres
    args = ["exp3", "--storage", url, "--study", "killed", "--trials", 3, "--data", tiny_data,
            "--heartbeat", 1, "--grace", 2, "--out", tmp_path / "runs", *TRIAL_ARGS]
    victim = _start(args, tmp_path, "victim", sleep=60)  # sleeps inside its first trial
    killed = _wait_for_running(url, "killed")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    code, stdout, stderr = _finish(_start(args, tmp_path, "survivor"), tmp_path, "survivor")
    assert code == 0, stderr
    summary = _summary(stdout)
    assert summary["n_complete"] == 3 and summary["n_failed"] == 1
    trials = {t.number: t for t in _trials(url, "killed")}
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == killed.params  # the same configuration, run again
    assert retries[0].user_attrs["worker"] != killed.user_attrs["worker"]


@pytest.mark.slow
def test_a_worker_that_loses_the_database_says_so_in_one_line(postgres, tiny_data, tmp_path):
    port, url = postgres
    _sql(port, "CREATE DATABASE doomed")
    doomed = url.rsplit("/", 1)[0] + "/doomed"
    worker = _start(["exp3", "--storage", doomed, "--study", "lost", "--trials", 2,
                     "--data", tiny_data, "--heartbeat", 1, "--out", tmp_path / "runs",
                     *TRIAL_ARGS], tmp_path, "lost", sleep=3)
    _wait_for_running(doomed, "lost")
    _sql(port, "DROP DATABASE doomed WITH (FORCE)")
    code, stdout, stderr = _finish(worker, tmp_path, "lost")
    assert code == 1
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost the study storage" in errors[0] and "doomed" in errors[0], stderr
    assert "postgres@127.0.0.1" in errors[0]


# --------------------------------------------------------------------------------------
# in one process: the library calls, bad input
# --------------------------------------------------------------------------------------
class QuietTracker:
    def __init__(self, project, config, **kwargs):
        pass

    def log(self, metrics, step=None):
        pass

    def log_summary(self, values):
        pass

    def finish(self, exit_code=None):
        pass


def test_run_sweep_with_a_storage_joins_the_study_and_returns_all_of_it(tmp_path):
    """Two run_sweep calls (two notebooks) on one journal study: the error of one trial is
    recorded on it, the initial params run once, each call returns the whole study."""
    config = {"method": "random", "metric": {"name": "score", "goal": "maximize"},
              "parameters": {"x": {"values": [1, 2, 3, 4, 5, 6]}}}

    def train_fn(params, tracker):
        if params["x"] == 6:
            raise ValueError("x=6 does not train")
        return {"score": params["x"] / 10, "extra": 1.5}

    journal = str(tmp_path / "s.journal")
    kwargs = dict(project="p", mode="disabled", progress=False, tracker_factory=QuietTracker,
                  storage=journal, study_name="nb", initial_params={"x": 2})
    with strict_warnings():
        first = sweeps.run_sweep(config, train_fn, count=2, run_dir=tmp_path / "a", **kwargs)
        second = sweeps.run_sweep(config, train_fn, count=4, run_dir=tmp_path / "b", **kwargs)
    assert first.sweep_name == "nb" and (first.table["state"] == "complete").sum() == 2
    table = second.table
    assert (table["state"] == "complete").sum() == 4
    assert list(table["trial"]) == sorted(set(table["trial"]))
    assert (table["x"] == 2).sum() >= 1 and table.loc[0, "x"] == 2  # enqueued once, first
    failed = table[table["state"] == "failed"]
    assert all(failed["error"] == "ValueError: x=6 does not train")
    assert second.best_value == table.loc[table["state"] == "complete", "score"].max()
    assert set(table.columns) >= {"trial", "name", "x", "score", "extra", "state", "worker",
                                  "duration_s", "run_dir", "error"}
    assert (tmp_path / "b" / "sweep_trials.csv").exists()
    summary = shared.study_summary(second.study, sweeps.sweep_config_to_optuna(config))
    assert summary["n_complete"] == 4 and summary["best_value"] == second.best_value
    with pytest.raises(ValueError, match="study_name"):
        sweeps.run_sweep(config, train_fn, count=1, run_dir=tmp_path / "c", storage=journal,
                         tracker_factory=QuietTracker, mode="disabled")


@contextlib.contextmanager
def strict_warnings():
    """A failed trial warns (fer_lib.sweeps); nothing else may (e.g. Optuna's deprecations)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message="sweep trial .* failed")
        yield


def test_the_report_presets_are_the_notebooks_settings():
    """`sweep exp4` must train what notebook 05's sweep trains: its parameters cell and its
    ReportExperiment(...) call hold the values of REPORT_EXPERIMENTS['exp4']."""
    import nbformat

    assert set(shared.REPORT_EXPERIMENTS) == set(sweeps.REPORT_SWEEPS) == set(NOTEBOOKS)
    for sweep, notebook in NOTEBOOKS.items():
        nb = nbformat.read(ROOT / "notebooks" / f"{notebook}.ipynb", as_version=4)
        parameters = {}
        exec(next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", [])),
             parameters)
        assert parameters["sweep_storage"] is None and parameters["sweep_study"] is None
        call = next(node for cell in nb.cells if "ReportExperiment(" in cell.source
                    for node in ast.walk(ast.parse(cell.source))
                    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "ReportExperiment")
        given = dict(zip(("name", "model", "sweep"), map(ast.literal_eval, call.args), strict=True))
        for keyword in call.keywords:
            value = keyword.value
            given[keyword.arg] = (parameters[value.id] if isinstance(value, ast.Name)
                                  else ast.literal_eval(value))
        assert given["sweep"] == sweep
        assert "sweep_storage" in given and "sweep_study" in given  # passed through
        expected = shared.REPORT_EXPERIMENTS[sweep]
        assert {key: given[key] for key in expected} == expected, notebook
        experiment = shared.report_experiment(sweep, sweep_count=5)
        assert experiment.name == notebook and experiment.sweep_count == 5


def _cli(argv, capsys):
    from fer_lib.__main__ import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["sweep", "exp9", "--trials", "2"], "unknown sweep 'exp9'"),
    (["sweep", "missing.yaml", "--model", "exp1_mlp", "--trials", "2"],
     "cannot read sweep config missing.yaml"),
    (["sweep", "exp3", "--trials", "2", "--storage", "nosuchdb://x/y"],
     "cannot open the study storage nosuchdb://x/y"),
    (["sweep", "exp3", "--trials", "2", "--workers", "2"], "several --workers need --storage"),
    (["sweep", "exp3"], "give --trials N"),
    (["sweep", "fast_cpu", "--seeds", "0", "1", "--storage", "mysql+pymysql://u:secret@127.0.0.1:1/x"],
     "'pymysql' is not installed"),
    (["sweep", "nope", "--seeds", "0"], "--seeds needs a recipe"),
])
def test_bad_input_is_one_error_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "pymysql" in message:
        monkeypatch.setitem(sys.modules, "pymysql", None)  # a driver that is not installed
    code, out, err = _cli([*argv, "--out", str(tmp_path / "runs")], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "secret" not in err


def test_a_bad_config_file_is_one_error_line(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: [grid\n")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"method": "grid", "metric": {"name": "m"},
                                 "parameters": {"lr": {"distribution": "normal"}}}))
    for path, message in ((bad_yaml, "is not valid YAML"), (wrong, "'lr'")):
        code, _, err = _cli(["sweep", str(path), "--model", "exp1_mlp", "--trials", "1"], capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, err


def test_unreachable_database_is_one_error_line(capsys, tmp_path):
    pytest.importorskip("psycopg")
    url = f"postgresql+psycopg://postgres:hidden@127.0.0.1:{_free_port()}/none"
    code, _, err = _cli(["sweep", "exp3", "--trials", "1", "--storage", url,
                         "--out", str(tmp_path)], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "cannot open the study storage postgresql+psycopg://postgres:***@127.0.0.1" in err
    assert "hidden" not in err


@pytest.mark.slow
def test_reproduce_seeds_as_a_grid_study(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FER_LIB_CACHE", str(tmp_path / "cache"))
    journal = tmp_path / "seeds.journal"
    code, out, err = _cli(["sweep", "fast_cpu", "--seeds", "3", "7", "--storage", str(journal),
                           "--data", str(tiny_data), "--out", str(tmp_path / "runs"),
                           *TRIAL_ARGS], capsys)
    assert code == 0, err
    summary = _summary(out)
    assert summary["study"] == "fast_cpu" and summary["n_complete"] == 2
    assert summary["best_params"]["seed"] in (3, 7)
    trials = _trials(str(journal), "fast_cpu")
    assert sorted(t.params["seed"] for t in trials) == [3, 7]
    assert all("test_accuracy" in t.user_attrs["metrics"] for t in trials)


def test_a_database_storage_has_heartbeats_and_retries_without_deprecated_names(tmp_path):
    with strict_warnings():
        storage = shared.open_storage(f"sqlite:///{tmp_path / 'h.db'}", heartbeat_interval=2)
    assert shared.heartbeat_interval(storage) == 2 and storage.grace_period == 4
    assert storage.get_heartbeat_stale_trial_callback() is not None
    assert shared.heartbeat_interval(shared.open_storage(str(tmp_path / "j.journal"))) is None
    assert shared.open_storage(None) is None


@pytest.mark.parametrize("driver_error", ["UniqueViolation", "DuplicateObject", "DuplicateTable"])
def test_opening_a_database_another_worker_is_creating_retries(monkeypatch, tmp_path, driver_error):
    # two workers on an empty PostgreSQL database both create Optuna's schema; the loser sees
    # a unique violation or 'type "studydirection" already exists' (DuplicateObject), wrapped
    # by SQLAlchemy: the schema is there then, so opening again must succeed
    import psycopg.errors
    import sqlalchemy.exc

    real, calls = optuna.storages.RDBStorage, []

    def racing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            orig = getattr(psycopg.errors, driver_error)("already exists")
            try:
                raise orig
            except Exception as error:  # chain it as SQLAlchemy does
                raise sqlalchemy.exc.ProgrammingError("CREATE ...", {}, error) from error
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    storage = shared.open_storage(f"sqlite:///{tmp_path / 'r.db'}", heartbeat_interval=None)
    assert len(calls) == 2 and storage is not None
    # any other error is no race: one clear error, no retry
    calls.clear()

    def broken(*args, **kwargs):
        calls.append(args)
        raise sqlalchemy.exc.OperationalError("connect", {}, OSError("connection refused"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(shared.StorageError, match="connection refused"):
        shared.open_storage(f"sqlite:///{tmp_path / 'r.db'}", heartbeat_interval=None)
    assert len(calls) == 1
