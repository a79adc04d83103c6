"""fer_lib.data: format detection, parsing, validation errors, cache, protocols, FER+ labels."""
import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from fer_lib import data as fer_data
from fer_lib import synthetic
from fer_lib.data import CLASS_NAMES, DatasetError, Split, ferplus_majority, load_fer2013

SMALL = (7, 7, 7)  # one image per class per split: enough for the error tests


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Every test caches into its own tmp folder and ignores a FERPLUS_PATH of the shell."""
    monkeypatch.setenv("FER_LIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FERPLUS_PATH", raising=False)


def _truth(n_per_split=synthetic.DEFAULT_SPLIT_SIZES, seed=0):
    images, labels, usage = synthetic.make_dataset(n_per_split, seed)
    return {name: (images[usage == code], labels[usage == code])
            for code, name in enumerate(("train", "val", "test"))}


def _assert_matches_truth(data, truth):
    for name, split in data.splits().items():
        images, labels = truth[name]
        np.testing.assert_array_equal(split.images, images)
        np.testing.assert_array_equal(split.labels, labels)
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int64


def _cache_files(tmp_path):
    return sorted((tmp_path / "cache").glob("*.npz")) if (tmp_path / "cache").exists() else []


# ------------------------------------------------------------------ formats
@pytest.mark.parametrize("name", ["fer2013.csv", "fer2013.csv.gz"])
def test_fer2013_csv_plain_and_gzip(tmp_path, name):
    path = synthetic.write_fer2013_csv(tmp_path / name)
    data = load_fer2013(path)
    _assert_matches_truth(data, _truth())
    assert data.format == ("fer2013_csv_gz" if name.endswith(".gz") else "fer2013_csv")
    assert data.class_names == CLASS_NAMES and data.source == path
    np.testing.assert_array_equal(data.val.rows, np.arange(70, 91))  # 0-based data rows


def test_gzip_is_detected_by_magic_bytes_not_name(tmp_path):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv", gzip=True)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    data = load_fer2013(path)
    assert data.format == "fer2013_csv_gz"
    _assert_matches_truth(data, _truth())


def test_crlf_line_endings_and_trailing_blank_lines(tmp_path):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv", n_per_split=SMALL)
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n") + b"\r\n\r\n")
    _assert_matches_truth(load_fer2013(path), _truth(SMALL))


def test_icml_face_data_csv(tmp_path):
    synthetic.write_icml_csv(tmp_path / "icml_face_data.csv")
    data = load_fer2013(tmp_path)  # a folder: the file is found in it
    assert data.format == "icml_csv"
    _assert_matches_truth(data, _truth())


@pytest.mark.parametrize("quote_pixels", [False, True])
def test_kaggle_train_test_pair(tmp_path, quote_pixels):
    synthetic.write_kaggle_train_test(tmp_path, quote_pixels=quote_pixels)
    data = load_fer2013(tmp_path)
    truth = _truth()
    assert data.format == "kaggle_train_test"
    np.testing.assert_array_equal(data.train.labels, truth["train"][1])
    np.testing.assert_array_equal(data.val.images, truth["val"][0])  # PublicTest rows first
    np.testing.assert_array_equal(data.test.images, truth["test"][0])
    for split in (data.val, data.test):
        assert not split.has_labels
        with pytest.raises(DatasetError, match=r"test\.csv.*no labels"):
            _ = split.labels


def test_kaggle_pair_given_as_train_csv_file(tmp_path):
    synthetic.write_kaggle_train_test(tmp_path, n_per_split=SMALL)
    data = load_fer2013(tmp_path / "train.csv")
    assert data.format == "kaggle_train_test" and data.source == tmp_path
    assert len(data.val) == len(data.test) == 7


def test_image_folders_recover_split_from_name_prefixes(tmp_path):
    synthetic.write_image_folders(tmp_path)
    data = load_fer2013(tmp_path)
    assert data.format == "image_folders"
    truth = _truth()
    for name, split in data.splits().items():
        images, labels = truth[name]
        assert len(split) == len(images)
        # files are ordered by the number after the prefix (= row here), so order is preserved
        np.testing.assert_array_equal(split.images, images)
        np.testing.assert_array_equal(split.labels, labels)
        assert (split.rows == -1).all()


def test_image_folders_without_prefix_split_test_half_half(tmp_path):
    synthetic.write_image_folders(tmp_path, with_usage_prefix=False, ext="jpg")
    with pytest.warns(UserWarning, match="half/half"):
        first = load_fer2013(tmp_path, seed=3)
    with pytest.warns(UserWarning):
        again = load_fer2013(tmp_path, seed=3)
    assert len(first.train) == 70 and len(first.val) == 21 and len(first.test) == 21
    for split in (first.val, first.test):
        assert set(split.labels.tolist()) == set(range(7))  # stratified: every class in both halves
    np.testing.assert_array_equal(first.val.images, again.val.images)
    # JPEG is lossy: pixels close to the generated ones, not equal
    truth_train = _truth()["train"][0].astype(int)
    assert np.abs(np.sort(first.train.images.astype(int).ravel()) - np.sort(truth_train.ravel())).mean() < 6


def test_image_folders_rgb_is_converted_with_warning(tmp_path):
    synthetic.write_image_folders(tmp_path, n_per_split=SMALL, mode="RGB")
    with pytest.warns(UserWarning, match="converted to grayscale"):
        data = load_fer2013(tmp_path)
    _assert_matches_truth(data, _truth(SMALL))  # gray RGB converts back exactly


def test_image_folders_wrong_size_errors_unless_resize(tmp_path):
    synthetic.write_image_folders(tmp_path, n_per_split=SMALL, size=96)
    with pytest.raises(DatasetError, match=r"Training_0\.png.*96x96.*resize=True"):
        load_fer2013(tmp_path)
    data = load_fer2013(tmp_path, resize=True)
    assert data.train.images.shape == (7, 48, 48)
    truth = _truth(SMALL)["train"][0].astype(int)
    assert np.abs(data.train.images.astype(int) - truth).mean() < 10


# ------------------------------------------------------------------ location
def test_directory_source_and_env_var(tmp_path, monkeypatch):
    path = synthetic.write_fer2013_csv(tmp_path / "d" / "fer2013.csv.gz", n_per_split=SMALL)
    assert load_fer2013(tmp_path / "d").source == path
    monkeypatch.setenv("FER2013_PATH", str(path))
    assert load_fer2013().source == path


def test_not_found_lists_every_place_searched(tmp_path, monkeypatch):
    empty_a, empty_b = tmp_path / "a", tmp_path / "b"
    empty_a.mkdir()
    monkeypatch.setenv("FER2013_PATH", str(tmp_path / "nowhere.csv"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fer_data, "_default_search_dirs", lambda: [empty_a, empty_b])
    with pytest.raises(DatasetError) as info:
        load_fer2013()
    message = str(info.value)
    for expected in ("FER2013_PATH", "nowhere.csv", str(empty_a), str(empty_b), "fer2013.csv",
                     "challenges-in-representation-learning-facial-expression-recognition-challenge",
                     "msambare/fer2013"):
        assert expected in message
    monkeypatch.delenv("FER2013_PATH")
    with pytest.raises(DatasetError, match=r"\$FER2013_PATH: not set"):
        load_fer2013()


def test_default_search_includes_repo_data_and_shared_folder():
    dirs = fer_data._default_search_dirs()
    repo = Path(fer_data.__file__).resolve().parent.parent
    assert repo / "data" in dirs
    assert repo.parent / "shared" / "data" / "fer2013" in dirs


def test_missing_explicit_source(tmp_path):
    with pytest.raises(DatasetError, match="missing.csv.*does not exist"):
        load_fer2013(tmp_path / "missing.csv")
    with pytest.raises(DatasetError, match="folder without"):
        load_fer2013(tmp_path)


# ------------------------------------------------------------------ protocols
def test_report_protocol_is_stratified_72_18_10_of_training(tmp_path):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv", n_per_split=(140, 7, 7))
    data = load_fer2013(path, protocol="report", seed=1)
    assert (len(data.train), len(data.val), len(data.test)) == (101, 25, 14)
    rows = np.concatenate([s.rows for s in data.splits().values()])
    np.testing.assert_array_equal(np.sort(rows), np.arange(140))  # all Training, disjoint
    for split, share in ((data.train, 0.72), (data.val, 0.18), (data.test, 0.10)):
        counts = np.bincount(split.labels, minlength=7)
        assert np.abs(counts - share * 20).max() <= 1  # 20 Training images per class
    same = load_fer2013(path, protocol="report", seed=1)
    other = load_fer2013(path, protocol="report", seed=2)
    np.testing.assert_array_equal(same.val.rows, data.val.rows)
    assert not np.array_equal(other.val.rows, data.val.rows)


def test_stratified_split_gives_report_sizes_on_real_class_counts():
    labels = np.repeat(np.arange(7), [3995, 436, 4097, 7215, 4830, 3171, 4965])
    train, val, test = fer_data.stratified_split(labels, (0.72, 0.18, 0.10), seed=0)
    assert (len(train), len(val), len(test)) == (20670, 5168, 2871)  # as report-003
    totals = np.bincount(labels)
    for part, share in ((train, 0.72), (val, 0.18), (test, 0.10)):
        assert np.abs(np.bincount(labels[part], minlength=7) - share * totals).max() <= 1.5


def test_fraction_subsamples_each_split_stratified(tmp_path):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv", n_per_split=(140, 70, 70))
    full = load_fer2013(path)
    part = load_fer2013(path, fraction=0.2, seed=5)
    assert (len(part.train), len(part.val), len(part.test)) == (28, 14, 14)
    for name, split in part.splits().items():
        assert np.bincount(split.labels, minlength=7).tolist() == [len(split) // 7] * 7
        assert np.isin(split.rows, full.splits()[name].rows).all()
    tiny = load_fer2013(path, fraction=0.01)
    assert set(tiny.val.labels.tolist()) == set(range(7))  # never loses a class
    with pytest.raises(ValueError, match="fraction"):
        load_fer2013(path, fraction=0)


def test_empty_split_is_an_error_for_the_protocol_that_needs_it(tmp_path):
    path = tmp_path / "fer2013.csv"
    synthetic.write_fer2013_csv(path, n_per_split=SMALL)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if not line.rstrip().endswith("PrivateTest")))
    with pytest.raises(DatasetError, match=r"fer2013\.csv: split 'test' \(PrivateTest\) is empty"):
        load_fer2013(path)
    assert len(load_fer2013(path, protocol="report").train) > 0


# ------------------------------------------------------------------ cache
def test_second_load_comes_from_cache(tmp_path, monkeypatch):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv.gz", n_per_split=SMALL)
    first = load_fer2013(path)
    assert len(_cache_files(tmp_path)) == 1

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed although a valid cache exists")

    monkeypatch.setattr(fer_data, "_parse_source", no_parsing)
    second = load_fer2013(path)
    np.testing.assert_array_equal(second.train.images, first.train.images)
    np.testing.assert_array_equal(second.test.labels, first.test.labels)
    assert second.format == first.format


def test_cache_invalidated_when_source_changes(tmp_path):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv", n_per_split=SMALL, seed=0)
    before = load_fer2013(path)
    stat = path.stat()
    synthetic.write_fer2013_csv(path, n_per_split=SMALL, seed=1)  # same size: values differ
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = load_fer2013(path)
    np.testing.assert_array_equal(after.train.images, _truth(SMALL, seed=1)["train"][0])
    assert not np.array_equal(after.train.images, before.train.images)
    assert len(_cache_files(tmp_path)) == 1  # the stale entry is removed


def test_cache_can_be_disabled(tmp_path):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv", n_per_split=SMALL)
    load_fer2013(path, cache=False)
    assert _cache_files(tmp_path) == []
    load_fer2013(path, cache_dir=tmp_path / "elsewhere")
    assert len(list((tmp_path / "elsewhere").glob("*.npz"))) == 1


def test_nothing_cached_after_a_failure(tmp_path):
    path = tmp_path / "fer2013.csv"
    synthetic.write_fer2013_csv(path, n_per_split=SMALL)
    path.write_text(path.read_text().replace(",PublicTest", ",Validation", 1))
    with pytest.raises(DatasetError):
        load_fer2013(path)
    assert _cache_files(tmp_path) == []
    assert not list((tmp_path / "cache").glob("*.tmp")) if (tmp_path / "cache").exists() else True


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv", n_per_split=SMALL)
    load_fer2013(path)
    (cache_file,) = _cache_files(tmp_path)
    cache_file.write_bytes(cache_file.read_bytes()[:1000])  # truncated zip
    with pytest.warns(UserWarning, match="ignoring unreadable FER2013 cache"):
        data = load_fer2013(path)
    _assert_matches_truth(data, _truth(SMALL))
    assert fer_data._load_cache(cache_file, fer_data._cache_key(path, "csv", False, None)) is not None


def test_image_folder_cache_notices_a_changed_image(tmp_path):
    synthetic.write_image_folders(tmp_path / "imgs", n_per_split=SMALL)
    load_fer2013(tmp_path / "imgs")
    target = next((tmp_path / "imgs" / "train" / "happy").glob("*.png"))
    from PIL import Image

    Image.fromarray(np.full((48, 48), 7, np.uint8)).save(target)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    data = load_fer2013(tmp_path / "imgs")
    assert (data.train.images == 7).all(axis=(1, 2)).sum() == 1


# ------------------------------------------------------------------ bad input
def _csv_with(tmp_path, edit, name="fer2013.csv"):
    """A small valid fer2013.csv, with ``edit(lines)`` applied to its list of lines."""
    path = tmp_path / name
    synthetic.write_fer2013_csv(path, n_per_split=SMALL)
    lines = path.read_text().split("\n")
    edit(lines)
    path.write_text("\n".join(lines))
    return path


def _set_pixels(lines, line_index, transform):
    emotion, pixels, usage = lines[line_index].split(",")
    lines[line_index] = ",".join([emotion, transform(pixels.split(" ")), usage])


@pytest.mark.parametrize("edit, pattern", [
    (lambda l: _set_pixels(l, 3, lambda p: " ".join(p[:-1])), r"line 4 \(data row 2\): 2303 pixel values, expected 2304"),
    (lambda l: _set_pixels(l, 5, lambda p: " ".join(p + ["1"])), r"line 6 \(data row 4\): 2305 pixel values"),
    (lambda l: _set_pixels(l, 2, lambda p: " ".join(p[:10] + ["12a"] + p[11:])), r"line 3 \(data row 1\): pixel value #11 '12a' is not an integer"),
    (lambda l: _set_pixels(l, 2, lambda p: " ".join(["3.5"] + p[1:])), r"line 3 \(data row 1\): pixel value #1 '3.5' is not an integer"),
    (lambda l: _set_pixels(l, 9, lambda p: " ".join(p[:-1] + ["-4"])), r"line 10 \(data row 8\): pixel value #2304 '-4'"),
    (lambda l: _set_pixels(l, 7, lambda p: " ".join(p[:99] + ["256"] + p[100:])), r"line 8 \(data row 6\): pixel value #100 = 256 is out of range"),
    (lambda l: _set_pixels(l, 7, lambda p: " ".join(p[:99] + ["1000"] + p[100:])), r"line 8 \(data row 6\): pixel value #100 = 1000 is out of range"),
    (lambda l: _set_pixels(l, 4, lambda p: "  ".join(p)), r"line 5 \(data row 3\): empty pixel value #2"),
    (lambda l: _set_pixels(l, 4, lambda p: ""), r"line 5 \(data row 3\): empty pixels field"),
    (lambda l: l.__setitem__(6, "7" + l[6][1:]), r"line 7 \(data row 5\): unknown emotion label 7"),
    (lambda l: l.__setitem__(6, "x" + l[6][1:]), r"line 7 \(data row 5\): emotion 'x' is not an integer"),
    (lambda l: l.__setitem__(11, l[11].replace(",PublicTest", ",Validation")), r"line 12 \(data row 10\): unknown Usage 'Validation'"),
    (lambda l: l.__setitem__(3, l[3].replace(",Training", ",Training,extra")), r"line 4 \(data row 2\): 4 comma-separated fields, expected 3"),
    (lambda l: l.insert(3, ""), r"line 4 \(data row 2\): 1 comma-separated fields"),
    (lambda l: l.__setitem__(0, "emotion,pixels,Split"), r"fer2013\.csv: missing column Usage"),
    (lambda l: l.__setitem__(0, "emotion,pixel,Usage"), r"missing column\(s\) pixels"),
])
def test_bad_csv_rows_name_file_line_and_problem(tmp_path, edit, pattern):
    path = _csv_with(tmp_path, edit)
    with pytest.raises(DatasetError, match=pattern) as info:
        load_fer2013(path)
    assert "fer2013.csv" in str(info.value)


def test_bad_pixel_in_a_later_chunk_is_located(tmp_path):
    path = tmp_path / "fer2013.csv"
    synthetic.write_fer2013_csv(path, n_per_split=(300, 7, 7))  # > one 128-row parse chunk
    lines = path.read_text().split("\n")
    _set_pixels(lines, 290, lambda p: " ".join(p[:5] + ["999"] + p[6:]))
    path.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=r"fer2013\.csv line 291 \(data row 289\): pixel value #6 = 999"):
        load_fer2013(path)


def test_csv_without_usage_column(tmp_path):
    path = tmp_path / "faces.csv"
    path.write_text("emotion,pixels\n0," + " ".join(["1"] * 2304) + "\n")
    with pytest.raises(DatasetError, match=r"faces\.csv: missing column Usage"):
        load_fer2013(path)


def test_empty_and_header_only_files(tmp_path):
    empty = tmp_path / "fer2013.csv"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"fer2013\.csv: the file is empty"):
        load_fer2013(empty)
    empty.write_text("emotion,pixels,Usage\n")
    with pytest.raises(DatasetError, match=r"fer2013\.csv: the file has a header .* but no data rows"):
        load_fer2013(empty)
    gz = tmp_path / "other.csv.gz"
    gz.write_bytes(gzip.compress(b""))
    with pytest.raises(DatasetError, match=r"other\.csv\.gz: the file is empty"):
        load_fer2013(gz)


def test_truncated_and_corrupt_gzip(tmp_path):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv.gz", n_per_split=SMALL)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match=r"fer2013\.csv\.gz: truncated gzip"):
        load_fer2013(path)
    corrupt = bytearray(raw)
    corrupt[100:400] = bytes(300)
    path.write_bytes(bytes(corrupt))
    with pytest.raises(DatasetError, match=r"fer2013\.csv\.gz: (corrupt gzip|truncated gzip)"):
        load_fer2013(path)
    assert _cache_files(tmp_path) == []


def test_bad_row_in_kaggle_test_csv_names_that_file(tmp_path):
    synthetic.write_kaggle_train_test(tmp_path, n_per_split=SMALL)
    test_csv = tmp_path / "test.csv"
    lines = test_csv.read_text().split("\n")
    lines[4] = lines[4].rsplit(" ", 1)[0]
    test_csv.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=r"test\.csv line 5 \(data row 3\): 2303 pixel values"):
        load_fer2013(tmp_path)


def test_unreadable_image(tmp_path):
    synthetic.write_image_folders(tmp_path, n_per_split=SMALL)
    broken = tmp_path / "test" / "sad" / "PrivateTest_99.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"PrivateTest_99\.png: cannot read image"):
        load_fer2013(tmp_path)
    assert _cache_files(tmp_path) == []


def test_missing_and_unknown_class_folders(tmp_path):
    synthetic.write_image_folders(tmp_path, n_per_split=SMALL)
    (tmp_path / "test" / "contempt").mkdir()
    with pytest.raises(DatasetError, match=r"contempt: unknown emotion folder"):
        load_fer2013(tmp_path)
    (tmp_path / "test" / "contempt").rmdir()
    for image in (tmp_path / "test" / "disgust").iterdir():
        image.unlink()
    (tmp_path / "test" / "disgust").rmdir()
    with pytest.raises(DatasetError, match=r"test: missing class folder\(s\) disgust"):
        load_fer2013(tmp_path)


def test_mixed_prefixes_in_test_folder(tmp_path):
    synthetic.write_image_folders(tmp_path, n_per_split=SMALL)
    first = sorted((tmp_path / "test" / "fear").iterdir())[0]
    first.rename(first.with_name("plain.png"))
    with pytest.raises(DatasetError, match=r"plain\.png: no PublicTest_/PrivateTest_ prefix"):
        load_fer2013(tmp_path)


def test_empty_image_split(tmp_path):
    synthetic.write_image_folders(tmp_path, n_per_split=SMALL)
    for image in (tmp_path / "test").rglob("PrivateTest_*"):
        image.unlink()
    with pytest.raises(DatasetError, match=r"split 'test' \(PrivateTest\) is empty"):
        load_fer2013(tmp_path)


# ------------------------------------------------------------------ FER+
def _votes(**columns):
    row = np.zeros(len(fer_data.VOTE_COLUMNS))
    for name, count in columns.items():
        row[fer_data.VOTE_COLUMNS.index(name)] = count
    return row


def test_ferplus_majority_rule():
    rows = np.array([
        _votes(happiness=7, neutral=1, surprise=1, fear=1),  # clear majority -> Happy
        _votes(neutral=5, sadness=5),  # tie -> unknown, dropped
        _votes(neutral=4, happiness=1, surprise=1, sadness=1, anger=1, disgust=1, fear=1),  # single votes removed -> Neutral
        _votes(anger=4, disgust=3, fear=2, neutral=1),  # 4 of 9 after removal: no majority
        _votes(surprise=5, fear=3, sadness=2),  # exactly half is not a majority
        _votes(unknown=8, neutral=2),  # "unknown" wins -> dropped
        _votes(NF=10),  # not a face -> dropped
        _votes(contempt=8, anger=2),  # contempt: dropped or class 7
        _votes(neutral=1, happiness=1, surprise=1, sadness=1, anger=1, disgust=1, fear=1, contempt=1, unknown=1, NF=1),
    ])
    np.testing.assert_array_equal(ferplus_majority(rows), [3, -1, 6, -1, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(ferplus_majority(rows, contempt="class"), [3, -1, 6, -1, -1, -1, -1, 7, -1])
    # each FER+ emotion column maps to the FER2013 class of the same emotion
    mapping = {"anger": 0, "disgust": 1, "fear": 2, "happiness": 3, "sadness": 4, "surprise": 5, "neutral": 6}
    clear = np.array([_votes(**{name: 9, "unknown": 1}) for name in mapping])
    np.testing.assert_array_equal(ferplus_majority(clear), list(mapping.values()))
    with pytest.raises(ValueError, match="contempt"):
        ferplus_majority(rows, contempt="keep")


def test_load_with_ferplus_labels(tmp_path):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv", seed=4)
    ferplus = synthetic.write_ferplus_csv(tmp_path / "fer2013new.csv", seed=4)
    votes = fer_data.load_ferplus_votes(ferplus)[list(fer_data.VOTE_COLUMNS)].to_numpy()
    expected = ferplus_majority(votes)
    data = load_fer2013(path, labels="ferplus")
    assert data.class_names == CLASS_NAMES and data.label_source == "ferplus"
    total = sum(len(s) for s in data.splits().values())
    assert total == (expected >= 0).sum() < len(expected)  # some rows dropped
    for split in data.splits().values():
        np.testing.assert_array_equal(split.labels, expected[split.rows])
        np.testing.assert_array_equal(split.votes, votes[split.rows])
        assert set(split.labels.tolist()) == set(range(7))
    with_contempt = load_fer2013(path, labels="ferplus", ferplus_contempt="class")
    assert with_contempt.class_names == CLASS_NAMES + ("Contempt",)
    assert (with_contempt.train.labels == 7).any()
    assert sum(len(s) for s in with_contempt.splits().values()) > total


def test_ferplus_found_in_sibling_folder_env_or_argument(tmp_path, monkeypatch):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013" / "fer2013.csv", n_per_split=SMALL)
    synthetic.write_ferplus_csv(tmp_path / "ferplus" / "fer2013new.csv", n_per_split=SMALL)
    assert len(load_fer2013(path, labels="ferplus").train) > 0
    moved = tmp_path / "elsewhere" / "votes.csv"
    moved.parent.mkdir()
    (tmp_path / "ferplus" / "fer2013new.csv").rename(moved)
    with pytest.raises(DatasetError, match=r"(?s)FER\+ labels \(fer2013new\.csv\) not found.*FERPLUS_PATH") as info:
        load_fer2013(path, labels="ferplus")
    assert str(tmp_path / "ferplus" / "fer2013new.csv") in str(info.value)
    assert len(load_fer2013(path, labels="ferplus", ferplus_path=moved).train) > 0
    monkeypatch.setenv("FERPLUS_PATH", str(moved))
    assert len(load_fer2013(path, labels="ferplus").train) > 0


def test_ferplus_row_count_and_usage_must_align(tmp_path):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv", n_per_split=SMALL)
    ferplus = synthetic.write_ferplus_csv(tmp_path / "fer2013new.csv", n_per_split=(7, 7, 8))
    with pytest.raises(DatasetError, match=r"fer2013new\.csv: 22 FER\+ rows but .*fer2013\.csv has 21 rows"):
        load_fer2013(path, labels="ferplus")
    synthetic.write_ferplus_csv(ferplus, n_per_split=SMALL)
    lines = ferplus.read_text().split("\n")
    lines[9] = lines[9].replace("PublicTest", "Training")
    ferplus.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=r"fer2013new\.csv line 10 \(data row 8\): FER\+ Usage Training"):
        load_fer2013(path, labels="ferplus")


def test_ferplus_bad_vote_and_header(tmp_path):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv", n_per_split=SMALL)
    ferplus = synthetic.write_ferplus_csv(tmp_path / "fer2013new.csv", n_per_split=SMALL)
    lines = ferplus.read_text().split("\n")
    fields = lines[3].split(",")
    fields[5] = "many"
    lines[3] = ",".join(fields)
    ferplus.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=r"fer2013new\.csv line 4 \(data row 2\): vote sadness='many'"):
        load_fer2013(path, labels="ferplus")
    ferplus.write_text("Usage,Image name,neutral\n")
    with pytest.raises(DatasetError, match=r"fer2013new\.csv: FER\+ header .*missing happiness"):
        load_fer2013(path, labels="ferplus")


def test_ferplus_labels_the_kaggle_test_csv(tmp_path):
    synthetic.write_kaggle_train_test(tmp_path, n_per_split=SMALL)
    synthetic.write_ferplus_csv(tmp_path / "fer2013new.csv", n_per_split=SMALL)
    data = load_fer2013(tmp_path, labels="ferplus")
    assert data.val.has_labels and data.test.has_labels
    np.testing.assert_array_equal(data.test.labels, _truth(SMALL)["test"][1])


def test_ferplus_needs_row_order(tmp_path):
    synthetic.write_image_folders(tmp_path, n_per_split=SMALL)
    synthetic.write_ferplus_csv(tmp_path / "fer2013new.csv", n_per_split=SMALL)
    with pytest.raises(DatasetError, match="by row position"):
        load_fer2013(tmp_path, labels="ferplus")


def test_load_ferplus_votes_dataframe(tmp_path):
    ferplus = synthetic.write_ferplus_csv(tmp_path / "fer2013new.csv", n_per_split=SMALL)
    frame = fer_data.load_ferplus_votes(ferplus)
    assert list(frame.columns) == ["Usage", "Image name", *fer_data.VOTE_COLUMNS, "majority"]
    assert len(frame) == 21 and (frame[list(fer_data.VOTE_COLUMNS)].sum(axis=1) == 10).all()
    assert frame["Usage"].tolist()[:8] == ["Training"] * 7 + ["PublicTest"]


# ------------------------------------------------------------------ containers
def test_split_and_summary(tmp_path):
    path = synthetic.write_fer2013_csv(tmp_path / "fer2013.csv")
    data = load_fer2013(path)
    summary = data.summary()
    assert summary.loc["total"].tolist() == [70, 21, 21]
    assert summary["train"].tolist()[:7] == [10] * 7
    sub = data.train.subset(np.arange(5))
    assert len(sub) == 5 and sub.name == "train"
    unlabeled = Split(images=np.zeros((2, 48, 48), np.uint8), labels=None, name="x", unlabeled_reason="why")
    with pytest.raises(DatasetError, match="why"):
        _ = unlabeled.labels
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        Split(images=np.zeros((2, 48, 48), np.uint8), labels=np.zeros(3), name="x")
    assert "no labels" in repr(unlabeled)


# ------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def real_cache_dir(tmp_path_factory):
    """One cache for the real-data tests of this module: the 300 MB file is parsed once."""
    return tmp_path_factory.mktemp("real_cache")


@pytest.mark.realdata
@pytest.mark.slow
def test_real_fer2013_counts(real_fer2013_path, real_cache_dir):
    data = load_fer2013(real_fer2013_path, cache_dir=real_cache_dir)
    assert (len(data.train), len(data.val), len(data.test)) == (28709, 3589, 3589)
    assert np.bincount(data.train.labels, minlength=7).tolist() == [3995, 436, 4097, 7215, 4830, 3171, 4965]
    assert np.bincount(data.val.labels, minlength=7).tolist() == [467, 56, 496, 895, 653, 415, 607]
    assert np.bincount(data.test.labels, minlength=7).tolist() == [491, 55, 528, 879, 594, 416, 626]
    for split in data.splits().values():
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (48, 48)
    np.testing.assert_array_equal(data.val.rows, np.arange(28709, 28709 + 3589))
    report = load_fer2013(real_fer2013_path, protocol="report", cache_dir=real_cache_dir)
    assert (len(report.train), len(report.val), len(report.test)) == (20670, 5168, 2871)


@pytest.mark.realdata
@pytest.mark.slow
def test_real_ferplus_labels(real_fer2013_path, real_cache_dir):
    try:
        ferplus_file = fer_data._find_ferplus(Path(real_fer2013_path), None)
    except DatasetError:
        pytest.skip("fer2013new.csv not found beside the real FER2013 file")
    import csv

    with open(ferplus_file, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    assert len(rows) == 35887

    def reference_majority(raw):  # the FER+ reference rule, written out per row
        votes = [0.0 if v <= 1 else v for v in map(float, raw)]
        top = max(votes)
        if top <= 0.5 * sum(votes):
            return -1
        column = votes.index(top)
        return fer_data.FERPLUS_TO_FER2013[column] if column < 7 else -1

    expected = np.array([reference_majority(r[2:]) for r in rows])
    data = load_fer2013(real_fer2013_path, labels="ferplus", cache_dir=real_cache_dir)
    total = 0
    for split, usage in zip(data.splits().values(), ("Training", "PublicTest", "PrivateTest")):
        np.testing.assert_array_equal(split.labels, expected[split.rows])
        assert all(rows[r][0] == usage for r in split.rows[:50].tolist())
        total += len(split)
    assert total == (expected >= 0).sum()


def test_image_folders_16_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    synthetic.write_image_folders(tmp_path, n_per_split=SMALL)
    for path in tmp_path.rglob("*.png"):
        with Image.open(path) as img:
            wide = np.asarray(img).astype(np.uint16) * 257  # the same picture on 0..65535
        Image.fromarray(wide).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
    with pytest.warns(UserWarning, match="converted to grayscale"):
        data = load_fer2013(tmp_path)
    _assert_matches_truth(data, _truth(SMALL))  # 257 * v scales back to v exactly
