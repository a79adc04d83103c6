"""One experiment = build a registry model, fit it, evaluate it once, record everything.

The notebooks 02-08 all follow the same protocol (train on Training, select the epoch on
PublicTest, report PrivateTest once), so the sequence lives here rather than in each notebook:
`run_experiment` returns the trained model, the history and the metrics, writes the run
folder's `results.json`, and mirrors everything to Weights & Biases through
`fer_lib.tracking` (offline by default). `sweep_objective` turns the reports' W&B sweep
parameter names into a training function for `fer_lib.sweeps.run_sweep`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import nn

from fer_lib.data import FER2013, stratified_subsample
from fer_lib.evaluation import classification_metrics, ensemble_probs
from fer_lib.fileio import safe_filename
from fer_lib.models import create_model
from fer_lib.results import REPORT_PER_CLASS_F1, write_results
from fer_lib.sweeps import REPORT_SWEEPS, SweepResult, run_sweep
from fer_lib.tracking import init_tracker
from fer_lib.training import FitResult, TrainConfig, evaluate, fit

# The reports' sweep parameter names -> where they go: TrainConfig fields or model kwargs.
CONFIG_KEYS = {
    "learning_rate": "lr",
    "lr": "lr",
    "batch_size": "batch_size",
    "weight_decay": "weight_decay",
    "label_smoothing": "label_smoothing",
    "epochs": "epochs",
    "patience": "early_stopping_patience",
    "optimizer": "optimizer",
}
MODEL_KEYS = ("dropout_rate", "hidden_dim")


@dataclass
class ExperimentResult:
    """What a notebook needs after a run: model, history, metrics and where files went."""

    name: str
    model_name: str
    model: nn.Module
    fit: FitResult
    val: dict[str, Any]  # classification_metrics on PublicTest (+ loss)
    test: dict[str, Any]  # classification_metrics on PrivateTest (+ loss), evaluated once
    test_preds: Any  # predicted class per PrivateTest image
    results: dict[str, Any]  # what results.json holds
    run_dir: Path
    val_logits: Any = None  # (N, C) CPU tensors of the final evaluation (with its TTA), kept
    test_logits: Any = None  # so ensembles need no second pass over the splits


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a flat parameter dict (a sweep trial's) into TrainConfig fields and model kwargs."""
    config_updates, model_kwargs = {}, {}
    for key, value in params.items():
        if key in CONFIG_KEYS:
            config_updates[CONFIG_KEYS[key]] = value
        elif key in MODEL_KEYS:
            model_kwargs[key] = value
        else:
            raise KeyError(f"sweep parameter {key!r} is neither a TrainConfig field "
                           f"({sorted(CONFIG_KEYS)}) nor a model kwarg ({list(MODEL_KEYS)})")
    return config_updates, model_kwargs


