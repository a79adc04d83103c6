"""Named training recipes: model + augmentation + optimizer + schedule + TTA in one place.

A recipe is what the record notebook (08) and the command line train:

    python -m fer_lib reproduce --recipe fast_cpu --seeds 0 1 2

trains the recipe once per seed under the standard protocol (train on Training, keep the
epoch with the best PublicTest accuracy, evaluate PrivateTest once) and prints a table with
per-seed PrivateTest accuracy, macro-F1, wall time and device, then mean +- std, then a
time-to-accuracy table: per seed, the training seconds at which PublicTest accuracy first
reached 60/65/68% and the PrivateTest accuracy of that epoch's model. The last line printed
is one JSON object (recipe, test_accuracy_mean/std, wall_seconds_mean,
ensemble_test_accuracy, machine, time_to_accuracy).

Every hyperparameter is visible in RECIPES below; nothing is tuned on PrivateTest. The
per-epoch PrivateTest probe behind the time-to-accuracy table only records numbers: the
epoch kept is still chosen on PublicTest alone.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from fer_lib.device import machine_description
from fer_lib.training import TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    description: str
    config: TrainConfig
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    prepare: str | None = None  # fer_lib.models.fernet.PREPARATIONS name, e.g. "whiten_stem"
    # progressive resizing: the first floor(early_fraction x epochs) epochs use
    # config.augment_early, whatever the epochs of a call; 0 keeps config.augment_early_epochs
    early_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.early_fraction < 1 or (self.early_fraction and self.config.augment_early is None):
            raise ValueError(f"recipe {self.name}: early_fraction must be in [0, 1) and needs "
                             f"config.augment_early, got {self.early_fraction}")

    def config_for(self, **overrides: Any) -> TrainConfig:
        """The recipe's TrainConfig with `overrides` (TrainConfig fields) applied.

        With early_fraction, augment_early_epochs follows the epochs of this call (so
        `--epochs 5` trains 2 early epochs, not the 12-epoch recipe's 6), unless the call
        sets augment_early_epochs itself.
        """
        config = replace(self.config, **overrides)
        if self.early_fraction and "augment_early_epochs" not in overrides:
            config = replace(config, augment_early_epochs=int(config.epochs * self.early_fraction))
        return config


RECIPES: dict[str, Recipe] = {
    # Time-to-accuracy on a 2-core CPU: a narrow net, the airbench recipe scaled to FER2013
    # (whole split resident, batched flip + translate, one-cycle, label smoothing, flip TTA at
    # evaluation). The ablations (docs/ablations.md) kept three ideas: Muon for the conv
    # weights (+1.5 PublicTest points over 2 seeds at 4 epochs), a frozen patch-whitening stem
    # (+0.6), and progressive resizing: the first half of the epochs on random 40x40 crops,
    # each ~0.73 of a 48x48 epoch's time (at 12 epochs the same accuracy as 12 full-size ones,
    # +0.97 PublicTest over 10 full-size ones, about the same work). BN, biases and the head stay
    # on Nesterov SGD at lr 0.2. The final evaluation runs in the training precision (bf16
    # where resolve_device picks it): ~10 s less per run. Until 2026-11-30 the recipe was
    # all-SGD on full-size faces (the measurements of each version say which they are).
    "fast_cpu": Recipe(
        name="fast_cpu",
        model="fernet_small",
        description="narrow 3-stage conv net, whitened stem, 40x40 crops for the first half of the epochs "
                    "then flip+translate, Muon (convs) + Nesterov SGD one-cycle, label smoothing 0.1, "
                    "flip TTA; minutes on 2 CPU cores",
        config=TrainConfig(epochs=12, batch_size=128, lr=0.2, optimizer="muon", muon_lr=0.03, momentum=0.9,
                           nesterov=True, weight_decay=5e-4, scheduler="onecycle", pct_start=0.25,
                           label_smoothing=0.1, augment="fast", tta="flip", eval_precision="auto",
                           augment_early=[["RandomHorizontalFlip", {"p": 0.5}], ["RandomCrop", {"size": 40}]],
                           augment_early_epochs=6),
        prepare="whiten_stem",
        early_fraction=0.5,
    ),
    # The record recipe scaled to about an hour on 2 CPU cores with AMX (bf16):
    # the same schedule, augmentation, EMA and TTA as "record", on the middle fernet
    # (64-128-256, ~1.2M params, ~2.2x fewer FLOPs than fernet_large) for 40 epochs, with Muon
    # for the conv weights (the short ablations' clear winner). Measured on a 2-core Xeon with
    # AMX (docs/speed.md): 72.16 +- 0.50% PrivateTest over 3 seeds, ensemble 73.56%, 46-70
    # min per seed (all-SGD, as before 2026-11-30: 70.94 +- 0.45%, ensemble 71.86%).
    # On a Zen 4 EPYC (bf16 without AMX) 40 epochs take ~80 min; `--epochs 30 --set
    # muon_precision=auto` took 55-57 min there: 71.47 +- 0.31% over 3 seeds, ensemble 72.03%.
    "cpu_record": Recipe(
        name="cpu_record",
        model="fernet",
        description="fernet 64-128-256, khaireddin-style augmentation, Muon (convs) + Nesterov SGD "
                    "one-cycle, label smoothing 0.1, EMA, flip TTA, 40 epochs; ~1 h on 2 CPU cores with AMX "
                    "(30 epochs fit the hour on a Zen 4)",
        config=TrainConfig(epochs=40, batch_size=128, lr=0.05, optimizer="muon", muon_lr=0.03, momentum=0.9,
                           nesterov=True, weight_decay=5e-4, scheduler="onecycle", pct_start=0.2,
                           label_smoothing=0.1, augment="khaireddin", ema_decay=0.999, tta="flip"),
    ),
    # The record attempt: wider net, stronger augmentation, EMA, Muon for the conv weights
    # (on CPU it beat all-SGD at 4 and 12 epochs of fast_cpu and at 40 of cpu_record, +1.2
    # points). Measured on one H200 (docs/speed.md, 2026-12-01): 60 epochs gave 72.25%
    # PrivateTest in 204 s (seed 0) but peaked on PublicTest at epoch 32 and over-fitted after;
    # 30 epochs gave 72.19 +- 0.43% (seeds 0 1) in 122 s, ensemble of the two 73.06%. Hence
    # 30 epochs (`--epochs 60` gives the earlier budget, `--set optimizer=sgd` all-SGD).
    "record": Recipe(
        name="record",
        model="fernet_large",
        description="wide 3-stage conv net, khaireddin-style augmentation, Muon (convs) + Nesterov SGD "
                    "one-cycle, label smoothing 0.1, EMA, flip TTA, 30 epochs; ~2 min per seed on one H200",
        config=TrainConfig(epochs=30, batch_size=128, lr=0.05, optimizer="muon", muon_lr=0.03, momentum=0.9,
                           nesterov=True, weight_decay=5e-4, scheduler="onecycle", pct_start=0.2,
                           label_smoothing=0.1, augment="khaireddin", ema_decay=0.999, tta="flip"),
    ),
    # Khaireddin & Chen 2021's VGG variant with their optimiser, for comparison.
    "khaireddin_vgg": Recipe(
        name="khaireddin_vgg",
        model="vgg_khaireddin",
        description="Khaireddin & Chen 2021 VGG (~30M params), SGD Nesterov lr 0.01 wd 1e-4, "
                    "ReduceLROnPlateau x0.75 patience 5, their augmentation, flip TTA",
        config=TrainConfig(epochs=300, batch_size=64, lr=0.01, optimizer="sgd", momentum=0.9,
                           nesterov=True, weight_decay=1e-4, scheduler="plateau",
                           plateau_factor=0.75, plateau_patience=5,
                           plateau_metric="val_accuracy", augment="khaireddin", tta="flip"),
    ),
}

# fast_cpu on the middle fernet (64-128-256, 4x the FLOPs of fernet_small), for a GPU:
# there a step of these nets is bounded by launching operations, not by arithmetic (one
# H200 trained fernet_small and fernet_large at the same ~25,000 img/s in the bench,
# docs/speed.md), so the wider net should cost about fast_cpu's 30 s per seed and buys
# accuracy (width 1.5x: +1.5 PublicTest points at 4 epochs on CPU, docs/ablations.md).
# The stem keeps fernet's 32 channels: 18 whitening filters and 14 random ones, all frozen.
# Measured on a 2-core Xeon (bf16; docs/measurements.md): 71.09 +- 0.61% PrivateTest over 3
# seeds, ensemble 71.83%, 580 s per seed there; GPU time not measured yet.
RECIPES["fast_gpu"] = replace(
    RECIPES["fast_cpu"], name="fast_gpu", model="fernet",
    description="fast_cpu's recipe (whitened stem, 40x40 crops for the first half of the epochs, Muon + "
                "Nesterov SGD one-cycle, label smoothing 0.1, flip TTA) on fernet 64-128-256; for a GPU")


# fast_cpu for a CPU without bf16 (fp32), where a 48x48 epoch costs ~2.7x a bf16 one: the
# early epochs see whole faces downscaled to 32x32 (box 80-100 % of the side) instead of
# 40x40 crops, 0.45 instead of 0.68 of a 48x48 step; 11 epochs, 5 of them at 32x32. Timed on
# a 2-core Xeon with torch's and oneDNN's kernels limited to AVX2 (docs/measurements.md):
# --epochs 5 gives 66.02 +- 0.24% PrivateTest in 282 s (fast_cpu: 66.45 +- 0.41% in 320 s);
# 11 epochs 68.65 +- 0.64% in ~610 s. With bf16 at 12 epochs the downscaled early epochs
# measured the same as the crops (PrivateTest 68.90 vs 68.96, two seeds; docs/ablations.md).
# On a 2-core AMD EPYC (Zen 3) without AVX-512 or bf16, whose speed drifted by half: --epochs
# 5 gave the same 65.76 +- 0.34% as the Zen 4 limited to AVX2, in 338-519 s; 11 epochs 68.01%
# in 993 s (slow phase, one seed).
RECIPES["fast_fp32"] = replace(
    RECIPES["fast_cpu"], name="fast_fp32",
    description="fast_cpu's recipe with the first half of the epochs on faces downscaled to 32x32, "
                "11 epochs, fp32; for CPUs without bf16 (10-17 min on 2 AVX2 cores)",
    config=replace(RECIPES["fast_cpu"].config, epochs=11, precision="fp32", augment_early=[
        ["RandomHorizontalFlip", {"p": 0.5}],
        ["RandomResizedCrop", {"size": 32, "scale": [0.64, 1.0], "ratio": [1.0, 1.0]}]]))


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}") from None


# PublicTest accuracies (%) whose first crossing the time-to-accuracy table reports.
THRESHOLDS: tuple[float, ...] = (60.0, 65.0, 68.0)
# The per-epoch probe's points in each seed's run folder (kept for --resume).
PROBE_FILE = "time_to_accuracy.json"
# The teachers' soft targets, kept in the output folder (fer_lib.distill.teacher_targets).
TEACHER_CACHE = "teacher_targets.pt"


class BudgetExceeded(RuntimeError):
    """A run was stopped between epochs because the next epoch would pass its time budget."""


class EpochProbe:
    """fit's on_epoch_end callback: per epoch, training seconds, PublicTest and PrivateTest.

    seconds: cumulative epoch seconds from fit's history (training + the per-epoch PublicTest
    pass), the same clock as `fer_lib.evaluation.history_curve`; start-up, checkpoint writes
    and this probe are not in it. PrivateTest is evaluated on the model of that epoch (EMA
    weights when EMA is on) without TTA, as the per-epoch PublicTest accuracy is, so the two
    columns are comparable. It is only recorded: fit chooses the kept epoch on PublicTest and
    never sees these numbers. The probe's own time is summed in `probe_seconds`, so callers
    can take it out of wall times. deadline: a time.perf_counter() value; when the next
    epoch (as long as the last one, probe included) would end after it, the probe raises
    BudgetExceeded (not after the final epoch).

    path: a JSON file the points are written to after every epoch (atomically), so that a
    resumed run keeps the time-to-accuracy of its earlier calls: with resume=True the probe
    starts from that file, and an epoch trained again (a run resumed from an earlier
    checkpoint) replaces the saved points from that epoch on.
    """

    def __init__(self, test_split: Any, *, epochs: int, batch_size: int = 512, precision: str = "auto",
                 deadline: float | None = None, path: str | Path | None = None, resume: bool = False):
        self.test, self.epochs, self.batch_size, self.precision = test_split, epochs, batch_size, precision
        self.deadline = deadline
        self.path = Path(path) if path is not None else None
        self.points: list[dict[str, float]] = []
        self._last_end: float | None = None
        if resume and self.path is not None and self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                keys = ("seconds", "val_accuracy", "test_accuracy", "probe_seconds")
                self.points = [{key: float(point[key]) for key in keys} | {"epoch": int(point["epoch"])}
                               for point in saved["points"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{self.path}: not a time-to-accuracy probe file ({exc})") from None

    def __call__(self, row: dict[str, float], model: Any) -> None:
        from fer_lib.fileio import atomic_write_json
        from fer_lib.training import evaluate

        start = time.perf_counter()
        epoch = int(row["epoch"])
        self.points = [point for point in self.points if point["epoch"] < epoch]
        before = self.points[-1] if self.points else {"seconds": 0.0, "probe_seconds": 0.0}
        test = evaluate(model, self.test, batch_size=self.batch_size, precision=self.precision)
        end = time.perf_counter()
        self.points.append({"epoch": epoch, "seconds": before["seconds"] + float(row["seconds"]),
                            "val_accuracy": 100 * float(row.get("val_accuracy", math.nan)),
                            "test_accuracy": 100 * float(test["accuracy"]),
                            "probe_seconds": before["probe_seconds"] + end - start})
        if self.path is not None:
            atomic_write_json(self.path, {"points": self.points})
        epoch_cost = float(row["seconds"]) if self._last_end is None else end - self._last_end
        self._last_end = end
        if (self.deadline is not None and int(row["epoch"]) < self.epochs
                and end + epoch_cost > self.deadline):
            raise BudgetExceeded(f"stopped after epoch {int(row['epoch'])}/{self.epochs}: the next epoch "
                                 f"(~{epoch_cost:.0f} s) would pass the time budget")

    @property
    def probe_seconds(self) -> float:
        """Seconds this probe's evaluations took, over the epochs in `points`."""
        return self.points[-1]["probe_seconds"] if self.points else 0.0

    def time_to(self, threshold: float) -> tuple[float, float]:
        """(seconds, PrivateTest %) at the first epoch whose PublicTest % >= threshold; NaNs if none."""
        return time_to_accuracy(self.points, threshold)


