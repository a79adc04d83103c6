"""fer_lib.publish: a finished run folder becomes executed/<profile>/ for GitHub.

A fake run folder (small generated executed notebooks that plant absolute paths, widget state,
a PNG and a results record in the places papermill and IPython put them) is published and the
copy is checked: valid, outputs and images kept, no machine path, no widgets, and a summary
read from the records. Failures must leave an existing publication untouched.
"""
import base64
import csv
import hashlib
import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from path_check import absolute_paths, strings  # tests/ is on sys.path

from fer_lib.publish import (
    PATH_LIKE_IN_BASE64,
    SUMMARY_COLUMNS,
    PublishError,
    find_absolute_paths,
    make_scrubber,
    png_without_path_like_text,
    publish_series,
)
from fer_lib.results import claim_row
from fer_lib.series import NOTEBOOKS, load_timings, main, merge_timings, summarise_series

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
MACHINE = "Test CPU, 2 cores, torch 0.0"
FOREIGN_CHECKOUT = "/home/bob/fer"           # the machine that ran the series (papermill paths)
FOREIGN_RUNS = "/scratch/bob/runs"           # its --out folder
FOREIGN_DATA = "/data/sets/fer2013/fer2013.csv"
WINDOWS_PATH = "C:\\Users\\bob\\fer\\fer_lib\\training.py"



def png_bytes(width=2, height=2):
    """A valid tiny PNG, made without matplotlib."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


PNG = base64.b64encode(png_bytes()).decode()


def planted_results(n):
    return {"model": f"model_{n}", "epochs_run": n, "val_accuracy": 0.40 + n / 100,
            "test_accuracy": 0.41 + n / 100, "test_macro_f1": 0.30 + n / 1000}


def executed_notebook(name, n, run_root, home, *, record=True, extra_png=0):
    """A small 'executed' notebook shaped like papermill's output on a foreign machine."""
    run_dir = f"{FOREIGN_RUNS}/cpu/{name}"
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2}}
    nb.metadata["papermill"] = {
        "input_path": f"{FOREIGN_CHECKOUT}/notebooks/{name}.ipynb",
        "output_path": f"{run_dir}/{name}.ipynb",
        "parameters": {"run_dir": run_dir, "runs_root": f"{FOREIGN_RUNS}/cpu",
                       "data_path": FOREIGN_DATA, "profile": "cpu"},
        "environment_variables": {}, "version": "2.6.0", "exception": None,
    }
    cells = [
        new_markdown_cell(f"# {name}"),
        new_code_cell('run_dir = None\ndata_path = None', metadata={"tags": ["parameters"]},
                      execution_count=1),
        new_code_cell(f'# Parameters\nrun_dir = "{run_dir}"\ndata_path = "{FOREIGN_DATA}"\n',
                      metadata={"tags": ["injected-parameters"]}, execution_count=2),
        new_code_cell("train()", execution_count=3, outputs=[
            new_output("stream", name="stdout",
                       text=f"run folder: {run_dir}\nlocal copy: {run_root}/cpu/{name}/results.json\n"
                            f"cache {home}/.cache/fer/x.npz, tmp /tmp/pytest-of-x/pytest-1/fer.csv\n"
                            "see https://github.com/owner/repo/blob/main/README.md\n"),
            new_output("stream", name="stderr",
                       text=f"{FOREIGN_CHECKOUT}/.venv/lib/python3.11/site-packages/torch/nn/f.py:12: "
                            "UserWarning: something\n"),
            new_output("execute_result", execution_count=3,
                       data={"text/plain": f"PosixPath('{FOREIGN_DATA}')",
                             "text/html": f"<b>{run_dir}/weights</b> in {WINDOWS_PATH}"}),
            new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure size 640x480>"}),
            new_output("display_data", data={WIDGET_VIEW: {"model_id": "abc", "version_major": 2},
                                             "text/plain": "HBox(children=(FloatProgress()))"}),
        ]),
        new_code_cell("fail()", execution_count=4, outputs=[
            new_output("error", ename="ValueError", evalue=f"bad file {home}/secret/notes.txt",
                       traceback=[
                           "\x1b[0;31mValueError\x1b[0m  Traceback (most recent call last)",
                           f"File \x1b[0;32m{FOREIGN_CHECKOUT}/fer_lib/training.py:88\x1b[0m, "
                           "in \x1b[0;36mfit\x1b[0;34m()",
                           "File \x1b[0;32m/opt/conda/lib/python3.11/warnings.py:10\x1b[0m",
                           f"File {WINDOWS_PATH}:3",
                       ]),
        ]),
    ]
    if extra_png:
        big = base64.b64encode(os.urandom(extra_png)).decode()
        cells.append(new_code_cell("big()", execution_count=5, outputs=[
            new_output("display_data", data={"image/png": big, "text/plain": "<Figure>"})]))
    if record and name != "01_data_exploration":
        bundle = claim_row(name, planted_results(n))._repr_mimebundle_()
        cells.append(new_code_cell(f'claim_row("{name}", result.results)', execution_count=9,
                                   outputs=[new_output("execute_result", data=bundle,
                                                       execution_count=9)]))
    nb.cells = cells
    nbformat.validate(nb)
    return nb


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home" / "alice"
    path.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(path))
    return str(path)