def run_experiment(name: str, data: FER2013, model_name: str, config: TrainConfig, *,
                   run_dir: str | Path, model_kwargs: dict[str, Any] | None = None,
                   wandb_mode: str | None = None, project: str = "fer2013",
                   tta: str | None = None, extra: dict[str, Any] | None = None,
                   resume: bool = False,
                   on_epoch_end: Callable[[dict[str, float], nn.Module], None] | None = None,
                   prepare: str | None = None, soft_targets: Any = None) -> ExperimentResult:
    """Train `model_name` on data.train, select on data.val, evaluate data.test once.

    tta: test-time augmentation for the final val/test evaluation (default: config.tta).
    extra: more key/values stored in results.json (e.g. the sweep's best parameters).
    resume: continue from run_dir/last.pt when it exists (a run longer than one sitting; the
    engine resumes exactly), else start fresh.
    on_epoch_end: handed to `fit` (called with each epoch's row and model).
    prepare: a model preparation of fer_lib.models.fernet.PREPARATIONS (e.g. "whiten_stem"),
    applied to the new model with the training images before training.
    soft_targets: distillation targets for data.train (fer_lib.distill), handed to `fit`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_kwargs = dict(model_kwargs or {})
    tta = tta or config.tta
    # fit seeds the data order and augmentation; the initial weights are drawn here, so seed
    # them too, or a run would depend on what the process drew before (a notebook's earlier
    # cells, the previous seed of `reproduce`).
    torch.manual_seed(config.seed)
    model = create_model(model_name, num_classes=len(data.class_names), **model_kwargs)
    if prepare:
        from fer_lib.models.fernet import prepare_model

        prepare_model(prepare, model, data.train.images)
    tracker = init_tracker(project, {**config.to_dict(), "model": model_name, **model_kwargs,
                                     **({"prepare": prepare} if prepare else {})},
                           mode=wandb_mode, run_dir=run_dir, name=name, job_type="train")
    start = time.perf_counter()
    try:
        resuming = resume and (run_dir / "last.pt").exists()
        if resuming:
            print(f"resuming from {run_dir.name}/last.pt", flush=True)
        fitted = fit(model, data.train, data.val, config, tracker=tracker, run_dir=run_dir,
                     class_names=data.class_names, resume=bool(resuming), on_epoch_end=on_epoch_end,
                     soft_targets=soft_targets)
        precision = config.final_eval_precision
        val_eval = evaluate(fitted.model, data.val, batch_size=config.eval_batch_size, tta=tta, precision=precision)
        # PrivateTest is looked at once, after the epoch was chosen on PublicTest.
        test_eval = evaluate(fitted.model, data.test, batch_size=config.eval_batch_size, tta=tta,
                             precision=precision)
        # A resumed run's seconds include the earlier calls' training (saved in last.pt).
        seconds = time.perf_counter() - start + fitted.resumed_seconds
        val = classification_metrics(val_eval["labels"], val_eval["preds"], data.class_names)
        test = classification_metrics(test_eval["labels"], test_eval["preds"], data.class_names)
        val["loss"], test["loss"] = float(val_eval["loss"]), float(test_eval["loss"])
        results = {
            "name": name,
            "model": model_name,
            "model_kwargs": model_kwargs,
            "params": sum(p.numel() for p in fitted.model.parameters()),
            "config": config.to_dict(),
            "epochs_run": len(fitted.history),
            "best_epoch": fitted.best_epoch,
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "test_accuracy": test["accuracy"],
            "test_macro_f1": test["macro_f1"],
            "test_per_class_f1": dict(zip(data.class_names, test["per_class"]["f1"].tolist())),
            "tta": tta,
            "seconds": round(seconds, 1),
            "train_size": len(data.train),
            "device": str(fitted.setup.device) if fitted.setup else None,
            "history": fitted.history,
            **(extra or {}),
        }
        tracker.log_summary({k: results[k] for k in ("val_accuracy", "val_macro_f1",
                                                     "test_accuracy", "test_macro_f1", "seconds")})
        tracker.log_per_class(test["per_class"])
        tracker.log_confusion(test_eval["labels"].numpy(), test_eval["preds"].numpy(),
                              list(data.class_names))
    finally:
        tracker.finish()
    write_results(run_dir, results)
    return ExperimentResult(name, model_name, fitted.model, fitted, val, test,
                            test_eval["preds"], results, run_dir,
                            val_logits=val_eval["logits"], test_logits=test_eval["logits"])


def ensemble_metrics(members: Sequence[ExperimentResult], data: FER2013) -> dict[str, dict[str, Any]]:
    """Softmax-average ensemble of finished runs: classification_metrics per split ("val", "test").

    Uses each member's logits from its own final evaluation (same TTA), so no model runs
    again. Every member counts equally: nothing is chosen on PrivateTest.
    """
    if not members:
        raise ValueError("ensemble_metrics needs at least one member")
    metrics = {}
    for split in ("val", "test"):
        logits = [getattr(member, f"{split}_logits") for member in members]
        if any(member_logits is None for member_logits in logits):
            raise ValueError(f"a member has no {split} logits (not made by run_experiment)")
        preds = ensemble_probs(logits).argmax(dim=1).numpy()
        metrics[split] = classification_metrics(getattr(data, split).labels, preds, data.class_names)
    return metrics


def sweep_objective(data: FER2013, model_name: str, base_config: TrainConfig, *,
                    model_kwargs: dict[str, Any] | None = None,
                    epochs: int | None = None, train_fraction: float = 1.0,
                    metric: str = "best_val_accuracy") -> Callable[[dict, Any], dict]:
    """A `train_fn(params, tracker)` for fer_lib.sweeps.run_sweep.

    Each trial trains on data.train and scores on data.val (PublicTest): the sweep never sees
    PrivateTest. `epochs` caps the trial length (a sweep's `epochs` value is used otherwise).
    train_fraction < 1: trials train on a seeded stratified subsample of Training (cheap
    sweeps on a CPU); the final run of a notebook still uses all of it.
    """
    train = data.train
    if train_fraction < 1.0:
        train = train.subset(stratified_subsample(train.labels, train_fraction,
                                                  seed=base_config.seed))

    def train_fn(params: dict[str, Any], tracker: Any = None) -> dict[str, Any]:
        config_updates, trial_kwargs = split_params(params)
        if epochs is not None:
            config_updates["epochs"] = epochs
        config = replace(base_config, **config_updates, checkpoint_every_epoch=False)
        torch.manual_seed(config.seed)  # initial weights independent of earlier trials
        model = create_model(model_name, num_classes=len(data.class_names),
                             **{**(model_kwargs or {}), **trial_kwargs})
        fitted = fit(model, train, data.val, config, tracker=tracker)
        return {metric: fitted.best_val_accuracy, "best_epoch": fitted.best_epoch,
                "epochs_run": len(fitted.history),
                "images": sum(row.get("images", 0) for row in fitted.history),
                "seconds": round(fitted.wall_seconds, 1)}

    return train_fn


# Notebook parameter names -> the reports' sweep parameter names.
_SWEEP_NAMES = {"lr": "learning_rate", "batch_size": "batch_size", "weight_decay": "weight_decay",
                "dropout_rate": "dropout_rate", "label_smoothing": "label_smoothing",
                "hidden_dim": "hidden_dim"}


@dataclass
class ReportExperiment:
    """One of report-003's sweep experiments, as notebooks 04-07 run it.

    The protocol: the report's sweep config (fer_lib.sweeps.REPORT_SWEEPS) with the report's
    best run as the first trial, then a final run with the best trial's parameters on all of
    Training, selected on PublicTest and reported once on PrivateTest. `sweep_count=0` skips
    the sweep and trains the report's best run directly (the CPU and report profiles do).

    name: the notebook (its run folder and results); model: a registry name; sweep: a key of
    REPORT_SWEEPS; report_sweep_epochs: epochs per trial in the report. The hyperparameters
    (lr, batch_size, weight_decay, dropout_rate, label_smoothing, hidden_dim; None = not used)
    are the report's best run: the final run's values and the sweep's first trial. The
    training setup is the reports': Adam, ReduceLROnPlateau on the validation loss (x0.5
    after `plateau_patience` epochs), early stopping after `patience` epochs without a better
    PublicTest accuracy. optimizer: "adam" (torch's Adam, weight decay added to the gradient:
    the reports' literal reading) or "adamw" (decoupled weight decay; 07 needs it to learn as
    its report's log does, docs/experiments.md). `epochs` bounds every training here: sweep_epochs=None means
    min(report_sweep_epochs, epochs), so `-p epochs 1` really means one epoch everywhere.

    sweep_storage / sweep_study: None runs the sweep in memory. A database URL or journal
    file (fer_lib.study) makes it a shared Optuna study (named sweep_study, default `name`):
    every notebook run or `python -m fer_lib sweep` worker with the same storage and study
    adds trials until the study has sweep_count finished ones, and the final run trains the
    best trial of the whole study.
    """

    name: str
    model: str
    sweep: str
    report_sweep_epochs: int
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    augment: Any
    dropout_rate: float | None = None
    label_smoothing: float | None = None
    hidden_dim: int | None = None
    patience: int | None = None
    plateau_patience: int = 3
    optimizer: str = "adam"
    sweep_count: int = 3
    sweep_epochs: int | None = None
    sweep_fraction: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    max_steps_per_epoch: int | None = None
    sweep_storage: Any = None
    sweep_study: str | None = None

    def __post_init__(self) -> None:
        if self.sweep not in REPORT_SWEEPS:
            raise ValueError(f"unknown report sweep {self.sweep!r}; known: {sorted(REPORT_SWEEPS)}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.sweep_count < 0:
            raise ValueError(f"sweep_count must be >= 0, got {self.sweep_count}")
        searched = set(REPORT_SWEEPS[self.sweep]["parameters"])
        missing = searched - set(self.report_best)
        if missing:
            raise ValueError(f"sweep {self.sweep!r} searches {sorted(missing)}: give the report's "
                             "value for each (it is the sweep's first trial)")

    @property
    def report_best(self) -> dict[str, Any]:
        """The report's best run in the sweep's parameter names (the first trial)."""
        return {sweep_name: getattr(self, field_name) for field_name, sweep_name in _SWEEP_NAMES.items()
                if getattr(self, field_name) is not None}

    @property
    def base(self) -> TrainConfig:
        """The final run's TrainConfig (before the sweep's best parameters are applied)."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, label_smoothing=self.label_smoothing or 0.0,
                           augment=self.augment, optimizer=self.optimizer, scheduler="plateau",
                           plateau_patience=self.plateau_patience, plateau_factor=0.5,
                           early_stopping_patience=self.patience, seed=self.seed, device=self.device,
                           precision=self.precision, max_steps_per_epoch=self.max_steps_per_epoch)

    @property
    def sweep_config(self) -> dict[str, Any]:
        return REPORT_SWEEPS[self.sweep]

    @property
    def trial_epochs(self) -> int:
        if self.sweep_epochs is not None:
            return int(self.sweep_epochs)
        return min(self.report_sweep_epochs, self.epochs)

    def planned_epochs(self) -> float:
        """Training work in epochs over all of Training (sweep trials at their fraction + final)."""
        return self.sweep_count * self.trial_epochs * self.sweep_fraction + self.epochs

    def describe(self) -> str:
        lines = [f"{self.name}: model {self.model}, final run {self.epochs} epochs"]
        if self.sweep_count:
            lines.append(f"sweep '{self.sweep}' ({self.sweep_config['method']}): {self.sweep_count} "
                         f"trials x {self.trial_epochs} epochs on {self.sweep_fraction:.0%} of "
                         "Training, trial 1 = the report's best run")
        else:
            lines.append("sweep skipped (sweep_count=0): the final run trains the report's best run")
        if self.sweep_count and self.sweep_storage is not None:
            from fer_lib.study import redact

            lines.append(f"shared study '{self.sweep_study or self.name}' in "
                         f"{redact(self.sweep_storage)}: {self.sweep_count} trials in total, "
                         "from every run that joins it")
        if self.optimizer != "adam":
            lines.append(f"optimizer {self.optimizer} (decoupled weight decay) instead of the report's Adam")
        if self.epochs < self.report_sweep_epochs:
            lines.append(f"note: {self.epochs} epochs is fewer than the report's "
                         f"{self.report_sweep_epochs}; expect a lower number than the report's")
        return "\n".join(lines)

    def estimate(self, data: FER2013) -> dict[str, Any]:
        """Print device, precision and this notebook's expected training time (a few measured steps)."""
        from fer_lib.bench import training_estimate

        torch.manual_seed(self.seed)
        model = create_model(self.model, num_classes=len(data.class_names),
                             **split_params(self.report_best)[1])
        print(self.describe(), flush=True)
        return training_estimate(model, data.train, self.base, epochs=self.planned_epochs())

    def sweep_trials(self, data: FER2013, *, run_dir: str | Path, wandb_mode: str | None = None,
                     project: str | None = None) -> SweepResult:
        """The sweep alone, trials in run_dir (run()'s first step; `python -m fer_lib sweep`
        workers run only this). With sweep_storage the result is the whole shared study's."""
        objective = sweep_objective(data, self.model, self.base, epochs=self.trial_epochs,
                                    train_fraction=self.sweep_fraction)
        shared = self.sweep_storage is not None
        return run_sweep(self.sweep_config, objective, initial_params=self.report_best,
                         count=self.sweep_count, project=project or self.project, mode=wandb_mode,
                         run_dir=run_dir, seed=self.seed, storage=self.sweep_storage,
                         study_name=self.sweep_study or (self.name if shared else None))

    @property
    def project(self) -> str:
        """The W&B project of this notebook's runs: fer2013-04 for 04_cnn_augmentation_sweep."""
        return f"fer2013-{self.name.split('_', 1)[0]}"

    def run(self, data: FER2013, *, run_dir: str | Path, wandb_mode: str | None = None,
            project: str | None = None, resume: bool = False) -> tuple[SweepResult | None, ExperimentResult]:
        """Sweep (unless sweep_count is 0), then the final run. Returns (SweepResult or None, result)."""
        run_dir = Path(run_dir)
        project = project or self.project
        sweep = None
        params = dict(self.report_best)
        if self.sweep_count:
            sweep = self.sweep_trials(data, run_dir=run_dir / "sweep", wandb_mode=wandb_mode,
                                      project=project)
            params = dict(sweep.best_params)  # fer_lib.sweeps.show_sweep reports it
        config_updates, model_kwargs = split_params(params)
        config_updates.pop("epochs", None)  # the final run trains for base.epochs
        config = replace(self.base, **config_updates)
        result = run_experiment(self.name, data, self.model, config, run_dir=run_dir,
                                model_kwargs=model_kwargs, wandb_mode=wandb_mode,
                                extra={"final_params": params,
                                       "params_from": "sweep" if sweep else "report",
                                       "sweep_trials": self.sweep_count,
                                       "sweep_trial_epochs": self.trial_epochs if sweep else 0},
                                resume=resume)
        return sweep, result


