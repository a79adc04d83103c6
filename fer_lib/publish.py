"""Publish a finished series run: executed notebooks with outputs, readable on GitHub.

    python -m fer_lib series --publish-only --profile cpu      # runs/cpu/ -> executed/cpu/

`publish_series(runs/<profile>, executed/)` writes `executed/<profile>/`:

- `NN_name.ipynb` for each of the eight notebooks, with their outputs (plots stay PNG
  outputs) and execution counts, scrubbed: no absolute path of any machine (the run folder
  becomes `runs/<profile>/...`, the data file its file name, the checkout `.`, the home folder
  `~`, installed packages `site-packages/...`, any other absolute path `.../<last part>`), no
  widget state, and no figure whose base64 text happens to spell a machine path such as
  'tmp' between slashes (encoded again, same pixels);
- `summary.csv` (SUMMARY_COLUMNS, accuracies in percent) and `summary.md`: one row per
  notebook, read from the record each notebook's results cell displays under
  `fer_lib.results.RESULTS_MIMETYPE` (never typed) and from the run's `timings.csv`
  (wall seconds, machine);
- `summary.png`, drawn from the published rows (so it shows exactly the notebooks published,
  also when the run folder's own summary.png covers another subset), and, when the run
  holds one, `time_to_accuracy.png` (written by 08).

Nothing is written unless every notebook passes: a missing notebook or results record, a
failed execution, a path the scrubber cannot remove or a series over `max_bytes` raises
PublishError naming the notebook, and the previous `executed/<profile>/` stays as it was
(the folder is built in a temporary sibling and swapped in at the end).
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from fer_lib.fileio import atomic_write_bytes, atomic_write_text, checkout_root
from fer_lib.results import RESULTS_MIMETYPE
from fer_lib.series import NOTEBOOKS, merge_timings

SUMMARY_COLUMNS = ("notebook", "model", "epochs", "val_accuracy", "test_accuracy", "macro_f1",
                   "claim_accuracy", "claim_metric", "wall_seconds", "machine")
# Notebooks whose results cell shows no claim_row record (01 explores the data, trains nothing).
WITHOUT_RECORD = frozenset({"01_data_exploration"})
# A published series is read on GitHub and cloned with the repo: keep it small.
MAX_BYTES = 8 * 1024 * 1024
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# Base64 payloads: '/' is part of the alphabet, so they are neither scrubbed nor searched.
BINARY_MIMETYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp",
                              "application/pdf"})
FIGURES = ("time_to_accuracy.png",)  # copied from the run folder; summary.png is drawn
# Base64 text is not searched for paths, but a plain text search of the repository for machine
# paths reads it like any other text, and 5 characters of a figure spell 'tmp' between two
# slashes by chance about once in 10^9 positions: often enough over a series. Such a PNG is
# encoded again.
PATH_LIKE_IN_BASE64 = re.compile(
    r"/(?:tmp|home|work|root|Users|mnt|scratch|private|var|opt|data|srv|media|content)/")

_PART = r"[\w.@+-]+"
# A URL is left alone (its path is not a file on this machine), except a file: URL.
_URL = r"(?P<url>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>`]*)"
# POSIX: '/' that does not continue a word, a relative path or '~', then 2+ components
# ('/data' alone is not flagged; '/tmp/x' and '/home/u/' are).
_POSIX = rf"(?P<posix>(?<![\w.~])/(?:{_PART}/)+(?:{_PART})?)"
# Windows: drive letter paths (also with doubled backslashes as in a repr) and UNC paths.
_WINDOWS = (r"(?P<windows>(?<![\w])[A-Za-z]:(?:\\{1,2}|/)(?:[^\\/\s\"'<>|:*?]+(?:\\{1,2}|/))*"
            r"[^\\/\s\"'<>|:*?]*|\\\\[\w.$-]+\\[\w.$-]+(?:\\[^\\\s\"'<>|:*?]+)*)")
ABSOLUTE_PATH = re.compile("|".join((_URL, _POSIX, _WINDOWS)))
# Terminal colour codes (IPython tracebacks: "\x1b[0;32m/home/u/x.py"): the text between them
# is searched piece by piece, so a path right after a code is still found.
ANSI = re.compile(r"(\x1b\[[0-9;?]*[A-Za-z])")
_SITE_PACKAGES = re.compile(rf"(?<![\w.~])/(?:{_PART}/)*?((?:site|dist)-packages/)")


class PublishError(RuntimeError):
    """The run folder cannot be published as it is; the message names the notebook."""


def executed_folder() -> Path:
    """Default destination: `executed/` in the checkout, else `./executed/`."""
    root = checkout_root()
    return (root if root is not None else Path.cwd()) / "executed"


# --------------------------------------------------------------------------- scrubbing

def find_absolute_paths(text: str) -> list[str]:
    """Absolute POSIX (2+ components) and Windows paths in `text`; URLs other than file:
    URLs are not paths."""
    found = []
    for match in (m for piece in ANSI.split(text) for m in ABSOLUTE_PATH.finditer(piece)):
        if match.group("url"):
            if match.group("url").lower().startswith("file:"):
                found.append(match.group("url"))
        else:
            found.append(match.group(0))
    return found


def _neutral(match: re.Match) -> str:
    url = match.group("url")
    if url is not None:
        if not url.lower().startswith("file:"):
            return url
        path = url.split("://", 1)[1]
    else:
        path = match.group(0)
    last = re.split(r"[\\/]+", path.rstrip("\\/"))[-1] if path.rstrip("\\/") else ""
    return f".../{last}" if last and ":" not in last else "..."


def make_scrubber(prefixes: dict[str, str]) -> Callable[[str], str]:
    """A function replacing each known absolute prefix (longest first, whole path components
    only) by its relative text, installed packages by `site-packages/...`, and any other
    absolute path by a neutral `.../<last part>`."""
    known = sorted(((p.rstrip("/\\"), r) for p, r in prefixes.items()
                    if p and len(p.rstrip("/\\")) > 1), key=lambda item: -len(item[0]))
    patterns = [(re.compile(re.escape(p) + r"(?![\w.@+-])"), r) for p, r in known]

    def scrub(text: str) -> str:
        for pattern, replacement in patterns:
            text = pattern.sub(lambda _m, r=replacement: r, text)
        return "".join(piece if i % 2 else ABSOLUTE_PATH.sub(_neutral, _SITE_PACKAGES.sub(r"\1", piece))
                       for i, piece in enumerate(ANSI.split(text)))

    return scrub


def _walk_strings(node: Any, fn: Callable[[str], Any], *, mimetype: str | None = None) -> Any:
    """Apply `fn` to every string in a notebook's JSON tree, skipping binary payloads and
    markdown attachments; returns the new tree (fn's return replaces each string)."""
    if isinstance(node, str):
        return node if mimetype in BINARY_MIMETYPES else fn(node)
    if isinstance(node, list):
        return [_walk_strings(item, fn, mimetype=mimetype) for item in node]
    if isinstance(node, dict):
        out = type(node)()
        for key, value in node.items():
            if key == "attachments":
                out[key] = value
            elif key == "data" and isinstance(value, dict):  # an output's mime bundle
                out[key] = type(value)((m, _walk_strings(v, fn, mimetype=m)) for m, v in value.items())
            else:
                out[key] = _walk_strings(value, fn, mimetype=mimetype)
        return out
    return node


def png_without_path_like_text(b64: str) -> str:
    """The same PNG (same pixels and mode), encoded again until its base64 text holds nothing
    that reads as a machine path (`PATH_LIKE_IN_BASE64`); returned unchanged when it holds none."""
    import base64

    from PIL import Image

    if not PATH_LIKE_IN_BASE64.search(b64):
        return b64
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    # Each zlib level gives other bytes; the chance that all ten spell a path is nil.
    for level in range(9, -1, -1):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=level)
        text = base64.b64encode(buffer.getvalue()).decode("ascii")
        if not PATH_LIKE_IN_BASE64.search(text):
            return text + ("\n" if b64.endswith("\n") else "")
    raise PublishError("a figure reads as a machine path at every PNG compression level")


