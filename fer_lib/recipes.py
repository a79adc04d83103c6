"""Named training recipes: model + augmentation + optimizer + schedule + TTA in one place.

A recipe is what the record notebook (08) and the command line train:

    python -m fer_lib reproduce --recipe fast_cpu --seeds 0 1 2

trains the recipe once per seed under the standard protocol (train on Training, keep the
epoch with the best PublicTest accuracy, evaluate PrivateTest once) and prints a table with
per-seed PrivateTest accuracy, macro-F1, wall time and device, then mean +- std.

Every hyperparameter is visible in RECIPES below; nothing is tuned on PrivateTest.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fer_lib.device import machine_description
from fer_lib.training import TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    description: str
    config: TrainConfig
    model_kwargs: dict[str, Any] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    # Time-to-accuracy on a 2-core CPU: a narrow net, the airbench recipe scaled to FER2013
    # (whole split resident, batched flip + translate, Nesterov SGD with one-cycle, label
    # smoothing, flip TTA at evaluation).
    "fast_cpu": Recipe(
        name="fast_cpu",
        model="fernet_small",
        description="narrow 3-stage conv net, flip+translate, Nesterov SGD one-cycle, "
                    "label smoothing 0.1, flip TTA; minutes on 2 CPU cores",
        config=TrainConfig(epochs=12, batch_size=128, lr=0.2, optimizer="sgd", momentum=0.9,
                           nesterov=True, weight_decay=5e-4, scheduler="onecycle", pct_start=0.25,
                           label_smoothing=0.1, augment="fast", tta="flip"),
    ),
    # The record attempt: wider net, longer schedule, stronger augmentation, EMA.
    "record": Recipe(
        name="record",
        model="fernet_large",
        description="wide 3-stage conv net, khaireddin-style augmentation, Nesterov SGD "
                    "one-cycle, label smoothing 0.1, EMA, flip TTA",
        config=TrainConfig(epochs=60, batch_size=128, lr=0.05, optimizer="sgd", momentum=0.9,
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


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(RECIPES)}") from None


def train_recipe(name: str, data, *, run_dir: str | Path, seed: int = 0,
                 wandb_mode: str | None = None, resume: bool = False, **overrides: Any):
    """Train one recipe once under the standard protocol; returns an ExperimentResult.

    overrides: TrainConfig fields to change for this run (e.g. epochs=2 for a smoke run).
    resume: continue from run_dir/last.pt when it exists.
    """
    from fer_lib.experiment import run_experiment

    recipe = get_recipe(name)
    config = replace(recipe.config, seed=seed, **overrides)
    return run_experiment(f"{name}-seed{seed}", data, recipe.model, config, run_dir=run_dir,
                          model_kwargs=recipe.model_kwargs, wandb_mode=wandb_mode,
                          extra={"recipe": name}, resume=resume)


def reproduce(name: str, seeds: list[int], data, *, out_dir: str | Path,
              wandb_mode: str | None = None, **overrides: Any):
    """Train a recipe once per seed; return (per-seed DataFrame, summary dict).

    The summary holds mean and std (ddof=1) of each column and, with two or more seeds, the
    ensemble of all of them (softmax average of each model's logits, with the recipe's TTA)
    on PublicTest and PrivateTest. Every seed is a member: nothing is chosen on PrivateTest.
    """
    import pandas as pd

    from fer_lib.experiment import ensemble_metrics

    rows, members = [], []
    for seed in seeds:
        result = train_recipe(name, data, run_dir=Path(out_dir) / f"seed{seed}", seed=seed,
                              wandb_mode=wandb_mode, **overrides)
        members.append(result)
        rows.append({
            "seed": seed,
            "val_accuracy": 100 * result.results["val_accuracy"],
            "test_accuracy": 100 * result.results["test_accuracy"],
            "test_macro_f1": 100 * result.results["test_macro_f1"],
            "wall_seconds": result.results["seconds"],
            "epochs": result.results["epochs_run"],
            "device": result.results["device"],
        })
    table = pd.DataFrame(rows)
    summary: dict[str, Any] = {"recipe": name, "seeds": list(seeds),
                               "machine": machine_description()}
    for col in ("val_accuracy", "test_accuracy", "test_macro_f1", "wall_seconds"):
        values = table[col].to_numpy(dtype=float)
        summary[col] = {"mean": float(values.mean()),
                        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    if len(seeds) > 1:
        ensemble: dict[str, Any] = {"members": len(seeds)}
        for split, metrics in ensemble_metrics(members, data).items():
            ensemble[f"{split}_accuracy"] = 100 * metrics["accuracy"]
            ensemble[f"{split}_macro_f1"] = 100 * metrics["macro_f1"]
        summary["ensemble"] = ensemble
    return table, summary


def summary_markdown(table, summary: dict[str, Any], labels: str = "fer2013") -> str:
    """The reproduce report as markdown: recipe, machine, per-seed table, mean +- std, ensemble."""
    from fer_lib.evaluation import to_markdown

    acc, f1, sec = summary["test_accuracy"], summary["test_macro_f1"], summary["wall_seconds"]
    lines = [f"recipe {summary['recipe']} ({get_recipe(summary['recipe']).description}); "
             f"labels {labels}", f"machine: {summary['machine']}", "", to_markdown(table, floatfmt=".2f"), "",
             f"PrivateTest accuracy {acc['mean']:.2f} +- {acc['std']:.2f} %, macro-F1 "
             f"{f1['mean']:.2f} +- {f1['std']:.2f} %, wall {sec['mean']:.0f} +- {sec['std']:.0f} s "
             f"over {len(summary['seeds'])} seeds"]
    if "ensemble" in summary:
        ens = summary["ensemble"]
        lines.append(f"Ensemble of the {ens['members']} seeds (softmax average): PrivateTest "
                     f"accuracy {ens['test_accuracy']:.2f} %, macro-F1 {ens['test_macro_f1']:.2f} %"
                     f" (PublicTest {ens['val_accuracy']:.2f} %)")
    return "\n".join(lines) + "\n"


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
    out = Path(args.out) / f"{args.recipe}-{args.labels}"
    table, summary = reproduce(args.recipe, args.seeds, data, out_dir=out,
                               wandb_mode=args.wandb_mode, **overrides)
    report = summary_markdown(table, summary, args.labels)
    print("\n" + report, end="")
    import json

    from fer_lib.fileio import atomic_write_text

    atomic_write_text(out / "reproduce.json", json.dumps({"summary": summary,
                                                         "runs": table.to_dict("records")}, indent=2))
    atomic_write_text(out / "reproduce.md", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
