"""Per-notebook results: written by each notebook, read by 08 and by the series summary.

Every notebook ends by calling `write_results(run_dir, {...})`, which stores a small
`results.json` in its run folder. Numbers shown side by side later (08's table, the README's
results section, `runs/<profile>/summary.md`) are read back from those files, never typed in.

`REPORT_CLAIMS` holds what each experiment report claimed, with the protocol it used, so a
notebook can put its measured number beside the claim with the caveat attached.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fer_lib.fileio import atomic_write_json, checkout_root, safe_filename, to_jsonable

RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class Claim:
    """A result as an experiment report states it."""

    experiment: str
    report: str
    accuracy: float | None  # percent, None where the report gives no number
    metric: str  # what the number is measured on, in the report's own protocol


# The reports split Training themselves (report-003: 72/18/10 in experiments 1-3; the logged
# steps per epoch of experiments 4-6 fit an 80/20 split) or used other ad-hoc splits, so their
# numbers are claims to compare against, not results under the standard protocol.
REPORT_CLAIMS: dict[str, Claim] = {
    "02_mlp_baseline": Claim("1: MLP 2304-64-7", "report-003", 30.30,
                             "test accuracy on a 10% hold-out of Training"),
    "03_cnn": Claim("2: CNN + BN + dropout", "report-003", 54.37,
                    "test accuracy on a 10% hold-out of Training"),
    "04_cnn_augmentation_sweep": Claim("3: CNN + flip/rotate + sweep", "report-003", 60.61,
                                       "test accuracy on a 10% hold-out of Training"),
    "05_resnet": Claim("4: ResNet 64-512 + bayes sweep", "report-003", 58.38,
                       "best validation accuracy (~20% of Training)"),
    "06_resnet_regularized": Claim("5: ResNet, stronger regularisation", "report-003", 57.65,
                                   "best validation accuracy (~20% of Training)"),
    "07_resnet_small": Claim("6: small ResNet", "report-003", 58.85,
                             "best validation accuracy (~20% of Training)"),
    "08_final_model": Claim("8: back to the best CNN, improved", "report-003", None,
                            "the report ends before a result; its best was 60.6% (exp. 3)"),
}


# Per-class F1 where a report printed a classification report (report-003, experiments 1-3,
# on its own 10% hold-out of Training), in the class order of FER2013.
REPORT_PER_CLASS_F1: dict[str, dict[str, float]] = {
    "02_mlp_baseline": {"Angry": 0.08, "Disgust": 0.00, "Fear": 0.13, "Happy": 0.49, "Sad": 0.15,
                        "Surprise": 0.41, "Neutral": 0.31},
    "03_cnn": {"Angry": 0.43, "Disgust": 0.00, "Fear": 0.35, "Happy": 0.76, "Sad": 0.47,
               "Surprise": 0.67, "Neutral": 0.49},
    "04_cnn_augmentation_sweep": {"Angry": 0.51, "Disgust": 0.44, "Fear": 0.42, "Happy": 0.81,
                                  "Sad": 0.52, "Surprise": 0.71, "Neutral": 0.56},
}


def runs_folder() -> Path:
    """Where run folders go by default: `runs/` in the checkout, else `./runs/` under the
    working directory (never next to an installed package, where nobody would find them)."""
    root = checkout_root()
    return (root if root is not None else Path.cwd()) / "runs"


def resolve_run_dir(run_dir: str | os.PathLike | None, notebook: str) -> Path:
    """A notebook's run folder: the given one, else `runs/manual/<safe_filename(notebook)>/`.

    In a checkout it is resolved from the package location rather than the working directory,
    so a notebook writes to the same place whether papermill starts it from the repo root or
    notebooks/.
    """
    path = Path(run_dir) if run_dir is not None else runs_folder() / "manual" / safe_filename(notebook)
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def write_results(run_dir: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Write `results` as JSON into `run_dir/results.json`, atomically.

    Values must be JSON-serialisable (numbers, strings, lists, dicts); NaN becomes null so the
    file stays valid JSON for every reader.
    """
    return atomic_write_json(Path(run_dir) / RESULTS_FILE, results, sort_keys=True)


