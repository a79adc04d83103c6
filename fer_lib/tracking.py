"""Experiment tracking with Weights & Biases that can never stop training.

`init_tracker` returns a `Tracker` whatever happens: without wandb, without network,
without an API key or when wandb itself fails, it warns (TrackingWarning) and keeps going as
a no-op for W&B. Every `log()` is also appended to `run_dir/metrics.jsonl` (and summaries to
`run_dir/summary.json`), so notebooks can read their metrics back without wandb.

Mode: the `mode` argument, else $WANDB_MODE, else "online" only when an API key is
available and we are not on CI, else "offline". Offline runs land in `run_dir/wandb/` and
can be uploaded later with `wandb sync run_dir/wandb/offline-run-*`.

Where files go: wandb writes into the home folder (~/.cache/wandb, ~/.local/share/wandb,
~/.config/wandb) unless WANDB_DIR, WANDB_CACHE_DIR, WANDB_DATA_DIR and WANDB_CONFIG_DIR are
set, and it reads them at call time (artifact and media staging read them on every log), not
only in wandb.init. So those variables are set to folders under run_dir around EVERY call
into wandb and restored right after: the notebook's environment is left as it was, and
several trackers with different run_dirs can live in one process. (The wandb-core service
process is started once per Python process and keeps the environment of the first run, so
its own debug log lands in the first run's folder.)
"""
from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from fer_lib.fileio import atomic_path, atomic_write_json, atomic_write_text, safe_filename, to_jsonable

MODES = ("online", "offline", "disabled")
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
WANDB_SUBDIR = "wandb"
# wandb.init waits up to 90 s by default for its service; a tracker must not hold training
# up that long (offline init takes about 1 s).
INIT_TIMEOUT_S = 30.0
_CI_VARIABLES = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "CIRCLECI", "JENKINS_URL",
                 "TF_BUILD", "TEAMCITY_VERSION")


class TrackingWarning(UserWarning):
    """A tracking problem that was turned into a warning so that training goes on."""


# --------------------------------------------------------------------------------------
# mode resolution
# --------------------------------------------------------------------------------------
def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


def in_ci() -> bool:
    """True on a CI runner (the usual CI environment variables are set)."""
    return any(_truthy(os.environ.get(name)) for name in _CI_VARIABLES)


