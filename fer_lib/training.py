"""The training engine: fit / evaluate / overfit_check.

Hot path (why it is fast on a 2-core CPU): the whole split lives on the training device as
one uint8 tensor (28,709 x 48 x 48 = 66 MB); each epoch draws a seeded permutation, slices
batches with index_select, converts them with one multiply-add (`augment.to_float`),
augments the whole batch at once with per-sample parameters (`fer_lib.augment`), switches
to channels_last and runs under the autocast dtype chosen by `resolve_device`. No
DataLoader, no PIL, no worker processes. Loss and correct counts accumulate on the device;
on CUDA the host reads them only every 50 steps (NaN check, progress) and at the epoch end.

Reproducibility and resume: the batch order and the augmentation of epoch e come from
generators seeded with (config.seed, e), so they need no saved state; the global torch RNG
(dropout) is seeded once at the start and its state is saved in every "last" checkpoint with
the model, optimizer, scheduler, grad scaler, EMA and early-stopping state. A run
interrupted after epoch k and resumed therefore reproduces the uninterrupted run exactly on
CPU (same thread count).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # POSIX: run-folder locks
    import fcntl
except ImportError:  # Windows
    fcntl = None

from fer_lib.augment import build_augment, generator_device, to_float
from fer_lib.balance import class_weights, upsample_to_max
from fer_lib.checkpoint import load_checkpoint, load_checkpoint_into, save_checkpoint, to_plain
from fer_lib.data import CLASS_NAMES
from fer_lib.device import DeviceSetup, EpochProgress, keep_freed_cpu_memory, progress_mode, resolve_device
from fer_lib.distill import check_soft_targets, distillation_loss, temper
from fer_lib.inference import predict_logits

__all__ = [
    "TrainConfig",
    "FitResult",
    "NonFiniteLossError",
    "RunFolderBusyError",
    "ResumeError",
    "Engine",
    "fit",
    "evaluate",
    "overfit_check",
    "steps_per_epoch",
    "summary_line",
    "make_optimizer",
]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (the message names epoch and step)."""


class RunFolderBusyError(RuntimeError):
    """Another training owns this run folder (the message names the folder and its process)."""