def read_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a notebook's `results.json`; a missing or broken file is a clear error."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no results yet (run the notebook first)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def collect_results(runs_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per notebook run folder under `runs_dir` that holds a results.json.

    Columns: notebook, model, val_accuracy, test_accuracy, macro_f1, seconds, plus the report's
    claim (claim_accuracy, claim_metric) where one exists.
    """
    rows = []
    for path in sorted(Path(runs_dir).glob(f"*/{RESULTS_FILE}")):
        notebook = path.parent.name
        res = read_results(path.parent)
        claim = REPORT_CLAIMS.get(notebook)
        rows.append({
            "notebook": notebook,
            "model": res.get("model"),
            "val_accuracy": res.get("val_accuracy"),
            "test_accuracy": res.get("test_accuracy"),
            "macro_f1": res.get("test_macro_f1"),
            "seconds": res.get("seconds"),
            "profile": res.get("profile"),
            "claim_accuracy": claim.accuracy if claim else None,
            "claim_metric": claim.metric if claim else None,
        })
    return pd.DataFrame(rows, columns=["notebook", "model", "val_accuracy", "test_accuracy",
                                       "macro_f1", "seconds", "profile", "claim_accuracy",
                                       "claim_metric"])


RESULTS_MIMETYPE = "application/vnd.fer-lib.results+json"


SERIES_COLUMNS = ["notebook", "model", "val_accuracy", "test_accuracy", "macro_f1", "claim_accuracy",
                  "claim_metric"]


def series_table(runs_dir: str | os.PathLike) -> pd.DataFrame:
    """`collect_results` with accuracies and macro-F1 in percent, like the reports' claims:
    the table the series summary (summary.md) and notebook 08 show."""
    table = collect_results(runs_dir)
    for col in ("val_accuracy", "test_accuracy", "macro_f1"):
        table[col] = table[col].astype(float) * 100.0
    return table


class ResultRow:
    """Our measured numbers beside the report's claim, as a notebook's results cell shows them.

    People see a one-row table; the executed notebook also stores the same numbers under
    RESULTS_MIMETYPE (frontends ignore the type and show the table), so a published series
    summary can be checked against the notebooks that produced it.
    """

    def __init__(self, notebook: str, results: dict[str, Any]) -> None:
        claim = REPORT_CLAIMS.get(notebook)
        self.record = {
            "notebook": notebook,
            "model": results.get("model"),
            "epochs": results.get("epochs_run"),
            "val_accuracy": _pct(results.get("val_accuracy")),
            "test_accuracy": _pct(results.get("test_accuracy")),
            "macro_f1": _pct(results.get("test_macro_f1")),
            "claim_accuracy": claim.accuracy if claim else None,
            "claim_metric": claim.metric if claim else "",
        }
        self.frame = pd.DataFrame([{
            "experiment": claim.experiment if claim else notebook,
            "ours: PublicTest (val) %": self.record["val_accuracy"],
            "ours: PrivateTest (test) %": self.record["test_accuracy"],
            "ours: macro-F1 %": self.record["macro_f1"],
            "report claim %": self.record["claim_accuracy"],
            "report's protocol": self.record["claim_metric"],
        }]).round(2)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {"text/plain": repr(self), "text/html": self.frame.to_html(index=False),
                RESULTS_MIMETYPE: to_jsonable(self.record)}

    def __repr__(self) -> str:
        return self.frame.to_string(index=False)


def claim_row(notebook: str, results: dict[str, Any]) -> ResultRow:
    """Our measured numbers beside the report's claim (a notebook's results cell shows it)."""
    return ResultRow(notebook, results)


def plot_results(df: pd.DataFrame):
    """Bar chart: our PrivateTest accuracy per notebook beside the report's claim."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(df))
    ours = [_pct(v) if v is not None else np.nan for v in df["test_accuracy"]]
    claims = [c if c is not None else np.nan for c in df["claim_accuracy"]]
    ax.bar(x - 0.2, ours, width=0.4, label="ours: PrivateTest (standard protocol)")
    ax.bar(x + 0.2, claims, width=0.4, label="report's claim (own split)", alpha=0.6)
    ax.set_xticks(x, [n.split("_", 1)[0] + "\n" + n.split("_", 1)[-1][:14] for n in df["notebook"]],
                  fontsize=8)
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("FER2013: our runs beside the experiment reports")
    fig.tight_layout()
    return fig


def _pct(value: Any) -> float | None:
    """Accuracies are stored as fractions (0..1); tables show percent."""
    if value is None:
        return None
    return 100.0 * float(value)