def open_run(notebook: str, *, data_path: str | Path | None = None, data_fraction: float = 1.0,
             seed: int = 0, run_dir: str | Path | None = None,
             note: str | None = None) -> tuple[FER2013, Path]:
    """A notebook's first step: load FER2013 (three standard splits) and make its run folder.

    note: what a profile changed from the report to fit its budget, printed for the reader.
    """
    from fer_lib.data import load_fer2013
    from fer_lib.results import resolve_run_dir

    folder = resolve_run_dir(run_dir, notebook)
    data = load_fer2013(data_path, fraction=data_fraction, seed=seed)
    print(f"train {len(data.train):,}  val (PublicTest) {len(data.val):,}  "
          f"test (PrivateTest) {len(data.test):,}  from {data.source.name}")
    print(f"run folder: {folder}")
    if note:
        print(f"note: {note}")
    return data, folder


def fit_summary(result: ExperimentResult, class_names: Sequence[str]) -> dict[str, Any]:
    """What the text around a run may claim, computed from the run: the train/val gap at the
    chosen and the last epoch, and how often the model predicts its most frequent class."""
    import numpy as np

    history = result.fit.history
    best = history[max(0, (result.fit.best_epoch or len(history)) - 1)]
    last = history[-1]
    counts = np.bincount(np.asarray(result.test_preds), minlength=len(class_names))
    top = int(counts.argmax())
    return {
        "best_epoch": result.fit.best_epoch, "epochs_run": len(history),
        "train_accuracy_best": best.get("train_accuracy"), "val_accuracy_best": best.get("val_accuracy"),
        "train_accuracy_last": last.get("train_accuracy"), "val_accuracy_last": last.get("val_accuracy"),
        "top_class": class_names[top], "top_class_share": float(counts[top] / max(1, counts.sum())),
    }


