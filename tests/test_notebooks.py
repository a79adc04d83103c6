"""The notebook series: clean in git, thin, parameterised, and every notebook runs headless.

The smoke runs execute each notebook with papermill in the `smoke` profile: a few batches on
the real FER2013 file when FER2013_PATH is set, otherwise on a small generated CSV.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from fer_lib.series import NOTEBOOKS, notebook_path, run_notebook

ROOT = Path(__file__).resolve().parent.parent
# The named series only: a user's papermill output (notebooks/out.ipynb) is not part of it.
NOTEBOOK_FILES = [notebook_path(name) for name in NOTEBOOKS]


def _code_cells(path):
    nb = json.loads(path.read_text())
    return nb, [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_series_is_complete_and_named():
    for n, path in enumerate(NOTEBOOK_FILES, start=1):
        assert path.exists(), path.name
        assert path.stem.startswith(f"0{n}_")
    assert (ROOT / "notebooks" / "05_resnet.ipynb").exists()


def test_papermill_outputs_next_to_the_sources_are_ignored_by_git():
    for name in ("out.ipynb", "05_resnet_out.ipynb", "run-1.ipynb"):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"notebooks/{name}"], cwd=ROOT)
        assert ignored.returncode == 0, f"notebooks/{name} is not ignored"
    for path in NOTEBOOK_FILES:
        tracked = subprocess.run(["git", "check-ignore", "-q", str(path.relative_to(ROOT))], cwd=ROOT)
        assert tracked.returncode == 1, f"{path.name} would be ignored"


def test_every_notebook_starts_with_the_same_setup_cell():
    """Colab / a fresh kernel: the first code cell installs fer_lib when it is missing."""
    firsts = {_source(_code_cells(path)[1][0]) for path in NOTEBOOK_FILES}
    assert len(firsts) == 1, "the setup cells differ between notebooks"
    setup = firsts.pop()
    assert 'find_spec("fer_lib") is None' in setup and "pip" in setup
    assert "ensure_fer2013" in setup
    assert "torch" not in setup.replace("torch stays as it is", "")  # never installs torch itself


def _logic_lines(source):
    """A cell's non-blank lines, without pure pass-through lines (`epochs=epochs, seed=seed,`):
    handing the parameters cell's values to a fer_lib call is plumbing, not copied logic."""
    kept = []
    for line in (raw.strip() for raw in source.splitlines()):
        items = [item.strip() for item in line.rstrip(",)").split(",") if item.strip()]
        if not line or (items and all("=" in item and item.split("=", 1)[0].strip() == item.split("=", 1)[1].strip()
                                      for item in items)):
            continue
        kept.append(line)
    return kept


def _shared_runs(a, b, length):
    """Runs of `length` consecutive identical lines found in both cells' line lists."""
    def windows(lines):
        return {tuple(lines[i:i + length]) for i in range(len(lines) - length + 1)}
    return windows(a) & windows(b)


def test_no_code_is_copied_between_notebooks():
    """Shared protocol lives in fer_lib: no 4 consecutive identical logic lines inside code cells
    of two notebooks (the setup and parameters cells, identical by design, are left out)."""
    cells = {}
    for path in NOTEBOOK_FILES:
        _, code_cells = _code_cells(path)
        body = [c for c in code_cells[1:] if "parameters" not in c.get("metadata", {}).get("tags", [])]
        cells[path.stem] = [_logic_lines(_source(c)) for c in body]
    names = sorted(cells)
    copied = {}
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            shared = [run for a in cells[x] for b in cells[y] for run in _shared_runs(a, b, 4)]
            if shared:
                copied[(x, y)] = shared[0]
    assert not copied, f"code copied between notebooks (move it into fer_lib): {copied}"