@pytest.fixture
def run_root(tmp_path, home):
    """runs/ with a finished fake cpu series."""
    root = tmp_path / "machine" / "runs"
    for n, name in enumerate(NOTEBOOKS, start=1):
        write_notebook(root, name, executed_notebook(name, n, root, home))
    (root / "cpu" / "timings.csv").write_text(
        "notebook,seconds,output,machine\n"
        + "".join(f'{name},{10.0 * n},{name}/{name}.ipynb,"{MACHINE}"\n'
                  for n, name in enumerate(NOTEBOOKS, start=1)))
    (root / "cpu" / "summary.png").write_bytes(png_bytes(3, 3))
    (root / "cpu" / "08_final_model" / "time_to_accuracy.png").write_bytes(png_bytes(4, 4))
    return root


def write_notebook(root, name, nb):
    folder = root / "cpu" / name
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(folder / f"{name}.ipynb"))


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_published_notebooks_keep_outputs_and_lose_paths_and_widgets(run_root, tmp_path, home):
    dest = tmp_path / "repo" / "executed"
    target = publish_series(run_root / "cpu", dest)
    assert target == dest / "cpu"
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [f"{n}.ipynb" for n in NOTEBOOKS] + ["summary.csv", "summary.md", "summary.png",
                                             "time_to_accuracy.png"])
    assert not [p for p in dest.iterdir() if p.name.startswith(".")], "staging folder left behind"
    planted = [home, str(tmp_path), "/scratch/bob", FOREIGN_CHECKOUT, "/data/sets", "/opt/conda",
               "/tmp/pytest-of-x", "C:\\Users", "Users\\bob"]
    for name in NOTEBOOKS:
        raw = (target / f"{name}.ipynb").read_text()
        nb = nbformat.reads(raw, as_version=4)
        nbformat.validate(nb)
        text = "\n".join(strings(nb))
        for needle in planted:
            assert needle not in raw and needle not in text, f"{name}: {needle!r} published"
        found = [p for s in strings(nb) for p in absolute_paths(s)]
        assert not found, f"{name}: absolute paths {found}"
        assert "widgets" not in nb.metadata
        outputs = [o for c in nb.cells for o in c.get("outputs", [])]
        assert not [o for o in outputs if WIDGET_VIEW in o.get("data", {})]
        assert [o for o in outputs if o.get("data", {}).get("image/png") == PNG], "image lost"
        assert [c.execution_count for c in nb.cells if c.cell_type == "code"][:4] == [1, 2, 3, 4]
        # the replacements say where things were, relative to the checkout
        assert f"run folder: runs/cpu/{name}\n" in text
        assert f"local copy: runs/cpu/{name}/results.json" in text
        assert "~/.cache/fer/x.npz" in text and "~/secret/notes.txt" in text
        assert "site-packages/torch/nn/f.py" in text
        assert "https://github.com/owner/repo/blob/main/README.md" in text  # URLs stay
        params = nb.metadata.papermill.parameters
        assert params.run_dir == f"runs/cpu/{name}" and params.runs_root == "runs/cpu"
        assert params.data_path == "fer2013.csv"
        assert nb.metadata.papermill.input_path == f"./notebooks/{name}.ipynb"
        assert nb.metadata.papermill.output_path == f"runs/cpu/{name}/{name}.ipynb"
        tb = [o for o in outputs if o.output_type == "error"][0].traceback
        assert "fer_lib/training.py:88" in tb[1] and "\x1b[0;32m" in tb[1]
        assert ".../warnings.py" in tb[2] and ".../training.py" in tb[3]
    assert (target / "time_to_accuracy.png").read_bytes() == png_bytes(4, 4)
    # summary.png is drawn from the published rows, never the run folder's (which may cover
    # another subset of the series)
    assert (target / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (target / "summary.png").read_bytes() != png_bytes(3, 3)


def png_spelling_in_base64(word="/tmp/xyz"):
    """A valid PNG whose base64 text holds `word` (8 base64 characters = 6 bytes): the bytes
    `word` decodes to, placed at a multiple of 3 bytes inside an ancillary tEXt chunk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    image = png_bytes(5, 3)
    head, rest = image[:33], image[33:]            # signature + IHDR, then IDAT + IEND
    start = len(head) + 8 + len(b"Comment\x00")      # where the chunk's text begins
    text = b"x" * (-start % 3) + base64.b64decode(word)
    return head + chunk(b"tEXt", b"Comment\x00" + text) + rest


def test_a_figure_whose_base64_spells_a_machine_path_is_encoded_again(run_root, tmp_path):
    from PIL import Image

    crafted = base64.b64encode(png_spelling_in_base64()).decode()
    assert "/tmp/xyz" in crafted and PATH_LIKE_IN_BASE64.search(crafted)
    again = png_without_path_like_text(crafted)
    assert not PATH_LIKE_IN_BASE64.search(again)
    pixels = [Image.open(io.BytesIO(base64.b64decode(b))) for b in (crafted, again)]
    assert pixels[0].mode == pixels[1].mode and pixels[0].size == pixels[1].size == (5, 3)
    assert pixels[0].tobytes() == pixels[1].tobytes()
    assert png_without_path_like_text(PNG) == PNG  # nothing path-like: left as it is

    # and through a publish: the published notebook's raw text holds no such figure
    name = NOTEBOOKS[2]
    path = run_root / "cpu" / name / f"{name}.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[-1].outputs.append(new_output("display_data", data={"image/png": crafted, "text/plain": "<Figure>"}))
    nbformat.write(nb, str(path))
    raw = (publish_series(run_root / "cpu", tmp_path / "executed") / f"{name}.ipynb").read_text()
    assert not PATH_LIKE_IN_BASE64.search(raw)
    published = nbformat.reads(raw, as_version=4)
    figures = [o.data["image/png"] for c in published.cells for o in c.get("outputs", [])
               if o.get("data", {}).get("text/plain") == "<Figure>"]
    assert figures == [again]


def test_summary_is_read_from_the_results_records_and_timings(run_root, tmp_path):
    target = publish_series(run_root / "cpu", tmp_path / "executed")
    with (target / "summary.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == SUMMARY_COLUMNS
        rows = list(reader)
    assert [r["notebook"] for r in rows] == list(NOTEBOOKS)
    first = rows[0]
    assert first["wall_seconds"] == "10.0" and first["machine"] == MACHINE
    assert all(first[c] == "" for c in SUMMARY_COLUMNS if c not in ("notebook", "wall_seconds", "machine"))
    for n, row in enumerate(rows[1:], start=2):
        planted = planted_results(n)
        record = claim_row(row["notebook"], planted).record
        assert row["model"] == planted["model"] and int(row["epochs"]) == n
        assert float(row["val_accuracy"]) == pytest.approx(100 * planted["val_accuracy"], abs=0.01)
        assert float(row["test_accuracy"]) == pytest.approx(100 * planted["test_accuracy"], abs=0.01)
        assert float(row["macro_f1"]) == pytest.approx(100 * planted["test_macro_f1"], abs=0.01)
        if record["claim_accuracy"] is None:
            assert row["claim_accuracy"] == ""
        else:
            assert float(row["claim_accuracy"]) == pytest.approx(record["claim_accuracy"], abs=0.01)
        assert row["claim_metric"] == record["claim_metric"]
        assert float(row["wall_seconds"]) == 10.0 * n and row["machine"] == MACHINE
    md = (target / "summary.md").read_text()
    assert MACHINE in md and f"{sum(10.0 * n for n in range(1, 9)) / 60:.1f} minutes" in md
    assert "[02_mlp_baseline](02_mlp_baseline.ipynb)" in md and "model_2" in md


def test_summary_png_is_drawn_when_the_run_has_none(run_root, tmp_path):
    (run_root / "cpu" / "summary.png").unlink()
    (run_root / "cpu" / "08_final_model" / "time_to_accuracy.png").unlink()
    target = publish_series(run_root / "cpu", tmp_path / "executed")
    assert (target / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (target / "time_to_accuracy.png").exists()


@pytest.mark.parametrize("breakage, needle", [
    ("no_record", "05_resnet"),
    ("too_large", "08_final_model.ipynb"),
    ("missing", "03_cnn"),
    ("failed", "06_resnet_regularized"),
    ("untimed", "07_resnet_small"),
])
def test_a_failed_publish_leaves_the_old_one_untouched(run_root, tmp_path, home, breakage, needle):
    dest = tmp_path / "executed"
    publish_series(run_root / "cpu", dest)
    (dest / "cpu" / "README.extra").write_text("kept")  # the whole old folder must survive
    before = snapshot(dest)
    kwargs = {}
    if breakage == "no_record":
        write_notebook(run_root, "05_resnet", executed_notebook("05_resnet", 5, run_root, home,
                                                                record=False))
    elif breakage == "too_large":
        write_notebook(run_root, "08_final_model",
                       executed_notebook("08_final_model", 8, run_root, home, extra_png=300_000))
        kwargs["max_bytes"] = 200_000
    elif breakage == "missing":
        (run_root / "cpu" / "03_cnn" / "03_cnn.ipynb").unlink()
    elif breakage == "failed":
        path = run_root / "cpu" / "06_resnet_regularized" / "06_resnet_regularized.ipynb"
        nb = nbformat.read(str(path), as_version=4)
        nb.metadata.papermill.exception = True
        nbformat.write(nb, str(path))
    elif breakage == "untimed":
        timings = run_root / "cpu" / "timings.csv"
        timings.write_text("".join(l for l in timings.read_text().splitlines(True)
                                   if not l.startswith("07_")))
    with pytest.raises(PublishError, match=needle):
        publish_series(run_root / "cpu", dest, **kwargs)
    assert snapshot(dest) == before
    assert sorted(p.name for p in dest.iterdir()) == ["cpu"]


def test_cli_publish_only(run_root, tmp_path, capsys):
    dest = tmp_path / "executed"
    assert main(["--publish-only", "--profile", "cpu", "--out", str(run_root),
                 "--executed", str(dest)]) == 0
    assert (dest / "cpu" / "summary.csv").is_file()
    (run_root / "cpu" / "04_cnn_augmentation_sweep" / "04_cnn_augmentation_sweep.ipynb").unlink()
    assert main(["--publish-only", "--profile", "cpu", "--out", str(run_root),
                 "--executed", str(dest)]) == 1
    assert "04_cnn_augmentation_sweep" in capsys.readouterr().err
    # a profile still in progress is published in part: only the notebooks named
    assert main(["--publish-only", "--profile", "cpu", "--out", str(run_root), "--executed", str(dest),
                 "--notebooks", "02_mlp_baseline", "03_cnn"]) == 0
    assert sorted(p.name for p in (dest / "cpu").glob("*.ipynb")) == ["02_mlp_baseline.ipynb",
                                                                      "03_cnn.ipynb"]
    assert "2 of the 8 notebooks" in (dest / "cpu" / "summary.md").read_text()


def test_restore_lets_a_fresh_run_folder_holding_one_notebook_publish_the_series(run_root, tmp_path, capsys):
    """A fresh checkout has no runs/: it runs 07 again, restores the rest from executed/."""
    from fer_lib.publish import restore_run_folder

    dest = tmp_path / "executed"
    first = snapshot(publish_series(run_root / "cpu", dest))
    fresh = tmp_path / "fresh" / "runs"
    (fresh / "cpu" / "07_resnet_small").mkdir(parents=True)
    rerun = run_root / "cpu" / "07_resnet_small" / "07_resnet_small.ipynb"
    shutil.copyfile(rerun, fresh / "cpu" / "07_resnet_small" / "07_resnet_small.ipynb")
    merge_timings(fresh / "cpu", [{"notebook": "07_resnet_small", "seconds": 99.0,
                                   "output": "07_resnet_small/07_resnet_small.ipynb", "machine": "Other CPU"}])
    assert main(["--publish-only", "--profile", "cpu", "--out", str(fresh), "--executed", str(dest),
                 "--restore"]) == 0
    assert "restored from cpu/: 01_data_exploration, 02_mlp_baseline, 03_cnn" in capsys.readouterr().out
    second = snapshot(dest / "cpu")
    # the restored notebooks, 08's figure and the plot publish unchanged; only 07 (its paths come
    # from another run folder) and the summary's table (07's new timing) differ
    assert set(second) == set(first)
    assert {k for k in first if first[k] != second[k]} == {"07_resnet_small.ipynb", "summary.csv", "summary.md"}
    timings = load_timings(fresh / "cpu").set_index("notebook")
    assert timings.loc["07_resnet_small", "seconds"] == 99.0
    assert timings.loc["07_resnet_small", "machine"] == "Other CPU"
    assert timings.loc["03_cnn", "seconds"] == 30.0 and timings.loc["03_cnn", "machine"] == MACHINE
    assert restore_run_folder(dest / "cpu", fresh / "cpu") == []  # nothing is replaced
    with pytest.raises(PublishError, match="no published series to restore from"):
        restore_run_folder(tmp_path / "nowhere" / "cpu", fresh / "cpu")
    with pytest.raises(SystemExit):
        main(["--profile", "cpu", "--restore", "--notebooks", "02_mlp_baseline"])
    assert "--restore goes with --publish" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("/home/bob/x", "~/x"),
    ("/srv/ci/checkout/fer_lib/data.py:3", "./fer_lib/data.py:3"),
    ("/srv/ci/checkout2/x.py", ".../x.py"),
    ("\x1b[0;32m/usr/lib/python3/dist-packages/numpy/a.py\x1b[0m",
     "\x1b[0;32mdist-packages/numpy/a.py\x1b[0m"),
    ("runs/cpu/03_cnn and ./x/y and ~/a/b and 3/4/5 and a // b and </td>", None),
    ("https://example.org/a/b/c", None),
    ("file:///home/bob/a.txt", ".../a.txt"),
    ("'D:\\\\data\\\\fer2013.csv'", "'.../fer2013.csv'"),
    ("/data alone", None),
])
def test_scrubber(text, expected):
    scrub = make_scrubber({"/home/bob": "~", "/srv/ci/checkout": "."})
    assert scrub(text) == (text if expected is None else expected)
    assert not find_absolute_paths(scrub(text)) and not absolute_paths(scrub(text))
    assert bool(find_absolute_paths(text)) == (expected is not None)
    assert bool(absolute_paths(text)) == (expected is not None)


def test_timings_accumulate_across_partial_runs(tmp_path):
    import json

    out = tmp_path / "runs" / "cpu"
    out.mkdir(parents=True)
    # a run folder from before timings.csv had a machine column: its summary.md names it
    (out / "timings.csv").write_text("notebook,seconds,output\n02_mlp_baseline,24.0,a\n03_cnn,362.0,b\n")
    (out / "summary.md").write_text("# x\n\n2 notebooks in 6.4 minutes on Old CPU, 2 cores.\n")
    merged = merge_timings(out, [{"notebook": "03_cnn", "seconds": 100.0, "output": "c",
                                  "machine": "New GPU"},
                                 {"notebook": "01_data_exploration", "seconds": 5.0,
                                  "output": "d", "machine": "New GPU"}])
    assert list(merged["notebook"]) == ["01_data_exploration", "02_mlp_baseline", "03_cnn"]
    table = load_timings(out)
    assert list(table.columns) == ["notebook", "seconds", "output", "machine"]
    assert dict(zip(table["notebook"], table["seconds"])) == {
        "01_data_exploration": 5.0, "02_mlp_baseline": 24.0, "03_cnn": 100.0}
    assert dict(zip(table["notebook"], table["machine"]))["02_mlp_baseline"] == "Old CPU, 2 cores"
    # the summary covers every notebook with a results.json, timed from the merged table
    for name in ("02_mlp_baseline", "03_cnn", "05_resnet"):
        (out / name).mkdir()
        (out / name / "results.json").write_text(json.dumps({"model": "m", "test_accuracy": 0.5,
                                                              "val_accuracy": 0.4}))
    text = summarise_series(out)
    assert "3 notebooks in" in text and "2 machines: Old CPU, 2 cores; New GPU" in text
    assert "05_resnet" in text and "Not in timings.csv (not counted): 05_resnet" in text
    assert (out / "summary.png").stat().st_size > 0
