"""Class imbalance: counts, tables and plots, upsampling, class weights, weighted sampling.

FER2013 Training holds 7,215 Happy but only 436 Disgust images. The experiment reports
(report-000/002) upsampled minority classes to the majority count and flagged the duplicates
(``needs_augmentation``) so that training applies a small brightness change (x0.9-1.1 / +-10)
to them; that augmentation lives in ``fer_lib.augment``, this module only builds the arrays.
Torch and matplotlib are imported inside the functions that need them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence, Union

import numpy as np

from fer_lib.data import CLASS_NAMES, FER2013, Split

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from matplotlib.figure import Figure
    from torch.utils.data import WeightedRandomSampler

LabelsLike = Union[Split, np.ndarray, Sequence[int]]


def _labels_of(labels_or_split: LabelsLike) -> np.ndarray:
    labels = labels_or_split.labels if isinstance(labels_or_split, Split) else labels_or_split
    if hasattr(labels, "detach"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def class_counts(labels_or_split: LabelsLike, num_classes: int = 7) -> np.ndarray:
    """Images per class, int64 (num_classes,), zeros for absent classes."""
    labels = _labels_of(labels_or_split)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


def _labelled_splits(data: Union[FER2013, Mapping[str, LabelsLike]]) -> dict[str, np.ndarray]:
    if isinstance(data, FER2013):
        return {name: split.labels for name, split in data.splits().items() if split.has_labels}
    return {name: _labels_of(value) for name, value in data.items()}


def class_distribution_table(data: Union[FER2013, Mapping[str, LabelsLike]],
                             class_names: Sequence[str] | None = None) -> "pd.DataFrame":
    """Counts and percentages per class for each labelled split (columns ``<split>`` and
    ``<split> %``), plus a total row. Unlabelled splits (Kaggle test.csv) are left out."""
    import pandas as pd

    if class_names is None:
        class_names = data.class_names if isinstance(data, FER2013) else CLASS_NAMES
    table = {}
    for name, labels in _labelled_splits(data).items():
        counts = class_counts(labels, len(class_names))
        table[name] = list(counts) + [int(counts.sum())]
        table[f"{name} %"] = list(np.round(100.0 * counts / max(counts.sum(), 1), 1)) + [100.0]
    return pd.DataFrame(table, index=list(class_names) + ["total"])


def plot_class_distribution(data: Union[FER2013, Mapping[str, LabelsLike]],
                            class_names: Sequence[str] | None = None, percent: bool = False) -> "Figure":
    """Grouped bar plot of images per class, one bar colour per split."""
    import matplotlib.pyplot as plt

    if class_names is None:
        class_names = data.class_names if isinstance(data, FER2013) else CLASS_NAMES
    splits = _labelled_splits(data)
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(class_names))
    width = 0.8 / max(len(splits), 1)
    for i, (name, labels) in enumerate(splits.items()):
        counts = class_counts(labels, len(class_names)).astype(float)
        values = 100.0 * counts / max(counts.sum(), 1.0) if percent else counts
        bars = ax.bar(x + (i - (len(splits) - 1) / 2) * width, values, width, label=f"{name} ({len(labels)})")
        ax.bar_label(bars, fmt="%.1f" if percent else "%d", fontsize=7)
    ax.set_xticks(x, class_names)
    ax.set_ylabel("% of split" if percent else "images")
    ax.set_title("Class distribution")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_samples(split: Split, per_class: int = 6, class_names: Sequence[str] = CLASS_NAMES,
                 seed: int = 0) -> "Figure":
    """A grid of random images: one row per class, ``per_class`` columns (blank when short)."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    labels = split.labels
    fig, axes = plt.subplots(len(class_names), per_class, figsize=(1.2 * per_class, 1.3 * len(class_names)),
                             squeeze=False)
    for c, name in enumerate(class_names):
        members = np.flatnonzero(labels == c)
        chosen = rng.choice(members, size=min(per_class, members.size), replace=False)
        for j, ax in enumerate(axes[c]):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < chosen.size:
                ax.imshow(split.images[chosen[j]], cmap="gray", vmin=0, vmax=255)
        axes[c, 0].set_ylabel(f"{name}\n({members.size})", rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{split.name or 'split'}: {per_class} random images per class")
    fig.tight_layout()
    return fig


def upsample_to_max(images: np.ndarray, labels: np.ndarray, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Duplicate minority-class images until every present class has the majority count.

    Duplicates are drawn per class with replacement (seeded) and appended after the originals.
    Returns (images, labels, needs_augmentation): False for originals, True for duplicates, so
    training can alter the duplicates slightly (brightness) instead of showing exact copies.
    """
    images = np.asarray(images)
    labels = _labels_of(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    rng = np.random.default_rng(seed)
    present, counts = np.unique(labels, return_counts=True)
    target = counts.max() if counts.size else 0
    extra = [rng.choice(np.flatnonzero(labels == c), size=target - n, replace=True)
             for c, n in zip(present.tolist(), counts.tolist()) if n < target]
    extra_index = np.concatenate(extra) if extra else np.empty(0, dtype=np.int64)
    flags = np.concatenate([np.zeros(len(labels), dtype=bool), np.ones(extra_index.size, dtype=bool)])
    return (np.concatenate([images, images[extra_index]]),
            np.concatenate([labels, labels[extra_index]]),
            flags)


def class_weights(labels: LabelsLike, num_classes: int = 7) -> "torch.Tensor":
    """Inverse-frequency weights for a weighted loss, float32 (num_classes,), mean 1 over the
    classes present; absent classes get 0 (they never occur as targets)."""
    import torch

    counts = class_counts(labels, num_classes).astype(np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("class_weights needs at least one label")
    weights = np.zeros(num_classes)
    weights[present] = 1.0 / counts[present]
    weights[present] /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)


def weighted_sampler(labels: LabelsLike, num_samples: int | None = None, seed: int = 0
                     ) -> "WeightedRandomSampler":
    """Sampler drawing each class equally often in expectation (with replacement, seeded)."""
    import torch
    from torch.utils.data import WeightedRandomSampler

    labels = _labels_of(labels)
    if labels.size == 0:
        raise ValueError("weighted_sampler needs at least one label")
    counts = np.bincount(labels)
    sample_weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(sample_weights, num_samples or labels.size, replacement=True,
                                 generator=generator)
