"""fer_lib.synthetic: deterministic, every class present, learnable, FER+ votes plausible."""
import numpy as np
import pytest

from fer_lib import synthetic
from fer_lib.data import VOTE_COLUMNS, ferplus_majority


def test_make_images_shapes_determinism_and_classes():
    images, labels = synthetic.make_images(50, seed=2)
    assert images.shape == (50, 48, 48) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert set(labels.tolist()) == set(range(7))
    again, again_labels = synthetic.make_images(50, seed=2)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, again_labels)
    assert not np.array_equal(synthetic.make_images(50, seed=3)[0], images)
    assert set(synthetic.make_images(16, seed=0, num_classes=8)[1].tolist()) == set(range(8))
    assert images.std() > 20  # not blank


def test_make_images_pattern_is_learnable():
    """A nearest-class-mean classifier separates held-out images: the pattern carries the class."""
    train_images, train_labels = synthetic.make_images(140, seed=0)
    test_images, test_labels = synthetic.make_images(70, seed=1)
    means = np.stack([train_images[train_labels == c].reshape(-1, 2304).mean(0) for c in range(7)])
    distances = ((test_images.reshape(-1, 1, 2304).astype(float) - means[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == test_labels).mean()
    assert accuracy > 0.9


def test_make_dataset_needs_every_class_in_every_split():
    images, labels, usage = synthetic.make_dataset((14, 7, 7), seed=0)
    assert len(images) == 28 and np.bincount(usage).tolist() == [14, 7, 7]
    for code in range(3):
        assert set(labels[usage == code].tolist()) == set(range(7))
    with pytest.raises(ValueError, match=">= 7 rows"):
        synthetic.make_dataset((14, 3, 7))


def test_ferplus_votes_have_every_special_case_and_keep_classes():
    _, labels, usage = synthetic.make_dataset(seed=0)
    votes = synthetic.make_ferplus_votes(labels, usage, seed=0)
    assert votes.shape == (len(labels), len(VOTE_COLUMNS)) and (votes.sum(1) == 10).all()
    nf = VOTE_COLUMNS.index("NF")
    assert (votes[:, nf] == 10).any()
    majority = ferplus_majority(votes, contempt="class")
    assert (majority == 7).any() and (majority == -1).sum() > (votes[:, nf] == 10).sum()
    kept = majority[(majority >= 0) & (majority < 7)]
    assert (kept == labels[(majority >= 0) & (majority < 7)]).all()  # ordinary rows keep their class
    for code in range(3):
        assert set(majority[(usage == code) & (majority >= 0)].tolist()) >= set(range(7))


def test_writers_validate_arguments(tmp_path):
    with pytest.raises(ValueError, match="equal PublicTest/PrivateTest"):
        synthetic.write_kaggle_train_test(tmp_path, n_per_split=(7, 7, 14))
    with pytest.raises(ValueError, match="n_rows=5"):
        synthetic.write_ferplus_csv(tmp_path / "fer2013new.csv", n_rows=5)
    path = synthetic.write_ferplus_csv(tmp_path / "custom.csv", labels=np.array([0, 3, 6]))
    assert path.read_text().splitlines()[2].startswith("Training,fer0000001.png,")
