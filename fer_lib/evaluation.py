"""Evaluation: metrics, plots, ensembles and result tables.

Everything here works on plain arrays/tensors so that notebooks can evaluate any model the
same way: `classification_metrics` for numbers, `plot_*` for figures (each returns a
matplotlib Figure and never calls `plt.show()`, so notebooks and tests decide what to do
with it), `ensemble_probs` to combine models' predictions (which come from the one
inference path, `fer_lib.inference`), `results_table` / `to_markdown`
to put our measured numbers beside the numbers the experiment reports claimed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # heavy imports stay lazy: importing fer_lib.evaluation must stay cheap
    import pandas as pd
    import torch
    from matplotlib.figure import Figure


# --------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------
def _as_int_array(values: Any, what: str) -> np.ndarray:
    """Labels from a list, ndarray or torch tensor as a 1-D int64 array."""
    if hasattr(values, "detach"):  # torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one label per sample), got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{what} must hold integer class indices, got dtype {array.dtype}")
    return array.astype(np.int64)


def classification_metrics(y_true: Any, y_pred: Any, class_names: Sequence[str]) -> dict:
    """Accuracy, macro/weighted F1, a per-class table and confusion matrices.

    The confusion matrix always has one row/column per entry of `class_names`, even when a
    class never occurs (early FER2013 models often never predict Disgust; the reports noted
    it missing from their confusion matrices), so matrices of different runs line up.

    Returns a dict with: accuracy, macro_f1, weighted_f1 (floats in 0..1), per_class
    (DataFrame indexed by class name: precision, recall, f1, support; zero_division=0),
    confusion (int64 counts, rows = true class, columns = predicted class) and
    confusion_normalized (each row divided by its count; rows of absent classes are 0).
    """
    import pandas as pd
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    true = _as_int_array(y_true, "y_true")
    pred = _as_int_array(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} labels but y_pred has {pred.size}")
    if true.size == 0:
        raise ValueError("classification_metrics needs at least one sample")
    num_classes = len(class_names)
    for what, array in (("y_true", true), ("y_pred", pred)):
        bad = np.flatnonzero((array < 0) | (array >= num_classes))
        if bad.size:
            raise ValueError(
                f"{what}[{bad[0]}] = {array[bad[0]]} is not a class index in 0..{num_classes - 1}"
            )
    labels = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=labels, zero_division=0
    )
    per_class = pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)},
        index=pd.Index(list(class_names), name="class"),
    )
    confusion = confusion_matrix(true, pred, labels=labels).astype(np.int64)
    row_totals = confusion.sum(axis=1, keepdims=True)
    confusion_normalized = np.divide(
        confusion, row_totals, out=np.zeros(confusion.shape, dtype=np.float64), where=row_totals > 0
    )
    return {
        "accuracy": float(np.mean(true == pred)),
        "macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(
            f1_score(true, pred, labels=labels, average="weighted", zero_division=0)
        ),
        "per_class": per_class,
        "confusion": confusion,
        "confusion_normalized": confusion_normalized,
    }


def accuracy(logits: Any, labels: Any) -> float:
    """Top-1 accuracy (0..1) of logits or probabilities (N, C) against integer labels (N,)."""
    if hasattr(logits, "detach"):
        logits = logits.detach().cpu().numpy()
    scores = np.asarray(logits)
    if scores.ndim != 2:
        raise ValueError(f"logits must have shape (N, num_classes), got {scores.shape}")
    true = _as_int_array(labels, "labels")
    if true.shape[0] != scores.shape[0]:
        raise ValueError(f"logits has {scores.shape[0]} rows but labels has {true.shape[0]}")
    if true.size == 0:
        raise ValueError("accuracy needs at least one sample")
    return float(np.mean(scores.argmax(axis=1) == true))


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------
def _new_figure(nrows: int = 1, ncols: int = 1, **kwargs: Any):
    """A pyplot figure and a 2-D array of its axes.

    pyplot figures (like the rest of the library's plots) are shown automatically by
    Jupyter's inline backend at the end of a cell, so `fig = plot_x(...)` displays once.
    Scripts and tests that make many figures should `plt.close(fig)`.
    """
    import matplotlib.pyplot as plt

    fig = plt.figure(**kwargs)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_confusion_matrix(
    confusion: Any,
    class_names: Sequence[str],
    normalize: bool = True,
    title: str | None = None,
) -> Figure:
    """Heat map of a confusion matrix with every cell annotated.

    `confusion` holds counts (rows = true class). With normalize=True the rows are divided by
    their totals and cells show percentages of each true class (recall on the diagonal);
    otherwise cells show the counts.
    """
    matrix = np.asarray(confusion, dtype=np.float64)
    num_classes = len(class_names)
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(
            f"confusion has shape {matrix.shape}, expected ({num_classes}, {num_classes}) "
            "for the given class_names"
        )
    if normalize:
        totals = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    size = max(4.0, 0.8 * num_classes + 2.0)
    fig, axes = _new_figure(figsize=(size + 1.0, size))
    ax = axes[0, 0]
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    threshold = (matrix.max() if matrix.size else 0.0) / 2.0
    for row in range(num_classes):
        for col in range(num_classes):
            value = matrix[row, col]
            text = f"{100.0 * value:.1f}" if normalize else f"{int(round(value))}"
            ax.text(
                col, row, text, ha="center", va="center", fontsize=8,
                color="white" if value > threshold else "black",
            )
    ax.set_xticks(range(num_classes), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(num_classes), labels=list(class_names))
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    default_title = "Confusion matrix (% of true class)" if normalize else "Confusion matrix"
    ax.set_title(title or default_title)
    fig.tight_layout()
    return fig


def plot_history(history: Sequence[Mapping[str, Any]] | pd.DataFrame, *,
                 others: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> Figure:
    """Loss and accuracy curves (train vs val) per epoch, plus the learning rate if logged.

    others: label -> another run's history, whose validation accuracy is drawn dashed on the
    accuracy panel (to compare a run with the previous notebook's).

    `history` is the list of per-epoch dicts the training engine returns (keys epoch,
    train_loss, train_accuracy, val_loss, val_accuracy, lr) or a DataFrame of them. Missing
    keys are skipped, so a history without validation still plots. The figure has two axes
    (loss, accuracy), and a third one (lr, log scale) when an `lr` column exists.
    """
    import pandas as pd

    frame = pd.DataFrame(list(history) if not isinstance(history, pd.DataFrame) else history)
    if frame.empty:
        raise ValueError("plot_history needs at least one epoch record")
    epochs = frame["epoch"] if "epoch" in frame else pd.Series(range(1, len(frame) + 1),
                                                               index=frame.index)
    has_lr = "lr" in frame and frame["lr"].notna().any()
    fig, axes = _new_figure(1, 3 if has_lr else 2, figsize=(15 if has_lr else 11, 4))
    panels = [("loss", "Loss"), ("accuracy", "Accuracy")]
    for ax, (key, label) in zip(axes[0], panels):
        for split, style in (("train", "-o"), ("val", "-s")):
            column = f"{split}_{key}"
            if column in frame and frame[column].notna().any():
                ax.plot(epochs, frame[column], style, markersize=3, label=split)
        if key == "accuracy":
            for other_label, other in (others or {}).items():
                other_frame = pd.DataFrame(list(other))
                if "val_accuracy" in other_frame:
                    other_epochs = other_frame.get("epoch", pd.Series(range(1, len(other_frame) + 1)))
                    ax.plot(other_epochs, other_frame["val_accuracy"], "--", alpha=0.7,
                            label=f"val, {other_label}")
        if key == "accuracy" and "val_accuracy" in frame and frame["val_accuracy"].notna().any():
            best = frame["val_accuracy"].astype(float).idxmax()  # skips NaN epochs
            ax.axvline(epochs.loc[best], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    if has_lr:
        ax = axes[0, 2]
        ax.plot(epochs, frame["lr"], "-", color="tab:green")
        if (frame["lr"].dropna() > 0).all():
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.set_title("Learning rate")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_misclassified(
    images: Any,
    y_true: Any,
    y_pred: Any,
    class_names: Sequence[str],
    max_images: int = 25,
    probs: Any = None,
) -> Figure:
    """Grid of misclassified faces titled "true -> predicted".

    With `probs` (N, C) the most confident mistakes come first (sorted by the probability of
    the wrong prediction) and the title shows that probability; without it the first
    mistakes in dataset order are shown. A figure with a note is returned when nothing is
    misclassified.
    """
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    pixels = np.asarray(images)
    if pixels.ndim == 4 and pixels.shape[1] == 1:
        pixels = pixels[:, 0]
    if pixels.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W) or (N, 1, H, W), got {pixels.shape}")
    true = _as_int_array(y_true, "y_true")
    pred = _as_int_array(y_pred, "y_pred")
    if not (pixels.shape[0] == true.size == pred.size):
        raise ValueError(
            f"images ({pixels.shape[0]}), y_true ({true.size}) and y_pred ({pred.size}) "
            "must have the same length"
        )
    wrong = np.flatnonzero(true != pred)
    confidence = None
    if probs is not None:
        if hasattr(probs, "detach"):
            probs = probs.detach().cpu().numpy()
        prob_array = np.asarray(probs, dtype=np.float64)
        if prob_array.shape[0] != true.size:
            raise ValueError(f"probs has {prob_array.shape[0]} rows, expected {true.size}")
        confidence = prob_array[np.arange(true.size), pred]
        wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    shown = wrong[: max(0, int(max_images))]
    if shown.size == 0:
        fig, axes = _new_figure(figsize=(4, 2))
        axes[0, 0].axis("off")
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        return fig
    cols = math.ceil(math.sqrt(shown.size))
    rows = math.ceil(shown.size / cols)
    fig, axes = _new_figure(rows, cols, figsize=(1.9 * cols, 2.1 * rows))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, index in zip(axes.ravel(), shown):
        ax.imshow(pixels[index], cmap="gray", vmin=0, vmax=255 if pixels.dtype == np.uint8 else None)
        title = f"{class_names[true[index]]}\n-> {class_names[pred[index]]}"
        if confidence is not None:
            title += f" ({confidence[index]:.2f})"
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"Misclassified: {shown.size} of {wrong.size} mistakes shown")
    fig.tight_layout()
    return fig


def plot_per_class_f1(per_class_df: pd.DataFrame,
                      reference: Mapping[str, float] | None = None,
                      reference_label: str = "report") -> Figure:
    """Bar chart of per-class F1 (the `per_class` table of classification_metrics).

    Bars are annotated with the class support, because on FER2013 a low F1 usually goes with
    a small class (Disgust has ~1.5% of the images). reference: class name -> F1 of another
    source (a report's classification report), drawn as a second bar per class.
    """
    if "f1" not in per_class_df:
        raise ValueError(f"per_class_df needs an 'f1' column, got {list(per_class_df.columns)}")
    names = [str(name) for name in per_class_df.index]
    scores = per_class_df["f1"].to_numpy(dtype=np.float64)
    fig, axes = _new_figure(figsize=(max(5.0, 0.9 * len(names) + 2.0), 4))
    ax = axes[0, 0]
    x = np.arange(len(names))
    width = 0.4 if reference else 0.8
    bars = ax.bar(x - (width / 2 if reference else 0), scores, width=width, color="tab:blue", label="ours")
    if reference:
        ref = [reference.get(name, np.nan) for name in names]
        ax.bar(x + width / 2, ref, width=width, color="tab:orange", alpha=0.7, label=reference_label)
        ax.legend(fontsize=8)
    if "support" in per_class_df:
        for bar, support in zip(bars, per_class_df["support"].to_numpy()):
            ax.annotate(
                f"n={int(support)}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=8,
            )
    ax.set_xticks(x, names)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("F1")
    ax.set_title("Per-class F1")
    ax.tick_params(axis="x", rotation=45)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def history_curve(history: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """(cumulative training seconds, validation accuracy) per epoch of a training history."""
    elapsed, points = 0.0, []
    for row in history:
        elapsed += float(row.get("seconds", 0.0))
        if row.get("val_accuracy") is not None:
            points.append((elapsed, float(row["val_accuracy"])))
    return points


def plot_time_to_accuracy(curves: Mapping[str, Sequence[tuple[float, float]]]) -> Figure:
    """Validation accuracy against wall-clock seconds, one line per run/configuration."""
    if not curves:
        raise ValueError("plot_time_to_accuracy needs at least one curve")
    fig, axes = _new_figure(figsize=(8, 4.5))
    ax = axes[0, 0]
    for label, points in curves.items():
        array = np.asarray(list(points), dtype=np.float64).reshape(-1, 2)
        ax.plot(array[:, 0], array[:, 1], "-o", markersize=3, label=str(label))
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Time to accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# test-time augmentation and ensembles
# --------------------------------------------------------------------------------------
def ensemble_probs(
    list_of_logits: Sequence[Any], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Weighted average of the softmax probabilities of several models: float (N, C).

    Each entry is an (N, C) logits tensor/array of one model on the same samples (e.g. from
    fer_lib.inference.predict_logits). Weights default to equal and are normalised to sum to 1.
    """
    import torch

    if len(list_of_logits) == 0:
        raise ValueError("ensemble_probs needs at least one set of logits")
    tensors = [torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
               for x in list_of_logits]
    shape = tuple(tensors[0].shape)
    for index, tensor in enumerate(tensors):
        if tensor.ndim != 2 or tuple(tensor.shape) != shape:
            raise ValueError(
                f"logits #{index} has shape {tuple(tensor.shape)}, expected {shape} (N, C) "
                "like the first model"
            )
    if weights is None:
        weight_array = np.full(len(tensors), 1.0 / len(tensors))
    else:
        weight_array = np.asarray(weights, dtype=np.float64)
        if weight_array.shape != (len(tensors),) or np.any(weight_array < 0) or weight_array.sum() <= 0:
            raise ValueError(
                f"weights must be {len(tensors)} non-negative numbers with a positive sum, "
                f"got {list(weights)}"
            )
        weight_array = weight_array / weight_array.sum()
    total = torch.zeros(shape, dtype=torch.float32)
    for weight, tensor in zip(weight_array, tensors):
        total += float(weight) * torch.softmax(tensor.detach().float().cpu(), dim=1)
    return total


# --------------------------------------------------------------------------------------
# result tables
# --------------------------------------------------------------------------------------
RESULT_COLUMNS = ("experiment", "model", "ours", "report_claim", "delta", "protocol")


def results_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Our measured numbers beside the reports' claims, one row per experiment.

    Each row is a dict with (some of) experiment, model, ours, report_claim, protocol and
    any extra columns (e.g. metric, note). `delta` = ours - report_claim is added where both
    are numbers. Column order: the standard columns first, extra columns after them.
    """
    import pandas as pd

    frame = pd.DataFrame([dict(row) for row in rows])
    for column in ("experiment", "model", "ours", "report_claim", "protocol"):
        if column not in frame:
            frame[column] = None
    ours = pd.to_numeric(frame["ours"], errors="coerce")
    claim = pd.to_numeric(frame["report_claim"], errors="coerce")
    frame["delta"] = ours - claim
    extra = [column for column in frame.columns if column not in RESULT_COLUMNS]
    return frame[list(RESULT_COLUMNS) + extra]


def _format_cell(value: Any, floatfmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        text = format(float(value), floatfmt)
    else:
        text = str(value)
    # a "|" would end the cell and a newline the row
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(frame: pd.DataFrame, *, floatfmt: str = ".2f", index: bool = False) -> str:
    """A GitHub-flavoured markdown table of a DataFrame (no `tabulate` needed).

    pandas.DataFrame.to_markdown needs the optional `tabulate` package, which this project
    does not install. Numeric columns are right-aligned and floats use `floatfmt`; missing
    values become empty cells.
    """
    import pandas as pd

    table = frame.reset_index() if index else frame
    headers = [str(column) for column in table.columns]
    numeric = [pd.api.types.is_numeric_dtype(table[column]) and
               not pd.api.types.is_bool_dtype(table[column]) for column in table.columns]
    body = [[_format_cell(value, floatfmt) for value in row]
            for row in table.itertuples(index=False, name=None)]
    widths = [max([3, len(header)] + [len(row[i]) for row in body]) for i, header in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.rjust(width) if is_num else cell.ljust(width)
                  for cell, width, is_num in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    separator = "| " + " | ".join(
        "-" * (width - 1) + ":" if is_num else "-" * width for width, is_num in zip(widths, numeric)
    ) + " |"
    return "\n".join([line([_format_cell(h, floatfmt) for h in headers]), separator]
                     + [line(row) for row in body])
