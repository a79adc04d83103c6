"""Run the notebook series headless with papermill: `python -m fer_lib series`.

Each notebook keeps the experiment report's own parameters in its `parameters` cell (the
"full" profile, meant for a CUDA machine: the reports' sweeps and epochs). "report" trains
each experiment's best configuration for the report's epochs without the sweep (hours on a
CPU; `--resume` continues where a sitting stopped). On a CPU-only machine the "cpu" profile
skips the sweeps and trains every final run on the full training set for fewer epochs, so the
whole series finishes in well under an hour on 2 cores. The "smoke" profile runs a few
batches per notebook and is what the test suite executes.

Outputs go under `runs/<profile>/`: one folder per notebook with the executed notebook, its
`results.json` and figures, plus `summary.md`, `summary.png` and `timings.csv` for the series.
`--notebooks` runs a subset: its timings replace those notebooks' rows in timings.csv and the
summary covers every notebook with a results.json, so a series can be run in pieces.

Publishing (fer_lib.publish): `--publish` after the run, or `--publish-only` for an existing
run folder, writes `executed/<profile>/` (the notebooks with outputs, scrubbed of machine
paths and widget state, plus summary.csv/.md/.png) for GitHub.
`--restore` first copies into the run folder the published notebooks it lacks (runs/ is not
in the repository: a fresh checkout that ran one notebook again can still publish them all).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

INLINE_BACKEND = "module://matplotlib_inline.backend_inline"

NOTEBOOKS = (
    "01_data_exploration",
    "02_mlp_baseline",
    "03_cnn",
    "04_cnn_augmentation_sweep",
    "05_resnet",
    "06_resnet_regularized",
    "07_resnet_small",
    "08_final_model",
)

# Overrides per profile; a notebook not listed runs with its own parameters cell.
_REPORT_BEST_ONLY = {"sweep_count": 0}  # train the report's best run, no sweep
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    # The notebooks' own parameters: the reports' sweeps and epochs (a CUDA machine).
    "full": {name: {} for name in NOTEBOOKS},
    # Each experiment's final run as the report ran its best configuration: the report's
    # epochs and early stopping, sweeps skipped (their trials would multiply the time). 08's
    # model zoo is a sweep over models (25 registry models x 5 epochs, ~4 PFLOP: hours on a
    # CPU) and is skipped with them; "full" runs it. Hours on a CPU; runs longer than a
    # sitting resume.
    "report": {
        "01_data_exploration": {},
        "02_mlp_baseline": {},
        "03_cnn": {},
        "04_cnn_augmentation_sweep": _REPORT_BEST_ONLY,
        "05_resnet": _REPORT_BEST_ONLY,
        "06_resnet_regularized": _REPORT_BEST_ONLY,
        "07_resnet_small": _REPORT_BEST_ONLY,
        "08_final_model": {"recipe": "fast_cpu", "zoo_epochs": 0},
    },
    # A CPU in well under an hour: no sweeps (the report's best run is trained directly), the
    # time goes to the final runs, on all of Training, with fewer epochs than the reports
    # (each notebook prints the epochs and that they are fewer than the report's).
    "cpu": {
        "01_data_exploration": {},
        "02_mlp_baseline": {},
        "03_cnn": {"epochs": 6, "sgd_epochs": 2},
        "04_cnn_augmentation_sweep": {"epochs": 5, **_REPORT_BEST_ONLY},
        "05_resnet": {"epochs": 4, **_REPORT_BEST_ONLY},
        "06_resnet_regularized": {"epochs": 5, **_REPORT_BEST_ONLY},
        # The report's lr 4.09e-3 as it is: with the notebook's decoupled weight decay (AdamW)
        # the model learns from the first epoch (docs/experiments.md, 07).
        "07_resnet_small": {"epochs": 5, **_REPORT_BEST_ONLY},
        "08_final_model": {"recipe": "fast_cpu", "epochs": 10, "ensemble_seeds": 2,
                           "ladder_epochs": 3, "zoo_epochs": 0},
    },
    # A few batches per notebook: what the test suite executes.
    "smoke": {
        name: {"epochs": 1, "max_steps_per_epoch": 2, "data_fraction": 0.05, "sweep_count": 2,
               "sgd_epochs": 1, "zoo_epochs": 0, "ensemble_seeds": 2, "ladder_epochs": 1}
        for name in NOTEBOOKS
    },
}


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def notebook_path(name: str) -> Path:
    return repo_root() / "notebooks" / f"{name}.ipynb"


def pick_profile(profile: str = "auto") -> str:
    """'auto' means the report's parameters on CUDA and the reduced CPU profile otherwise."""
    if profile != "auto":
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose from auto, {', '.join(PROFILES)}")
        return profile
    import torch

    return "full" if torch.cuda.is_available() else "cpu"