def reencode_path_like_figures(nb: Any) -> None:
    """Encode again, in place, every PNG output whose base64 text reads as a machine path."""
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) or []:
            data = output.get("data") or {}
            if isinstance(data.get("image/png"), str):
                data["image/png"] = png_without_path_like_text(data["image/png"])


def notebook_absolute_paths(nb: Any) -> list[str]:
    """Every absolute path left anywhere in a notebook (sources, outputs, metadata)."""
    found: list[str] = []
    _walk_strings(nb, lambda s: found.extend(find_absolute_paths(s)) or s)
    return found


def strip_widgets(nb: Any) -> Any:
    """Drop widget state: notebook metadata.widgets and outputs that are widget views (their
    text/plain is only the widget's repr)."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if "outputs" in cell:
            cell.outputs = [o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})]
    return nb


def _prefixes(nb: Any, name: str, profile: str, profile_dir: Path,
              data_path: str | None) -> dict[str, str]:
    """Absolute prefixes this notebook may hold, from this machine and from the machine that
    ran it (papermill's parameters and paths), mapped to the text that replaces them."""
    prefixes: dict[str, str] = {}
    pm = nb.metadata.get("papermill", {}) or {}
    params = pm.get("parameters", {}) or {}

    def add(path: Any, replacement: str) -> None:
        if isinstance(path, str) and (path.startswith("/") or re.match(r"[A-Za-z]:[\\/]", path)):
            prefixes.setdefault(path, replacement)

    home = os.path.expanduser("~")
    if home not in ("/", "") and home.count("/") >= 1:
        add(home, "~")
    root = checkout_root()
    if root is not None:
        add(str(root), ".")
    for p in {str(profile_dir.absolute()), str(profile_dir.resolve())}:
        add(p, f"runs/{profile}")
        add(str(Path(p).parent), "runs")
    for path in (params.get("data_path"), data_path, os.environ.get("FER2013_PATH")):
        if isinstance(path, str) and path:
            add(path, re.split(r"[\\/]", path.rstrip("\\/"))[-1])
    add(params.get("run_dir"), f"runs/{profile}/{name}")
    add(params.get("runs_root"), f"runs/{profile}")
    for key in ("input_path", "output_path"):
        path = pm.get(key)
        if not isinstance(path, str):
            continue
        parts = re.split(r"[\\/]", path)
        if key == "input_path" and len(parts) >= 3 and parts[-2] == "notebooks":
            add(path[: -len(parts[-1]) - len(parts[-2]) - 2], ".")  # the checkout that ran it
        if key == "output_path" and len(parts) >= 3:
            add(path[: -len(parts[-1]) - len(parts[-2]) - 2], f"runs/{profile}")
    return prefixes


# --------------------------------------------------------------------------- the run's numbers

def results_record(nb: Any) -> dict[str, Any] | None:
    """The last RESULTS_MIMETYPE record among a notebook's outputs (claim_row's), or None."""
    record = None
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if RESULTS_MIMETYPE in data:
                record = data[RESULTS_MIMETYPE]
    return dict(record) if record is not None else None


def read_timings(profile_dir: Path) -> dict[str, dict[str, Any]]:
    """timings.csv's rows by notebook: wall seconds and machine."""
    from fer_lib.series import summary_machine

    path = profile_dir / "timings.csv"
    if not path.is_file():
        raise PublishError(f"{profile_dir.name}: no timings.csv in the run folder "
                           "(run `python -m fer_lib series` first)")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    fallback = summary_machine(profile_dir)  # run folders from before timings had 'machine'
    out = {}
    for row in rows:
        machine = (row.get("machine") or "").strip() or fallback
        out[row["notebook"]] = {"seconds": float(row["seconds"]), "machine": machine}
    return out


def _number(value: Any, digits: int) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), digits)