class ResumeError(ValueError):
    """A checkpoint cannot continue this run (the message names the file and what differs)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run; `to_dict()` is what checkpoints and trackers store."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" | "adamw" | "sgd" | "muon" (fer_lib.optim: conv weights
    # orthogonalised at muon_lr, everything else Nesterov-or-not SGD at lr, both under one schedule)
    muon_lr: float = 0.03
    # "fp32" | "auto": Muon's Newton-Schulz iterations in bf16 when training autocasts to bf16
    # (matrix units: 1.3x faster for fernet's conv weights on a 2-core AMX CPU, 6% of its
    # step; docs/speed.md), else in fp32
    muon_precision: str = "fp32"
    # decoupled weight decay of Muon's conv weights (p *= 1 - lr * wd each step); None: weight_decay.
    # At muon_lr 0.03 the recipes' 5e-4 shrinks them ~17x less per step than Nesterov SGD's
    # coupled 5e-4 at lr 0.05 shrinks its weights (lr * wd / (1 - momentum))
    muon_weight_decay: float | None = None
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 0.0
    scheduler: str = "none"  # "none" | "plateau" | "onecycle" | "cosine"
    plateau_factor: float = 0.1
    plateau_patience: int = 5
    plateau_metric: str = "val_loss"  # "val_loss" (min) or "val_accuracy" (max)
    warmup_epochs: float = 0.0  # cosine: linear warmup length
    pct_start: float = 0.3  # onecycle
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global grad norm
    early_stopping_patience: int | None = None  # epochs without a better val accuracy
    ema_decay: float | None = None  # e.g. 0.999; evaluate and checkpoint the EMA weights
    class_weights: bool = False  # weight the loss by inverse class frequency
    weighted_sampling: bool = False  # draw batches with inverse-frequency probabilities
    # fer_lib.balance.upsample_to_max; the copies' needs_augmentation flags go to the augment,
    # so add {"name": "FlaggedBrightness"} to `augment` to jitter the copies as the reports did
    upsample: bool = False
    augment: Any = "none"  # preset name or spec for fer_lib.augment.build_augment
    # progressive resizing: epochs 1..augment_early_epochs use augment_early instead (e.g. a
    # 40x40 random crop: the net trains on smaller maps early, fernet's global pool takes any size)
    augment_early: Any = None
    augment_early_epochs: int = 0
    # airbench's alternating flip: each training image gets a fixed random bit (from seed) and
    # is mirrored in the epochs where epoch parity matches it, so every image is seen both
    # ways in every two epochs (leave RandomHorizontalFlip out of `augment` with this)
    alternating_flip: bool = False
    mixup_alpha: float = 0.0  # > 0: mix batches with lambda ~ Beta(alpha, alpha)
    # knowledge distillation (fer_lib.distill): fit(soft_targets=...) gives each training image
    # the teachers' probabilities; loss = (1 - w) * CE + w * T^2 * KL(targets_T || student_T)
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    device: str = "auto"
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16"
    channels_last: Any = "auto"
    compile: bool = False  # torch.compile (CUDA only)
    seed: int = 0
    eval_batch_size: int = 512
    max_steps_per_epoch: int | None = None  # smoke runs
    tta: str = "none"  # "none" | "flip": final evaluation of the best model
    # the final evaluation's precision: "fp32" (exact; what shipped weights give anywhere) or
    # "auto" (the training precision, e.g. bf16 on an AMX CPU: 2.4x faster, ~10 s of a 2-minute
    # fast_cpu run; the accuracy moved by at most 0.14 points over 6 measured evaluations)
    eval_precision: str = "fp32"
    progress: Any = True  # True (auto) | "plain" | "bar" | False
    checkpoint_every_epoch: bool = True

    def __post_init__(self) -> None:
        choices = {
            "optimizer": ("adam", "adamw", "sgd", "muon"),
            "muon_precision": ("fp32", "auto"),
            "scheduler": ("none", "plateau", "onecycle", "cosine"),
            "plateau_metric": ("val_loss", "val_accuracy"),
            "tta": ("none", "flip"),
            "eval_precision": ("fp32", "auto"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"TrainConfig needs epochs >= 1 and batch_size >= 1, got {self.epochs}, {self.batch_size}")
        if self.muon_weight_decay is not None and self.muon_weight_decay < 0:
            raise ValueError(f"TrainConfig.muon_weight_decay must be >= 0 or None, got {self.muon_weight_decay}")
        if self.mixup_alpha < 0 or self.augment_early_epochs < 0:
            raise ValueError("TrainConfig.mixup_alpha and augment_early_epochs must be >= 0, got "
                             f"{self.mixup_alpha}, {self.augment_early_epochs}")
        if not 0 <= self.distill_weight <= 1 or self.distill_temperature <= 0:
            raise ValueError("TrainConfig needs 0 <= distill_weight <= 1 and distill_temperature > 0, got "
                             f"{self.distill_weight}, {self.distill_temperature}")
        if self.augment_early_epochs and self.augment_early is None:
            raise ValueError("TrainConfig.augment_early_epochs needs augment_early (the early epochs' augment)")

    @property
    def final_eval_precision(self) -> str:
        """The `precision` argument of the final evaluation (fer_lib.training.evaluate)."""
        return self.precision if self.eval_precision == "auto" else "fp32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("augment", "augment_early"):
            if isinstance(getattr(self, key), nn.Module):
                d[key] = repr(getattr(self, key))
        return to_plain(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"TrainConfig.from_dict ignores unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    model: nn.Module
    wall_seconds: float  # this call
    stopped_early: bool = False
    setup: DeviceSetup | None = None
    resumed_seconds: float = 0.0  # wall seconds of the earlier calls a resume continued (not in wall_seconds)


# --------------------------------------------------------------------------------------
# data helpers


def _arrays(split, what: str) -> tuple[Tensor, Tensor | None]:
    """(images uint8 (N,H,W) tensor, labels int64 tensor or None) from a Split / tuple / array."""
    if isinstance(split, (tuple, list)) and len(split) == 2:
        images, labels = split
    elif hasattr(split, "images"):
        images = split.images
        try:
            labels = split.labels
        except Exception:  # e.g. fer_lib.data.DatasetError for an unlabelled test split
            labels = None
    else:
        images, labels = split, None
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if images.dtype != torch.uint8:
        raise TypeError(f"{what}: images must be uint8, got {images.dtype}")
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() != 3:
        raise ValueError(f"{what}: images must be (N,H,W) or (N,1,H,W), got shape {tuple(images.shape)}")
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels).long()
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{what}: {labels.shape[0] if labels.dim() else 0} labels for {images.shape[0]} images")
    return images, labels


def steps_per_epoch(n: int, batch_size: int, max_steps: int | None = None) -> int:
    """Batches per epoch over n samples: the one rule fit, the engine and the bench share.

    A final batch of a single sample is dropped (BatchNorm cannot normalise one sample in
    train mode); `max_steps` caps it for smoke runs.
    """
    steps = math.ceil(n / batch_size)
    if steps > 1 and n % batch_size == 1:
        steps -= 1
    return min(steps, max_steps) if max_steps else steps


@dataclass
class _TrainData:
    """The splits as device tensors, balanced as the config asks (what the epoch loop reads)."""

    images: Tensor
    labels: Tensor
    flags: Tensor | None  # upsampled copies (for the augment's FlaggedBrightness)
    sample_weight: Tensor | None  # weighted sampling: drawing probability of each sample
    class_weight: Tensor | None  # weighted loss
    val_images: Tensor | None
    val_labels: Tensor | None
    class_names: tuple[str, ...]
    soft_targets: Tensor | None = None  # distillation: (N, C) probabilities per training image


def _prepare_data(train: Any, val: Any, config: TrainConfig, class_names: Sequence[str] | None,
                  device: torch.device, soft_targets: Any = None) -> _TrainData:
    train_x, train_y = _arrays(train, "train")
    if train_y is None:
        raise ValueError("train split has no labels")
    val_x = val_y = None
    if val is not None:
        val_x, val_y = _arrays(val, "val")
        if val_y is None:
            raise ValueError("val split has no labels")
    names = tuple(class_names if class_names is not None else getattr(train, "class_names", CLASS_NAMES))
    num_classes = max(int(train_y.max()) + 1, len(names))
    flags = sample_weight = class_weight = soft = None
    if config.distill_weight > 0 and soft_targets is None:
        raise ValueError(f"TrainConfig.distill_weight={config.distill_weight} needs fit(soft_targets=...) "
                         "(fer_lib.distill.teacher_probs on the training images)")
    if soft_targets is not None:
        if config.upsample:
            raise ValueError("soft targets follow the training rows; upsample copies rows, so use one or the other")
        soft = check_soft_targets(soft_targets, train_y.numel(), num_classes).to(device)
        if config.distill_weight == 0:  # checked, then dropped: the loss would weigh them by 0
            warnings.warn("soft targets given with TrainConfig.distill_weight=0: they are not used", stacklevel=3)
            soft = None
    if config.upsample:
        up_x, up_y, up_flags = upsample_to_max(train_x.numpy(), train_y.numpy(), config.seed)
        train_x, train_y = torch.as_tensor(up_x), torch.as_tensor(up_y).long()
        flags = torch.as_tensor(up_flags).bool().to(device)
    if config.class_weights:
        class_weight = class_weights(train_y.numpy(), num_classes=num_classes)
    if config.weighted_sampling:
        counts = torch.bincount(train_y, minlength=num_classes).double()
        sample_weight = (1.0 / counts.clamp(min=1))[train_y]
    return _TrainData(train_x.to(device), train_y.to(device), flags, sample_weight, class_weight,
                      val_x.to(device) if val_x is not None else None, val_y, names, soft)


def _seed_for(seed: int, epoch: int, stream: int) -> int:
    """Independent seed per (run seed, epoch, stream): batch order and augment need no saved state."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, epoch, stream]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> 1)


