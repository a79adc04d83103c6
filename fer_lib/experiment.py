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

import torch
from torch import nn

from fer_lib.data import FER2013, stratified_subsample
from fer_lib.evaluation import classification_metrics, ensemble_probs
from fer_lib.models import create_model
from fer_lib.results import write_results
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
                   tta: str | None = None, extra: dict[str, Any] | None = None) -> ExperimentResult:
    """Train `model_name` on data.train, select on data.val, evaluate data.test once.

    tta: test-time augmentation for the final val/test evaluation (default: config.tta).
    extra: more key/values stored in results.json (e.g. the sweep's best parameters).
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
    tracker = init_tracker(project, {**config.to_dict(), "model": model_name, **model_kwargs},
                           mode=wandb_mode, run_dir=run_dir, name=name, job_type="train")
    start = time.perf_counter()
    try:
        fitted = fit(model, data.train, data.val, config, tracker=tracker, run_dir=run_dir,
                     class_names=data.class_names)
        val_eval = evaluate(fitted.model, data.val, batch_size=config.eval_batch_size, tta=tta)
        # PrivateTest is looked at once, after the epoch was chosen on PublicTest.
        test_eval = evaluate(fitted.model, data.test, batch_size=config.eval_batch_size, tta=tta)
        seconds = time.perf_counter() - start
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
                "seconds": round(fitted.wall_seconds, 1)}

    return train_fn
