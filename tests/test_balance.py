"""fer_lib.balance: counts, tables, plots, upsampling with flags, class weights, weighted sampler."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fer_lib import balance, synthetic  # noqa: E402
from fer_lib.data import CLASS_NAMES, FER2013, Split  # noqa: E402

IMBALANCED_COUNTS = [40, 4, 41, 72, 48, 32, 50]  # FER2013 Training shape, /100


def _labels(counts=IMBALANCED_COUNTS, seed=0):
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


def _dataset():
    images, labels = synthetic.make_images(sum(IMBALANCED_COUNTS), seed=1)
    train = Split(images=images, labels=_labels(), name="train")
    val = Split(images=images[:21], labels=np.arange(21) % 7, name="val")
    test = Split(images=images[:14], labels=None, name="test", unlabeled_reason="no labels here")
    return FER2013(train, val, test, CLASS_NAMES, source=None, format="synthetic")


def test_class_counts_of_labels_and_split():
    labels = _labels()
    assert balance.class_counts(labels).tolist() == IMBALANCED_COUNTS
    assert balance.class_counts(_dataset().train).tolist() == IMBALANCED_COUNTS
    assert balance.class_counts(torch.tensor([0, 0, 2]), num_classes=3).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="0..6"):
        balance.class_counts(np.array([0, 7]))


def test_class_distribution_table_skips_unlabelled_splits():
    table = balance.class_distribution_table(_dataset())
    assert list(table.columns) == ["train", "train %", "val", "val %"]
    assert table["train"].tolist() == IMBALANCED_COUNTS + [sum(IMBALANCED_COUNTS)]
    assert table.loc["Happy", "train %"] == round(100 * 72 / 287, 1)
    assert table.loc["total", "val"] == 21


def test_plots_return_figures():
    data = _dataset()
    fig = balance.plot_class_distribution(data)
    (ax,) = fig.axes
    assert len(ax.patches) == 7 * 2  # two labelled splits
    assert [p.get_height() for p in ax.patches[:7]] == IMBALANCED_COUNTS
    plt.close(fig)
    fig = balance.plot_samples(data.train, per_class=3)
    assert len(fig.axes) == 7 * 3
    assert sum(len(ax.images) for ax in fig.axes) == 7 * 3  # Disgust has 4 >= 3 images
    plt.close(fig)
    short = balance.plot_samples(data.val, per_class=5)  # 3 images per class: 2 blanks each
    assert sum(len(ax.images) for ax in short.axes) == 7 * 3
    plt.close(short)


def test_upsample_to_max_counts_and_flags():
    labels = _labels()
    images = np.arange(len(labels), dtype=np.int64)[:, None, None] * np.ones((1, 2, 2), np.int64)
    up_images, up_labels, needs_aug = balance.upsample_to_max(images, labels, seed=3)
    assert np.bincount(up_labels).tolist() == [72] * 7
    added = 72 * 7 - len(labels)
    assert needs_aug.dtype == bool and needs_aug.sum() == added
    assert not needs_aug[: len(labels)].any() and needs_aug[len(labels):].all()
    np.testing.assert_array_equal(up_images[: len(labels)], images)  # originals first, untouched
    source = up_images[len(labels):, 0, 0]  # each duplicate is an original of the same class
    np.testing.assert_array_equal(labels[source], up_labels[len(labels):])
    again = balance.upsample_to_max(images, labels, seed=3)
    np.testing.assert_array_equal(again[0], up_images)
    balanced = np.arange(14) % 7
    same_images, same_labels, flags = balance.upsample_to_max(np.zeros((14, 48, 48), np.uint8), balanced)
    assert len(same_labels) == 14 and not flags.any()
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        balance.upsample_to_max(np.zeros((3, 2, 2)), np.array([0, 1]))


def test_class_weights_inverse_frequency_mean_one():
    weights = balance.class_weights(_labels())
    assert weights.dtype == torch.float32 and weights.shape == (7,)
    assert weights.mean().item() == pytest.approx(1.0)
    counts = torch.tensor(IMBALANCED_COUNTS, dtype=torch.float32)
    products = weights * counts  # inverse frequency: weight x count is the same for every class
    assert torch.allclose(products, products[0].expand(7))
    assert weights.argmax().item() == 1  # Disgust, the rarest
    absent = balance.class_weights(np.array([0, 0, 1]), num_classes=3)
    assert absent[2].item() == 0 and absent[:2].mean().item() == pytest.approx(1.0)


def test_weighted_sampler_balances_classes():
    labels = _labels()
    sampler = balance.weighted_sampler(labels, num_samples=7000, seed=0)
    assert isinstance(sampler, torch.utils.data.WeightedRandomSampler) and len(sampler) == 7000
    drawn = np.array(list(sampler))
    counts = np.bincount(labels[drawn], minlength=7)
    assert counts.min() > 800 and counts.max() < 1200  # ~1000 each; plain sampling gives 98..1756
    assert list(balance.weighted_sampler(labels, seed=0)) == list(balance.weighted_sampler(labels, seed=0))
    assert len(balance.weighted_sampler(labels)) == len(labels)