def summary_rows(notebooks: dict[str, Any], timings: dict[str, dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """One SUMMARY_COLUMNS row per notebook, from its results record and its timing."""
    rows = []
    for name, nb in notebooks.items():
        timing = timings.get(name)
        if timing is None:
            raise PublishError(f"{name}: no row in timings.csv (its wall time is unknown)")
        if not timing["machine"]:
            raise PublishError(f"{name}: timings.csv names no machine for it")
        row: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS)
        row.update(notebook=name, wall_seconds=_number(timing["seconds"], 1),
                   machine=timing["machine"])
        record = results_record(nb)
        if record is None and name not in WITHOUT_RECORD:
            raise PublishError(
                f"{name}: the executed notebook has no output with mimetype {RESULTS_MIMETYPE} "
                "(its results cell must display fer_lib.results.claim_row(...))")
        if record is not None:
            if record.get("notebook") not in (None, name):
                raise PublishError(f"{name}: its results record names {record.get('notebook')!r}")
            epochs = record.get("epochs")
            row.update(model=record.get("model"),
                       epochs=int(epochs) if epochs is not None else None,
                       val_accuracy=_number(record.get("val_accuracy"), 2),
                       test_accuracy=_number(record.get("test_accuracy"), 2),
                       macro_f1=_number(record.get("macro_f1"), 2),
                       claim_accuracy=_number(record.get("claim_accuracy"), 2),
                       claim_metric=record.get("claim_metric") or None)
        rows.append(row)
    return rows


def summary_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in SUMMARY_COLUMNS})
    return buffer.getvalue()