# --------------------------------------------------------------------------------------
# pieces of the loop


class ModelEma:
    """Exponential moving average of a model's weights (and float buffers).

    decay warms up as min(decay, (1 + updates) / (10 + updates)) so short runs are not
    dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs: tuple | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._pairs is None:  # state_dict() is slow-ish; its tensors stay the same objects
            ema_f, model_f, ema_o, model_o = [], [], [], []
            for ema_t, model_t in zip(self.module.state_dict().values(), model.state_dict().values()):
                (ema_f if ema_t.is_floating_point() else ema_o).append(ema_t)
                (model_f if ema_t.is_floating_point() else model_o).append(model_t)
            self._pairs = (ema_f, model_f, ema_o, model_o)
        ema_f, model_f, ema_o, model_o = self._pairs
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(ema_f, model_f, 1.0 - decay)
        for ema_t, model_t in zip(ema_o, model_o):
            ema_t.copy_(model_t)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device,
                   amp_dtype: torch.dtype | None = None) -> torch.optim.Optimizer:
    """The optimizer config.optimizer names, over the model's trainable parameters.

    amp_dtype: the training's autocast dtype (DeviceSetup.amp_dtype); with
    config.muon_precision "auto", Muon's orthogonalisation runs in it when it is bf16.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "muon":
        from fer_lib.optim import Muon

        ns_dtype = (torch.bfloat16 if config.muon_precision == "auto" and amp_dtype == torch.bfloat16
                    else torch.float32)
        convs = [p for p in params if p.ndim == 4]
        rest = [p for p in params if p.ndim != 4]
        conv_decay = config.weight_decay if config.muon_weight_decay is None else config.muon_weight_decay
        groups = [{"params": convs, "lr": config.muon_lr, "orthogonalize": True, "weight_decay": conv_decay},
                  {"params": rest, "lr": config.lr, "orthogonalize": False}]
        return Muon([g for g in groups if g["params"]], momentum=config.momentum, nesterov=config.nesterov,
                    weight_decay=config.weight_decay, ns_dtype=ns_dtype)
    if config.optimizer == "sgd":
        cls = torch.optim.SGD
        kwargs = {"momentum": config.momentum, "nesterov": config.nesterov}
    else:
        cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        kwargs = {}
    try:
        # fused kernels: one pass over all parameters instead of a few ops per tensor
        return cls(params, lr=config.lr, weight_decay=config.weight_decay, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, lr=config.lr, weight_decay=config.weight_decay, **kwargs)


