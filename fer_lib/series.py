"""Run the notebook series headless with papermill: `python -m fer_lib series`.

Each notebook keeps the experiment report's own parameters in its `parameters` cell (the
"full" profile, meant for a CUDA machine). On a CPU-only machine the "cpu" profile overrides
them so that the whole series finishes in well under an hour on 2 cores while still training
every experiment on the full training set (fewer epochs, smaller sweeps). The "smoke" profile
runs a few batches per notebook and is what the test suite executes.

Outputs go under `runs/<profile>/`: one folder per notebook with the executed notebook, its
`results.json` and figures, plus `summary.md`, `summary.png` and `timings.csv` for the series.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

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
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {name: {} for name in NOTEBOOKS},
    # Budget: the whole series in <= 45 minutes on 2 CPU cores (measured: 43.1 minutes on a
    # 2-core AVX2 EPYC, per notebook in the README). Every final run trains on all of
    # Training; sweeps train each trial for one epoch on a stratified share of it.
    "cpu": {
        "01_data_exploration": {},
        "02_mlp_baseline": {"epochs": 10},
        "03_cnn": {"epochs": 3, "sgd_epochs": 1},
        "04_cnn_augmentation_sweep": {"epochs": 3, "sweep_count": 2, "sweep_epochs": 1,
                                      "sweep_fraction": 0.25},
        "05_resnet": {"epochs": 1, "sweep_count": 2, "sweep_epochs": 1, "sweep_fraction": 0.1},
        "06_resnet_regularized": {"epochs": 2, "sweep_count": 2, "sweep_epochs": 1,
                                  "sweep_fraction": 0.15},
        "07_resnet_small": {"epochs": 1, "sweep_count": 2, "sweep_epochs": 1,
                            "sweep_fraction": 0.1},
        "08_final_model": {"recipe": "fast_cpu", "epochs": 5, "ensemble_seeds": 1,
                           "seed_style_seconds": 120, "zoo_epochs": 0},
    },
    "smoke": {
        name: {"epochs": 1, "max_steps_per_epoch": 2, "data_fraction": 0.05, "sweep_count": 2,
               "sweep_epochs": 1, "sgd_epochs": 1, "zoo_epochs": 0, "ensemble_seeds": 2,
               "seed_style_seconds": 3}
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
    pm.execute_notebook(str(src), str(out_nb), parameters=params, cwd=str(src.parent),
                        progress_bar=False, kernel_name="python3",
                        stdout_file=sys.stdout if echo else None,
                        stderr_file=sys.stderr if echo else None)
    seconds = time.perf_counter() - start
    executed = nbformat.read(str(out_nb), as_version=4)
    nbformat.validate(executed)
    if "widgets" in executed.metadata:
        raise RuntimeError(f"{out_nb}: executed notebook carries widget state; GitHub cannot render it")
    return {"notebook": name, "seconds": round(seconds, 1), "output": str(out_nb)}


def run_series(profile: str = "auto", *, notebooks: list[str] | None = None,
               out_dir: str | os.PathLike = "runs", data_path: str | None = None,
               wandb_mode: str | None = None, overrides: dict[str, Any] | None = None) -> Path:
    """Run the notebooks in order and write the series summary; return the profile's folder.

    overrides: parameters set in every notebook on top of the profile's (e.g. data_fraction).
    """
    import pandas as pd

    from fer_lib.device import machine_description
    from fer_lib.evaluation import to_markdown
    from fer_lib.results import atomic_write_text, collect_results, plot_results

    profile = pick_profile(profile)
    out_root = Path(out_dir).resolve() / profile
    out_root.mkdir(parents=True, exist_ok=True)
    names = list(notebooks) if notebooks else list(NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"unknown notebooks {unknown}; the series is {list(NOTEBOOKS)}")
    print(f"fer_lib series: profile '{profile}', {len(names)} notebooks, output {out_root}",
          flush=True)
    timings = []
    for name in names:
        print(f"--- {name} ---", flush=True)
        timing = run_notebook(name, profile, out_root, data_path=data_path, wandb_mode=wandb_mode,
                              overrides=overrides)
        print(f"--- {name}: {timing['seconds']:.0f} s ---", flush=True)
        # relative to the series folder, so the file reads the same on every machine
        timings.append({**timing, "output": str(Path(timing["output"]).relative_to(out_root))})
    atomic_write_text(out_root / "timings.csv", pd.DataFrame(timings).to_csv(index=False))

    table = collect_results(out_root)
    seconds = {t["notebook"]: t["seconds"] for t in timings}
    table["wall_seconds"] = [seconds.get(n) for n in table["notebook"]]
    for col in ("val_accuracy", "test_accuracy", "macro_f1"):
        table[col] = table[col].astype(float) * 100.0
    shown = table[["notebook", "model", "val_accuracy", "test_accuracy", "macro_f1",
                   "claim_accuracy", "claim_metric", "wall_seconds"]]
    total = sum(t["seconds"] for t in timings)
    header = (f"# FER2013 notebook series: profile '{profile}'\n\n"
              f"{len(timings)} notebooks in {total / 60:.1f} minutes on {machine_description()}.\n\n"
              "Ours: selected on PublicTest (val), reported once on PrivateTest (test), in %. "
              "Report claims use the reports' own splits.\n\n")
    atomic_write_text(out_root / "summary.md", header + to_markdown(shown, floatfmt=".1f") + "\n")
    fig = plot_results(table.assign(test_accuracy=table["test_accuracy"] / 100.0))
    fig.savefig(out_root / "summary.png", dpi=120)
    print((out_root / "summary.md").read_text(), flush=True)
    return out_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer_lib series", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="auto", choices=["auto", *PROFILES])
    parser.add_argument("--notebooks", nargs="*", help="subset of the series, e.g. 02_mlp_baseline")
    parser.add_argument("--out", default="runs", help="output folder (default: runs/)")
    parser.add_argument("--data", default=None, help="FER2013 source (default: found as the library finds it)")
    parser.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"])
    args = parser.parse_args(argv)
    run_series(args.profile, notebooks=args.notebooks, out_dir=args.out, data_path=args.data,
               wandb_mode=args.wandb_mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