def notebook_parameters(name: str, profile: str, run_dir: Path, data_path: str | None,
                        wandb_mode: str | None) -> dict[str, Any]:
    """Papermill parameters for one notebook: the profile's overrides plus where to write."""
    params: dict[str, Any] = dict(PROFILES[profile].get(name, {}))
    params["run_dir"] = str(run_dir)
    params["runs_root"] = str(run_dir.parent)
    params["profile"] = profile
    if data_path:
        params["data_path"] = str(data_path)
    if wandb_mode:
        params["wandb_mode"] = wandb_mode
    return params


def filter_parameters(nb_path: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Keep only the parameters the notebook's parameters cell defines.

    papermill would otherwise inject unknown names silently; dropping them keeps each
    executed notebook honest about what it ran with.
    """
    import papermill as pm

    known = set(pm.inspect_notebook(str(nb_path)).keys())
    return {k: v for k, v in params.items() if k in known}


def run_notebook(name: str, profile: str, out_root: Path, *, data_path: str | None = None,
                 wandb_mode: str | None = None, overrides: dict[str, Any] | None = None,
                 echo: bool = True) -> dict[str, Any]:
    """Execute one notebook with papermill; return its timing and output path.

    echo: forward the notebook's printed output (epoch lines, progress) to this process's
    stdout, so a headless run shows progress as plain text.
    """
    import nbformat
    import papermill as pm

    run_dir = out_root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    src = notebook_path(name)
    params = notebook_parameters(name, profile, run_dir, data_path, wandb_mode)
    params = filter_parameters(src, {**params, **(overrides or {})})
    out_nb = run_dir / f"{name}.ipynb"
    start = time.perf_counter()
    # The kernel inherits this process's environment. Its figures must land in the executed
    # notebook, so it gets Jupyter's inline backend whatever MPLBACKEND says here (CI and
    # headless shells set Agg, which would leave every executed notebook without a plot).
    backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = INLINE_BACKEND
    try:
        pm.execute_notebook(str(src), str(out_nb), parameters=params, cwd=str(src.parent),
                            progress_bar=False, kernel_name="python3",
                            stdout_file=sys.stdout if echo else None,
                            stderr_file=sys.stderr if echo else None)
    finally:
        if backend is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = backend
    seconds = time.perf_counter() - start
    executed = nbformat.read(str(out_nb), as_version=4)
    nbformat.validate(executed)
    if "widgets" in executed.metadata:
        raise RuntimeError(f"{out_nb}: executed notebook carries widget state; GitHub cannot render it")
    return {"notebook": name, "seconds": round(seconds, 1), "output": str(out_nb)}


TIMING_COLUMNS = ("notebook", "seconds", "output", "machine")


def summary_machine(out_root: str | os.PathLike) -> str | None:
    """The machine named by an existing summary.md ("... minutes on <machine>."), if one.

    Run folders written before timings.csv had a machine column name it only there.
    """
    import re

    path = Path(out_root) / "summary.md"
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\d+ notebooks in [\d.]+ minutes on (.+)\.\s*$", line)
        if match and not re.match(r"\d+ machines\b", match.group(1)):
            return match.group(1)
    return None


def load_timings(out_root: str | os.PathLike):
    """The profile's timings.csv as a DataFrame (TIMING_COLUMNS); empty when there is none."""
    import pandas as pd

    path = Path(out_root) / "timings.csv"
    if not path.is_file():
        return pd.DataFrame(columns=list(TIMING_COLUMNS))
    frame = pd.read_csv(path, dtype={"notebook": str, "output": str})
    if "machine" not in frame.columns:
        frame["machine"] = None
    known = summary_machine(out_root) or ""
    frame["machine"] = frame["machine"].astype(object).where(frame["machine"].notna(), known)
    return frame[list(TIMING_COLUMNS)]


def merge_timings(out_root: str | os.PathLike, rows: list[dict[str, Any]]):
    """Write timings.csv: the rows of the notebooks just run replace their old rows, the other
    notebooks' rows stay, so a series run in pieces is timed as a whole. Returns the table."""
    import pandas as pd

    from fer_lib.fileio import atomic_write_text

    old = load_timings(out_root)
    new = pd.DataFrame(rows, columns=list(TIMING_COLUMNS))
    kept = old[~old["notebook"].isin(new["notebook"])]
    merged = pd.concat([kept, new], ignore_index=True) if len(kept) else new
    order = {name: i for i, name in enumerate(NOTEBOOKS)}
    merged = merged.sort_values("notebook", key=lambda s: s.map(lambda n: order.get(n, len(order))),
                                kind="stable").reset_index(drop=True)
    atomic_write_text(Path(out_root) / "timings.csv", merged.to_csv(index=False))
    return merged


def summarise_series(out_root: str | os.PathLike) -> str:
    """Write summary.md and summary.png for every notebook with a results.json in the profile
    folder (whichever run produced it), timed from timings.csv; return the markdown."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from fer_lib.evaluation import to_markdown
    from fer_lib.fileio import atomic_write_text
    from fer_lib.results import SERIES_COLUMNS, plot_results, series_table

    out_root = Path(out_root)
    profile = out_root.name
    table = series_table(out_root)
    timings = load_timings(out_root)
    seconds = dict(zip(timings["notebook"], timings["seconds"]))
    machine_of = dict(zip(timings["notebook"], timings["machine"]))
    table["wall_seconds"] = [seconds.get(n) for n in table["notebook"]]
    shown = table[SERIES_COLUMNS + ["wall_seconds"]]
    total = float(table["wall_seconds"].astype(float).sum(skipna=True))
    machines = list(dict.fromkeys(m for m in (machine_of.get(n) for n in table["notebook"]) if m))
    if len(machines) == 1:
        where = f"on {machines[0]}"
    elif machines:
        where = f"on {len(machines)} machines: " + "; ".join(machines)
    else:
        where = "on an unrecorded machine"
    untimed = [n for n, s in zip(table["notebook"], table["wall_seconds"]) if pd.isna(s)]
    header = (f"# FER2013 notebook series: profile '{profile}'\n\n"
              f"{len(table)} notebooks in {total / 60:.1f} minutes {where}.\n\n"
              + (f"Not in timings.csv (not counted): {', '.join(untimed)}.\n\n" if untimed else "")
              + "Ours: selected on PublicTest (val), reported once on PrivateTest (test), in %. "
              "Report claims use the reports' own splits.\n\n")
    text = header + to_markdown(shown, floatfmt=".1f") + "\n"
    atomic_write_text(out_root / "summary.md", text)
    fig = plot_results(table.assign(test_accuracy=table["test_accuracy"] / 100.0))
    fig.savefig(out_root / "summary.png", dpi=120)
    plt.close(fig)
    return text


def run_series(profile: str = "auto", *, notebooks: list[str] | None = None,
               out_dir: str | os.PathLike | None = None, data_path: str | None = None,
               wandb_mode: str | None = None, overrides: dict[str, Any] | None = None) -> Path:
    """Run the notebooks in order and write the series summary; return the profile's folder.

    out_dir: where profile folders go (default: fer_lib.results.runs_folder(), runs/ in the
    checkout). notebooks: a subset; their timings replace their old rows in timings.csv and
    the summary covers every notebook of the profile folder, so a series can be run in pieces.
    overrides: parameters set in every notebook on top of the profile's (e.g. data_fraction).
    """
    from fer_lib.device import machine_description
    from fer_lib.results import runs_folder

    profile = pick_profile(profile)
    out_root = Path(out_dir if out_dir is not None else runs_folder()).resolve() / profile
    out_root.mkdir(parents=True, exist_ok=True)
    names = list(notebooks) if notebooks else list(NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"unknown notebooks {unknown}; the series is {list(NOTEBOOKS)}")
    print(f"fer_lib series: profile '{profile}', {len(names)} notebooks, output {out_root}",
          flush=True)
    machine = machine_description()
    timings = []
    for name in names:
        print(f"--- {name} ---", flush=True)
        timing = run_notebook(name, profile, out_root, data_path=data_path, wandb_mode=wandb_mode,
                              overrides=overrides)
        print(f"--- {name}: {timing['seconds']:.0f} s ---", flush=True)
        # relative to the series folder, so the file reads the same on every machine
        timings.append({**timing, "output": str(Path(timing["output"]).relative_to(out_root)),
                        "machine": machine})
        merge_timings(out_root, timings)  # after each notebook: a later failure keeps these
    print(summarise_series(out_root), flush=True)
    return out_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer_lib series", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="auto", choices=["auto", *PROFILES])
    parser.add_argument("--notebooks", nargs="*", help="subset of the series, e.g. 02_mlp_baseline")
    parser.add_argument("--out", default=None,
                        help="folder of the profile folders (default: runs/ in the checkout, "
                             "else ./runs/)")
    parser.add_argument("--data", default=None, help="FER2013 source (default: found as the library finds it)")
    parser.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"])
    parser.add_argument("--publish", action="store_true",
                        help="after the run, publish the profile's executed notebooks and summary "
                             "into --executed")
    parser.add_argument("--resume", action="store_true",
                        help="continue each notebook's runs from their last checkpoints (a long "
                             "profile run across several sittings)")
    parser.add_argument("--publish-only", action="store_true",
                        help="run nothing: publish the existing runs/<profile>/ folder")
    parser.add_argument("--executed", default=None,
                        help="where published series go (default: executed/ in the checkout, "
                             "else ./executed/)")
    parser.add_argument("--restore", action="store_true",
                        help="before publishing, copy into runs/<profile>/ the notebooks of "
                             "executed/<profile>/ it lacks, with their timings (a fresh checkout "
                             "that ran one notebook again can publish the series)")
    parser.add_argument("--results-table", action="store_true",
                        help="run nothing: print the README's results table from executed/")
    args = parser.parse_args(argv)
    if args.restore and not (args.publish or args.publish_only):
        parser.error("--restore goes with --publish or --publish-only")
    if args.results_table:
        from fer_lib.publish import readme_results_table

        print(readme_results_table(args.executed))
        return 0
    if args.publish_only:
        from fer_lib.results import runs_folder

        out_root = Path(args.out if args.out is not None else runs_folder()).resolve()
        out_root = out_root / pick_profile(args.profile)
    else:
        out_root = run_series(args.profile, notebooks=args.notebooks, out_dir=args.out,
                              data_path=args.data, wandb_mode=args.wandb_mode,
                              overrides={"resume": True} if args.resume else None)
    if args.publish or args.publish_only:
        from fer_lib.publish import PublishError, executed_folder, publish_series, restore_run_folder

        try:
            if args.restore:
                published = Path(args.executed or executed_folder()) / out_root.name
                restored = restore_run_folder(published, out_root)
                print(f"restored from {published.name}/: {', '.join(restored) or 'nothing'}", flush=True)
            # with --publish-only, --notebooks publishes part of a profile still in progress
            target = publish_series(out_root, args.executed, data_path=args.data,
                                    notebooks=args.notebooks if args.publish_only else None)
        except PublishError as err:
            print(f"error: not published: {err}", file=sys.stderr)
            return 1
        print(f"published {out_root.name}: {target}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