def _make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    """(scheduler or None, steps per batch: True when stepped every batch)."""
    total = config.epochs * steps_per_epoch
    if config.scheduler == "onecycle":
        # each group peaks at its own lr (muon: conv weights and the rest differ)
        peaks = [group["lr"] for group in optimizer.param_groups]
        # torch divides by (pct_start * total - 1): a warm-up of exactly one step (e.g. a smoke
        # run of 2 epochs x 2 steps at pct_start 0.25) would divide by zero; take two instead.
        pct_start = 2 / total if total > 2 and math.isclose(config.pct_start * total, 1.0) else config.pct_start
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total,
                                                   pct_start=pct_start), True
    if config.scheduler == "cosine":
        warmup = int(round(config.warmup_epochs * steps_per_epoch))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), True
    if config.scheduler == "plateau":
        mode = "max" if config.plateau_metric == "val_accuracy" else "min"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=config.plateau_factor,
                                                          patience=config.plateau_patience), False
    return None, False


class Engine:
    """Model + optimizer + scheduler + loss + augment + EMA on one device; runs epochs.

    fit() and the bench (fer_lib.bench) both train through `train_epoch`, so the bench
    measures exactly the code path that fit uses.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, setup: DeviceSetup, steps_per_epoch: int,
                 class_weight: Tensor | None = None, soft_targets: Tensor | None = None):
        self.config, self.setup = config, setup
        if setup.device.type == "cpu":
            keep_freed_cpu_memory()  # every step reuses its buffers instead of page-faulting them in
        self.model = model.to(setup.device, memory_format=setup.memory_format())
        self.forward_model = torch.compile(self.model) if setup.compile else self.model
        self.optimizer = make_optimizer(self.model, config, setup.device, setup.amp_dtype)
        self.scheduler, self.per_step_scheduler = _make_scheduler(self.optimizer, config, steps_per_epoch)
        weight = class_weight.to(setup.device) if class_weight is not None else None
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
        self.augment = build_augment(config.augment).to(setup.device)
        self.augment_early = (build_augment(config.augment_early).to(setup.device)
                              if config.augment_early_epochs else None)
        self.flip_bits: Tensor | None = None  # alternating_flip: one bit per training image
        # distillation targets at the run's temperature, tempered once (not per batch)
        self.soft_targets = (temper(soft_targets, config.distill_temperature).to(setup.device)
                             if soft_targets is not None else None)
        self.ema = ModelEma(self.model, config.ema_decay) if config.ema_decay else None
        self.scaler = torch.amp.GradScaler(setup.device.type) if setup.needs_grad_scaler else None
        # on CPU reading a scalar costs nothing (no queue to drain); on CUDA it stalls the GPU
        self.sync_every = 1 if setup.device.type == "cpu" else 50

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def end_epoch(self, row: dict[str, float]) -> None:
        """Step a per-epoch scheduler (ReduceLROnPlateau) on the epoch's metric."""
        if self.scheduler is None or self.per_step_scheduler:
            return
        fallback = row["train_loss"] if self.config.plateau_metric == "val_loss" else row["train_accuracy"]
        self.scheduler.step(row.get(self.config.plateau_metric, fallback))

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the evaluated weights that an exact resume needs."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            # with EMA the checkpoint's model_state holds the EMA weights; keep the raw ones too
            "model_state_raw": self.model.state_dict() if self.ema is not None else None,
            "rng": _rng_state(self.setup.device),  # dropout draws from the global generator
        }

    def load_state_dict(self, state: dict[str, Any], model_state: dict[str, Tensor]) -> None:
        """Inverse of state_dict; `model_state` is the checkpoint's weights (raw when no EMA)."""
        self.model.load_state_dict(state.get("model_state_raw") or model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        for part, saved in ((self.scheduler, state.get("scheduler")), (self.scaler, state.get("scaler")),
                            (self.ema, state.get("ema"))):
            if part is not None and saved is not None:
                part.load_state_dict(saved)
        _set_rng_state(state["rng"], self.setup.device)

    def flip_mask(self, n: int, epoch: int) -> Tensor:
        """alternating_flip: which of the n training images are mirrored in this epoch."""
        if self.flip_bits is None or self.flip_bits.numel() != n:
            bits = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(self.config.seed))
            self.flip_bits = bits.bool().to(self.setup.device)
        return self.flip_bits ^ bool(epoch % 2)

    def train_epoch(self, epoch: int, images: Tensor, labels: Tensor, flags: Tensor | None, order: Tensor,
                    generator: torch.Generator | None, max_steps: int | None = None,
                    progress: EpochProgress | None = None) -> dict[str, float]:
        """One pass over `order` (indices on the device). Returns loss, accuracy, images, seconds."""
        model, setup, batch_size = self.model, self.setup, self.config.batch_size
        model.train()
        steps = steps_per_epoch(order.numel(), batch_size, max_steps)
        device = setup.device
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        seen = reported = 0
        early = self.augment_early is not None and epoch <= self.config.augment_early_epochs
        augment = self.augment_early if early else self.augment
        augment = None if augment.is_identity else augment
        flip_mask = self.flip_mask(images.shape[0], epoch) if self.config.alternating_flip else None
        mixup = self.config.mixup_alpha
        memory_format = setup.memory_format()
        clip = self.config.grad_clip
        start = time.perf_counter()
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            yb = labels.index_select(0, idx)
            x = to_float(images.index_select(0, idx))
            if flip_mask is not None:
                x = torch.where(flip_mask.index_select(0, idx)[:, None, None, None], x.flip(-1), x)
            if augment is not None:
                x = augment(x, needs_aug=None if flags is None else flags.index_select(0, idx), generator=generator)
            if mixup:
                lam, partner = _mixup_draw(mixup, idx.numel(), generator, device)
                x = lam * x + (1 - lam) * x.index_select(0, partner)
            x = x.contiguous(memory_format=memory_format)
            with setup.autocast():
                logits = self.forward_model(x)
            scores = logits.float()
            loss = self.criterion(scores, yb)
            if mixup:
                loss = lam * loss + (1 - lam) * self.criterion(scores, yb.index_select(0, partner))
            if self.soft_targets is not None:
                soft = self.soft_targets.index_select(0, idx)
                if mixup:
                    soft = lam * soft + (1 - lam) * soft.index_select(0, partner)
                weight = self.config.distill_weight
                loss = (1 - weight) * loss + weight * distillation_loss(scores, soft, self.config.distill_temperature)
            if self.sync_every == 1 and not math.isfinite(loss.item()):
                raise NonFiniteLossError(
                    f"training loss is {loss.item()} at epoch {epoch}, step {step + 1} of {steps}; "
                    "lower the learning rate, set grad_clip, or check the inputs for NaN")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                if clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                if clip:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                self.optimizer.step()
            if self.per_step_scheduler:
                self.scheduler.step()
            if self.ema is not None:
                self.ema.update(model)
            with torch.no_grad():
                loss_d = loss.detach()
                loss_sum += loss_d.double() * idx.numel()
                correct += (logits.detach().argmax(1) == yb).sum()
                if self.sync_every > 1:
                    first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_d), step + 1, first_bad)
            seen += idx.numel()
            if (step + 1) % self.sync_every == 0 or step + 1 == steps:
                if self.sync_every > 1 and int(first_bad) >= 0:
                    raise NonFiniteLossError(
                        f"training loss became NaN/inf at epoch {epoch}, step {int(first_bad)} of {steps}; "
                        "lower the learning rate, set grad_clip, or check the inputs for NaN")
                if progress is not None:
                    progress.update(step + 1, step + 1 - reported, float(loss_sum) / seen)
                    reported = step + 1
        seconds = time.perf_counter() - start
        return {
            "loss": float(loss_sum) / max(seen, 1),
            "accuracy": int(correct) / max(seen, 1),
            "images": seen,
            "seconds": seconds,
        }


