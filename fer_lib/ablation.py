"""Ablations: each idea alone, on one recipe and one budget, against the unchanged recipe.

    python -m fer_lib ablate --recipe fast_cpu --epochs 4 --seeds 0
    python -m fer_lib ablate --only base alternating_flip --seeds 0 1

Every variant is the base recipe with one change (ABLATIONS below), trained for the same
number of epochs under the standard protocol. The table gives, per variant and mean over the
seeds, the final PublicTest and PrivateTest accuracy (recipe TTA, best epoch chosen on
PublicTest as always), the difference to `base` on each, and the wall seconds (training, the
per-epoch PublicTest pass and the final evaluation). Decide on the PublicTest column: the
PrivateTest column is there to be reported, not to choose with. A variant with `tta_only`
set reuses another variant's trained models and changes only the evaluation.

Writes <out>/ablation.json (every run) and <out>/ablation.md (the table) after each run, so
an interrupted ablation keeps what it measured; --resume skips runs already in ablation.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fer_lib.recipes import get_recipe

FLIP = ("RandomHorizontalFlip", {"p": 0.5})
TRANSLATE = ("RandomCrop", {"size": 48, "padding": 3, "padding_mode": "reflect"})
CROP40 = ("RandomCrop", {"size": 40})


@dataclass(frozen=True)
class Ablation:
    """One change to the base recipe.

    config: TrainConfig fields to override. model_kwargs: create_model kwargs to add.
    prepare: name of an initialisation in fer_lib.models.fernet.PREPARATIONS applied to the
    new model (it gets the model and the training images). equalize: histogram-equalise every split (training and
    evaluation alike). tta / crop_size: the final evaluation's TTA instead of the recipe's.
    tta_only: the name of the variant whose trained models are evaluated again (no training).
    epochs_factor: train round(epochs * factor) epochs (a costlier variant on a similar time).
    """

    name: str
    idea: str
    config: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    prepare: str | None = None
    equalize: bool = False
    tta: str | None = None
    crop_size: int | None = None
    tta_only: str | None = None
    epochs_factor: float = 1.0


ABLATIONS: tuple[Ablation, ...] = (
    Ablation("base", "the recipe unchanged"),
    # width: a wider net uses the CPU's matrix units better (bench: fernet_small reaches 14% of
    # the bf16 peak), so it may buy more accuracy per second; compare wall_s as well
    Ablation("width_1.5x", "stages 48-96-192 instead of 32-64-128", model_kwargs={"widths": (48, 96, 192)}),
    Ablation("width_2x_fewer_epochs", "stages 64-128-256 (fernet) for 3/4 of the epochs",
             model_kwargs={"widths": (64, 128, 256)}, epochs_factor=0.75),
    Ablation("label_smoothing_0.2", "label smoothing 0.2 instead of 0.1", config={"label_smoothing": 0.2}),
    Ablation("ema_0.99", "evaluate an EMA of the weights (decay 0.99)", config={"ema_decay": 0.99}),
    Ablation("batch_256", "batch 256 with lr x2 (0.4)", config={"batch_size": 256, "lr": 0.4}),
    Ablation("alternating_flip", "alternating flips across epochs instead of random ones",
             config={"augment": [TRANSLATE], "alternating_flip": True}),
    Ablation("flip_translate_tta", "10-view TTA (flip x 2-px translations) instead of flip",
             tta="flip_translate", tta_only="base"),
    Ablation("crop40", "train on random 40x40 crops (no padding), evaluate whole 48x48 faces",
             config={"augment": [FLIP, CROP40]}),
    Ablation("crop40_tencrop", "crop40's models with ten-crop 40x40 TTA (Khaireddin & Chen)",
             tta="tencrop", crop_size=40, tta_only="crop40"),
    Ablation("progressive_40_48", "progressive resizing: 40x40 crops for the first half of the "
             "epochs, then the recipe's 48x48 augmentation", config={"augment_early": [FLIP, CROP40]}),
    # its 40x40 epochs cost ~31% less: on about the base's time it can train a quarter longer
    Ablation("progressive_40_48_x1.25", "progressive_40_48 for 1.25x the epochs (about the base's time)",
             config={"augment_early": [FLIP, CROP40]}, epochs_factor=1.25),
    Ablation("muon", "Muon (orthogonalised momentum, lr 0.03) for the conv weights; SGD for the rest",
             config={"optimizer": "muon"}),
    Ablation("muon_lr_0.015", "muon at half its lr (0.015)", config={"optimizer": "muon", "muon_lr": 0.015}),
    Ablation("muon_lr_0.06", "muon at twice its lr (0.06)", config={"optimizer": "muon", "muon_lr": 0.06}),
    Ablation("muon_ns_bf16", "Muon's Newton-Schulz iterations in bf16 where training autocasts to bf16 "
             "(fp32 otherwise)", config={"optimizer": "muon", "muon_precision": "auto"}),
    Ablation("mixup_0.2", "mixup, alpha 0.2", config={"mixup_alpha": 0.2}),
    Ablation("hist_eq", "histogram-equalise every face (train and test)", equalize=True),
    Ablation("whiten_stem", "patch-whitening stem conv, frozen (airbench)", prepare="whiten_stem"),
    # with the stem conv frozen, a trained stem BN is all that makes backward run through the
    # stem's full-size maps and compute stage 1's input gradient
    Ablation("whiten_stem_frozen_bn", "whitened stem with its BN scale and bias fixed too (1 and 0): "
             "no backward before stage 1", prepare="whiten_stem_frozen_bn"),
    Ablation("identity_init", "Dirac-initialised convs after the stem", prepare="identity_init"),
    Ablation("frozen_bn_scales", "BatchNorm scales fixed at 1, biases trained", prepare="frozen_bn_scales"),
    # cheaper steps on a CPU: ReLU made fernet_small's whole step 1.1-1.25x faster, average
    # pooling about 1.1x (Xeon with AMX and Zen 4; docs/ablations.md, docs/measurements.md)
    Ablation("relu", "ReLU instead of GELU", model_kwargs={"act": "relu"}),
    Ablation("relu_stem", "ReLU in the stem only (its 48x48 map), GELU after it",
             model_kwargs={"stem_act": "relu"}),
    Ablation("silu", "SiLU instead of GELU: a smooth activation without erf, ~0.6x GELU's cost on a CPU",
             model_kwargs={"act": "silu"}),
    Ablation("hardswish", "Hardswish instead of GELU: GELU's shape, ReLU's cost in bf16 on a CPU",
             model_kwargs={"act": "hardswish"}),
    Ablation("avgpool", "2x2 average pooling inside each stage instead of max pooling",
             model_kwargs={"downsample": "avg"}),
    Ablation("relu_avgpool", "ReLU and average pooling together", model_kwargs={"act": "relu", "downsample": "avg"}),
    Ablation("stride_down", "each stage's first conv at stride 2 instead of conv + 2x2 max pooling",
             model_kwargs={"downsample": "stride"}),
)


def get_ablation(name: str) -> Ablation:
    for ablation in ABLATIONS:
        if ablation.name == name:
            return ablation
    raise ValueError(f"unknown ablation {name!r}; ablations: {', '.join(a.name for a in ABLATIONS)}")


def _config_for(recipe, ablation: Ablation, epochs: int, seed: int, extra: dict[str, Any]):
    overrides = {"epochs": max(1, round(epochs * ablation.epochs_factor)), "seed": seed, **ablation.config, **extra}
    if "augment_early" in ablation.config:
        overrides.setdefault("augment_early_epochs", max(1, overrides["epochs"] // 2))
    return recipe.config_for(**overrides)


def _equalized(data):
    from fer_lib.data import equalize_histogram

    splits = {name: replace(split, images=equalize_histogram(split.images))
              for name, split in data.splits().items()}
    return replace(data, **splits)


def _final_metrics(model, data, config, tta: str, crop_size: int | None) -> dict[str, float]:
    from fer_lib.evaluation import classification_metrics
    from fer_lib.inference import predict_logits

    out = {}
    for key, split in (("val", data.val), ("test", data.test)):
        logits = predict_logits(model, split.images, tta=tta, crop_size=crop_size,
                                batch_size=config.eval_batch_size, precision=config.final_eval_precision)
        metrics = classification_metrics(split.labels, logits.argmax(1).numpy(), data.class_names)
        out[f"{key}_accuracy"] = 100 * float(metrics["accuracy"])
        out[f"{key}_macro_f1"] = 100 * float(metrics["macro_f1"])
    return out


def run_ablation(ablation: Ablation, data, *, recipe: str = "fast_cpu", epochs: int = 4, seed: int = 0,
                 trained: dict[tuple[str, int], Any] | None = None, **config_overrides: Any) -> dict[str, Any]:
    """Train (or, for a tta_only variant, re-evaluate) one variant for one seed; a table row.

    trained: models by (variant, seed), filled with what this call trains and read by tta_only
    variants. config_overrides: further TrainConfig changes for every variant (smoke runs).
    """
    import torch

    from fer_lib.models import create_model
    from fer_lib.models.fernet import combine_preparations, prepare_model
    from fer_lib.training import fit

    base = get_recipe(recipe)
    trained = {} if trained is None else trained
    source = get_ablation(ablation.tta_only) if ablation.tta_only else ablation
    config = _config_for(base, source, epochs, seed, {"progress": "plain", "checkpoint_every_epoch": False,
                                                      **config_overrides})
    if source.equalize:
        data = _equalized(data)
    start = time.perf_counter()
    if ablation.tta_only:
        key = (ablation.tta_only, seed)
        if key not in trained:
            raise ValueError(f"ablation {ablation.name!r} re-evaluates {ablation.tta_only!r} seed {seed}: "
                             "run that variant first in the same call")
        model, train_seconds, best_epoch = trained[key]
    else:
        torch.manual_seed(seed)
        model = create_model(base.model, num_classes=len(data.class_names),
                             **{**base.model_kwargs, **ablation.model_kwargs})
        # the recipe's own preparation first (base is the recipe unchanged), then the variant's
        for name in combine_preparations(base.prepare, ablation.prepare):
            prepare_model(name, model, data.train.images)
        fitted = fit(model, data.train, data.val, config, class_names=data.class_names)
        model, train_seconds, best_epoch = fitted.model, time.perf_counter() - start, fitted.best_epoch
        trained[(ablation.name, seed)] = (model, train_seconds, best_epoch)
        start = time.perf_counter()
    metrics = _final_metrics(model, data, config, ablation.tta or config.tta, ablation.crop_size)
    return {"variant": ablation.name, "idea": ablation.idea, "seed": seed, "epochs": config.epochs,
            "best_epoch": best_epoch, **metrics,
            "wall_seconds": train_seconds + time.perf_counter() - start}


def ablation_table(runs: list[dict[str, Any]]):
    """Mean over seeds per variant (in ABLATIONS order) with the differences to base."""
    import pandas as pd

    frame = pd.DataFrame(runs)
    order = [a.name for a in ABLATIONS if a.name in set(frame["variant"])]
    grouped = frame.groupby("variant")
    table = pd.DataFrame({
        "variant": order,
        "seeds": [int(grouped.get_group(v)["seed"].nunique()) for v in order],
        "epochs": [int(grouped.get_group(v)["epochs"].max()) for v in order],
        "PublicTest": [grouped.get_group(v)["val_accuracy"].mean() for v in order],
        "PrivateTest": [grouped.get_group(v)["test_accuracy"].mean() for v in order],
        "wall_s": [grouped.get_group(v)["wall_seconds"].mean() for v in order],
    })
    if "base" in order:
        # differences over the seeds both variants ran, so a variant run on fewer seeds is
        # compared with base on the same seeds
        deltas = {"dPublic": [], "dPrivate": []}
        base_runs = grouped.get_group("base")
        for variant in order:
            mine = grouped.get_group(variant)
            shared = sorted(set(mine["seed"]) & set(base_runs["seed"]))
            mine, theirs = mine[mine["seed"].isin(shared)], base_runs[base_runs["seed"].isin(shared)]
            deltas["dPublic"].append(mine["val_accuracy"].mean() - theirs["val_accuracy"].mean())
            deltas["dPrivate"].append(mine["test_accuracy"].mean() - theirs["test_accuracy"].mean())
        table.insert(4, "dPublic", deltas["dPublic"])
        table.insert(6, "dPrivate", deltas["dPrivate"])
    table["idea"] = [get_ablation(v).idea for v in order]
    return table


def ablation_markdown(runs: list[dict[str, Any]], header: str) -> str:
    from fer_lib.evaluation import to_markdown

    return header + "\n\n" + to_markdown(ablation_table(runs), floatfmt=".2f") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer_lib ablate",
                                     description="Each idea alone on a recipe and a fixed budget.")
    parser.add_argument("--recipe", default="fast_cpu")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", default=None, help="variants to run (default: all)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--fraction", type=float, default=1.0, help="data fraction (smoke runs)")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--resume", action="store_true", help="skip runs already in <out>/ablation.json")
    args = parser.parse_args(argv)

    from fer_lib.data import load_fer2013
    from fer_lib.device import machine_description
    from fer_lib.fileio import atomic_write_text

    names = args.only or [a.name for a in ABLATIONS]
    chosen = [get_ablation(n) for n in names]
    for ablation in chosen:  # a TTA-only variant needs its trained variant in the same call
        if ablation.tta_only and ablation.tta_only not in names:
            parser.error(f"{ablation.name} re-evaluates {ablation.tta_only}: add it to --only")
    data = load_fer2013(args.data, fraction=args.fraction)
    out = Path(args.out) / f"{args.recipe}-{args.epochs}ep"
    record_path = out / "ablation.json"
    runs: list[dict[str, Any]] = []
    if args.resume and record_path.exists():
        runs = json.loads(record_path.read_text(encoding="utf-8"))["runs"]
    done = {(r["variant"], r["seed"]) for r in runs}
    extra = {"max_steps_per_epoch": args.max_steps_per_epoch} if args.max_steps_per_epoch else {}
    machine = machine_description()
    header = (f"Ablation of recipe {args.recipe} at {args.epochs} epochs (seeds per variant in the table); "
              f"machine: {machine}")
    trained: dict[tuple[str, int], Any] = {}

    def run(ablation: Ablation, seed: int) -> dict[str, Any]:
        print(f"ablation {ablation.name} seed {seed}: {ablation.idea}", flush=True)
        row = run_ablation(ablation, data, recipe=args.recipe, epochs=args.epochs, seed=seed,
                           trained=trained, **extra)
        print(f"ablation {ablation.name} seed {seed}: PublicTest {row['val_accuracy']:.2f} "
              f"PrivateTest {row['test_accuracy']:.2f} in {row['wall_seconds']:.0f} s", flush=True)
        return row

    for seed in args.seeds:
        for ablation in chosen:
            if (ablation.name, seed) in done:
                continue
            if ablation.tta_only and (ablation.tta_only, seed) not in trained:
                # the models it re-evaluates came from an earlier call and are gone: train again
                runs = [r for r in runs if (r["variant"], r["seed"]) != (ablation.tta_only, seed)]
                runs.append(run(get_ablation(ablation.tta_only), seed))
            runs.append(run(ablation, seed))
            atomic_write_text(record_path, json.dumps({"machine": machine, "recipe": args.recipe,
                                                       "epochs": args.epochs, "runs": runs}, indent=2))
            atomic_write_text(out / "ablation.md", ablation_markdown(runs, header))
    if not runs:
        print("nothing to run", flush=True)
        return 0
    print("\n" + ablation_markdown(runs, header), end="", flush=True)
    return 0 if all(math.isfinite(r["val_accuracy"]) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