def summary_markdown(rows: list[dict[str, Any]], profile: str) -> str:
    import pandas as pd

    from fer_lib.evaluation import to_markdown

    frame = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    frame["notebook"] = [f"[{n}]({n}.ipynb)" for n in frame["notebook"]]
    frame["epochs"] = ["" if r["epochs"] is None else str(r["epochs"]) for r in rows]
    for col in ("val_accuracy", "test_accuracy", "macro_f1", "claim_accuracy", "wall_seconds"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    machines = list(dict.fromkeys(r["machine"] for r in rows))
    total = sum(r["wall_seconds"] or 0.0 for r in rows) / 60.0
    if len(machines) == 1:
        where, shown = f"on {machines[0]}", frame.drop(columns="machine")
    else:
        where, shown = f"on {len(machines)} machines (see the machine column)", frame
    covered = (f"{len(rows)} notebooks" if len(rows) == len(NOTEBOOKS)
               else f"{len(rows)} of the {len(NOTEBOOKS)} notebooks (the others have not run yet)")
    header = (f"# FER2013 notebook series: profile '{profile}', executed\n\n"
              f"{covered} in {total:.1f} minutes {where}.\n\n"
              "Ours: epoch selected on PublicTest (val_accuracy), reported once on PrivateTest "
              "(test_accuracy), in %; macro_f1 on PrivateTest. claim_accuracy is the "
              "experiment report's own number, on its own split (claim_metric). Read from "
              "each executed notebook's results cell; `summary.csv` holds the same rows.\n\n")
    return header + to_markdown(shown, floatfmt=".1f") + "\n"


def _summary_png(rows: list[dict[str, Any]]) -> bytes:
    """summary.png from the published rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from fer_lib.results import plot_results

    frame = pd.DataFrame([r for r in rows if r["test_accuracy"] is not None])
    frame["test_accuracy"] = frame["test_accuracy"] / 100.0
    fig = plot_results(frame)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


# --------------------------------------------------------------------------- publishing

def prepare_notebook(path: Path, name: str, profile: str, profile_dir: Path,
                     data_path: str | None = None) -> Any:
    """Read one executed notebook and return its scrubbed, widget-free copy (validated)."""
    import nbformat

    try:
        nb = nbformat.read(str(path), as_version=4)
    except FileNotFoundError:
        raise PublishError(f"{name}: no executed notebook at runs/{profile}/{name}/{name}.ipynb "
                           f"(run `python -m fer_lib series --profile {profile} "
                           f"--notebooks {name}`)") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same error to a user
        raise PublishError(f"{name}: cannot read the executed notebook ({err})") from None
    if (nb.metadata.get("papermill") or {}).get("exception"):
        raise PublishError(f"{name}: the executed notebook stopped on an error; rerun it")
    scrub = make_scrubber(_prefixes(nb, name, profile, profile_dir, data_path))
    clean = nbformat.from_dict(_walk_strings(dict(nb), scrub))
    strip_widgets(clean)
    reencode_path_like_figures(clean)
    left = notebook_absolute_paths(clean)
    if left:
        raise PublishError(f"{name}: absolute paths survive scrubbing: {left[:3]}")
    try:
        nbformat.validate(clean)
    except nbformat.ValidationError as err:
        raise PublishError(f"{name}: not a valid notebook after scrubbing ({err.message})") from None
    return clean


def _swap_in(staging: Path, target: Path) -> None:
    """Replace `target` by `staging` (two renames on one file system; the old folder is put
    back if the second rename fails)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-old-"))
        old.rmdir()
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish_series(profile_dir: str | os.PathLike, dest: str | os.PathLike | None = None, *,
                   max_bytes: int = MAX_BYTES, data_path: str | None = None,
                   notebooks: Sequence[str] | None = None) -> Path:
    """Publish the finished run in `profile_dir` (runs/<profile>/) into dest/<profile>/.

    dest: the `executed/` folder (default: executed_folder()). data_path: the FER2013 file the
    run read, when it was not passed as a notebook parameter (its folder is scrubbed too).
    notebooks: publish only these (a profile run still in progress, e.g. the report profile
    after some sittings); the summary then says how many of the series it covers.
    Returns dest/<profile>. Raises PublishError (naming the notebook) and leaves an existing
    dest/<profile>/ untouched when the run cannot be published.
    """
    import nbformat

    profile_dir = Path(profile_dir)
    if not profile_dir.is_dir():
        raise PublishError(f"{profile_dir.name}: no run folder (run `python -m fer_lib series "
                           f"--profile {profile_dir.name}` first)")
    profile = profile_dir.resolve().name
    dest = Path(dest) if dest is not None else executed_folder()
    target = dest / profile

    unknown = [name for name in notebooks or () if name not in NOTEBOOKS]
    if unknown:
        raise PublishError(f"{unknown[0]}: not a notebook of the series {list(NOTEBOOKS)}")
    names = [name for name in NOTEBOOKS if notebooks is None or name in notebooks]
    prepared = {name: prepare_notebook(profile_dir / name / f"{name}.ipynb", name, profile,
                                       profile_dir, data_path)
                for name in names}
    rows = summary_rows(prepared, read_timings(profile_dir))

    texts = {f"{name}.ipynb": nbformat.writes(nb) + "\n" for name, nb in prepared.items()}
    texts["summary.csv"] = summary_csv(rows)
    texts["summary.md"] = summary_markdown(rows, profile)
    figures: dict[str, bytes] = {"summary.png": _summary_png(rows)}
    for figure in FIGURES:
        for candidate in (profile_dir / figure, profile_dir / "08_final_model" / figure):
            if candidate.is_file():
                figures[figure] = candidate.read_bytes()
                break

    sizes = {n: len(t.encode("utf-8")) for n, t in texts.items()}
    sizes.update({n: len(b) for n, b in figures.items()})
    total = sum(sizes.values())
    if total > max_bytes:
        largest = sorted(sizes.items(), key=lambda item: -item[1])[:3]
        listed = ", ".join(f"{n} {s / 2**20:.1f} MB" for n, s in largest)
        raise PublishError(f"{profile}: the published series would be {total / 2**20:.1f} MB, over "
                           f"the {max_bytes / 2**20:.1f} MB limit; largest: {listed}")

    dest.mkdir(parents=True, exist_ok=True)
    for leftover in [*dest.glob(f".{profile}-new-*"), *dest.glob(f".{profile}-old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)  # from a publish that was killed halfway
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=f".{profile}-new-"))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes 0700
        for filename, text in texts.items():
            atomic_write_text(staging / filename, text)
        for filename, data in figures.items():
            (staging / filename).write_bytes(data)
            os.chmod(staging / filename, 0o644)
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def restore_run_folder(published: str | os.PathLike, profile_dir: str | os.PathLike) -> list[str]:
    """Fill a run folder with the published notebooks it lacks; return their names.

    runs/ is not in the repository, so a fresh checkout that runs one notebook again has a
    run folder holding that notebook alone, and publishing the series needs the others. For
    each notebook in `published` (executed/<profile>/) whose run folder has no notebook, this
    copies the published one (already scrubbed: publishing it again gives the same file),
    adds its summary.csv wall seconds and machine to timings.csv, and, with 08, 08's figures.
    Nothing the run folder holds is replaced. PublishError when `published` has no summary.csv.
    """
    published, profile_dir = Path(published), Path(profile_dir)
    summary = published / "summary.csv"
    if not summary.is_file():
        raise PublishError(f"{published.name}: no published series to restore from "
                           f"({summary.name} missing in {published})")
    with summary.open(newline="", encoding="utf-8") as handle:
        rows = {row["notebook"]: row for row in csv.DictReader(handle)}
    restored, timings = [], []
    for name in NOTEBOOKS:
        source, target = published / f"{name}.ipynb", profile_dir / name / f"{name}.ipynb"
        if name not in rows or not source.is_file() or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, source.read_text(encoding="utf-8"))
        timings.append({"notebook": name, "seconds": float(rows[name]["wall_seconds"]),
                        "output": f"{name}/{name}.ipynb", "machine": rows[name]["machine"]})
        if name == "08_final_model":
            for figure in FIGURES:
                if (published / figure).is_file():
                    atomic_write_bytes(target.parent / figure, (published / figure).read_bytes())
        restored.append(name)
    if timings:
        merge_timings(profile_dir, timings)
    return restored


