"""Throughput bench: seed-style PIL pipeline vs this engine vs the bare model step.

    python -m fer_lib.bench [--model exp3_cnn] [--seconds 20] [--batch-size 64] [--json]
    python -m fer_lib.bench --peak-models exp3_cnn fernet_small resnet18_48 [--peak-size 2048]
    python -m fer_lib.bench --compare-precision [--epochs 2] [--images 6000]
    python -m fer_lib.bench --inference --peak-models fernet_small fernet [--precision fp32]

Three ways to train the same model (same initial weights, Adam lr 1e-3, flip + rotation 10)
measured side by side in one process, in training images per second:

(a) seed   the notebooks' original pipeline: a Dataset applying torchvision PIL transforms
           per image (ToPILImage, RandomHorizontalFlip, RandomRotation(10), ToTensor,
           Normalize) in a DataLoader with 2 workers, fp32, loss.item() every step;
(b) engine fer_lib.training's own train step (`Engine.train_epoch`, what `fit` runs):
           device-resident uint8 split, batched per-sample augmentation, autocast and
           channels_last as `resolve_device` decides;
(c) bare   the model's forward + backward + optimizer step on one pre-made batch with the
           same precision settings as (b): the ceiling for (b).

Uses the real FER2013 training split when `fer_lib.data.load_fer2013` finds it, else
generated images. The last line printed is one JSON object (for scripts and the lead's
re-measurements on a quiet machine).

Fraction of peak (`--peak-models`, default exp3_cnn and the fast recipe's model): in the
same process the bench times a large square matmul in the training precision (fp32, or the
autocast dtype `resolve_device` picks: bf16 on CPUs where it trains faster, and on recent GPUs)
as the machine's practical peak, then each model's training images/s (engine and bare
paths). Achieved training FLOP/s = images/s x 3 x forward FLOPs of one 1x48x48 image
(`torch.utils.flop_counter.FlopCounterMode`; backward ~ 2x forward). The fraction
achieved / peak says how much of the hardware a model's training step uses.

Inference (`--inference`): `fer_lib.inference.predict_logits` (what evaluation, the
per-epoch probes, the distillation teachers and the photo predictor run) on the same images
with the model's weights in contiguous and in channels_last memory format, images/s per
model; predict_logits uses channels_last for conv nets.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["run_bench", "compare_precision", "seed_style_curve", "seed_style_train", "SeedStyleRun",
           "training_flops_per_image", "matmul_peak", "peak_fraction", "peak_table", "inference_throughput",
           "main"]


class _SeedStyleDataset(torch.utils.data.Dataset):
    """Per-image PIL transforms, as the reports' FERDataset + transforms.Compose did."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float, std: float):
        from torchvision import transforms as T

        self.images, self.labels = images, labels
        self.transform = T.Compose([
            T.ToPILImage(),
            T.RandomHorizontalFlip(),
            T.RandomRotation(10),
            T.ToTensor(),
            T.Normalize((mean,), (std,)),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), int(self.labels[index])


def _load_images(n_images: int | None, data: str, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    if data in ("auto", "fer2013"):
        try:
            from fer_lib.data import load_fer2013

            train = load_fer2013().train
            images, labels = np.asarray(train.images), np.asarray(train.labels)
            if n_images is not None:
                images, labels = images[:n_images], labels[:n_images]
            return images, labels, "fer2013"
        except Exception as err:  # no file, no fer_lib.data yet: fall back to generated images
            if data == "fer2013":
                raise
            print(f"(real data not used: {type(err).__name__}: {err}; using generated images)", file=sys.stderr)
    n = n_images or 4096
    try:
        from fer_lib.synthetic import make_images

        images, labels = make_images(n, seed=seed)
    except ImportError:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
        labels = rng.integers(0, 7, n)
    return images, labels, "synthetic"


class _Meter:
    """Images and seconds of one path, accumulated over interleaved rounds."""

    def __init__(self, step_fn, warmup_steps: int):
        self.step_fn, self.warmup_steps = step_fn, warmup_steps
        self.images, self.seconds = 0, 0.0

    def run(self, seconds: float) -> None:
        for _ in range(self.warmup_steps):  # first round only: allocator, worker start-up
            self.step_fn()
        self.warmup_steps = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.images += self.step_fn()
        self.seconds += time.perf_counter() - start

    @property
    def img_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


class _SeedStyleTrainer:
    """The reports' training step: a DataLoader over per-image PIL transforms, fp32, Adam.

    `step()` trains on the next batch and returns its size; loss, correct predictions and
    images accumulate in `loss_sum`, `correct` and `seen` (what the reports' loops printed).
    """

    def __init__(self, model, images, labels, batch_size, workers, mean, std, *, lr: float = 1e-3,
                 weight_decay: float = 0.0, device: str | torch.device = "cpu"):
        dataset = _SeedStyleDataset(images, labels, mean, std)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                             drop_last=True, persistent_workers=workers > 0)
        self.device = torch.device(device)
        self.model, self.loader = model.to(self.device), loader
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.criterion = nn.CrossEntropyLoss()
        self.batches = iter(loader)
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        model.train()

    def step(self) -> int:
        try:
            x, y = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            x, y = next(self.batches)
        if self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        self.optimizer.zero_grad()
        logits = self.model(x)
        loss = self.criterion(logits, y)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.item() * x.shape[0]  # as the seed notebooks did, every step
        self.correct += int((logits.argmax(1) == y).sum())
        self.seen += x.shape[0]
        return x.shape[0]

    def close(self) -> None:
        self.batches = None  # drops the iterator: the worker processes exit


@dataclass
class SeedStyleRun:
    """A model trained the reports' way (`seed_style_train`).

    model: the best-PublicTest-epoch weights, in eval mode, on the training device.
    history: one dict per epoch with fit's keys (epoch, train_loss, train_accuracy, val_loss,
    val_accuracy, lr, seconds, img_per_s). curve: (wall seconds since the start, val
    accuracy) per epoch.
    """

    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float
    wall_seconds: float
    curve: list[tuple[float, float]] = field(default_factory=list)


def seed_style_train(data, *, epochs: int | None = None, seconds: float | None = None, model: str = "exp3_cnn",
                     model_kwargs: dict[str, Any] | None = None, batch_size: int = 64, workers: int = 2,
                     lr: float = 1e-3, weight_decay: float = 0.0, plateau: tuple[float, int] | None = None,
                     max_steps_per_epoch: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
                     verbose: bool = False) -> SeedStyleRun:
    """Train `model` the reports' way for `epochs` epochs and/or about `seconds`; keep the best epoch.

    The reports' pipeline: PIL transforms per image (flip + rotation 10) in a DataLoader with
    `workers` processes, fp32 on `device` (the batches go there as the reports' notebooks
    sent them to their GPU), Adam(lr, weight_decay), loss.item() every step; PublicTest
    (data.val) after every epoch, counted in the wall time as `fit` counts its own.
    plateau: (factor, patience) of a ReduceLROnPlateau on the PublicTest loss, as the reports
    used; None: a constant learning rate. Training stops after `epochs` epochs or after the
    epoch that crosses `seconds`, whichever comes first (at least one must be given). The
    returned model holds the epoch with the best PublicTest accuracy; PrivateTest is not touched.
    """
    from fer_lib.augment import MEAN, STD
    from fer_lib.device import progress_mode
    from fer_lib.models import create_model
    from fer_lib.training import evaluate, summary_line

    if epochs is None and seconds is None:
        raise ValueError("seed_style_train needs epochs or seconds")
    steps_per_epoch = len(data.train.labels) // batch_size  # the DataLoader drops the last partial batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data.train.labels)} training images make no full batch of {batch_size}")
    if max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    torch.manual_seed(seed)
    net = create_model(model, num_classes=len(data.class_names), **(model_kwargs or {}))
    trainer = _SeedStyleTrainer(net, np.asarray(data.train.images), np.asarray(data.train.labels),
                                batch_size, workers, MEAN, STD, lr=lr, weight_decay=weight_decay, device=device)
    scheduler = None
    if plateau is not None:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(trainer.optimizer, mode="min", factor=plateau[0],
                                                               patience=plateau[1])
    plain = verbose and progress_mode(True) != "off"
    if plain:
        print(f"training the reports' way: {trainer.device} fp32, PIL transforms, DataLoader workers={workers}: "
              f"{len(data.train.labels):,} images, {steps_per_epoch} steps/epoch", flush=True)
    history: list[dict[str, float]] = []
    curve: list[tuple[float, float]] = []
    best_epoch, best_acc, best_state = 0, -1.0, None
    start = time.perf_counter()
    try:
        epoch = 0
        while (epochs is None or epoch < epochs) and (seconds is None or time.perf_counter() - start < seconds):
            epoch += 1
            epoch_start = time.perf_counter()
            lr_now = float(trainer.optimizer.param_groups[0]["lr"])
            trainer.loss_sum, trainer.correct, trainer.seen = 0.0, 0, 0
            net.train()
            for _ in range(steps_per_epoch):
                trainer.step()
            train_seconds = time.perf_counter() - epoch_start
            val = evaluate(net, data.val, batch_size=256)
            if scheduler is not None:
                scheduler.step(float(val["loss"]))
            accuracy = float(val["accuracy"])
            if accuracy > best_acc:
                best_epoch, best_acc = epoch, accuracy
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            now = time.perf_counter()
            row = {"epoch": epoch, "train_loss": trainer.loss_sum / max(trainer.seen, 1),
                   "train_accuracy": trainer.correct / max(trainer.seen, 1), "val_loss": float(val["loss"]),
                   "val_accuracy": accuracy, "lr": lr_now, "seconds": now - epoch_start,
                   "img_per_s": trainer.seen / max(train_seconds, 1e-9)}
            history.append(row)
            curve.append((now - start, accuracy))
            if plain:
                print(summary_line(row, epochs or epoch), flush=True)
    finally:
        trainer.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return SeedStyleRun(net, history, best_epoch, best_acc, time.perf_counter() - start, curve)


def seed_style_curve(data, *, seconds: float, model: str = "exp3_cnn", batch_size: int = 64,
                     workers: int = 2, lr: float = 1e-3, max_steps_per_epoch: int | None = None,
                     seed: int = 0) -> list[tuple[float, float]]:
    """Train `model` the reports' way for about `seconds`; return (wall seconds, val accuracy).

    `seed_style_train` with a time budget (constant lr, the model's default kwargs). The
    epoch that crosses `seconds` is finished, so the curve ends just past the budget.
    """
    return seed_style_train(data, seconds=seconds, model=model, batch_size=batch_size, workers=workers, lr=lr,
                            max_steps_per_epoch=max_steps_per_epoch, seed=seed).curve


def _device_engine(model, config, images, labels, steps_per_epoch: int):
    """(engine, setup, images, labels): fit's Engine on the config's device, the data there."""
    from fer_lib.device import resolve_device
    from fer_lib.training import Engine

    setup = resolve_device(config.device, config.precision, config.channels_last, compile=config.compile, model=model)
    engine = Engine(model, config, setup, steps_per_epoch)
    x = torch.as_tensor(np.asarray(images)).to(setup.device)
    y = torch.as_tensor(np.asarray(labels)).long().to(setup.device)
    return engine, setup, x, y


def _engine_step(model, images, labels, batch_size, config_kwargs, chunk: int = 8):
    from fer_lib.training import TrainConfig, steps_per_epoch

    config = TrainConfig(batch_size=batch_size, lr=1e-3, optimizer="adam", augment="exp3", progress=False,
                         **config_kwargs)
    engine, setup, x, y = _device_engine(model, config, images, labels, steps_per_epoch(len(labels), batch_size))
    generator = torch.Generator().manual_seed(0)
    order_gen = torch.Generator().manual_seed(0)
    # chunk: steps per call (default 8); the per-call sync is what fit pays once per epoch
    state = {"order": torch.randperm(len(y), generator=order_gen).to(setup.device), "pos": 0}

    def step() -> int:
        need = chunk * batch_size
        if state["pos"] + need > len(y):
            state["order"] = torch.randperm(len(y), generator=order_gen).to(setup.device)
            state["pos"] = 0
        order = state["order"][state["pos"]:state["pos"] + need]
        state["pos"] += need
        return engine.train_epoch(0, x, y, None, order, generator, max_steps=chunk)["images"]

    return step, setup


def _bare_step(model, batch_size, setup, config_kwargs):
    from fer_lib.augment import to_float
    from fer_lib.training import TrainConfig, make_optimizer

    config = TrainConfig(batch_size=batch_size, lr=1e-3, optimizer="adam", **config_kwargs)
    model = model.to(setup.device, memory_format=setup.memory_format()).train()
    optimizer = make_optimizer(model, config, setup.device)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    x = to_float(torch.randint(0, 256, (batch_size, 48, 48), dtype=torch.uint8, generator=generator))
    x = x.to(setup.device).contiguous(memory_format=setup.memory_format())
    y = torch.randint(0, 7, (batch_size,), generator=generator).to(setup.device)

    def step() -> int:
        with setup.autocast():
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if setup.device.type == "cuda":
            torch.cuda.synchronize()  # count finished work, not queued work
        return batch_size

    return step


def run_bench(model: str = "exp3_cnn", *, seconds: float = 20.0, batch_size: int = 64, workers: int = 2,
              n_images: int | None = None, data: str = "auto", device: str = "auto", precision: str = "auto",
              channels_last: str | bool = "auto", warmup_steps: int = 5, rounds: int = 3, seed: int = 0,
              verbose: bool = True) -> dict[str, Any]:
    """Measure (a) seed-style, (b) engine, (c) bare img/s; returns the JSON-able result dict."""
    from fer_lib.augment import MEAN, STD
    from fer_lib.models import create_model

    images, labels, source = _load_images(n_images, data, seed)
    torch.manual_seed(seed)
    base = create_model(model)
    params = sum(p.numel() for p in base.parameters())
    config_kwargs = {"device": device, "precision": precision, "channels_last": channels_last}

    def say(line: str) -> None:
        if verbose:
            print(line, flush=True)

    say(f"bench: model {model} ({params:,} params), batch {batch_size}, {len(labels):,} {source} images, "
        f"{seconds:g}s per path in {rounds} interleaved rounds, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    engine_fn, setup = _engine_step(copy.deepcopy(base), images, labels, batch_size, config_kwargs)
    bare_fn = _bare_step(copy.deepcopy(base), batch_size, setup, config_kwargs)
    seed_trainer = _SeedStyleTrainer(copy.deepcopy(base), images, labels, batch_size, workers, MEAN, STD)
    meters = {"seed": _Meter(seed_trainer.step, warmup_steps), "engine": _Meter(engine_fn, max(1, warmup_steps // 8)),
              "bare": _Meter(bare_fn, warmup_steps)}
    # Interleaving the paths in rounds spreads slow drifts of a shared machine over all three.
    try:
        for _ in range(rounds):
            for meter in meters.values():
                meter.run(seconds / rounds)
    finally:
        seed_trainer.close()
    seed_ips, engine_ips, bare_ips = (meters[k].img_per_s for k in ("seed", "engine", "bare"))
    say(f"(a) seed-style {seed_ips:9,.0f} img/s  [cpu fp32, PIL transforms, DataLoader workers={workers}]")
    say(f"(b) engine     {engine_ips:9,.0f} img/s  [{setup.describe()}, batched flip+rotation]")
    say(f"(c) bare step  {bare_ips:9,.0f} img/s  [{setup.describe()}, pre-made batch]")
    result = {
        "seed_style_img_s": round(seed_ips, 1),
        "engine_img_s": round(engine_ips, 1),
        "bare_img_s": round(bare_ips, 1),
        "engine_vs_seed": round(engine_ips / seed_ips, 3),
        "engine_vs_bare": round(engine_ips / bare_ips, 3),
        "device": str(setup.device),
        "precision": setup.precision,
        "channels_last": setup.channels_last,
        "model": model,
        "params": params,
        "batch_size": batch_size,
        "augment": "exp3 (flip + rotation 10)",
        "data": source,
        "workers": workers,
        "seconds_per_path": seconds,
        "rounds": rounds,
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    say(f"engine / seed-style = {result['engine_vs_seed']:.2f}x   engine / bare = {result['engine_vs_bare']:.2f}x")
    return result


def training_flops_per_image(model: nn.Module, input_size: int = 48, in_chans: int = 1) -> int:
    """3 x forward FLOPs: the backward pass costs about twice the forward (gradients with
    respect to inputs and to weights). A slight over-count: the first layer needs no input
    gradient."""
    from fer_lib.model_table import forward_flops

    return 3 * forward_flops(model, input_size, in_chans)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: str | torch.device = "auto", precision: str = "auto", *, size: int | None = None,
                repeats: int = 10, warmup: int = 3) -> dict[str, Any]:
    """The machine's practical peak: best-of-`repeats` time of a size x size matmul.

    Precision as `resolve_device` decides for training (fp32, or its autocast dtype), so the
    fraction of peak compares like with like. size default: 8192 on CUDA (enough work to fill
    an H100/H200), 2048 on CPU (~17 GFLOP, a fraction of a second on a few cores). `warmup`
    untimed products first (thread pools, clocks, kernel selection); the best time, not the
    mean, because a shared machine only ever slows a product down.
    """
    from fer_lib.device import resolve_device

    setup = resolve_device(device, precision, channels_last=False)
    dtype = setup.amp_dtype or torch.float32
    size = size or (8192 if setup.device.type == "cuda" else 2048)
    if size < 1 or repeats < 1:
        raise ValueError(f"matmul_peak needs size >= 1 and repeats >= 1, got {size}, {repeats}")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(setup.device, dtype)
    b = torch.randn(size, size, generator=generator).to(setup.device, dtype)
    out = torch.empty(size, size, device=setup.device, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    _sync(setup.device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(setup.device)
        best = min(best, time.perf_counter() - start)
    return {"device": str(setup.device), "precision": setup.precision, "size": size, "repeats": repeats,
            "best_seconds": best, "gflops": 2 * size ** 3 / best / 1e9, "threads": torch.get_num_threads()}


def peak_fraction(models: list[str], *, seconds: float = 10.0, batch_size: int = 64, n_images: int | None = None,
                  device: str = "auto", precision: str = "auto", rounds: int = 2, peak: dict[str, Any] | None = None,
                  peak_size: int | None = None, measured: dict[str, dict[str, float]] | None = None,
                  deadline: float | None = None, warmup_steps: int = 3, engine_chunk: int = 8, seed: int = 0,
                  verbose: bool = True) -> dict[str, Any]:
    """Each model's achieved training FLOP/s as a fraction of the machine's matmul peak.

    models: registered names; each is trained by the engine path (fit's own step, with the
    exp3 augmentation) and the bare path (forward + backward + step on one batch) for
    `seconds` each, interleaved over `rounds`. Generated images: throughput does not depend
    on pixel values. measured: {model: {"engine_img_s": .., "bare_img_s": ..}} already
    measured in this process (run_bench's), reused instead of timed again. peak: a
    `matmul_peak` result to reuse. deadline: time.perf_counter() value after which the
    remaining models are skipped with a note (gpu-run's time budget). warmup_steps: untimed
    bare steps first (the engine gets one untimed call unless it is 0). engine_chunk: engine
    steps per timed call (1 for smoke runs of big models).
    Returns {"peak": ..., "rows": [one dict per model], "skipped": [notes]}.
    """
    from fer_lib.models import create_model

    if peak is None:
        peak = matmul_peak(device, precision, size=peak_size)
    if verbose:
        print(f"peak: {peak['size']}x{peak['size']} matmul in {peak['precision']} on {peak['device']}: "
              f"{peak['gflops']:,.1f} GFLOP/s (best of {peak['repeats']})", flush=True)
    config_kwargs = {"device": device, "precision": precision, "channels_last": "auto"}
    rows, skipped = [], []
    for name in models:
        if deadline is not None and time.perf_counter() + 2 * seconds > deadline:
            skipped.append(f"{name}: not measured, the time budget ran out")
            continue
        torch.manual_seed(seed)
        base = create_model(name)
        flops = training_flops_per_image(base)
        speeds = dict((measured or {}).get(name, {}))
        if not speeds:
            images, labels = _load_images(max(batch_size * 16, 256), "synthetic", seed)[:2]
            engine_fn, setup = _engine_step(copy.deepcopy(base), images, labels, batch_size, config_kwargs,
                                            chunk=engine_chunk)
            bare_fn = _bare_step(copy.deepcopy(base), batch_size, setup, config_kwargs)
            meters = {"engine": _Meter(engine_fn, min(warmup_steps, 1)), "bare": _Meter(bare_fn, warmup_steps)}
            for _ in range(rounds):
                for meter in meters.values():
                    meter.run(seconds / rounds)
            speeds = {f"{k}_img_s": m.img_per_s for k, m in meters.items()}
        row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in base.parameters()),
                               "train_mflop_per_image": round(flops / 1e6, 3)}
        for path in ("engine", "bare"):
            img_s = float(speeds[f"{path}_img_s"])
            achieved = img_s * flops / 1e9
            row[f"{path}_img_s"] = round(img_s, 1)
            row[f"{path}_gflops"] = round(achieved, 3)
            row[f"{path}_fraction"] = round(achieved / peak["gflops"], 5)
        rows.append(row)
    result = {"peak": peak, "rows": rows, "skipped": skipped, "batch_size": batch_size}
    if verbose:
        print(peak_table(result), flush=True)
        for note in skipped:
            print(f"skipped {note}", flush=True)
    return result


def peak_table(result: dict[str, Any]) -> str:
    """`peak_fraction`'s result as markdown: model, path, img/s, achieved GFLOP/s, peak, fraction."""
    header = ("| model | path | img/s | train MFLOP/img | achieved GFLOP/s | peak GFLOP/s | fraction of peak |\n"
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    peak = result["peak"]["gflops"]
    lines = [header]
    for row in result["rows"]:
        for path in ("engine", "bare"):
            lines.append(f"| {row['model']} | {path} | {row[f'{path}_img_s']:,.0f} | "
                         f"{row['train_mflop_per_image']:,.1f} | {row[f'{path}_gflops']:,.1f} | {peak:,.1f} | "
                         f"{100 * row[f'{path}_fraction']:.2f}% |")
    return "\n".join(lines)


def inference_throughput(models: list[str], *, n_images: int = 2048, batch_size: int = 512,
                         device: str = "auto", precision: str = "auto", rounds: int = 3, seed: int = 0,
                         verbose: bool = True) -> dict[str, Any]:
    """predict_logits' images/s per model with its weights contiguous vs channels_last.

    Generated faces, tta "none", interleaved rounds (best round per path). Each row also holds
    the largest logit difference between the two paths and whether their predicted classes
    agree (same weights: only the kernels differ).
    """
    from fer_lib.device import resolve_device
    from fer_lib.inference import predict_logits
    from fer_lib.models import create_model
    from fer_lib.synthetic import make_images

    images = torch.from_numpy(make_images(n_images, seed=seed)[0])
    rows = []
    for name in models:
        torch.manual_seed(seed)
        net = create_model(name).eval()
        setups = {fmt: resolve_device(device, precision, channels_last=fmt == "channels_last", model=net)
                  for fmt in ("contiguous", "channels_last")}
        best: dict[str, float] = {}
        logits = {}
        for _ in range(rounds):
            for fmt, setup in setups.items():
                net.to(setup.device, memory_format=setup.memory_format())
                predict_logits(net, images[:batch_size], batch_size=batch_size, setup=setup)  # warm-up
                start = time.perf_counter()
                logits[fmt] = predict_logits(net, images, batch_size=batch_size, setup=setup)
                best[fmt] = max(best.get(fmt, 0.0), n_images / (time.perf_counter() - start))
        row = {"model": name, "precision": setups["contiguous"].precision,
               **{f"{fmt}_img_s": round(value, 1) for fmt, value in best.items()},
               "speedup": round(best["channels_last"] / best["contiguous"], 2),
               "max_logit_diff": float((logits["contiguous"] - logits["channels_last"]).abs().max()),
               "same_predictions": bool((logits["contiguous"].argmax(1) == logits["channels_last"].argmax(1))
                                        .float().mean() >= 0.99)}
        rows.append(row)
        if verbose:
            print(f"{name} ({row['precision']}): contiguous {row['contiguous_img_s']:,.0f} img/s, channels_last "
                  f"{row['channels_last_img_s']:,.0f} img/s ({row['speedup']:.2f}x)", flush=True)
    return {"inference": rows, "images": n_images, "batch_size": batch_size, "torch": str(torch.__version__)}


def compare_precision(model: str = "exp3_cnn", *, precisions: tuple[str, ...] = ("fp32", "bf16"),
                      epochs: int = 2, n_images: int | None = 6000, batch_size: int = 64,
                      data_path: str | None = None, device: str = "auto", seed: int = 0,
                      max_steps_per_epoch: int | None = None, verbose: bool = True) -> dict[str, Any]:
    """Does bf16 cost accuracy? The same short run (same seed, weights, data order) per precision.

    Trains `model` the experiment-3 way (Adam lr 1e-3, flip + rotation 10) on a seeded
    stratified `n_images` share of Training and reports PublicTest accuracy per precision;
    PrivateTest is not touched. Returns {"runs": [...], "accuracy_delta": bf16 - fp32, ...}.
    """
    from fer_lib.data import load_fer2013, stratified_subsample
    from fer_lib.training import TrainConfig, fit

    data = load_fer2013(data_path)
    train = data.train
    if n_images is not None and n_images < len(train):
        train = train.subset(stratified_subsample(train.labels, n_images / len(train), seed=seed))
    runs = []
    for precision in precisions:
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, augment="exp3", seed=seed,
                             device=device, precision=precision, max_steps_per_epoch=max_steps_per_epoch,
                             progress="plain" if verbose else False, checkpoint_every_epoch=False)
        start = time.perf_counter()
        result = fit(model, train, data.val, config)
        last = result.history[-1]
        runs.append({"precision": result.setup.precision, "val_accuracy": round(100 * result.best_val_accuracy, 2),
                     "last_train_loss": round(last["train_loss"], 4),
                     "train_img_s": round(float(np.mean([h["img_per_s"] for h in result.history])), 1),
                     "seconds": round(time.perf_counter() - start, 1)})
        if verbose:
            print(f"{precision:>5}: PublicTest {runs[-1]['val_accuracy']:.2f}%  last train loss "
                  f"{runs[-1]['last_train_loss']:.4f}  {runs[-1]['train_img_s']:,.0f} img/s  "
                  f"{runs[-1]['seconds']:.0f} s", flush=True)
    out = {"model": model, "epochs": epochs, "train_images": len(train), "device": str(result.setup.device),
           "torch": str(torch.__version__), "runs": runs}
    by = {r["precision"]: r for r in runs}
    if "fp32" in by and "bf16" in by:
        out["accuracy_delta"] = round(by["bf16"]["val_accuracy"] - by["fp32"]["val_accuracy"], 2)
        out["speed_ratio"] = round(by["bf16"]["train_img_s"] / by["fp32"]["train_img_s"], 3)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m fer_lib.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="exp3_cnn", help="registered model name (default exp3_cnn)")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per path (default 20; --quick 0.5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the seed-style path")
    parser.add_argument("--images", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--data", choices=("auto", "fer2013", "synthetic"), default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.5 s per path on 256 generated images")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--compare-precision", action="store_true",
                        help="instead: train a short run in fp32 and in bf16, print PublicTest accuracy")
    parser.add_argument("--epochs", type=int, default=2, help="--compare-precision: epochs per run")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="--compare-precision: smoke runs")
    parser.add_argument("--peak-models", nargs="+", default=None, metavar="MODEL",
                        help="models whose training FLOP/s is compared with the matmul peak "
                             "(default: --model and the fast_cpu recipe's model)")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="side of the peak matmul (default 2048 on CPU, 8192 on CUDA; --quick 256)")
    parser.add_argument("--no-peak", action="store_true", help="skip the matmul peak and the fraction table")
    parser.add_argument("--inference", action="store_true",
                        help="instead: predict_logits images/s with contiguous vs channels_last weights "
                             "for --peak-models (default --model and the fast_cpu recipe's model)")
    args = parser.parse_args(argv)
    if args.inference:
        from fer_lib.recipes import get_recipe

        models = list(dict.fromkeys(args.peak_models or [args.model, get_recipe("fast_cpu").model]))
        result = inference_throughput(models, n_images=args.images or (256 if args.quick else 2048),
                                      batch_size=64 if args.quick else 512, device=args.device,
                                      precision=args.precision, rounds=1 if args.quick else args.rounds,
                                      verbose=not args.json)
        print(json.dumps(result), flush=True)
        return result
    if args.compare_precision:
        result = compare_precision(args.model, epochs=args.epochs, batch_size=args.batch_size,
                                   n_images=args.images if args.images is not None else 6000,
                                   device=args.device,
                                   max_steps_per_epoch=args.max_steps_per_epoch, verbose=not args.json)
        print(json.dumps(result), flush=True)
        return result
    seconds, images, data, warmup, rounds = args.seconds or 20.0, args.images, args.data, 5, args.rounds
    if args.quick:
        seconds, images, data, warmup, rounds = args.seconds or 0.5, images or 256, "synthetic", 1, 1
    result = run_bench(args.model, seconds=seconds, batch_size=args.batch_size, workers=args.workers,
                       n_images=images, data=data, device=args.device, precision=args.precision,
                       warmup_steps=warmup, rounds=rounds, verbose=not args.json)
    if not args.no_peak:
        from fer_lib.recipes import get_recipe

        models = list(dict.fromkeys(args.peak_models or [args.model, get_recipe("fast_cpu").model]))
        # --model was just timed with the same batch size, device and precision: reuse it
        measured = {args.model: {k: result[k] for k in ("engine_img_s", "bare_img_s")}}
        peak_size = args.peak_size or (256 if args.quick else None)
        fraction = peak_fraction(models, seconds=seconds, batch_size=args.batch_size, device=args.device,
                                 precision=args.precision, rounds=rounds, peak_size=peak_size,
                                 measured=measured, verbose=not args.json)
        result["peak"] = fraction["peak"]
        result["flops"] = fraction["rows"]
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()


def training_estimate(model, train, config, *, epochs: float, seconds: float = 2.0,
                      max_steps: int = 64, verbose: bool = True) -> dict[str, Any]:
    """Measure a few training steps of `model` with `config` and project the notebook's time.

    epochs: the training work the notebook plans, in epochs over `train` (sweep trials
    included). Steps run for about `seconds` (at least 3, at most `max_steps`) after one
    warm-up step. Prints one line with the device, precision, measured images/s and the
    expected minutes, so nobody starts a ten-hour CPU run without knowing. The model is
    copied; the caller's weights are untouched. Evaluation passes are not counted.
    """
    from dataclasses import replace

    from fer_lib.device import machine_description

    config = replace(config, progress=False, checkpoint_every_epoch=False)
    batch = config.batch_size
    n = min(len(train.labels), batch * 8)
    # A throwaway engine on a copy of the model whose schedule is long enough for the timed
    # steps (a one-cycle schedule sized for a tiny training set would run out after a step or two).
    engine, setup, x, y = _device_engine(copy.deepcopy(model), config, train.images[:n], train.labels[:n],
                                         max(len(train.labels) // batch, max_steps + 4))
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.arange(n, device=setup.device)
    engine.train_epoch(0, x, y, None, order, generator, max_steps=1)  # warm-up step
    images = steps = 0
    elapsed = 0.0
    while steps < max_steps and (steps < 3 or elapsed < seconds):
        stats = engine.train_epoch(0, x, y, None, order, generator, max_steps=2)
        images, elapsed = images + stats["images"], elapsed + stats["seconds"]
        steps += 2
    img_per_s = images / max(elapsed, 1e-9)
    per_epoch = len(train.labels)
    if config.max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, config.max_steps_per_epoch * batch)
    total = epochs * per_epoch / img_per_s
    result = {"device": str(setup.device), "precision": setup.precision, "img_per_s": img_per_s,
              "epochs": epochs, "images": int(epochs * per_epoch), "seconds": total,
              "machine": machine_description()}
    if verbose:
        print(f"device {setup.describe()} on {result['machine']}: {img_per_s:,.0f} training images/s "
              f"(measured over {images:,} images) -> {epochs:g} epochs x {per_epoch:,} images "
              f"~ {total / 60:.1f} min of training, plus evaluation", flush=True)
    return result
