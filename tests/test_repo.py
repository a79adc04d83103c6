"""The repository keeps its promises: layout, pinned requirements, README == CI command."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_layout():
    for name in ("notebooks", "fer_lib", "tests", "requirements.txt", "README.md",
                 ".gitattributes", "pyproject.toml", ".ci/run", ".gitignore"):
        assert (ROOT / name).exists(), f"missing top-level {name}"


def test_requirements_are_pinned_and_install_the_library():
    lines = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [l for l in lines if l and not l.startswith("#")]
    assert "-e ." in reqs
    unpinned = [r for r in reqs if r != "-e ." and not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+]+", r)]
    assert not unpinned, f"unpinned requirements: {unpinned}"
    names = {r.split("==")[0].lower() for r in reqs if "==" in r}
    for needed in ("torch", "torchvision", "jupyterlab", "nbconvert", "papermill", "wandb",
                   "pandas", "numpy", "matplotlib", "scikit-learn", "pytest", "nbstripout",
                   "tqdm", "ipykernel"):
        assert needed in names, f"{needed} is not pinned in requirements.txt"


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = (ROOT / ".ci/run").read_text().splitlines()
    test_cmd = ci_lines[-1].strip()
    assert "pytest" in test_cmd
    readme = (ROOT / "README.md").read_text()
    assert test_cmd in readme.splitlines(), "the README's test command and .ci/run differ"


def test_gitattributes_strips_notebooks():
    assert "*.ipynb filter=nbstripout" in (ROOT / ".gitattributes").read_text()


def test_importing_fer_lib_does_no_heavy_work():
    import subprocess
    import sys

    code = "import sys, fer_lib; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_readme_model_table_matches_the_code():
    from fer_lib.model_table import model_table, to_markdown

    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- model-table:start -->\n", "\n<!-- model-table:end -->"
    shown = readme[readme.index(start) + len(start):readme.index(end)]
    assert shown.strip() == to_markdown(model_table()).strip(), \
        "README model table is stale: paste `python -m fer_lib model-table` into it"


def test_ci_lints_with_pyflakes_and_bugbear_before_the_tests():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    lint = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert {"F", "B"} <= set(lint["select"])
    test_cmd = (ROOT / ".ci/run").read_text().splitlines()[-1]
    assert test_cmd.index("ruff check fer_lib tests") < test_cmd.index("pytest")
    assert any(line.startswith("ruff==") for line in (ROOT / "requirements.txt").read_text().splitlines())


def test_readme_claims_are_the_report_claims():
    """The README's notebook table states each report's claim as fer_lib.results.REPORT_CLAIMS holds it."""
    from decimal import ROUND_HALF_UP, Decimal

    from fer_lib.results import REPORT_CLAIMS

    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"\| \[(\d\d_\w+)\]\(notebooks/", line)
        if match:
            rows[match.group(1)] = line.rstrip(" |").rsplit("|", 1)[1].strip()
    assert set(REPORT_CLAIMS) <= set(rows), "a notebook with a report claim is missing from the README table"
    for notebook, claim in REPORT_CLAIMS.items():
        if claim.accuracy is None:
            assert rows[notebook] == "-", notebook
            continue
        where = "own hold-out" if "hold-out" in claim.metric else "validation"
        shown = Decimal(str(claim.accuracy)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
        assert rows[notebook] == f"{shown}% ({where})", notebook