def show_result(result: ExperimentResult, data: FER2013, *,
                others: dict[str, Sequence[dict[str, Any]]] | None = None,
                max_mistakes: int = 16) -> dict[str, Any]:
    """The plots a reader expects after a run, plus a computed summary line.

    Curves (train and val: the overfitting gap), the PrivateTest confusion matrix, per-class
    F1, and the most confidently wrong PrivateTest faces. others: label -> history of an
    earlier run to overlay on the validation curve (04 shows 03's).
    """
    from fer_lib.evaluation import plot_confusion_matrix, plot_history, plot_misclassified, plot_per_class_f1

    summary = fit_summary(result, data.class_names)
    gap = summary["train_accuracy_last"] - summary["val_accuracy_last"]
    print(f"this run: {summary['epochs_run']} epochs, best PublicTest epoch {summary['best_epoch']}; "
          f"last epoch train accuracy {summary['train_accuracy_last']:.1%} vs PublicTest "
          f"{summary['val_accuracy_last']:.1%} (gap {100 * gap:+.1f} points); "
          f"PrivateTest predictions: {summary['top_class_share']:.0%} {summary['top_class']}")
    if summary["top_class_share"] > 0.5:
        print(f"warning: the model calls more than half of PrivateTest {summary['top_class']}: "
              "it has collapsed towards one class")
    plot_history(result.fit.history, others=others)
    plot_confusion_matrix(result.test["confusion"], data.class_names, normalize=True,
                          title="PrivateTest, row-normalised")
    plot_per_class_f1(result.test["per_class"], reference=REPORT_PER_CLASS_F1.get(result.name),
                      reference_label="report (own hold-out)")
    probs = torch.softmax(result.test_logits.float(), dim=1) if result.test_logits is not None else None
    plot_misclassified(data.test.images, data.test.labels, result.test_preds, data.class_names,
                       max_images=max_mistakes, probs=probs)
    return summary


