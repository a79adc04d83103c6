"""The committed executed series (executed/<profile>/): complete, portable, and its summary
table agrees with the notebooks that produced it.

summary.csv is written by `python -m fer_lib series --publish` from the record each notebook's
results cell displays (claim_row, under fer_lib.results.RESULTS_MIMETYPE). This test reads
those records back out of the committed notebooks and compares, so a hand-edited or stale
table fails. Set FER_EXECUTED=<folder> to check a publication somewhere else first.
"""
import csv
import os
from pathlib import Path

import nbformat
import pytest
from path_check import absolute_paths, strings  # tests/ is on sys.path

from fer_lib.results import RESULTS_MIMETYPE
from fer_lib.series import NOTEBOOKS

ROOT = Path(__file__).resolve().parent.parent
EXECUTED = Path(os.environ.get("FER_EXECUTED") or ROOT / "executed")
PROFILES = sorted(p.name for p in EXECUTED.iterdir() if p.is_dir() and not p.name.startswith(".")) \
    if EXECUTED.is_dir() else []
COLUMNS = ["notebook", "model", "epochs", "val_accuracy", "test_accuracy", "macro_f1",
           "claim_accuracy", "claim_metric", "wall_seconds", "machine"]
WITHOUT_RECORD = {"01_data_exploration"}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
MAX_BYTES = 8 * 1024 * 1024

needs_publication = pytest.mark.skipif(
    not PROFILES, reason=f"no published series yet under {EXECUTED.name}/ "
                         "(python -m fer_lib series --publish)")
profiles = pytest.mark.parametrize("profile", PROFILES or ["none"])




# The CPU profile is published whole; a long profile (report) may be published in parts, and
# then its summary.csv lists the notebooks it holds.
COMPLETE = {"cpu", "report"}


def published_names(profile):
    with (EXECUTED / profile / "summary.csv").open(newline="", encoding="utf-8") as handle:
        return [row["notebook"] for row in csv.DictReader(handle)]


def read(profile, name):
    path = EXECUTED / profile / f"{name}.ipynb"
    assert path.is_file(), f"{profile}: {name}.ipynb is not published"
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    return nb


def outputs(nb):
    return [o for cell in nb.cells for o in cell.get("outputs", [])]


def record_of(nb):
    found = [o["data"][RESULTS_MIMETYPE] for o in outputs(nb) if RESULTS_MIMETYPE in o.get("data", {})]
    return found[-1] if found else None


@needs_publication
@profiles
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_published_notebook_is_complete_and_portable(profile, name):
    if profile not in COMPLETE and name not in published_names(profile):
        pytest.skip(f"{profile} is published in part; {name} is not in it yet")
    nb = read(profile, name)
    outs = outputs(nb)
    assert outs, f"{profile}/{name}: no outputs (was it stripped?)"
    assert any(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    if name != "01_data_exploration":
        assert any("image/png" in o.get("data", {}) for o in outs), f"{profile}/{name}: no figure"
    assert not (nb.metadata.get("papermill") or {}).get("exception"), f"{name} stopped on an error"
    assert "widgets" not in nb.metadata
    assert not [o for o in outs if WIDGET_VIEW in o.get("data", {})]
    found = sorted({p for s in strings(nb) for p in absolute_paths(s)})
    assert not found, f"{profile}/{name}: absolute paths {found[:5]}"


@needs_publication
@profiles
def test_published_series_is_small_and_has_its_summary(profile):
    folder = EXECUTED / profile
    for filename in ("summary.csv", "summary.md", "summary.png"):
        assert (folder / filename).is_file(), f"{profile}: {filename} missing"
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"{profile}: {total / 2**20:.1f} MB published"
    for path in folder.glob("*.md"):
        assert not absolute_paths(path.read_text()), path.name
    assert not absolute_paths((folder / "summary.csv").read_text())


@needs_publication
@profiles
def test_summary_rows_agree_with_the_executed_notebooks(profile):
    with (EXECUTED / profile / "summary.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == COLUMNS
        rows = {row["notebook"]: row for row in reader}
    if profile in COMPLETE:
        assert list(rows) == list(NOTEBOOKS)
    else:
        assert rows and list(rows) == [n for n in NOTEBOOKS if n in rows], "rows out of series order"
        published = sorted(p.stem for p in (EXECUTED / profile).glob("*.ipynb"))
        assert published == sorted(rows), f"{profile}: notebooks and summary rows differ"
    for name, row in rows.items():
        assert float(row["wall_seconds"]) > 0 and row["machine"].strip(), f"{name}: untimed"
        record = record_of(read(profile, name))
        if name in WITHOUT_RECORD:
            assert record is None or not record.get("model")
            assert all(row[c] == "" for c in ("model", "epochs", "val_accuracy", "test_accuracy",
                                               "macro_f1")), f"{name}: numbers without a record"
            continue
        assert record is not None, f"{name}: no {RESULTS_MIMETYPE} output in the notebook"
        assert record.get("notebook") in (None, name)
        assert row["model"] == (record.get("model") or ""), name
        assert (int(row["epochs"]) if row["epochs"] else None) == record.get("epochs"), name
        for column in ("val_accuracy", "test_accuracy", "macro_f1", "claim_accuracy"):
            expected = record.get(column)
            if expected is None:
                assert row[column] == "", f"{name}: {column}"
            else:
                assert float(row[column]) == pytest.approx(expected, abs=0.01), f"{name}: {column}"
        assert row["claim_metric"] == (record.get("claim_metric") or ""), name


@needs_publication
def test_readme_results_table_is_the_published_one():
    """The README's results come from the published summaries: regenerate, never type."""
    from fer_lib.publish import readme_results_table

    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- results-table:start -->\n", "\n<!-- results-table:end -->"
    shown = readme[readme.index(start) + len(start):readme.index(end)]
    assert shown.strip() == readme_results_table(EXECUTED).strip(), \
        "README results table is stale: paste fer_lib.publish.readme_results_table() into it"
