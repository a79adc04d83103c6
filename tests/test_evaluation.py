"""fer_lib.evaluation: metrics against hand-computed values, figures, TTA, ensembles, tables."""
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fer_lib import evaluation  # noqa: E402

CLASSES = ("A", "B", "C", "D")  # D never occurs: its row/column must still be there


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------------------ metrics
def test_classification_metrics_match_hand_computed_values():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    m = evaluation.classification_metrics(y_true, y_pred, CLASSES)
    # A: tp1 fp1 fn1 -> P .5 R .5 F1 .5 ; B: tp2 fp1 fn0 -> P 2/3 R 1 F1 .8 ;
    # C: tp1 fp0 fn1 -> P 1 R .5 F1 2/3 ; D: nothing -> 0 (zero_division=0)
    assert m["accuracy"] == pytest.approx(4 / 6)
    f1 = [0.5, 0.8, 2 / 3, 0.0]
    assert m["per_class"]["f1"].tolist() == pytest.approx(f1)
    assert m["per_class"]["precision"].tolist() == pytest.approx([0.5, 2 / 3, 1.0, 0.0])
    assert m["per_class"]["recall"].tolist() == pytest.approx([0.5, 1.0, 0.5, 0.0])
    assert m["per_class"]["support"].tolist() == [2, 2, 2, 0]
    assert list(m["per_class"].index) == list(CLASSES)
    assert m["macro_f1"] == pytest.approx(sum(f1) / 4)
    assert m["weighted_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    expected = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(m["confusion"], expected)
    np.testing.assert_allclose(m["confusion_normalized"][0], [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(m["confusion_normalized"][3], [0, 0, 0, 0])  # no NaN rows


def test_classification_metrics_accepts_tensors_and_rejects_bad_labels():
    m = evaluation.classification_metrics(torch.tensor([0, 1]), torch.tensor([0, 1]), CLASSES)
    assert m["accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"y_pred\[1\] = 4"):
        evaluation.classification_metrics([0, 1], [0, 4], CLASSES)
    with pytest.raises(ValueError, match="same|has 2 labels"):
        evaluation.classification_metrics([0, 1], [0], CLASSES)


def test_accuracy_of_logits():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    assert evaluation.accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="rows"):
        evaluation.accuracy(logits, [0, 1])


# ------------------------------------------------------------------------------ figures
def test_plot_confusion_matrix_annotates_every_cell():
    confusion = np.array([[3, 1], [0, 4]])
    fig = evaluation.plot_confusion_matrix(confusion, ["x", "y"], normalize=True, title="t")
    main = fig.axes[0]
    texts = [t.get_text() for t in main.texts]
    assert texts == ["75.0", "25.0", "0.0", "100.0"]
    assert main.get_title() == "t"
    assert len(fig.axes) == 2  # the matrix and its colour bar
    counts = evaluation.plot_confusion_matrix(confusion, ["x", "y"], normalize=False)
    assert [t.get_text() for t in counts.axes[0].texts] == ["3", "1", "0", "4"]
    with pytest.raises(ValueError, match="shape"):
        evaluation.plot_confusion_matrix(confusion, ["x", "y", "z"])


def _history(with_lr=True):
    rows = []
    for epoch in range(1, 5):
        row = {"epoch": epoch, "train_loss": 2.0 / epoch, "train_accuracy": 0.2 * epoch,
               "val_loss": 2.2 / epoch, "val_accuracy": 0.15 * epoch}
        if with_lr:
            row["lr"] = 1e-3 / epoch
        rows.append(row)
    return rows


def test_plot_history_has_loss_accuracy_and_lr_axes():
    fig = evaluation.plot_history(_history())
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Loss", "Accuracy", "Learning rate"]
    loss_ax = fig.axes[0]
    assert len(loss_ax.get_lines()) == 2  # train and val
    np.testing.assert_allclose(loss_ax.get_lines()[0].get_ydata(), [2.0, 1.0, 2 / 3, 0.5])
    no_lr = evaluation.plot_history(_history(with_lr=False))
    assert [ax.get_title() for ax in no_lr.axes] == ["Loss", "Accuracy"]
    with pytest.raises(ValueError):
        evaluation.plot_history([])


def test_plot_misclassified_shows_most_confident_mistakes_first():
    images = np.zeros((6, 48, 48), dtype=np.uint8)
    y_true = np.array([0, 1, 2, 0, 1, 2])
    y_pred = np.array([0, 2, 2, 1, 0, 2])  # mistakes at 1, 3, 4
    probs = np.full((6, 3), 0.1)
    probs[1, 2], probs[3, 1], probs[4, 0] = 0.5, 0.9, 0.7
    fig = evaluation.plot_misclassified(images, y_true, y_pred, ["a", "b", "c"], probs=probs)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 3
    assert shown[0].get_title() == "a\n-> b (0.90)"  # sample 3, the most confident mistake
    assert shown[1].get_title() == "b\n-> a (0.70)"
    limited = evaluation.plot_misclassified(images, y_true, y_pred, ["a", "b", "c"], max_images=2)
    assert len([ax for ax in limited.axes if ax.images]) == 2
    none = evaluation.plot_misclassified(images, y_true, y_true, ["a", "b", "c"])
    assert "no misclassified" in none.axes[0].texts[0].get_text()


def test_plot_per_class_f1_and_time_to_accuracy():
    per_class = evaluation.classification_metrics([0, 1, 2], [0, 1, 1], ["a", "b", "c"])["per_class"]
    fig = evaluation.plot_per_class_f1(per_class)
    bars = fig.axes[0].patches
    assert [round(bar.get_height(), 4) for bar in bars] == [1.0, round(2 / 3, 4), 0.0]
    curves = {"cnn": [(0, 0.2), (10, 0.4)], "resnet": [(0, 0.1), (5, 0.3), (20, 0.5)]}
    fig2 = evaluation.plot_time_to_accuracy(curves)
    lines = fig2.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["cnn", "resnet"]
    np.testing.assert_allclose(lines[1].get_xdata(), [0, 5, 20])


def test_per_class_f1_beside_a_reference_and_history_overlay_and_curve():
    per_class = evaluation.classification_metrics([0, 1, 2], [0, 1, 1], ["a", "b", "c"])["per_class"]
    fig = evaluation.plot_per_class_f1(per_class, reference={"a": 0.5, "c": 0.25})
    heights = [round(bar.get_height(), 4) for bar in fig.axes[0].patches]
    assert heights[:3] == [1.0, round(2 / 3, 4), 0.0]
    assert heights[3] == 0.5 and np.isnan(heights[4]) and heights[5] == 0.25  # "b" has no reference
    history = [{"epoch": 1, "train_accuracy": 0.3, "val_accuracy": 0.25, "seconds": 2.0},
               {"epoch": 2, "train_accuracy": 0.5, "val_accuracy": 0.4, "seconds": 3.0}]
    fig2 = evaluation.plot_history(history, others={"earlier": [{"epoch": 1, "val_accuracy": 0.2}]})
    labels = [line.get_label() for line in fig2.axes[1].get_lines()]
    assert "val, earlier" in labels
    # the overlay's label names its line, never the panel (it once became the title and axis)
    assert fig2.axes[1].get_title() == fig2.axes[1].get_ylabel() == "Accuracy"
    assert evaluation.history_curve(history) == [(2.0, 0.25), (5.0, 0.4)]


# ------------------------------------------------------------------------------ ensembles
def test_ensemble_probs_average_softmax_and_sum_to_one():
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    probs = evaluation.ensemble_probs([a, b.numpy()])
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(probs, (torch.softmax(a, 1) + torch.softmax(b, 1)) / 2)
    only_a = evaluation.ensemble_probs([a, b], weights=[2.0, 0.0])
    torch.testing.assert_close(only_a, torch.softmax(a, 1))
    with pytest.raises(ValueError, match="shape"):
        evaluation.ensemble_probs([a, b[:1]])
    with pytest.raises(ValueError, match="weights"):
        evaluation.ensemble_probs([a, b], weights=[1.0])


# ------------------------------------------------------------------------------ tables
def test_results_table_adds_delta_and_orders_columns():
    table = evaluation.results_table([
        {"experiment": "3", "model": "cnn", "ours": 62.5, "report_claim": 60.61,
         "protocol": "standard", "note": "x"},
        {"experiment": "8", "model": "cnn", "ours": 65.0, "report_claim": None},
    ])
    assert list(table.columns) == ["experiment", "model", "ours", "report_claim", "delta",
                                   "protocol", "note"]
    assert table["delta"].iloc[0] == pytest.approx(1.89)
    assert math.isnan(table["delta"].iloc[1])


def test_to_markdown_formats_aligns_and_escapes():
    frame = pd.DataFrame({"model": ["cnn", "a|b"], "acc": [60.614, float("nan")]})
    text = evaluation.to_markdown(frame)
    assert text.splitlines() == [
        "| model |   acc |",
        "| ----- | ----: |",
        "| cnn   | 60.61 |",
        "| a\\|b  |       |",
    ]
    indexed = evaluation.to_markdown(frame.set_index("model"), index=True, floatfmt=".1f")
    assert indexed.splitlines()[2] == "| cnn   | 60.6 |"