# One short recipe for every registry model, so the zoo is compared on equal terms.
ZOO_CONFIG = TrainConfig(epochs=5, batch_size=128, lr=2e-3, optimizer="adamw", weight_decay=5e-4,
                         scheduler="onecycle", label_smoothing=0.1, augment="fast",
                         checkpoint_every_epoch=False)


def zoo_comparison(data: FER2013, *, epochs: int, run_dir: str | Path, names: Sequence[str] | None = None,
                   seed: int = 0, device: str = "auto", precision: str = "auto",
                   max_steps_per_epoch: int | None = None,
                   wandb_mode: str | None = None) -> pd.DataFrame:
    """Train every registry model (or `names`) with ZOO_CONFIG for `epochs`, standard protocol.

    Returns name, val_accuracy %, test_accuracy %, macro_f1 %, seconds; each model's
    results.json goes to run_dir/<name>/.
    """
    from fer_lib.models import list_models

    config = replace(ZOO_CONFIG, epochs=epochs, seed=seed, device=device, precision=precision,
                     max_steps_per_epoch=max_steps_per_epoch)
    rows = []
    for name in names if names is not None else list_models():
        print(f"zoo: {name}", flush=True)
        result = run_experiment(f"zoo-{name}", data, name, config,
                                run_dir=Path(run_dir) / safe_filename(name),
                                wandb_mode=wandb_mode)
        rows.append({"name": name, "val_accuracy %": 100 * result.val["accuracy"],
                     "test_accuracy %": 100 * result.test["accuracy"],
                     "macro_f1 %": 100 * result.test["macro_f1"], "seconds": result.results["seconds"]})
    return pd.DataFrame(rows).round(2)