def test_copy_detector_finds_a_copied_block_and_ignores_plumbing():
    a = ["x = 1", "y = 2", "z = f(x, y)", "print(z)", "w = 0"]
    assert _shared_runs(a, ["q = 3"] + a[:4], 4)
    assert not _shared_runs(a, a[:3] + ["other()"], 4)
    assert _logic_lines("run(a,\n    epochs=epochs, seed=seed,\n    device=device)\n") == ["run(a,"]
    assert _logic_lines("x = f(epochs=2 * epochs)") == ["x = f(epochs=2 * epochs)"]


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    """The real FER2013 file when available, else a generated one in the same format."""
    real = os.environ.get("FER2013_PATH")
    if real and os.path.exists(real):
        return real, {}
    from fer_lib.synthetic import write_fer2013_csv

    path = tmp_path_factory.mktemp("fer2013") / "fer2013.csv"
    write_fer2013_csv(path, n_per_split=(280, 70, 70), seed=0)
    return str(path), {"data_fraction": 1.0}


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_headless_in_smoke_profile(name, smoke_data, tmp_path, monkeypatch):
    data_path, overrides = smoke_data
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # what CI sets; the executed notebook still gets figures
    out = tmp_path / "runs"
    if name == "08_final_model":
        # 08 reads the other notebooks' results; give it one to read.
        run_notebook("02_mlp_baseline", "smoke", out, data_path=data_path, overrides=overrides,
                     echo=False)
    timing = run_notebook(name, "smoke", out, data_path=data_path, overrides=overrides, echo=False)
    executed = nbformat.read(timing["output"], as_version=4)
    nbformat.validate(executed)
    assert "widgets" not in executed.metadata
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # progress is plain text, never a widget view
    for cell in executed.cells:
        for output in cell.get("outputs", []):
            assert "application/vnd.jupyter.widget-view+json" not in output.get("data", {})
    # figures are in the executed notebook even though the test process says MPLBACKEND=Agg
    images = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{name}: the executed notebook holds no figure"
    results = json.loads((out / name / "results.json").read_text())
    assert results
    if name != "01_data_exploration":
        assert 0.0 <= results["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_run_series_writes_portable_timings_and_a_summary(smoke_data, tmp_path, monkeypatch):
    from fer_lib.series import run_series

    data_path, overrides = smoke_data
    monkeypatch.setenv("WANDB_MODE", "disabled")
    root = run_series("smoke", notebooks=["02_mlp_baseline"], out_dir=tmp_path / "runs",
                      data_path=data_path, overrides=overrides)
    assert root == (tmp_path / "runs" / "smoke").resolve()
    with open(root / "timings.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["notebook", "seconds", "output", "machine"]
        rows = list(reader)
    assert rows[0]["notebook"] == "02_mlp_baseline" and float(rows[0]["seconds"]) > 0
    assert rows[0]["output"] == "02_mlp_baseline/02_mlp_baseline.ipynb"  # relative: no machine path
    assert rows[0]["machine"]
    summary = (root / "summary.md").read_text()
    assert "1 notebooks in" in summary and "02_mlp_baseline" in summary
    assert (root / "summary.png").stat().st_size > 0


@pytest.mark.slow
def test_papermill_epochs_bound_every_training_and_leave_git_clean(smoke_data, tmp_path):
    """`papermill 05_resnet.ipynb out.ipynb -p epochs 1 -p data_fraction 0.05` from notebooks/:
    the sweep trials and the final run train one epoch each (counted in images, not seconds),
    and the output notebook and run folder leave `git status` as it was."""
    data_path, _ = smoke_data
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    run_dir = tmp_path / "05"
    env = {**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
    subprocess.run([sys.executable, "-m", "papermill", "05_resnet.ipynb", "out.ipynb",
                    "-p", "epochs", "1", "-p", "data_fraction", "0.05", "-p", "sweep_count", "2",
                    "-p", "data_path", data_path, "-p", "run_dir", str(run_dir)],
                   cwd=ROOT / "notebooks", env=env, check=True, capture_output=True, text=True)
    try:
        results = json.loads((run_dir / "results.json").read_text())
        train_size = results["train_size"]
        assert results["epochs_run"] == 1 and results["sweep_trial_epochs"] == 1
        assert sum(row["images"] for row in results["history"]) <= train_size
        with open(run_dir / "sweep" / "sweep_trials.csv", newline="") as handle:
            trials = list(csv.DictReader(handle))
        assert len(trials) == 2
        for trial in trials:
            assert int(float(trial["epochs_run"])) == 1 and int(float(trial["images"])) <= train_size
        after = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        assert after == before
    finally:
        (ROOT / "notebooks" / "out.ipynb").unlink(missing_ok=True)
