"""Experiment 8 as a measured ladder: what each change to the experiment-3 CNN buys.

report-003's experiment 8 only says "go back to the experiment-3 CNN (the series' best, 61%)
and improve it as far as possible". Notebook 08 shows that as a ladder: each step changes
one thing, every trained step gets the same budget (same epochs, same data, same seed) and
the standard protocol (train on Training, keep the epoch with the best PublicTest accuracy,
evaluate PrivateTest once):

    1  reports' pipeline  exp3_cnn trained as report-003 did (PIL transforms per image in a
                          DataLoader, fp32, Adam, ReduceLROnPlateau)      fer_lib.bench
    2  this engine        the same model/optimizer/schedule/augmentation in fer_lib's engine
    3  + one-cycle ...    Nesterov SGD with a one-cycle schedule and label smoothing 0.1
    4  + flip TTA         step 3's model, evaluated with flip test-time augmentation
    5  + a model shaped   the fast_cpu recipe (fernet_small)             fer_lib.recipes
       for 48x48
    6  + ensemble         only when the caller passes ensemble metrics (ensemble_metrics)

    from fer_lib.ladder import run_ladder, plot_ladder
    ladder = run_ladder(data, epochs=5, run_dir=run_dir / "ladder", final=result)
    ladder.table; plot_ladder(ladder)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from fer_lib.recipes import get_recipe

__all__ = ["LadderStep", "LadderResult", "STEPS", "EXP3_MODEL_KWARGS", "EXP3_CONFIG", "ONECYCLE_CONFIG",
           "run_ladder", "plot_ladder"]

# report-003 experiment 3's best sweep run (notebook 04's defaults): hidden 64, dropout 0.2,
# Adam lr 1e-3, weight decay 1e-6, batch 128, flip + rotation 10, ReduceLROnPlateau on the
# PublicTest loss (x0.5 after 2 epochs without improvement, as notebook 04 schedules it).
EXP3_MODEL_KWARGS: dict[str, Any] = {"hidden_dim": 64, "dropout_rate": 0.2}
EXP3_CONFIG: dict[str, Any] = {"batch_size": 128, "lr": 1e-3, "optimizer": "adam", "weight_decay": 1e-6,
                               "scheduler": "plateau", "plateau_factor": 0.5, "plateau_patience": 2,
                               "plateau_metric": "val_loss", "augment": "exp3"}
# Step 3: the fast_cpu recipe's optimizer (Nesterov SGD, momentum 0.9, weight decay 5e-4,
# one-cycle with pct_start 0.25, label smoothing 0.1) on the same model and augmentation. Its
# peak lr 0.2 is for fernet_small (BN after every conv, global pooling, no dropout); exp3_cnn
# ends in an un-normalised 4608 -> 64 -> 7 head with dropout and needs a 10x lower peak: on
# 25% of Training for 3 epochs (PublicTest only) peaks 0.1 and 0.2 collapsed to the majority
# class (24.9%), 0.05 reached 34.7% and 0.02 42.7%.
ONECYCLE_CONFIG: dict[str, Any] = {"batch_size": 128, "lr": 0.02, "optimizer": "sgd", "momentum": 0.9,
                                   "nesterov": True, "weight_decay": 5e-4, "scheduler": "onecycle",
                                   "pct_start": 0.25, "label_smoothing": 0.1, "augment": "exp3"}

HOWS = ("seed_style", "engine", "reuse", "recipe", "ensemble")


@dataclass(frozen=True)
class LadderStep:
    """One rung: what it is called, what it changes and how it is trained.

    how: "seed_style" (fer_lib.bench.seed_style_train: the reports' PIL + DataLoader
    pipeline, fp32), "engine" (fer_lib.experiment.run_experiment), "reuse" (no training:
    the model of step `reuse` evaluated again with `tta`), "recipe" (fer_lib.recipes.
    train_recipe of `recipe`), "ensemble" (metrics passed in by the caller).
    overrides: TrainConfig fields of the step (the whole training setup, not a delta).
    """

    key: str
    label: str
    change: str
    model: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    tta: str = "none"
    how: str = "engine"
    reuse: str | None = None
    recipe: str | None = None

    def __post_init__(self) -> None:
        if self.how not in HOWS:
            raise ValueError(f"LadderStep.how must be one of {HOWS}, got {self.how!r}")
        if self.how == "reuse" and not self.reuse:
            raise ValueError(f"ladder step {self.key!r}: how='reuse' needs the key of the step it reuses")
        if self.how == "recipe" and not self.recipe:
            raise ValueError(f"ladder step {self.key!r}: how='recipe' needs a recipe name")


def _recipe_step() -> LadderStep:
    recipe = get_recipe("fast_cpu")
    config = recipe.config
    optimizer = (f"Muon for the convs (lr {config.muon_lr:g}) + SGD lr {config.lr:g}" if config.optimizer == "muon"
                 else f"SGD lr {config.lr:g}")
    return LadderStep(
        "fernet", "+ a model shaped for 48x48",
        f"recipe fast_cpu: {recipe.model} (3 stages, global pooling), "
        f"{'40x40 crops for the first half of the epochs, then ' if recipe.early_fraction else ''}flip + translate, "
        f"{optimizer}, one-cycle, flip TTA",
        recipe.model, {k: v for k, v in config.to_dict().items() if k not in ("epochs", "seed", "progress")},
        dict(recipe.model_kwargs), tta=config.tta, how="recipe", recipe=recipe.name)


STEPS: list[LadderStep] = [
    LadderStep("reports", "reports' pipeline",
               "report-003's way: PIL transforms per image in a DataLoader, fp32; Adam 1e-3, "
               "ReduceLROnPlateau, flip + rotation 10",
               "exp3_cnn", EXP3_CONFIG, EXP3_MODEL_KWARGS, how="seed_style"),
    LadderStep("engine", "this engine",
               "same model, optimizer, schedule, augmentation in fer_lib's engine: device-resident "
               "data, batched augmentation, precision auto",
               "exp3_cnn", EXP3_CONFIG, EXP3_MODEL_KWARGS, how="engine"),
    LadderStep("onecycle", "+ one-cycle Nesterov SGD + label smoothing 0.1",
               "Adam + plateau -> Nesterov SGD (momentum 0.9, wd 5e-4), one-cycle peak lr 0.02, "
               "label smoothing 0.1",
               "exp3_cnn", ONECYCLE_CONFIG, EXP3_MODEL_KWARGS, how="engine"),
    LadderStep("tta", "+ flip TTA",
               "step 3's model; logits averaged with the mirrored face (no new training)",
               "exp3_cnn", ONECYCLE_CONFIG, EXP3_MODEL_KWARGS, tta="flip", how="reuse", reuse="onecycle"),
    _recipe_step(),
    LadderStep("ensemble", "+ ensemble of seeds",
               "softmax average of the recipe trained with several seeds (every seed a member)",
               "fernet_small", how="ensemble"),
]
_BY_KEY = {step.key: step for step in STEPS}

COLUMNS = ["step", "change", "model", "params", "epochs", "val_accuracy %", "test_accuracy %", "macro_f1 %",
           "wall_seconds", "img_per_s"]


@dataclass
class LadderResult:
    """table: one row per step (COLUMNS); histories: per-epoch dicts per trained step key;
    runs: what each step produced (ExperimentResult, bench.SeedStyleRun, or None);
    info: per step device/precision and where its files went; machine: the hardware."""

    table: pd.DataFrame
    histories: dict[str, list[dict[str, float]]]
    steps: list[LadderStep]
    runs: dict[str, Any] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    machine: str = ""
    epochs: int = 0

    def to_markdown(self) -> str:
        from fer_lib.evaluation import to_markdown

        return to_markdown(self.table, floatfmt=".2f")


def _select(steps: Sequence[str | LadderStep] | None, with_ensemble: bool) -> list[LadderStep]:
    if steps is None:
        chosen = [s for s in STEPS if s.how != "ensemble" or with_ensemble]
    else:
        chosen = []
        for item in steps:
            if isinstance(item, LadderStep):
                chosen.append(item)
            elif item in _BY_KEY:
                chosen.append(_BY_KEY[item])
            else:
                raise ValueError(f"unknown ladder step {item!r}; steps: {', '.join(_BY_KEY)}")
    keys = [s.key for s in chosen]
    if len(set(keys)) != len(keys):
        raise ValueError(f"ladder steps repeat a key: {keys}")
    for i, step in enumerate(chosen):
        if step.how == "reuse" and step.reuse not in keys[:i]:
            raise ValueError(f"ladder step {step.key!r} re-evaluates step {step.reuse!r}, which must come before it")
        if step.how == "ensemble" and not with_ensemble:
            raise ValueError(f"ladder step {step.key!r} needs ensemble= (fer_lib.experiment.ensemble_metrics) "
                             "and ensemble_members=")
    return chosen


def _params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _mean_img_per_s(history: Sequence[Mapping[str, float]]) -> float:
    values = [h["img_per_s"] for h in history if "img_per_s" in h]
    return float(sum(values) / len(values)) if values else float("nan")


def _row(step: LadderStep, *, params: int, epochs: int, val: Mapping[str, Any], test: Mapping[str, Any],
         wall: float, img_per_s: float) -> dict[str, Any]:
    return {"step": step.label, "change": step.change, "model": step.model, "params": int(params),
            "epochs": int(epochs), "val_accuracy %": 100 * float(val["accuracy"]),
            "test_accuracy %": 100 * float(test["accuracy"]), "macro_f1 %": 100 * float(test["macro_f1"]),
            "wall_seconds": round(float(wall), 1), "img_per_s": round(float(img_per_s), 1)}


def _check_final(final, recipe_name: str, epochs: int) -> None:
    recipe = get_recipe(recipe_name)
    results = getattr(final, "results", None) or {}
    trained_epochs = (results.get("config") or {}).get("epochs")
    if getattr(final, "model_name", None) != recipe.model or trained_epochs != epochs:
        raise ValueError(f"final= must be a run of recipe {recipe_name!r} ({recipe.model}) for {epochs} epochs "
                         f"(the ladder's budget); got {getattr(final, 'model_name', None)!r} for "
                         f"{trained_epochs} epochs")
    if results.get("recipe") not in (None, recipe_name):
        raise ValueError(f"final= was trained with recipe {results.get('recipe')!r}, not {recipe_name!r}")


def run_ladder(data, *, epochs: int, seed: int = 0, device: str = "auto", precision: str = "auto",
               max_steps_per_epoch: int | None = None, run_dir: str | Path, wandb_mode: str | None = None,
               steps: Sequence[str | LadderStep] | None = None, final=None,
               ensemble: Mapping[str, Mapping[str, Any]] | None = None, ensemble_members: int | None = None,
               ensemble_seconds: float | None = None, workers: int = 2) -> LadderResult:
    """Train the ladder's steps on `data` (fer_lib.data.FER2013) with one budget; return LadderResult.

    epochs, seed, max_steps_per_epoch: the same for every trained step. device, precision:
    for the engine steps ("auto": resolve_device decides); the reports' pipeline always
    trains in fp32 on `device`, with `workers` DataLoader processes. run_dir/<key>/ holds
    each step's files (results.json; checkpoints and tracking for engine steps).
    steps: keys (or LadderStep objects) to run, in order (default: all of STEPS, the
    ensemble only when `ensemble` is given). final: an ExperimentResult of the fast_cpu
    recipe already trained for `epochs` epochs (e.g. the notebook's single model): step 5
    uses it instead of training again. ensemble: fer_lib.experiment.ensemble_metrics of
    `ensemble_members` recipe runs; its wall time is `ensemble_seconds`, default members x
    step 5's wall.
    """
    from fer_lib.bench import seed_style_train
    from fer_lib.device import machine_description, resolve_device
    from fer_lib.evaluation import classification_metrics
    from fer_lib.experiment import run_experiment
    from fer_lib.recipes import train_recipe
    from fer_lib.results import write_results
    from fer_lib.training import TrainConfig, evaluate

    if epochs < 1:
        raise ValueError(f"run_ladder needs epochs >= 1, got {epochs}")
    if (ensemble is None) != (ensemble_members is None):
        raise ValueError("pass ensemble= and ensemble_members= together")
    chosen = _select(steps, ensemble is not None)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, float]]] = {}
    runs: dict[str, Any] = {}
    info: dict[str, dict[str, Any]] = {}
    by_key: dict[str, dict[str, Any]] = {}  # row of each finished step

    for number, step in enumerate(chosen, start=1):
        step_dir = run_dir / step.key
        print(f"ladder {number}/{len(chosen)}: {step.label} ({step.model}, {epochs} epoch"
              f"{'s' if epochs != 1 else ''}) -> {step_dir}",
              flush=True)
        if step.how == "seed_style":
            overrides = dict(step.overrides)
            plateau = None
            if overrides.get("scheduler") == "plateau":
                plateau = (overrides.get("plateau_factor", 0.1), overrides.get("plateau_patience", 5))
            dev = resolve_device(device, "fp32", channels_last=False).device
            start = time.perf_counter()
            trained = seed_style_train(data, epochs=epochs, model=step.model, model_kwargs=dict(step.model_kwargs),
                                       batch_size=overrides.get("batch_size", 64), workers=workers,
                                       lr=overrides.get("lr", 1e-3), weight_decay=overrides.get("weight_decay", 0.0),
                                       plateau=plateau, max_steps_per_epoch=max_steps_per_epoch, seed=seed,
                                       device=dev, verbose=True)
            val_eval = evaluate(trained.model, data.val, tta=step.tta)
            test_eval = evaluate(trained.model, data.test, tta=step.tta)  # PrivateTest, once
            wall = time.perf_counter() - start
            val = classification_metrics(val_eval["labels"], val_eval["preds"], data.class_names)
            test = classification_metrics(test_eval["labels"], test_eval["preds"], data.class_names)
            row = _row(step, params=_params(trained.model), epochs=len(trained.history), val=val, test=test,
                       wall=wall, img_per_s=_mean_img_per_s(trained.history))
            histories[step.key], runs[step.key] = trained.history, trained
            info[step.key] = {"device": f"{dev} fp32, PIL + DataLoader workers={workers}", "run_dir": str(step_dir)}
            write_results(step_dir, {"name": f"ladder-{step.key}", "model": step.model,
                                     "model_kwargs": dict(step.model_kwargs), "pipeline": "seed_style",
                                     "config": {**overrides, "epochs": epochs, "seed": seed, "workers": workers,
                                                "max_steps_per_epoch": max_steps_per_epoch},
                                     "params": row["params"], "epochs_run": len(trained.history),
                                     "best_epoch": trained.best_epoch, "val_accuracy": val["accuracy"],
                                     "val_macro_f1": val["macro_f1"], "test_accuracy": test["accuracy"],
                                     "test_macro_f1": test["macro_f1"], "tta": step.tta,
                                     "seconds": round(wall, 1), "train_size": len(data.train),
                                     "device": str(dev), "history": trained.history})
        elif step.how in ("engine", "recipe"):
            if step.how == "recipe" and final is not None:
                _check_final(final, step.recipe, epochs)
                result = final
                print(f"  using the given final run {getattr(final, 'run_dir', '')} (not trained again)",
                      flush=True)
            elif step.how == "recipe":
                result = train_recipe(step.recipe, data, run_dir=step_dir, seed=seed, wandb_mode=wandb_mode,
                                      epochs=epochs, device=device, precision=precision,
                                      max_steps_per_epoch=max_steps_per_epoch)
            else:
                config = TrainConfig(**{**dict(step.overrides), "epochs": epochs, "seed": seed, "device": device,
                                        "precision": precision, "max_steps_per_epoch": max_steps_per_epoch,
                                        "tta": step.tta})
                result = run_experiment(f"ladder-{step.key}", data, step.model, config, run_dir=step_dir,
                                        model_kwargs=dict(step.model_kwargs), wandb_mode=wandb_mode,
                                        extra={"ladder_step": step.key})
            history = result.fit.history
            row = _row(step, params=result.results["params"], epochs=len(history), val=result.val,
                       test=result.test, wall=result.results["seconds"], img_per_s=_mean_img_per_s(history))
            histories[step.key], runs[step.key] = history, result
            setup = result.fit.setup
            info[step.key] = {"device": setup.describe() if setup is not None else result.results.get("device"),
                              "run_dir": str(result.run_dir)}
        elif step.how == "reuse":
            source = runs[step.reuse]
            model = source.model
            val_eval = evaluate(model, data.val, tta=step.tta)
            test_eval = evaluate(model, data.test, tta=step.tta)  # PrivateTest, once with this TTA
            val = classification_metrics(val_eval["labels"], val_eval["preds"], data.class_names)
            test = classification_metrics(test_eval["labels"], test_eval["preds"], data.class_names)
            base = by_key[step.reuse]
            # no training: the wall time and throughput are those of the model's own step
            row = _row(step, params=base["params"], epochs=base["epochs"], val=val, test=test,
                       wall=base["wall_seconds"], img_per_s=base["img_per_s"])
            histories[step.key], runs[step.key] = histories[step.reuse], None
            info[step.key] = {**info[step.reuse], "reuses": step.reuse, "run_dir": str(step_dir)}
            write_results(step_dir, {"name": f"ladder-{step.key}", "model": step.model, "reuses": step.reuse,
                                     "tta": step.tta, "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
                                     "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
                                     "seconds": base["wall_seconds"], "params": base["params"]})
        else:  # ensemble: metrics computed by the caller from runs it already has
            members = int(ensemble_members)
            recipe_row = by_key.get("fernet")
            if ensemble_seconds is not None:
                wall = float(ensemble_seconds)
            elif recipe_row is not None:
                wall = members * recipe_row["wall_seconds"]
            else:
                wall = float("nan")
            if recipe_row is not None:
                params = members * recipe_row["params"]
            else:
                from fer_lib.models import create_model

                params = members * _params(create_model(step.model, num_classes=len(data.class_names)))
            step = replace(step, change=f"softmax average of {members} seeds of the recipe (every seed a member)")
            row = _row(step, params=params, epochs=recipe_row["epochs"] if recipe_row else epochs,
                       val=ensemble["val"], test=ensemble["test"], wall=wall,
                       img_per_s=recipe_row["img_per_s"] if recipe_row else float("nan"))
            runs[step.key] = None
            info[step.key] = {"members": members,
                              "wall": "given" if ensemble_seconds is not None else "members x step 5's wall"}
        rows.append(row)
        by_key[step.key] = row
        print(f"ladder {number}/{len(chosen)}: {step.label}: PublicTest {row['val_accuracy %']:.2f}%  "
              f"PrivateTest {row['test_accuracy %']:.2f}%  macro-F1 {row['macro_f1 %']:.2f}%  "
              f"{row['wall_seconds']:.0f} s  {row['img_per_s']:,.0f} img/s", flush=True)

    table = pd.DataFrame(rows, columns=COLUMNS)
    table.index = pd.RangeIndex(1, len(table) + 1, name="#")
    return LadderResult(table, histories, chosen, runs, info, machine_description(), epochs)


def plot_ladder(result: LadderResult):
    """PrivateTest accuracy per step (left, gain over the previous step annotated) and wall
    seconds per step (right): what each step buys and what it costs."""
    import matplotlib.pyplot as plt
    import numpy as np

    table = result.table
    if table.empty:
        raise ValueError("plot_ladder needs at least one step")
    labels = [f"{i}. {s}" for i, s in zip(table.index, table["step"])]
    acc = table["test_accuracy %"].to_numpy(dtype=float)
    wall = table["wall_seconds"].to_numpy(dtype=float)
    y = np.arange(len(table))
    fig = plt.figure(figsize=(14, 0.6 * len(table) + 2.4))
    axes = fig.subplots(1, 2, squeeze=False)
    ax_acc, ax_wall = axes[0]
    ax_acc.barh(y, acc, color="tab:blue")
    for i, value in enumerate(acc):
        gain = "" if i == 0 else f"  ({value - acc[i - 1]:+.1f})"
        ax_acc.text(value, i, f" {value:.1f}%{gain}", va="center", fontsize=9)
    ax_acc.set_xlim(0, min(100.0, max(acc.max() * 1.25, 10.0)))
    ax_acc.set_xlabel("PrivateTest accuracy % (gain over the step above)")
    ax_acc.set_yticks(y, labels=labels)
    ax_acc.invert_yaxis()
    ax_acc.grid(axis="x", alpha=0.3)
    finite = np.where(np.isfinite(wall), wall, 0.0)
    ax_wall.barh(y, finite, color="tab:orange")
    for i, value in enumerate(wall):
        text = "n/a" if not np.isfinite(value) else f" {value:,.0f} s"
        if i < len(result.steps) and result.steps[i].how == "reuse":
            source = [s.key for s in result.steps].index(result.steps[i].reuse) + 1
            text += f" (step {source}'s model, no training)"
        ax_wall.text(finite[i], i, text, va="center", fontsize=9)
    ax_wall.set_xlim(0, max(finite.max() * 1.35, 1.0))
    ax_wall.set_xlabel("wall seconds (train + evaluate)")
    ax_wall.set_yticks(y, labels=[""] * len(y))
    ax_wall.invert_yaxis()
    ax_wall.grid(axis="x", alpha=0.3)
    epochs = result.epochs or int(table["epochs"].max())
    fig.suptitle(f"Improving the experiment-3 CNN: what each step buys in PrivateTest accuracy and costs in "
                 f"wall time ({epochs} epoch{'s' if epochs != 1 else ''} each)\n{result.machine}", fontsize=10)
    fig.tight_layout()
    return fig