def _mixup_draw(alpha: float, batch: int, generator: torch.Generator | None,
                device: torch.device) -> tuple[float, Tensor]:
    """mixup's lambda ~ Beta(alpha, alpha) and partner permutation, both from `generator`."""
    gen_device = generator_device(generator)
    draw = int(torch.randint(2**31, (1,), generator=generator, device=gen_device))
    lam = float(np.random.default_rng(draw).beta(alpha, alpha))
    partner = torch.randperm(batch, generator=generator, device=gen_device).to(device)
    return lam, partner


def _metrics(logits: Tensor, labels: Tensor) -> dict[str, Any]:
    labels = labels.to(logits.device)
    preds = logits.argmax(1)
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float((preds == labels).float().mean()),
        "logits": logits.cpu(),
        "labels": labels.cpu(),
        "preds": preds.cpu(),
    }


def evaluate(model: nn.Module, split, *, batch_size: int = 512, device=None, tta: str = "none",
             precision: str = "fp32", setup: DeviceSetup | None = None) -> dict[str, Any]:
    """loss (mean cross-entropy), accuracy (0..1), logits (N,C), labels, preds: CPU tensors.

    split: an object with .images (uint8) and .labels (e.g. fer_lib.data.Split) or a pair.
    Predictions come from `fer_lib.inference.predict_logits`, the one inference path (the
    photo predictor uses it too), with its meaning of `tta` (e.g. "flip": softmax of image
    and mirror averaged). device None: the model's device. precision: "fp32" (default: exact
    numbers) or "auto"/"bf16" (faster where supported); `setup` overrides both.
    """
    images, labels = _arrays(split, "evaluate")
    if labels is None:
        raise ValueError("evaluate needs labels; use fer_lib.inference.predict_logits for unlabelled images")
    logits = predict_logits(model, images, tta=tta, batch_size=batch_size, device=device, precision=precision,
                            setup=setup)
    return _metrics(logits, labels)


# --------------------------------------------------------------------------------------
# fit


def _as_model(model) -> nn.Module:
    if isinstance(model, str):
        from fer_lib.models import create_model

        return create_model(model)
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"model must be an nn.Module or a registered model name, got {type(model).__name__}")


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)


_RESUME_FIELDS = ("batch_size", "lr", "optimizer", "weight_decay", "scheduler", "augment", "seed", "label_smoothing",
                  "ema_decay", "upsample", "weighted_sampling", "class_weights", "max_steps_per_epoch",
                  "augment_early", "augment_early_epochs", "alternating_flip", "mixup_alpha", "muon_lr",
                  "muon_precision", "muon_weight_decay", "distill_weight", "distill_temperature")