def time_to_accuracy(points: list[dict[str, float]], threshold: float) -> tuple[float, float]:
    """(seconds, test_accuracy) of the first point with val_accuracy >= threshold, else (nan, nan)."""
    for point in points:
        if point["val_accuracy"] >= threshold:
            return point["seconds"], point["test_accuracy"]
    return math.nan, math.nan


def recipe_preparation(recipe: Recipe, prepare: str | None) -> str | None:
    """The preparation a run of `recipe` applies: the recipe's (prepare None), none ("none"), or
    the named one (checked against fer_lib.models.fernet.PREPARATIONS)."""
    from fer_lib.models.fernet import PREPARATIONS

    if prepare is None:
        return recipe.prepare
    if prepare == "none":
        return None
    if prepare not in PREPARATIONS:
        raise ValueError(f"unknown model preparation {prepare!r}; known: none, {', '.join(PREPARATIONS)}")
    return prepare


def train_recipe(name: str, data, *, run_dir: str | Path, seed: int = 0,
                 wandb_mode: str | None = None, resume: bool = False,
                 on_epoch_end: Callable[[dict[str, float], Any], None] | None = None, soft_targets: Any = None,
                 prepare: str | None = None, **overrides: Any):
    """Train one recipe once under the standard protocol; returns an ExperimentResult.

    overrides: TrainConfig fields to change for this run (e.g. epochs=2 for a smoke run).
    prepare: a model preparation (fer_lib.models.fernet.PREPARATIONS) instead of the recipe's,
    "none" for none; None keeps the recipe's.
    resume: continue from run_dir/last.pt when it exists.
    on_epoch_end: handed to fit (e.g. an EpochProbe).
    soft_targets: distillation targets for data.train (fer_lib.distill); set distill_weight too.
    """
    from fer_lib.experiment import run_experiment

    recipe = get_recipe(name)
    config = recipe.config_for(seed=seed, **overrides)
    return run_experiment(f"{name}-seed{seed}", data, recipe.model, config, run_dir=run_dir,
                          model_kwargs=recipe.model_kwargs, wandb_mode=wandb_mode,
                          extra={"recipe": name}, resume=resume, on_epoch_end=on_epoch_end,
                          prepare=recipe_preparation(recipe, prepare), soft_targets=soft_targets)


