"""fer_lib.tracking: mode rules, local metric files, a real offline run kept inside run_dir,
and wandb failures that must turn into warnings instead of stopping training."""
import json
import os
import subprocess
import sys
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fer_lib import tracking  # noqa: E402

WANDB_VARIABLES = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "WANDB_DIR", "WANDB_CACHE_DIR",
                   "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR", "WANDB_BASE_URL",
                   "WANDB_IDENTITY_TOKEN_FILE", "NETRC")


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    """An empty HOME (and XDG folders) so that a stray wandb write would show up there."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(name, str(home / name.lower()))
    for name in WANDB_VARIABLES + tracking._CI_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return home


def _files_under(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


class FakeRun:
    """Stands in for a wandb Run; optionally fails on one method."""

    def __init__(self, fail_on=None):
        self.fail_on = fail_on
        self.logged, self.finished_with = [], []
        self.summary = {}

    def log(self, payload, step=None):
        if self.fail_on == "log":
            raise RuntimeError("service died")
        self.logged.append((payload, step))

    def finish(self, exit_code=None):
        self.finished_with.append(exit_code)


# ------------------------------------------------------------------------------ mode rules
def test_resolve_mode_rules(fake_home, monkeypatch):
    assert tracking.resolve_mode("disabled") == "disabled"
    assert tracking.resolve_mode("dryrun") == "offline"
    assert tracking.resolve_mode() == "offline"  # no key anywhere
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode() == "disabled"
    assert tracking.resolve_mode("offline") == "offline"  # the argument wins
    monkeypatch.delenv("WANDB_MODE")
    (fake_home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    os.chmod(fake_home / ".netrc", 0o600)
    assert tracking.has_api_key()
    assert tracking.resolve_mode() == "online"
    monkeypatch.setenv("CI", "true")
    assert tracking.resolve_mode() == "offline"  # never online on CI unless asked for
    with pytest.raises(ValueError, match="unknown W&B mode"):
        tracking.resolve_mode("cloud")


def test_netrc_for_another_host_is_not_a_key(fake_home):
    (fake_home / ".netrc").write_text("machine example.com\n  login user\n  password x\n")
    os.chmod(fake_home / ".netrc", 0o600)
    assert not tracking.has_api_key()


# ------------------------------------------------------------------------------ disabled
def test_disabled_tracker_writes_local_files_only(tmp_path):
    run_dir = tmp_path / "run"
    with tracking.init_tracker("p", {"lr": 1e-3, "path": tmp_path}, mode="disabled",
                               run_dir=run_dir) as tracker:
        assert not tracker.enabled and tracker.mode == "disabled"
        tracker.log({"loss": np.float32(1.5), "acc": torch.tensor(0.25), "vector": np.zeros(3)},
                    step=3)
        tracker.log({"loss": 1.0})
        tracker.log_summary({"best": 0.5})
        tracker.log_summary({"test": 0.4})
        tracker.log_confusion([0, 1], [0, 0], ["a", "b"])
        tracker.log_artifact(tmp_path, "m")
    records = tracking.load_metrics(run_dir)
    assert records["_step"].tolist() == [3, 4]
    assert records["loss"].tolist() == [1.5, 1.0]
    assert records["acc"].iloc[0] == 0.25 and "vector" not in records
    assert json.loads((run_dir / "summary.json").read_text()) == {"best": 0.5, "test": 0.4}
    assert json.loads((run_dir / "config.json").read_text())["path"] == str(tmp_path)
    assert not (run_dir / "wandb").exists()


def test_disabled_mode_does_not_import_wandb(tmp_path):
    code = ("import sys; from fer_lib import tracking; "
            "t = tracking.init_tracker('p', {}, mode='disabled', run_dir=sys.argv[1]); "
            "t.log({'a': 1}); t.finish(); print('wandb' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------ offline
def test_offline_run_stays_inside_run_dir(fake_home, tmp_path):
    run_dir = tmp_path / "runs" / "exp"
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", tracking.TrackingWarning)  # any wandb failure fails here
        tracker = tracking.init_tracker("fer-test", {"lr": 0.01}, mode="offline", run_dir=run_dir,
                                        name="t1", group="g", job_type="train", tags=["test"])
        assert tracker.enabled and tracker.mode == "offline"
        for epoch in range(3):
            tracker.log({"epoch": epoch, "val_accuracy": 0.1 * epoch}, step=epoch)
        tracker.log_summary({"best_val_accuracy": 0.2})
        tracker.log_confusion([0, 1, 1], [0, 1, 0], ["a", "b"])
        tracker.log_per_class(pd.DataFrame({"f1": [0.5, 0.6]}, index=["a", "b"]))
        tracker.log_figure("curve", fig)
        tracker.log_artifact(checkpoint, "model v1")
        tracker.finish()
    plt.close(fig)
    assert "WANDB_DIR" not in os.environ  # the environment is restored after each call
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert tracker.wandb_dir == runs[0]
    assert len(tracking.load_metrics(run_dir)) == 3
    assert (run_dir / "figures" / "curve.png").exists()
    assert (run_dir / "per_class.csv").exists()
    assert _files_under(fake_home) == []  # nothing landed in the home folder
    outside = [p for p in _files_under(tmp_path) if not p.startswith(("runs", "home"))]
    assert outside == ["model.pt"]


# ------------------------------------------------------------------------------ failures
def test_init_failure_warns_and_training_goes_on(fake_home, tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(tracking.TrackingWarning, match="init failed.*no service"):
        tracker = tracking.init_tracker("p", {}, mode="offline", run_dir=tmp_path / "r")
    assert not tracker.enabled and isinstance(tracker.error, RuntimeError)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a no-op tracker warns no more
        tracker.log({"loss": 1.0})
        tracker.log_figure("f", plt.figure())
        tracker.finish()
    plt.close("all")
    assert tracking.load_metrics(tmp_path / "r")["loss"].tolist() == [1.0]


def test_wandb_import_failure_warns(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.warns(tracking.TrackingWarning, match="ModuleNotFoundError|ImportError"):
        tracker = tracking.init_tracker("p", {}, mode="offline", run_dir=tmp_path)
    assert not tracker.enabled


def test_log_failure_degrades_to_local_only(tmp_path):
    run = FakeRun(fail_on="log")
    tracker = tracking.Tracker(run, run_dir=tmp_path, mode="offline")
    with pytest.warns(tracking.TrackingWarning, match="service died"):
        tracker.log({"loss": 2.0}, step=0)
    assert not tracker.enabled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.log({"loss": 1.0}, step=1)
        tracker.finish()
    assert tracking.load_metrics(tmp_path)["loss"].tolist() == [2.0, 1.0]
    assert run.finished_with == []  # the broken run is left alone


def test_online_without_key_falls_back_to_offline_inside_run_dir(fake_home, tmp_path, monkeypatch):
    import wandb

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        seen["WANDB_DIR"] = os.environ.get("WANDB_DIR")
        seen["WANDB_DATA_DIR"] = os.environ.get("WANDB_DATA_DIR")
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    with pytest.warns(tracking.TrackingWarning, match="no API key"):
        tracker = tracking.init_tracker("p", {"a": 1}, mode="online", run_dir=tmp_path / "r",
                                        group="sweep", job_type="sweep-trial")
    assert seen["mode"] == "offline" and seen["group"] == "sweep"
    assert seen["job_type"] == "sweep-trial" and seen["reinit"] == "create_new"
    assert seen["WANDB_DIR"] == str((tmp_path / "r").resolve())
    assert seen["WANDB_DATA_DIR"].startswith(str((tmp_path / "r").resolve()))
    assert "WANDB_DIR" not in os.environ
    with pytest.raises(ZeroDivisionError):
        with tracker:
            tracker.log({"a": 1})
            raise ZeroDivisionError  # the training error propagates, the run is closed as failed
    assert tracker.run.finished_with == [1]
    assert tracker.run.logged == [({"a": 1}, None)]


def test_table_and_figure_names_cannot_leave_the_run_folder(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    tracker = tracking.init_tracker("p", {}, mode="disabled", run_dir=run_dir)
    tracker.log_per_class(pd.DataFrame({"f1": [0.5]}, index=["a"]), name="../../escaped")
    tracker.log_figure("../sub/fig:1", plt.figure())
    plt.close("all")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    # everything stays inside run_dir, under the sanitised names
    assert all(name.startswith(os.path.join("runs", "r1")) for name in written), written
    assert (run_dir / "escaped.csv").read_text().startswith("index,f1")
    assert (run_dir / "figures" / "sub-fig-1.png").stat().st_size > 0
