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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fer_lib.evaluation import ensemble_probs
from fer_lib.inference import predict_logits

__all__ = ["load_teachers", "teacher_probs", "check_soft_targets", "temper", "distillation_loss"]


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
                  batch_size: int = 512, precision: str = "fp32") -> Tensor:
    """Soft targets (N, C): the teachers' average softmax on uint8 faces (each with `tta`)."""
    if not teachers:
        raise ValueError("teacher_probs needs at least one teacher")
    logits = [predict_logits(teacher, images_uint8, tta=tta, batch_size=batch_size, precision=precision)
              for teacher in teachers]
    return ensemble_probs(logits)


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