def _tta_columns(probe: EpochProbe) -> dict[str, float]:
    columns: dict[str, float] = {}
    for threshold in THRESHOLDS:
        seconds, test = probe.time_to(threshold)
        columns[f"s_to_{threshold:g}"] = seconds
        columns[f"test_at_{threshold:g}"] = test
    return columns


@dataclass
class Reproduction:
    """What `reproduce` returns: the per-seed table, the summary, and the trained runs."""

    table: Any  # pandas.DataFrame, one row per finished seed
    summary: dict[str, Any]
    members: list[Any]  # fer_lib.experiment.ExperimentResult per finished seed, in seed order


def reproduce(name: str, seeds: list[int], data, *, out_dir: str | Path,
              wandb_mode: str | None = None, budget_seconds: float | None = None, resume: bool = False,
              teachers: list[str | Path] | None = None, prepare: str | None = None,
              **overrides: Any) -> Reproduction:
    """Train a recipe once per seed (run folders out_dir/seed<k>); return a Reproduction.

    The summary holds mean and std (ddof=1) of each column and, with two or more seeds, the
    ensemble of all of them (softmax average of each model's logits, with the recipe's TTA)
    on PublicTest and PrivateTest. Every seed is a member: nothing is chosen on PrivateTest.

    Each run carries an EpochProbe, so the table also holds, per threshold in THRESHOLDS,
    `s_to_<t>` (training seconds when PublicTest first reached t%) and `test_at_<t>`
    (PrivateTest % of that epoch's model), NaN when never reached. wall_seconds is the run's
    wall time without the probe's own evaluations (`probe_seconds`).

    budget_seconds: a time budget for all seeds. A seed is not started when the previous
    one's wall time would not fit in what is left, and a run is stopped between epochs when
    the next epoch would pass the budget; both leave a note in summary["skipped"] (a stopped
    run's time-to-accuracy so far included) and count in no mean. resume: continue each seed
    from its run folder's last checkpoint (its wall time and time-to-accuracy include the
    earlier calls', saved in last.pt and PROBE_FILE; a seed without a last checkpoint starts
    afresh). teachers:
    finished run folders whose best models' flip-TTA ensemble gives every seed its soft targets
    (fer_lib.distill; computed once and cached in out_dir/TEACHER_CACHE, its seconds in
    summary["teacher_seconds"], not in any seed's wall time); the recipe's distill_weight, or
    an override, must be > 0. prepare: a model preparation instead of the recipe's (see
    `train_recipe`); the summary's "overrides" name it when it differs.
    """
    import pandas as pd

    from fer_lib.experiment import ensemble_metrics

    recipe = get_recipe(name)
    config = recipe.config_for(**overrides)
    preparation = recipe_preparation(recipe, prepare)  # checked before any seed trains
    soft_targets, teacher_seconds = None, 0.0
    if teachers:
        from fer_lib.distill import teacher_targets

        if config.distill_weight == 0:
            raise ValueError("teachers given but distill_weight is 0: set it (e.g. --distill-weight 0.5)")
        started = time.perf_counter()
        # cached beside the seeds: a second call with the same teachers skips their pass
        soft_targets = teacher_targets(teachers, data.train.images, tta="flip", batch_size=config.eval_batch_size,
                                       precision=config.precision, cache=Path(out_dir) / TEACHER_CACHE)
        teacher_seconds = time.perf_counter() - started
        print(f"soft targets from {len(teachers)} teachers in {teacher_seconds:.0f} s", flush=True)
    deadline = time.perf_counter() + budget_seconds if budget_seconds is not None else None
    rows, members, skipped = [], [], []
    curves: dict[str, list[list[float]]] = {}
    previous_seconds = 0.0
    for index, seed in enumerate(seeds):
        if deadline is not None and time.perf_counter() + previous_seconds > deadline:
            skipped.append(f"seed {seed}: not started, the {budget_seconds:.0f} s budget has "
                           f"{max(deadline - time.perf_counter(), 0):.0f} s left and the previous seed took "
                           f"{previous_seconds:.0f} s")
            continue
        run_dir = Path(out_dir) / f"seed{seed}"
        resuming = resume and (run_dir / "last.pt").exists()
        probe = EpochProbe(data.test, epochs=config.epochs, batch_size=config.eval_batch_size,
                           precision=config.precision, deadline=deadline, path=run_dir / PROBE_FILE,
                           resume=resuming)
        started = time.perf_counter()
        try:
            result = train_recipe(name, data, run_dir=run_dir, seed=seed, wandb_mode=wandb_mode,
                                  resume=resuming,
                                  on_epoch_end=probe, soft_targets=soft_targets, prepare=prepare, **overrides)
        except BudgetExceeded as stop:
            reached = ", ".join(f"{t:g}% at {probe.time_to(t)[0]:.0f} s" for t in THRESHOLDS
                                if not math.isnan(probe.time_to(t)[0]))
            skipped.append(f"seed {seed}: {stop}; PublicTest reached {reached or 'none of the thresholds'}")
            curves[f"seed {seed} (stopped)"] = [[pt["seconds"], pt["val_accuracy"]] for pt in probe.points]
            skipped += [f"seed {later}: not started, the budget ran out" for later in seeds[index + 1:]]
            break
        previous_seconds = time.perf_counter() - started
        members.append(result)
        curves[f"seed {seed}"] = [[pt["seconds"], pt["val_accuracy"]] for pt in probe.points]
        rows.append({
            "seed": seed,
            "val_accuracy": 100 * result.results["val_accuracy"],
            "test_accuracy": 100 * result.results["test_accuracy"],
            "test_macro_f1": 100 * result.results["test_macro_f1"],
            "wall_seconds": result.results["seconds"] - probe.probe_seconds,
            "epochs": result.results["epochs_run"],
            "device": result.results["device"],
            "probe_seconds": probe.probe_seconds,
            **_tta_columns(probe),
        })
    columns = ["seed", "val_accuracy", "test_accuracy", "test_macro_f1", "wall_seconds", "epochs", "device",
               "probe_seconds"] + [f"{k}_{t:g}" for t in THRESHOLDS for k in ("s_to", "test_at")]
    table = pd.DataFrame(rows, columns=columns)
    # what the call changed: a field that only follows its epochs (early_fraction) is no change
    unchanged = {**recipe.config_for(epochs=config.epochs).to_dict(), "epochs": recipe.config.epochs}
    summary: dict[str, Any] = {"recipe": name, "seeds": [int(r["seed"]) for r in rows],
                               "machine": machine_description(), "skipped": skipped, "curves": curves,
                               "overrides": {key: value for key, value in config.to_dict().items()
                                             if value != unchanged[key]}}
    if preparation != recipe.prepare:
        summary["overrides"]["prepare"] = preparation or "none"
    if teachers:
        summary["teachers"] = [str(teacher) for teacher in teachers]
        summary["teacher_seconds"] = teacher_seconds
    for col in ("val_accuracy", "test_accuracy", "test_macro_f1", "wall_seconds"):
        values = table[col].to_numpy(dtype=float)
        summary[col] = {"mean": float(values.mean()) if len(values) else math.nan,
                        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    summary["time_to_accuracy"] = {}
    for threshold in THRESHOLDS:
        seconds = table[f"s_to_{threshold:g}"].dropna().to_numpy(dtype=float)
        tests = table[f"test_at_{threshold:g}"].dropna().to_numpy(dtype=float)
        summary["time_to_accuracy"][f"{threshold:g}"] = {
            "reached": int(len(seconds)), "of": len(rows),
            "seconds_mean": float(seconds.mean()) if len(seconds) else None,
            "test_accuracy_mean": float(tests.mean()) if len(tests) else None}
    if len(members) > 1:
        ensemble: dict[str, Any] = {"members": len(members)}
        for split, metrics in ensemble_metrics(members, data).items():
            ensemble[f"{split}_accuracy"] = 100 * metrics["accuracy"]
            ensemble[f"{split}_macro_f1"] = 100 * metrics["macro_f1"]
        summary["ensemble"] = ensemble
    return Reproduction(table, summary, members)


def _cell(value: float, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def time_to_accuracy_markdown(table) -> str:
    """The per-seed time-to-accuracy table ('-' where a threshold was never reached)."""
    import pandas as pd

    from fer_lib.evaluation import to_markdown

    shown = {"seed": table["seed"].astype(int).tolist()}
    for threshold in THRESHOLDS:
        shown[f"s to {threshold:g}%"] = [_cell(v, ".0f") for v in table[f"s_to_{threshold:g}"]]
        shown[f"PrivateTest @{threshold:g}"] = [_cell(v, ".2f") for v in table[f"test_at_{threshold:g}"]]
    return to_markdown(pd.DataFrame(shown))


def summary_markdown(table, summary: dict[str, Any], labels: str = "fer2013") -> str:
    """The reproduce report as markdown: recipe, machine, per-seed table, mean +- std, ensemble,
    time to accuracy and the notes of seeds a time budget skipped or stopped."""
    from fer_lib.evaluation import to_markdown

    acc, f1, sec = summary["test_accuracy"], summary["test_macro_f1"], summary["wall_seconds"]
    main_columns = ["seed", "val_accuracy", "test_accuracy", "test_macro_f1", "wall_seconds", "epochs", "device"]
    changed = ", ".join(f"{key}={value}" for key, value in summary.get("overrides", {}).items())
    lines = [f"recipe {summary['recipe']} ({get_recipe(summary['recipe']).description}); "
             f"labels {labels}" + (f"; changed: {changed}" if changed else ""), f"machine: {summary['machine']}", "",
             to_markdown(table[main_columns], floatfmt=".2f"), "",
             f"PrivateTest accuracy {acc['mean']:.2f} +- {acc['std']:.2f} %, macro-F1 "
             f"{f1['mean']:.2f} +- {f1['std']:.2f} %, wall {sec['mean']:.0f} +- {sec['std']:.0f} s "
             f"over {len(summary['seeds'])} seeds"]
    if summary.get("teachers"):
        lines.append(f"Distilled from {len(summary['teachers'])} teachers' flip-TTA ensemble "
                     f"({', '.join(Path(t).name for t in summary['teachers'])}); soft targets took "
                     f"{summary['teacher_seconds']:.0f} s, outside the seeds' wall time")
    if "ensemble" in summary:
        ens = summary["ensemble"]
        lines.append(f"Ensemble of the {ens['members']} seeds (softmax average): PrivateTest "
                     f"accuracy {ens['test_accuracy']:.2f} %, macro-F1 {ens['test_macro_f1']:.2f} %"
                     f" (PublicTest {ens['val_accuracy']:.2f} %)")
    lines += ["", "Time to PublicTest accuracy (training seconds: epochs + their PublicTest pass; "
              "PrivateTest % of that epoch's model, no TTA, recorded only, never used to choose):", "",
              time_to_accuracy_markdown(table)]
    lines += [f"Not run in full: {note}" for note in summary.get("skipped", [])]
    return "\n".join(lines) + "\n"


def summary_line_json(summary: dict[str, Any]) -> dict[str, Any]:
    """The one JSON object `reproduce` prints last (NaN becomes null: strict JSON)."""
    from fer_lib.fileio import to_jsonable

    return to_jsonable({"recipe": summary["recipe"], "seeds": summary["seeds"],
                        "test_accuracy_mean": summary["test_accuracy"]["mean"],
                        "test_accuracy_std": summary["test_accuracy"]["std"],
                        "wall_seconds_mean": summary["wall_seconds"]["mean"],
                        "ensemble_test_accuracy": summary.get("ensemble", {}).get("test_accuracy"),
                        "machine": summary["machine"], "time_to_accuracy": summary["time_to_accuracy"],
                        "skipped": summary.get("skipped", [])})


def parse_settings(settings: list[str]) -> dict[str, Any]:
    """--set FIELD=VALUE items as TrainConfig overrides (VALUE as JSON, else text); one error
    naming the item for a malformed one or a field TrainConfig does not have."""
    from dataclasses import fields

    known = {f.name for f in fields(TrainConfig)}
    overrides: dict[str, Any] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE, e.g. optimizer=muon")
        if key not in known:
            raise ValueError(f"--set {item!r}: TrainConfig has no field {key!r}")
        try:
            overrides[key] = json.loads(text)
        except ValueError:
            overrides[key] = text
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer_lib reproduce",
                                     description="Train a named recipe for N seeds and print "
                                                 "PrivateTest accuracy per seed and mean +- std.")
    parser.add_argument("--recipe", default="fast_cpu", choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--data", default=None, help="FER2013 source (default: found as usual)")
    parser.add_argument("--labels", default="fer2013", choices=["fer2013", "ferplus"])
    parser.add_argument("--fraction", type=float, default=1.0, help="data fraction (smoke runs)")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None)
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="time budget for all seeds: later seeds are skipped, a run is stopped "
                             "between epochs, each with a note")
    parser.add_argument("--resume", action="store_true",
                        help="continue each seed from its run folder's last checkpoint (seeds "
                             "without one start afresh)")
    parser.add_argument("--teacher", nargs="+", default=None, metavar="RUN_DIR",
                        help="distil from these finished run folders (their best.pt, flip-TTA ensemble)")
    parser.add_argument("--distill-weight", type=float, default=None,
                        help="weight of the distillation loss (0..1; with --teacher)")
    parser.add_argument("--distill-temperature", type=float, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="settings",
                        help="change one TrainConfig field of the recipe (repeatable), e.g. --set "
                             "optimizer=muon --set muon_lr=0.03; VALUE is read as JSON, else as text")
    parser.add_argument("--prepare", default=None, metavar="NAME",
                        help="a model preparation instead of the recipe's (fer_lib.models.fernet.PREPARATIONS, "
                             "e.g. whiten_stem), or none")
    parser.add_argument("--out", default="runs/reproduce")
    parser.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"])
    args = parser.parse_args(argv)

    from fer_lib.data import load_fer2013

    data = load_fer2013(args.data, labels=args.labels, fraction=args.fraction)
    overrides = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.max_steps_per_epoch is not None:
        overrides["max_steps_per_epoch"] = args.max_steps_per_epoch
    for key in ("distill_weight", "distill_temperature"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    overrides.update(parse_settings(args.settings))
    out = Path(args.out) / f"{args.recipe}-{args.labels}"
    run = reproduce(args.recipe, args.seeds, data, out_dir=out, wandb_mode=args.wandb_mode,
                    budget_seconds=args.budget_seconds, resume=args.resume,
                    teachers=args.teacher, prepare=args.prepare, **overrides)
    table, summary = run.table, run.summary
    report = summary_markdown(table, summary, args.labels)
    print("\n" + report, end="")
    from fer_lib.fileio import atomic_write_text, to_jsonable

    line = summary_line_json(summary)
    record = {"summary": summary, "runs": table.to_dict("records"), "line": line}
    atomic_write_text(out / "reproduce.json", json.dumps(to_jsonable(record), indent=2))
    atomic_write_text(out / "reproduce.md", report)
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