def summary_line(row: dict[str, float], epochs: int) -> str:
    val = ""
    if "val_loss" in row:
        val = f" | val loss {row['val_loss']:.3f} acc {100 * row['val_accuracy']:.1f}%"
    return (f"epoch {row['epoch']}/{epochs} loss {row['train_loss']:.3f} acc {100 * row['train_accuracy']:.1f}%"
            f"{val} | lr {row['lr']:.1e} | {row['seconds']:.1f}s {row['img_per_s']:,.0f} img/s")


@contextlib.contextmanager
def _own_run_folder(run_dir: Path | None) -> Iterator[None]:
    """Hold an OS lock on run_dir/.lock while training, so two trainings never share a folder.

    The lock dies with the process (a killed run leaves no stale lock). Without fcntl
    (Windows) folders are not locked.
    """
    if run_dir is None or fcntl is None:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            raise RunFolderBusyError(f"{run_dir} is in use by another training (process {owner}); "
                                     "wait for it or choose another run_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class _RunRecord:
    """The run's bookkeeping besides the engine: history, best epoch, early-stopping count."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_accuracy: float | None = None
    bad_epochs: int = 0
    epochs_done: int = 0
    best_state: dict[str, Tensor] | None = None  # best weights of this call, kept in memory
    seconds_before: float = 0.0  # wall seconds of the earlier calls up to the resumed checkpoint

    def add(self, row: dict[str, float], eval_model: nn.Module) -> bool:
        """Append an epoch; True when it is the new best (always, without validation)."""
        self.history.append(row)
        self.epochs_done = row["epoch"]
        score = row.get("val_accuracy")
        if score is not None and self.best_accuracy is not None and score <= self.best_accuracy:
            self.bad_epochs += 1
            return False
        self.best_epoch, self.best_accuracy, self.bad_epochs = row["epoch"], score, 0
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in eval_model.state_dict().items()}
        return True

    def patience_spent(self, config: TrainConfig) -> bool:
        return bool(config.early_stopping_patience) and self.bad_epochs >= config.early_stopping_patience


def _run_identity(model: nn.Module, data: _TrainData, config: TrainConfig, steps: int) -> dict[str, Any]:
    """What a resumed run must share with the saved one to continue it."""
    return {"model_name": getattr(model, "registry_name", None), "train_images": int(data.labels.numel()),
            "label_counts": torch.bincount(data.labels.cpu()).tolist(), "epochs": config.epochs,
            "steps_per_epoch": steps, "scheduler": config.scheduler}


def _check_resumable(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Refuse, before training, a resume that could not continue the saved run."""
    if saved.get("model_name") and now["model_name"] and saved["model_name"] != now["model_name"]:
        raise ResumeError(f"{path} holds a {saved['model_name']!r} run; this call trains {now['model_name']!r}")
    for key, what in (("train_images", "training images"), ("label_counts", "training labels per class")):
        if key in saved and saved[key] != now[key]:
            raise ResumeError(f"{path} was trained on other data ({what}: {saved[key]} then, {now[key]} now)")
    # one-cycle and cosine schedules are laid out over epochs x steps when the run starts: a
    # different length cannot continue them (one-cycle would fail mid-run, cosine jump back)
    per_step = now["scheduler"] in ("onecycle", "cosine")
    for key in ("epochs", "steps_per_epoch"):
        if per_step and key in saved and saved[key] != now[key]:
            raise ResumeError(f"{path}: the {now['scheduler']} schedule was built for {key}={saved[key]}, "
                              f"this call asks {now[key]}; resume with {key}={saved[key]} or start a new run")


def _resume(engine: Engine, path: Path, config: TrainConfig, identity: dict[str, Any]) -> _RunRecord:
    ckpt = load_checkpoint(path, map_location=engine.setup.device)
    state = ckpt.get("train_state")
    if state is None:
        raise ResumeError(f"checkpoint {path} has no train_state (a 'best' checkpoint?); resume from last.pt")
    _check_resumable({"model_name": ckpt.get("model_name"), **(state.get("run") or {})}, identity, path)
    try:
        engine.load_state_dict(state, ckpt["model_state"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ResumeError(f"{path} does not fit this model ({identity['model_name'] or 'unregistered'}): "
                          f"{str(exc).splitlines()[0]}") from exc
    now, saved = config.to_dict(), ckpt.get("config") or {}
    changed = [k for k in _RESUME_FIELDS if k in saved and saved[k] != now.get(k)]
    if changed:
        warnings.warn(f"resuming {path} with changed settings {changed}: the run will not match an "
                      "uninterrupted one", stacklevel=3)
    return _RunRecord(list(ckpt.get("history") or []), ckpt.get("best_epoch") or 0,
                      ckpt.get("best_val_accuracy"), int(state.get("bad_epochs", 0)), int(ckpt["epoch"]),
                      seconds_before=float(state.get("wall_seconds", 0.0)))


def _run_epoch(engine: Engine, data: _TrainData, epoch: int, mode: str) -> dict[str, float]:
    """Train one epoch in its seeded order and augmentation, then validate: the history row."""
    config, started = engine.config, time.perf_counter()
    order_gen = torch.Generator().manual_seed(_seed_for(config.seed, epoch, 0))
    n = data.labels.numel()
    if data.sample_weight is not None:
        order = torch.multinomial(data.sample_weight, n, replacement=True, generator=order_gen)
    else:
        order = torch.randperm(n, generator=order_gen)
    augment_gen = torch.Generator().manual_seed(_seed_for(config.seed, epoch, 1))
    lr = engine.lr()
    steps = steps_per_epoch(n, config.batch_size, config.max_steps_per_epoch)
    progress = EpochProgress(mode, epoch, config.epochs, steps) if mode != "off" else None
    try:
        stats = engine.train_epoch(epoch, data.images, data.labels, data.flags, order.to(engine.setup.device),
                                   augment_gen, max_steps=config.max_steps_per_epoch, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    row = {"epoch": epoch, "train_loss": stats["loss"], "train_accuracy": stats["accuracy"]}
    if data.val_images is not None:
        logits = predict_logits(engine.eval_model, data.val_images, batch_size=config.eval_batch_size,
                                setup=engine.setup)
        val = _metrics(logits, data.val_labels)
        row["val_loss"], row["val_accuracy"] = val["loss"], val["accuracy"]
    row["lr"] = lr
    row["seconds"] = time.perf_counter() - started
    row["img_per_s"] = stats["images"] / max(stats["seconds"], 1e-9)
    row["images"] = stats["images"]  # trained this epoch: what bounds a run's work
    return row


def fit(model: nn.Module | str, train: Any, val: Any, config: TrainConfig | None = None, *, tracker: Any = None,
        run_dir: str | Path | None = None, resume: bool | str | Path | None = None,
        class_names: Sequence[str] | None = None,
        on_epoch_end: Callable[[dict[str, float], nn.Module], None] | None = None,
        soft_targets: Any = None) -> FitResult:
    """Train `model` on `train`, select the best epoch on `val` accuracy, return FitResult.

    model: an nn.Module (moved to the training device in place) or a registered model name.
    train / val: objects with .images uint8 (N,48,48) and .labels int64 (fer_lib.data.Split)
        or (images, labels) pairs; val may be None (then the last epoch counts as best).
    tracker: duck-typed .log(dict, step=), .log_summary(dict), .log_artifact(path, name, type).
    run_dir: folder for best.pt / last.pt (None: keep the best weights in memory only). One
        training at a time owns it (RunFolderBusyError for a second one).
    resume: True (run_dir/last.pt) or a checkpoint path: continue that run to config.epochs.
        The model, the training data and (for one-cycle/cosine) the schedule's length must
        match the saved run, else ResumeError before any training.
    on_epoch_end: called as on_epoch_end(row, model) after each epoch (row: a copy), with the
        model that epoch would be kept as (EMA weights when EMA is on), before that epoch's
        last.pt is written; it may evaluate, must not train, and may raise an Exception to stop
        the run (e.g. fer_lib.recipes' time budget): the epoch's last.pt is written, then it
        propagates.
    soft_targets: (N, C) probabilities per training image (fer_lib.distill.teacher_probs), used
        when config.distill_weight > 0.
    Returns FitResult with the model holding the best (EMA if enabled) weights. fit selects
    on `val` without TTA and evaluates nothing after training: config.tta is for the callers
    that evaluate the kept model (run_experiment, the ablations, the notebooks), each once.
    """
    config = config or TrainConfig()
    wall_start = time.perf_counter()
    resume_path = None
    if resume:
        if resume is not True:
            resume_path = Path(resume)
            run_dir = run_dir if run_dir is not None else resume_path.parent
        elif run_dir is None:
            raise ValueError("fit(resume=True) needs run_dir (it resumes from run_dir/last.pt)")
        else:
            resume_path = Path(run_dir) / "last.pt"
    run_dir = Path(run_dir) if run_dir is not None else None
    if resume_path is None:
        torch.manual_seed(config.seed)
    model = _as_model(model)
    setup = resolve_device(config.device, config.precision, config.channels_last, compile=config.compile, model=model)
    mode = progress_mode(config.progress)
    data = _prepare_data(train, val, config, class_names, setup.device, soft_targets)
    steps = steps_per_epoch(data.labels.numel(), config.batch_size, config.max_steps_per_epoch)
    engine = Engine(model, config, setup, steps, data.class_weight, data.soft_targets)
    identity = _run_identity(model, data, config, steps)
    meta = {"config": config.to_dict(), "class_names": data.class_names, "model_name": identity["model_name"],
            "model_kwargs": getattr(model, "registry_kwargs", None)}
    best_path = run_dir / "best.pt" if run_dir is not None else None
    last_path = run_dir / "last.pt" if run_dir is not None else None

    stopped_early = False
    with _own_run_folder(run_dir):
        record = _RunRecord()
        if resume_path is not None:
            record = _resume(engine, resume_path, config, identity)
            if mode != "off":
                print(f"resumed from {resume_path} after epoch {record.epochs_done}", flush=True)
        elif mode != "off":
            print(f"training on {setup.describe()}: {data.labels.numel():,} images, {steps} steps/epoch", flush=True)

        for epoch in range(record.epochs_done + 1, config.epochs + 1):
            if record.patience_spent(config):  # a resumed run that had already stopped early
                stopped_early = True
                break
            row = _run_epoch(engine, data, epoch, mode)
            engine.end_epoch(row)
            improved = record.add(row, engine.eval_model)
            stop_now = epoch < config.epochs and record.patience_spent(config)
            saved = {"metrics": row, "history": record.history, "best_epoch": record.best_epoch,
                     "best_val_accuracy": record.best_accuracy, **meta}
            if improved and best_path is not None:
                save_checkpoint(best_path, engine.eval_model, epoch=epoch, **saved)
            if mode != "off":
                print(summary_line(row, config.epochs), flush=True)
            # The callback runs before last.pt is written, so a resume never starts after an
            # epoch the callback did not finish (e.g. a probe that keeps per-epoch records); an
            # exception it raises to stop the run still leaves this epoch's last.pt.
            stop_by_callback = None
            if on_epoch_end is not None:
                try:
                    on_epoch_end(dict(row), engine.eval_model)
                except Exception as exc:  # re-raised below, after the checkpoint
                    stop_by_callback = exc
            if last_path is not None and (config.checkpoint_every_epoch or epoch == config.epochs or stop_now
                                          or stop_by_callback is not None):
                train_state = {**engine.state_dict(), "bad_epochs": record.bad_epochs, "run": identity,
                               "wall_seconds": record.seconds_before + time.perf_counter() - wall_start}
                save_checkpoint(last_path, engine.eval_model, epoch=epoch, train_state=train_state, **saved)
            if tracker is not None:
                tracker.log(dict(row), step=epoch)
            if stop_by_callback is not None:
                raise stop_by_callback
            if stop_now:
                stopped_early = True
                if mode != "off":
                    print(f"early stopping: no better val accuracy for {record.bad_epochs} epochs "
                          f"(best {100 * record.best_accuracy:.2f}% at epoch {record.best_epoch})", flush=True)
                break

        # Return the best weights (EMA when on) from memory; only a resume whose best epoch
        # came before it reads best.pt, written by this run (the folder is ours while locked).
        if record.best_state is not None:
            model.load_state_dict(record.best_state)
        elif best_path is not None and best_path.exists():
            load_checkpoint_into(model, best_path, map_location=setup.device)
        elif engine.ema is not None:
            model.load_state_dict(engine.ema.module.state_dict())
    model.eval()

    wall = time.perf_counter() - wall_start
    best_file = best_path if best_path is not None and best_path.exists() else None
    if tracker is not None:
        tracker.log_summary({"best_epoch": record.best_epoch, "best_val_accuracy": record.best_accuracy,
                             "wall_seconds": wall, "stopped_early": stopped_early})
        if best_file is not None:
            tracker.log_artifact(best_file, name=f"{meta['model_name'] or 'model'}-best", type="model")
    return FitResult(history=record.history, best_epoch=record.best_epoch, best_val_accuracy=record.best_accuracy,
                     best_checkpoint=best_file,
                     last_checkpoint=last_path if last_path is not None and last_path.exists() else None,
                     model=model, wall_seconds=wall, stopped_early=stopped_early, setup=setup,
                     resumed_seconds=record.seconds_before)


# --------------------------------------------------------------------------------------
# overfit check


def overfit_check(model: nn.Module, images, labels=None, n: int = 20, max_steps: int = 300, lr: float = 1e-3, *,
                  device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """The reports' sanity check: can the model reach 100% training accuracy on n samples?

    Trains a COPY of the model (the argument is left untouched) on n seeded random samples,
    full batch, Adam(lr), no augmentation, fp32, until every sample is classified correctly
    in train mode (as the reports measured) or max_steps. Returns dict(reached, steps,
    accuracy (also as "acc", the contract's name), losses).
    """
    if labels is None:
        images, labels = _arrays(images, "overfit_check")
    else:
        images, labels = _arrays((images, labels), "overfit_check")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(images.shape[0], generator=gen)[:n]
    setup = resolve_device(device, precision="fp32", model=model)
    net = copy.deepcopy(model).to(setup.device, memory_format=setup.memory_format()).train()
    x = to_float(images[pick].to(setup.device)).contiguous(memory_format=setup.memory_format())
    y = labels[pick].to(setup.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    losses: list[float] = []
    accuracy = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(1, max_steps + 1):
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            accuracy = float((logits.argmax(1) == y).float().mean())
            if accuracy == 1.0:
                return {"reached": True, "steps": step, "accuracy": accuracy, "acc": accuracy, "losses": losses}
    return {"reached": False, "steps": max_steps, "accuracy": accuracy, "acc": accuracy, "losses": losses}
