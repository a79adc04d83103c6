"""fer_lib.fileio: atomic writes that lose nothing and say what went wrong; JSON-plain data."""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fer_lib import fileio


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "summary.md"
    fileio.atomic_write_text(target, "old\n")

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", full_disk)
    with pytest.raises(fileio.WriteError) as info:
        fileio.atomic_write_text(target, "new\n")
    # one clear message naming the file and the cause, errno kept for callers
    assert str(target) in str(info.value) and "no space left" in str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]


def test_an_exception_inside_the_writer_removes_the_temporary(tmp_path):
    target = tmp_path / "model.bin"
    with pytest.raises(KeyError), fileio.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(fileio.WriteError, match="produced no file"), fileio.atomic_path(tmp_path / "x"):
        pass


def _dead_pid() -> int:
    """The pid of a process that has exited: free (or reused much later), like a killed writer's."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "last.pt"
    dead = _dead_pid()
    stale = tmp_path / f".last.pt.{dead}.tmp"
    stale.write_bytes(b"left behind")
    alive = tmp_path / f".last.pt.{os.getppid()}.tmp"  # a live process may still be writing
    alive.write_bytes(b"in progress")
    other = tmp_path / ".best.pt.1.tmp"  # another target's temporary is not ours to judge
    other.write_bytes(b"x")
    fileio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert not stale.exists() and alive.exists() and other.exists()


def test_written_files_get_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = fileio.atomic_write_text(tmp_path / "weights.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_missing_folder_that_cannot_be_made_is_one_write_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(fileio.WriteError, match="cannot write"):
        fileio.atomic_write_text(blocker / "sub" / "x.txt", "x")


def test_atomic_write_json_is_valid_json_even_with_nan(tmp_path):
    path = fileio.atomic_write_json(tmp_path / "r.json", {"acc": float("nan"), "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"acc": None, "n": 3}


@dataclasses.dataclass
class _Point:
    x: float
    tag: str


def test_to_jsonable_converts_numpy_torch_paths_dataclasses():
    value = {"a": np.float32(0.5), "b": torch.tensor([1, 2]), "c": Path("x/y"), "d": (1, 2),
             "e": _Point(math.inf, "p"), 3: torch.tensor(2.5)}
    assert fileio.to_jsonable(value) == {"a": 0.5, "b": [1, 2], "c": "x/y", "d": [1, 2],
                                         "e": {"x": None, "tag": "p"}, "3": 2.5}
    assert fileio.to_jsonable(object).startswith("<class")


def test_to_jsonable_strict_names_where_the_bad_value_sits():
    with pytest.raises(TypeError, match=r"metrics\.extra\[1\]: object"):
        fileio.to_jsonable({"extra": [1, object()]}, strict=True, where="metrics")


@pytest.mark.parametrize("name,expected", [
    ("03_cnn", "03_cnn"), ("zoo-exp3_cnn", "zoo-exp3_cnn"), ("../../etc/passwd", "etc-passwd"),
    ("a\\b/c", "a-b-c"), ("..", "unnamed"), ("", "unnamed"), ("  .hidden  ", "hidden"),
    ("run 1: lr=0.1", "run-1-lr-0.1"), ("tab\there\x00\n", "tab-here"), ("a..b", "a.b"),
    ("con.txt", "con_.txt"), ("NUL", "NUL_"), ("Überraschung", "Überraschung"),
])
def test_safe_filename_gives_one_harmless_path_component(name, expected):
    assert fileio.safe_filename(name) == expected
    assert fileio.safe_filename(expected) == expected  # applying it twice changes nothing


def test_safe_filename_bounds_long_names_and_keeps_them_distinct():
    a, b = fileio.safe_filename("é" * 300 + "a"), fileio.safe_filename("é" * 300 + "b")
    assert a != b
    for name in (a, b):
        assert len(name.encode("utf-8")) <= fileio.MAX_FILENAME_BYTES
        assert fileio.safe_filename(name) == name


def test_keep_suffix_temporaries_end_in_the_suffix_and_stale_ones_are_removed(tmp_path):
    target = tmp_path / "clip.avi"
    dead = _dead_pid()
    stale = tmp_path / f".clip.avi.{dead}.tmp.avi"
    stale.write_bytes(b"left behind")
    with fileio.atomic_path(target, keep_suffix=True) as tmp:
        assert tmp.suffix == ".avi" and tmp.parent == tmp_path
        tmp.write_bytes(b"video")
    assert target.read_bytes() == b"video" and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.avi"]


def test_a_full_disk_inside_torch_save_is_one_write_error_naming_the_checkpoint(tmp_path, monkeypatch):
    from fer_lib import checkpoint

    model = torch.nn.Linear(2, 2)
    path = checkpoint.save_checkpoint(tmp_path / "last.pt", model, epoch=1)
    before = path.read_bytes()

    def full_disk_save(obj, handle):
        # what torch.save's C++ zip writer raises when the disk fills: ENOSPC only in the chain
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0") from None

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_save)
    with pytest.raises(fileio.WriteError) as info:
        checkpoint.save_checkpoint(path, model, epoch=2)
    assert str(info.value) == f"cannot write {path}: no space left on the device"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path):
    import hashlib

    # a little over two 1 MiB chunks, so the chunked read must join three pieces
    data = np.random.default_rng(0).integers(0, 256, (2 << 20) + 7, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert fileio.sha256_file(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert fileio.sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
