"""Knowledge distillation from finished runs: soft targets and the loss that uses them.

The teachers (e.g. the three seeds of `cpu_record`) run once over the training images
before the student trains; their averaged, flip-TTA softmax is kept as one (N, C) table of
soft targets, so a distillation step costs what an ordinary step costs. The student sees
augmented images (shifts, small rotations, flips) whose target is the teacher's answer for
the plain face: flip TTA makes the target mirror-symmetric, and the other augmentations
are small enough that the face keeps its expression. This is the fixed-target variant of
Hinton et al. (2015); teachers run on every augmented batch would double the step's cost.

The loss (fer_lib.training.Engine) mixes the usual cross-entropy with the KL divergence to
the targets at temperature T:

    loss = (1 - distill_weight) * CE(student, label) + distill_weight * T^2 * KL(p_T || q_T)

with q_T = softmax(student_logits / T) and p_T the targets sharpened or softened to T
(p^(1/T), renormalised: the softmax at T of the ensemble's log-probabilities). T^2 keeps
the gradient's size independent of T, as in the paper.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fer_lib.evaluation import ensemble_probs
from fer_lib.fileio import atomic_path, sha256_file
from fer_lib.inference import predict_logits

__all__ = ["load_teachers", "teacher_probs", "teacher_targets", "check_soft_targets", "temper",
           "distillation_loss"]


def load_teachers(run_dirs: Sequence[str | os.PathLike]) -> list[nn.Module]:
    """The best model (best.pt, chosen on PublicTest) of each finished run folder, in eval mode."""
    from fer_lib.checkpoint import load_model

    if not run_dirs:
        raise ValueError("distillation needs at least one teacher run folder")
    teachers = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "best.pt"
        if not path.is_file():
            raise FileNotFoundError(f"teacher {run_dir}: no best.pt there (a finished run folder holds one)")
        teachers.append(load_model(path))
    return teachers


def teacher_probs(teachers: Sequence[nn.Module], images_uint8: Any, *, tta: str = "flip",
                  batch_size: int = 512, precision: str = "fp32", progress: bool = False) -> Tensor:
    """Soft targets (N, C): the teachers' average softmax on uint8 faces (each with `tta`).

    progress: print a line as each teacher finishes (the pass takes minutes on a CPU).
    """
    if not teachers:
        raise ValueError("teacher_probs needs at least one teacher")
    logits = []
    for index, teacher in enumerate(teachers, 1):
        started = time.perf_counter()
        logits.append(predict_logits(teacher, images_uint8, tta=tta, batch_size=batch_size, precision=precision))
        if progress:
            print(f"teacher {index}/{len(teachers)}: {logits[-1].shape[0]:,} faces ({tta} TTA) in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    return ensemble_probs(logits)


def teacher_targets(run_dirs: Sequence[str | os.PathLike], images_uint8: Any, *, tta: str = "flip",
                    batch_size: int = 512, precision: str = "fp32", cache: str | os.PathLike | None = None,
                    progress: bool = True) -> Tensor:
    """Soft targets of finished run folders' best models (`load_teachers` + `teacher_probs`).

    cache: a file for the targets. When it holds targets of the same teachers (sha256 of each
    best.pt), the same faces (sha256 of their bytes), TTA and precision, they are read back
    instead of running the teachers again; otherwise they are computed and the file is
    (re)written atomically. An unreadable cache file is recomputed with a warning: it holds
    nothing that cannot be made again.
    """
    images = torch.as_tensor(images_uint8)
    key = {"teachers": [sha256_file(Path(run_dir) / "best.pt") if (Path(run_dir) / "best.pt").is_file()
                        else None for run_dir in run_dirs],
           "images": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest(), "shape": list(images.shape),
           "tta": tta, "precision": precision}
    cache = Path(cache) if cache is not None else None
    if cache is not None and cache.exists():
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            found = saved["key"] == key
        except Exception as exc:  # a foreign or damaged file: recompute, keep going
            warnings.warn(f"{cache}: not a readable soft-target cache ({type(exc).__name__}); recomputing",
                          stacklevel=2)
            found = False
        if found:
            if progress:
                print(f"soft targets read from {cache.name} (same teachers, faces and TTA)", flush=True)
            return saved["probs"]
    probs = teacher_probs(load_teachers(run_dirs), images, tta=tta, batch_size=batch_size, precision=precision,
                          progress=progress)
    if cache is not None:
        with atomic_path(cache) as tmp:
            torch.save({"key": key, "probs": probs}, tmp)
    return probs


def check_soft_targets(soft: Any, n: int, num_classes: int) -> Tensor:
    """`soft` as a float32 (n, num_classes) tensor of probability rows, or one clear error."""
    soft = torch.as_tensor(soft).float()
    if soft.shape != (n, num_classes):
        raise ValueError(f"soft targets must be (training images, classes) = ({n}, {num_classes}), "
                         f"got shape {tuple(soft.shape)}")
    bad = ~torch.isfinite(soft).all(1) | (soft < 0).any(1) | ((soft.sum(1) - 1).abs() > 1e-3)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(f"soft targets row {row} is not a probability vector (finite, >= 0, sums to 1): "
                         f"{soft[row].tolist()}")
    return soft


def temper(probs: Tensor, temperature: float) -> Tensor:
    """softmax(log(probs) / T): the targets at temperature T (T > 1 softer, T < 1 sharper)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(torch.log(probs.clamp_min(1e-12)) / temperature, dim=1)


def distillation_loss(logits: Tensor, tempered_targets: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(targets || softmax(logits / T)), averaged over the batch (float32 logits)."""
    log_q = F.log_softmax(logits / temperature, dim=1)
    return temperature ** 2 * F.kl_div(log_q, tempered_targets, reduction="batchmean")