def has_api_key() -> bool:
    """Whether wandb could log in without asking: WANDB_API_KEY or a netrc entry for its host.

    Only checks that a key exists (never reads or returns it), so that "online" is chosen
    only when wandb.init will not stop and prompt for a login.
    """
    if os.environ.get("WANDB_API_KEY", "").strip() or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    if not host:
        return False
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else [
        os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")]
    for path in candidates:
        try:
            if os.path.isfile(path) and netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def resolve_mode(mode: str | None = None) -> str:
    """The W&B mode a tracker will use: "online", "offline" or "disabled".

    Explicit `mode`, else $WANDB_MODE (WANDB_DISABLED=true means disabled), else "online" if
    an API key is available and we are not on CI, else "offline". wandb's legacy names
    "dryrun" and "run" map to offline and online.
    """
    aliases = {"dryrun": "offline", "run": "online"}
    if mode is None:
        env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if env_mode:
            mode = env_mode
        elif _truthy(os.environ.get("WANDB_DISABLED")):
            mode = "disabled"
        else:
            return "online" if has_api_key() and not in_ci() else "offline"
    resolved = aliases.get(mode.strip().lower(), mode.strip().lower())
    if resolved not in MODES:
        raise ValueError(f"unknown W&B mode {mode!r}; expected one of {MODES}")
    return resolved


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def wandb_env(run_dir: str | os.PathLike) -> dict[str, str]:
    """The W&B environment variables that keep every wandb file inside `run_dir/wandb`."""
    base = Path(run_dir).resolve()
    wandb_dir = base / WANDB_SUBDIR
    return {
        "WANDB_DIR": str(base),  # wandb itself appends "wandb/"
        "WANDB_CACHE_DIR": str(wandb_dir / ".cache"),
        "WANDB_DATA_DIR": str(wandb_dir / ".data"),
        "WANDB_CONFIG_DIR": str(wandb_dir / ".config"),
        "WANDB_ARTIFACT_DIR": str(wandb_dir / ".artifacts"),
    }


@contextlib.contextmanager
def scoped_env(variables: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def scalar(value: Any) -> Any:
    """A JSON-able Python scalar for numbers/strings (numpy scalars, 1-element tensors), else None."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else None
    if hasattr(value, "numel") and hasattr(value, "item"):  # torch tensor, torch not imported
        return value.item() if value.numel() == 1 else None
    return None


def _json_line(record: Mapping[str, Any]) -> str:
    # NaN/inf are written as null so the file stays valid JSON for every reader
    clean = {key: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for key, v in record.items()}
    return json.dumps(clean, sort_keys=False)


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
    return cleaned or "artifact"


# --------------------------------------------------------------------------------------
# tracker
# --------------------------------------------------------------------------------------
class Tracker:
    """Logs to a W&B run (if any) and to local files in `run_dir`; never raises.

    Create it with `init_tracker`. Every method catches wandb failures, warns once with
    TrackingWarning and from then on only writes the local files.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        run_dir: str | os.PathLike | None = None,
        mode: str = "disabled",
        project: str | None = None,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.run = run
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.mode = mode if run is not None else "disabled"
        self.project = project
        self.name = name
        self.config = dict(config or {})
        self.finished = False
        self.error: BaseException | None = None
        self._auto_step = 0
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    # -- state ------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """True while a W&B run is attached (online or offline)."""
        return self.run is not None and not self.finished

    @property
    def wandb_dir(self) -> Path | None:
        """The offline run folder (sync it with `wandb sync`), if there is one."""
        directory = getattr(getattr(self.run, "settings", None), "sync_dir", None)
        return Path(directory) if directory else None

    def __repr__(self) -> str:
        return (f"Tracker(mode={self.mode!r}, project={self.project!r}, name={self.name!r}, "
                f"run_dir={str(self.run_dir) if self.run_dir else None!r})")

    # -- plumbing ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _wandb_call(self, what: str) -> Iterator[bool]:
        """Run a wandb call inside run_dir's environment; turn any failure into a warning.

        Yields whether the call should happen (False when there is no run). On failure the
        run is dropped, so later calls are cheap no-ops instead of repeated warnings.
        """
        if not self.enabled:
            yield False
            return
        env = wandb_env(self.run_dir) if self.run_dir is not None else {}
        try:
            with scoped_env(env):
                yield True
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            self.error = error
            warnings.warn(
                f"W&B {what} failed ({type(error).__name__}: {error}); W&B logging is off for "
                f"the rest of this run, local files in {self.run_dir} are still written",
                TrackingWarning, stacklevel=4,
            )
            self.run = None
            self.mode = "disabled"

    def _write_local(self, filename: str, line: str) -> None:
        if self.run_dir is None:
            return
        try:
            with open(self.run_dir / filename, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        except OSError as error:
            warnings.warn(f"could not write {self.run_dir / filename}: {error}", TrackingWarning,
                          stacklevel=3)

    # -- logging ----------------------------------------------------------------------
    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log a dict of metrics (numbers; matplotlib Figures become images in W&B).

        Scalars are appended as one JSON line to run_dir/metrics.jsonl with `_step` (the
        given step, else a counter) and `_time` (unix seconds).
        """
        record: dict[str, Any] = {"_step": step if step is not None else self._auto_step,
                                  "_time": round(time.time(), 3)}
        self._auto_step = (step if step is not None else self._auto_step) + 1
        for key, value in metrics.items():
            number = scalar(value)
            if number is not None:
                record[str(key)] = number
        self._write_local(METRICS_FILE, _json_line(record))
        with self._wandb_call("log") as active:
            if active:
                import wandb

                payload = {}
                for key, value in metrics.items():
                    if _is_figure(value):
                        payload[str(key)] = wandb.Image(value)
                    else:
                        number = scalar(value)
                        payload[str(key)] = number if number is not None else value
                self.run.log(payload, step=step)

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Set run summary values (final/best numbers); also merged into run_dir/summary.json."""
        clean = to_jsonable(dict(values))
        if self.run_dir is not None:
            path = self.run_dir / SUMMARY_FILE
            try:
                summary = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
                summary.update(clean)
                atomic_write_text(path, json.dumps(summary, indent=2, default=str))
            except (OSError, ValueError) as error:
                warnings.warn(f"could not write {path}: {error}", TrackingWarning, stacklevel=2)
        with self._wandb_call("summary") as active:
            if active:
                self.run.summary.update(clean)

    def log_confusion(
        self, y_true: Any, y_pred: Any, class_names: Sequence[str], name: str = "confusion_matrix"
    ) -> None:
        """Log an interactive confusion matrix (wandb.plot.confusion_matrix)."""
        true = [int(v) for v in _to_list(y_true)]
        pred = [int(v) for v in _to_list(y_pred)]
        with self._wandb_call("confusion matrix") as active:
            if active:
                import wandb

                chart = wandb.plot.confusion_matrix(
                    y_true=true, preds=pred, class_names=list(class_names))
                self.run.log({name: chart})

    def log_per_class(self, per_class_df: Any, name: str = "per_class") -> None:
        """Log the per-class precision/recall/F1 table (also saved as run_dir/<name>.csv).

        The file name is `safe_filename(name)`: a name like "../x" stays inside run_dir.
        """
        table = per_class_df.reset_index()
        if self.run_dir is not None:
            path = self.run_dir / f"{safe_filename(name)}.csv"
            try:
                atomic_write_text(path, table.to_csv(index=False))
            except OSError as error:
                warnings.warn(f"could not write {path}: {error}", TrackingWarning, stacklevel=2)
        with self._wandb_call("table") as active:
            if active:
                import wandb

                self.run.log({name: wandb.Table(dataframe=table)})

    def log_figure(self, name: str, fig: Any, *, save_local: bool = True) -> None:
        """Log a matplotlib figure as an image (and save run_dir/figures/<safe name>.png)."""
        if save_local and self.run_dir is not None:
            try:
                with atomic_path(self.run_dir / "figures" / f"{safe_filename(name)}.png") as tmp:
                    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
            except Exception as error:  # noqa: BLE001 - a figure must not stop training
                warnings.warn(f"could not save figure {name!r}: {error}", TrackingWarning,
                              stacklevel=2)
        with self._wandb_call("figure") as active:
            if active:
                import wandb

                self.run.log({name: wandb.Image(fig)})

    def log_artifact(
        self,
        path: str | os.PathLike,
        name: str,
        type: str = "model",  # noqa: A002 - same keyword as wandb.Artifact
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Log a file or folder (e.g. a checkpoint) as a W&B artifact."""
        with self._wandb_call("artifact") as active:
            if active:
                import wandb

                source = Path(path)
                artifact = wandb.Artifact(_artifact_name(name), type=type,
                                          metadata=to_jsonable(dict(metadata or {})))
                if source.is_dir():
                    artifact.add_dir(str(source))
                else:
                    artifact.add_file(str(source))
                self.run.log_artifact(artifact)

    def finish(self, exit_code: int | None = None) -> None:
        """Close the W&B run (idempotent). Offline runs can then be synced with `wandb sync`."""
        if self.finished:
            return
        with self._wandb_call("finish") as active:
            if active:
                self.run.finish(exit_code=exit_code)
        self.finished = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


def _is_figure(value: Any) -> bool:
    return type(value).__name__ in ("Figure", "SubFigure") and hasattr(value, "savefig")


def _to_list(values: Any) -> list:
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    if hasattr(values, "tolist"):
        return list(values.tolist())
    return list(values)


# --------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------
def init_tracker(
    project: str,
    config: Mapping[str, Any] | None,
    *,
    mode: str | None = None,
    run_dir: str | os.PathLike | None,
    name: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: Sequence[str] | None = None,
) -> Tracker:
    """Start a W&B run (see the module docstring for the mode rules) and return a Tracker.

    `run_dir` holds metrics.jsonl, summary.json, config.json and the wandb files (None: no
    local files and wandb's own default folders; avoid it). Never raises for wandb problems:
    a failed import or init warns (TrackingWarning) and returns a Tracker that only writes
    the local files. "online" without an API key would make wandb prompt for a login (and
    hang a notebook run by papermill), so it falls back to offline with a warning.
    """
    resolved = resolve_mode(mode)
    directory = Path(run_dir) if run_dir is not None else None
    clean_config = to_jsonable(dict(config or {}))
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / CONFIG_FILE, clean_config)
    local_only = Tracker(None, run_dir=directory, project=project, name=name, config=clean_config)
    if resolved == "disabled":
        return local_only
    if resolved == "online" and not has_api_key():
        warnings.warn("W&B mode 'online' but no API key (WANDB_API_KEY or netrc); logging "
                      "offline instead (upload later with `wandb sync`)", TrackingWarning,
                      stacklevel=2)
        resolved = "offline"
    env = wandb_env(directory) if directory is not None else {}
    try:
        with scoped_env(env):
            if directory is not None:
                for folder in env.values():
                    Path(folder).mkdir(parents=True, exist_ok=True)
            import wandb

            settings = wandb.Settings(console="off", silent=True, init_timeout=INIT_TIMEOUT_S,
                                      save_code=False)
            run = wandb.init(
                project=project, config=clean_config, mode=resolved,
                dir=str(directory) if directory is not None else None, name=name, group=group,
                job_type=job_type, tags=list(tags) if tags else None, reinit="create_new",
                settings=settings,
            )
    except Exception as error:  # noqa: BLE001 - tracking must never stop training
        warnings.warn(f"W&B init failed ({type(error).__name__}: {error}); continuing without "
                      f"W&B, metrics still go to {directory}", TrackingWarning, stacklevel=2)
        local_only.error = error
        return local_only
    if run is None:
        return local_only
    return Tracker(run, run_dir=directory, mode=resolved, project=project, name=name,
                   config=clean_config)


def load_metrics(run_dir: str | os.PathLike):
    """run_dir/metrics.jsonl as a DataFrame (one row per log() call)."""
    import pandas as pd

    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return pd.DataFrame()
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return pd.DataFrame(records)
