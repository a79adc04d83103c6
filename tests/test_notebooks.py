"""The notebook series: clean in git, thin, parameterised, and every notebook runs headless.

The smoke runs execute each notebook with papermill in the `smoke` profile: a few batches on
the real FER2013 file when FER2013_PATH is set, otherwise on a small generated CSV.
"""
import ast
import json
import os
from collections import defaultdict
from pathlib import Path

import nbformat
import pytest

from fer_lib.series import NOTEBOOKS, notebook_path, run_notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_FILES = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _code_cells(path):
    nb = json.loads(path.read_text())
    return nb, [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_series_is_complete_and_named():
    names = [p.stem for p in NOTEBOOK_FILES]
    assert names == list(NOTEBOOKS)
    for n, name in enumerate(names, start=1):
        assert name.startswith(f"0{n}_")
    assert (ROOT / "notebooks" / "05_resnet.ipynb").exists()


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    nb, cells = _code_cells(path)
    nbformat.validate(nbformat.reads(path.read_text(), as_version=4))
    assert "widgets" not in nb["metadata"], "widget state in notebook metadata"
    assert "papermill" not in nb["metadata"], "papermill metadata committed"
    for cell in nb["cells"]:
        assert not cell.get("outputs"), f"{path.name}: a cell has outputs (run nbstripout)"
        assert cell.get("execution_count") is None, f"{path.name}: execution counts committed"
        assert set(cell.get("metadata", {})) <= {"tags"}, f"{path.name}: cell metadata {cell['metadata']}"


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_notebook_has_one_parameters_cell_of_plain_assignments(path):
    nb, cells = _code_cells(path)
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
    tree = ast.parse(_source(tagged[0]))
    assert tree.body, "empty parameters cell"
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"{path.name}: parameters cell holds more than assignments"
    names = {t.id for node in tree.body for t in node.targets}
    assert {"seed", "data_fraction", "device", "wandb_mode", "run_dir"} <= names
    assert nb["cells"][0]["cell_type"] == "markdown" and _source(nb["cells"][0]).startswith("# ")


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=lambda p: p.stem)
def test_notebook_imports_fer_lib(path):
    _, cells = _code_cells(path)
    code = "\n".join(_source(c) for c in cells)
    assert "from fer_lib" in code or "import fer_lib" in code


def test_no_function_or_class_is_defined_in_two_notebooks():
    defined = defaultdict(set)
    for path in NOTEBOOK_FILES:
        _, cells = _code_cells(path)
        for cell in cells:
            for node in ast.walk(ast.parse(_source(cell))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    defined[node.name].add(path.name)
    shared = {name: files for name, files in defined.items() if len(files) > 1}
    assert not shared, f"move these into fer_lib: {shared}"


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
    timings = (root / "timings.csv").read_text().splitlines()
    assert timings[0] == "notebook,seconds,output"
    name, seconds, output = timings[1].split(",")
    assert name == "02_mlp_baseline" and float(seconds) > 0
    assert output == "02_mlp_baseline/02_mlp_baseline.ipynb"  # relative: no machine path
    summary = (root / "summary.md").read_text()
    assert "1 notebooks in" in summary and "02_mlp_baseline" in summary
    assert (root / "summary.png").stat().st_size > 0