def readme_results_table(executed: str | os.PathLike | None = None,
                         profiles: Sequence[str] = ("cpu", "report")) -> str:
    """The README's results table, read from the published summaries (never typed).

    One row per notebook: the report's claim, then PrivateTest % (epochs) per published
    profile; "-" where a profile has not published that notebook yet.
    """
    import csv

    folder = Path(executed) if executed is not None else executed_folder()
    published: dict[str, dict[str, dict[str, str]]] = {}
    for profile in profiles:
        path = folder / profile / "summary.csv"
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as handle:
                published[profile] = {row["notebook"]: row for row in csv.DictReader(handle)}
    from fer_lib.results import REPORT_CLAIMS

    header = ["notebook", "model", "report's claim %"] + [
        f"ours, `{profile}` profile: PrivateTest % (epochs)" for profile in published]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in NOTEBOOKS:
        if name == "01_data_exploration":
            continue
        claim = REPORT_CLAIMS.get(name)
        model = next((rows[name]["model"] for rows in published.values()
                      if name in rows and rows[name]["model"]), "")
        cells = [name, f"`{model}`" if model else "-",
                 f"{claim.accuracy:.1f} ({claim.metric})" if claim and claim.accuracy else "-"]
        for profile, rows in published.items():
            row = rows.get(name)
            if row and row["test_accuracy"]:
                link = f"executed/{profile}/{name}.ipynb"
                cells.append(f"[{float(row['test_accuracy']):.1f}]({link}) ({row['epochs']})")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
