"""One prepared GPU session: `python -m fer_lib gpu-run [--dry-run] [--out DIR] [--data DIR]`.

Made for a borrowed GPU machine with a hard time limit (docs/speed.md: an H200 lent for
minutes, torch 2.11 preinstalled, no network, a few files back). In order, each step with a
time budget inside `--minutes` (default 9) in all:

1. tests   the CUDA tests (tests/test_cuda.py; they skip without a GPU), in a pytest subprocess
2. bench   the matmul peak and the training FLOP/s fraction of exp3_cnn, resnet18_48,
           vgg_khaireddin, fernet_small, fernet and fernet_large (`fer_lib.bench.peak_fraction`)
3. fast    `reproduce` of the fast_gpu recipe (fast_cpu's on a wider net), seeds 0 1 2
4. record  `reproduce` of the record recipe, seeds 0 1 2, in whatever time is left; a short
           timed run of the recipe first checks that one seed fits (else fewer epochs, noted)

A step whose budget runs out is cut, not killed: the bench skips the models left, reproduce
starts no seed that would not fit and stops a run between epochs (`fer_lib.recipes`); each
cut leaves a note. So the command always finishes and writes what it has into `--out`, at
most 8 files: summary.json, gpu_run.log (everything printed), gpu_run.md (the tables),
bench_peak.png, tta_<recipe>.png, and record_best.safetensors + .json: the record seed with
the best PublicTest accuracy, as shipped weights (`fer_lib.weights_io.save_run_weights`;
~10 MB, under the 16 MiB a file may bring back). Other training run folders (checkpoints)
go to a temporary folder that is removed at the end.

Exit code: 0 when every step ran (a budget may have cut seeds or models: see the notes);
1 when a step failed or was skipped for lack of time, or without CUDA and --dry-run.

`--dry-run`: the same steps in smoke size on CPU (generated data unless --data is given;
one short epoch per seed), a few seconds each; the test suite runs it.

Data: the machine cannot reach the FER2013 file, and what travels with a call is limited
to 64 MiB. `--pack DIR` writes FER2013 as two xz files (Training; PublicTest + PrivateTest),
each small enough to carry in its own call; `--data DIR` (default .gpudata when it exists)
loads them. File layout (after xz): N usage bytes (0 Training, 1 PublicTest, 2 PrivateTest),
N label bytes, then N x 48 x 48 pixel bytes in the original row order.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import lzma
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = ["TRAIN_FILE", "TEST_FILE", "pack_fer2013", "load_packed", "fitting_epochs", "run_steps", "main"]

TRAIN_FILE = "fer2013_training.u8.xz"
TEST_FILE = "fer2013_publictest_privatetest.u8.xz"
DEFAULT_DATA_DIR = ".gpudata"
PIXELS = 48 * 48
# Delta against the pixel one row up (48 bytes back) before LZMA2: faces are smooth
# vertically, which saves ~9% over plain xz and keeps Training under 50 MB.
_FILTERS = [{"id": lzma.FILTER_DELTA, "dist": 48}, {"id": lzma.FILTER_LZMA2, "preset": 6}]

# the issue's three, plus the recipes' models: fernet_small (fast_cpu), fernet (fast_gpu) and
# fernet_large (record)
BENCH_MODELS = ("exp3_cnn", "resnet18_48", "vgg_khaireddin", "fernet_small", "fernet", "fernet_large")
# fast_cpu ran on the first lease (docs/speed.md); fast_gpu is its version for a GPU
RECIPE_STEPS = (("fast", "fast_gpu"), ("record", "record"))
# The record step gets the time left; a short timed run first checks that one seed of the
# recipe fits in it (`fitting_epochs`), else its epochs are cut to what fits.
FIT_EPOCHS_STEPS = ("record",)
# steps whose best seed (by PublicTest) comes back as <step>_best.safetensors + .json
KEEP_WEIGHTS_STEPS = ("record",)
CALIBRATION_STEPS = 40
SEEDS = (0, 1, 2)
# Seconds per step; the record recipe gets whatever is left. The reserve keeps time for
# writing the outputs after the last step.
STEP_BUDGETS = {"tests": 45.0, "bench": 50.0, "fast": 120.0}
RESERVE_SECONDS = 15.0
MIN_STEP_SECONDS = 5.0


# --------------------------------------------------------------------------------------
# data: pack here, load there


def _payload(images: np.ndarray, labels: np.ndarray, usage: np.ndarray) -> bytes:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.shape[1:] != (48, 48):
        raise ValueError(f"images must be (N, 48, 48), got {images.shape}")
    return (np.asarray(usage, dtype=np.uint8).tobytes() + np.asarray(labels, dtype=np.uint8).tobytes()
            + images.tobytes())


def pack_fer2013(out_dir: str | os.PathLike, source: str | os.PathLike | None = None, *,
                 verbose: bool = True) -> list[Path]:
    """Write FER2013 (found as `load_fer2013(source)` finds it) as TRAIN_FILE and TEST_FILE in out_dir."""
    from fer_lib.data import load_fer2013
    from fer_lib.fileio import atomic_write_bytes

    data = load_fer2013(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = {
        TRAIN_FILE: (data.train.images, data.train.labels, np.zeros(len(data.train), np.uint8)),
        TEST_FILE: (np.concatenate([data.val.images, data.test.images]),
                    np.concatenate([data.val.labels, data.test.labels]),
                    np.concatenate([np.ones(len(data.val), np.uint8), np.full(len(data.test), 2, np.uint8)])),
    }
    written = []
    for name, (images, labels, usage) in parts.items():
        start = time.perf_counter()
        packed = lzma.compress(_payload(images, labels, usage), format=lzma.FORMAT_XZ, filters=_FILTERS)
        written.append(atomic_write_bytes(out / name, packed))
        if verbose:
            print(f"wrote {out / name}: {len(labels):,} images, {len(packed) / 1e6:.1f} MB "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return written


def _read_packed(path: Path, allowed_usage: set[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no packed FER2013 file here; write it with "
                                "`python -m fer_lib gpu-run --pack DIR` where the data is")
    try:
        raw = lzma.decompress(path.read_bytes())
    except lzma.LZMAError as error:
        raise ValueError(f"{path}: not a readable xz file ({error}); pack it again") from None
    n, rest = divmod(len(raw), 2 + PIXELS)
    if rest or n == 0:
        raise ValueError(f"{path}: {len(raw)} bytes is not N x (2 + {PIXELS}); pack it again")
    array = np.frombuffer(raw, dtype=np.uint8)
    usage, labels = array[:n].astype(np.int8), array[n:2 * n].astype(np.int64)
    if not set(np.unique(usage).tolist()) <= allowed_usage:
        raise ValueError(f"{path}: usage codes {sorted(set(np.unique(usage).tolist()))}, expected "
                         f"{sorted(allowed_usage)}; were the two files swapped?")
    return array[2 * n:].reshape(n, 48, 48), labels, usage


def _dataset(images: np.ndarray, labels: np.ndarray, usage: np.ndarray, source: Path, fmt: str):
    from fer_lib.data import CLASS_NAMES, FER2013, Split

    if labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{source}: label {int(labels.max())} is not one of the {len(CLASS_NAMES)} classes")
    rows = np.arange(len(labels))
    splits = [Split(images=images[usage == code], labels=labels[usage == code], rows=rows[usage == code],
                    name=name) for code, name in enumerate(("train", "val", "test"))]
    return FER2013(*splits, class_names=tuple(CLASS_NAMES), source=source, format=fmt)


def load_packed(directory: str | os.PathLike):
    """FER2013 (standard protocol, original labels) from the two files `pack_fer2013` wrote."""
    directory = Path(directory)
    train = _read_packed(directory / TRAIN_FILE, {0})
    test = _read_packed(directory / TEST_FILE, {1, 2})
    images, labels, usage = (np.concatenate([a, b]) for a, b in zip(train, test, strict=True))
    return _dataset(images, labels, usage, directory, "packed")


# --------------------------------------------------------------------------------------
# steps


@dataclass
class StepResult:
    name: str
    status: str = "skipped"  # "ok" | "partial" (a budget cut part of it) | "skipped" | "failed"
    seconds: float = 0.0
    budget_seconds: float = 0.0
    note: str = ""
    result: dict[str, Any] = field(default_factory=dict)


class _Tee:
    """Writes to the terminal and the log file at once (the log is what comes back)."""

    encoding = "utf-8"

    def __init__(self, *streams: TextIO):
        self.streams = streams

    def isatty(self) -> bool:  # progress bars and colours stay off: the log is a plain file
        return False

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _step_tests(budget: float, dry_run: bool) -> StepResult:
    from fer_lib.fileio import checkout_root

    step = StepResult("tests")
    root = checkout_root()
    test_file = root / "tests" / "test_cuda.py" if root is not None else None
    if test_file is None or not test_file.is_file():
        step.note = "no tests/test_cuda.py beside the package (an installed copy?)"
        return step
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file.relative_to(root))]
    print("$ " + " ".join(command[1:]), flush=True)
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as timeout:
        output = timeout.stdout or b""
        print(output.decode(errors="replace") if isinstance(output, bytes) else output, flush=True)
        step.status, step.note = "failed", f"pytest timed out after {budget:.0f} s"
        return step
    print(done.stdout + done.stderr, flush=True)
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    step.note = lines[-1].strip("= ") if lines else f"pytest exit code {done.returncode}"
    step.status = "ok" if done.returncode == 0 else "failed"
    step.result = {"returncode": done.returncode, "dry_run_expected_skips": dry_run}
    return step


def _step_bench(budget: float, dry_run: bool, out: Path) -> StepResult:
    from fer_lib.bench import peak_fraction, peak_table

    step = StepResult("bench")
    start = time.perf_counter()
    if dry_run:
        kwargs = {"seconds": 0.05, "batch_size": 2, "peak_size": 256, "rounds": 1, "warmup_steps": 0,
                  "engine_chunk": 1}
    else:
        # two timed paths per model, plus warm-up and the peak; the recipes' batch size
        seconds = max(1.0, min(8.0, (budget - 15) / (2 * len(BENCH_MODELS))))
        kwargs = {"seconds": seconds, "batch_size": 128, "rounds": 2, "warmup_steps": 3}
    result = peak_fraction(list(BENCH_MODELS), deadline=start + budget, **kwargs)
    step.result = {**result, "table": peak_table(result)}
    step.status = "partial" if result["skipped"] else "ok"
    step.note = "; ".join(result["skipped"]) or (f"peak {result['peak']['gflops']:,.0f} GFLOP/s "
                                                 f"({result['peak']['precision']})")
    if result["rows"]:
        _plot_fractions(result, out / "bench_peak.png")
    return step


def fitting_epochs(recipe: str, data, budget: float, work: Path, overrides: dict[str, Any], *,
                   steps: int = CALIBRATION_STEPS) -> tuple[int, float]:
    """(epochs of `recipe` that fit one seed into `budget` seconds, estimated epoch seconds).

    A short run of the recipe itself (two epochs of `steps` steps each, same model, batch,
    augmentation and optimizer) times its second epoch, the first paying for warm-up; that
    epoch's seconds (its PublicTest pass included) scaled to a full epoch, plus a tenth for
    the per-epoch PrivateTest probe, is the estimate, on the high side. The recipe's own
    epochs are returned whenever they fit, so the recipe is changed only when one seed of it
    could not finish in the budget (a run stopped by the budget has no final accuracy).
    """
    from fer_lib.recipes import get_recipe, train_recipe
    from fer_lib.training import steps_per_epoch

    config = get_recipe(recipe).config_for(**overrides)
    calibration = {**overrides, "epochs": 2, "max_steps_per_epoch": min(steps, config.max_steps_per_epoch or steps)}
    started = time.perf_counter()
    result = train_recipe(recipe, data, run_dir=work / f"{recipe}-calibration", seed=0, wandb_mode="disabled",
                          **calibration)
    timed = result.fit.history[-1]
    full = steps_per_epoch(len(data.train), config.batch_size, config.max_steps_per_epoch)
    epoch_seconds = 1.1 * float(timed["seconds"]) * full / calibration["max_steps_per_epoch"]
    left = budget - (time.perf_counter() - started)
    fit = int(left // epoch_seconds)
    print(f"calibration of {recipe}: ~{epoch_seconds:.1f} s per epoch ({calibration['max_steps_per_epoch']} "
          f"steps in {float(timed['seconds']):.2f} s); {max(left, 0):.0f} s left fit {fit} epochs, the recipe "
          f"has {config.epochs}", flush=True)
    return max(1, min(config.epochs, fit)), epoch_seconds


def _step_recipe(name: str, recipe: str, budget: float, dry_run: bool, data, work: Path, out: Path, *,
                 fit_epochs: bool = False, keep_weights: bool = False) -> StepResult:
    from fer_lib.recipes import get_recipe, reproduce, summary_line_json, summary_markdown

    step = StepResult(name)
    overrides: dict[str, Any] = {"progress": "plain", "checkpoint_every_epoch": False}
    if dry_run:
        overrides.update(epochs=1, max_steps_per_epoch=2, batch_size=16)
    started, notes = time.perf_counter(), []
    if fit_epochs:
        epochs, epoch_seconds = fitting_epochs(recipe, data, budget, work, overrides)
        if epochs < get_recipe(recipe).config_for(**overrides).epochs:
            overrides["epochs"] = epochs
            notes.append(f"epochs cut to {epochs} to fit one seed (~{epoch_seconds:.1f} s per epoch)")
    run = reproduce(recipe, list(SEEDS), data, out_dir=work / recipe, wandb_mode="disabled",
                    budget_seconds=budget - (time.perf_counter() - started), **overrides)
    table, summary = run.table, run.summary
    report = summary_markdown(table, summary)
    print("\n" + report, end="", flush=True)
    line = summary_line_json(summary)
    print(json.dumps(line), flush=True)
    step.result = {"line": line, "runs": table.to_dict("records"), "report": report, "curves": summary["curves"]}
    step.status = "partial" if summary["skipped"] or notes else "ok"
    step.note = "; ".join(notes + summary["skipped"]) or f"{len(summary['seeds'])} seeds"
    if summary["curves"]:
        _plot_curves(recipe, summary["curves"], out / f"tta_{recipe}.png")
    if keep_weights and run.members:
        from fer_lib.weights_io import save_run_weights

        # chosen on PublicTest, the selection split; PrivateTest plays no part
        best = max(run.members, key=lambda member: member.results["val_accuracy"])
        path = save_run_weights(best.run_dir, out / f"{name}_best.safetensors")
        step.result["weights"] = {"file": path.name, "seed": best.results.get("config", {}).get("seed"),
                                  "val_accuracy": 100 * best.results["val_accuracy"],
                                  "test_accuracy": 100 * best.results["test_accuracy"]}
        print(f"{name}: weights of {best.run_dir.name} (best PublicTest) written to {path.name}", flush=True)
    return step


# --------------------------------------------------------------------------------------
# figures


def _plot_fractions(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, path_name in ((-0.2, "engine"), (0.2, "bare")):
        ax.bar(x + offset, [100 * r[f"{path_name}_fraction"] for r in rows], width=0.4, label=path_name)
    ax.set_xticks(x, [r["model"] for r in rows])
    ax.set_ylabel("training FLOP/s, % of matmul peak")
    peak = result["peak"]
    ax.set_title(f"peak {peak['gflops']:,.0f} GFLOP/s ({peak['precision']} {peak['size']}^3 matmul), "
                 f"batch {result['batch_size']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(recipe: str, curves: dict[str, list[list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fer_lib.evaluation import plot_time_to_accuracy
    from fer_lib.recipes import THRESHOLDS

    fig = plot_time_to_accuracy({label: [tuple(p) for p in points] for label, points in curves.items() if points})
    ax = fig.axes[0]
    for threshold in THRESHOLDS:
        ax.axhline(threshold, color="gray", linestyle=":", linewidth=1)
    ax.set_ylabel("PublicTest accuracy (%)")
    ax.set_title(f"{recipe}: time to accuracy (dotted: {', '.join(f'{t:g}%' for t in THRESHOLDS)})")
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# the run


def _load_data(data_dir: str | None, dry_run: bool):
    if data_dir is None and Path(DEFAULT_DATA_DIR, TRAIN_FILE).is_file():
        data_dir = DEFAULT_DATA_DIR
    if data_dir is not None:
        return load_packed(data_dir)
    if dry_run:
        from fer_lib.synthetic import make_dataset

        images, labels, usage = make_dataset((70, 21, 21), seed=0)
        return _dataset(images, labels, usage, Path("generated"), "synthetic")
    from fer_lib.data import load_fer2013

    return load_fer2013()


def run_steps(out: Path, data, *, dry_run: bool, total_seconds: float, work: Path,
              started: float | None = None) -> list[StepResult]:
    """Run the four steps within total_seconds (counted from `started`); one StepResult each."""
    started = time.perf_counter() if started is None else started
    deadline = started + total_seconds - RESERVE_SECONDS
    steps: list[StepResult] = []
    plan = [("tests", None), ("bench", None)] + list(RECIPE_STEPS)
    for name, recipe in plan:
        left = deadline - time.perf_counter()
        budget = min(STEP_BUDGETS.get(name, math.inf), left)
        print(f"\n=== {name}: budget {max(budget, 0):.0f} s ({max(left, 0):.0f} s left in all)", flush=True)
        if budget < (0 if dry_run else MIN_STEP_SECONDS) or left <= 0:
            steps.append(StepResult(name, "skipped", note=f"not started: {max(left, 0):.0f} s left"))
            print(f"skipped {name}: no time left", flush=True)
            continue
        start = time.perf_counter()
        try:
            if name == "tests":
                step = _step_tests(budget, dry_run)
            elif name == "bench":
                step = _step_bench(budget, dry_run, out)
            else:
                step = _step_recipe(name, recipe, budget, dry_run, data, work, out,
                                    fit_epochs=name in FIT_EPOCHS_STEPS, keep_weights=name in KEEP_WEIGHTS_STEPS)
        except Exception as error:  # noqa: BLE001 - one step's failure must not lose the others
            traceback.print_exc()
            step = StepResult(name, "failed", note=f"{type(error).__name__}: {error}")
        step.seconds, step.budget_seconds = time.perf_counter() - start, budget
        print(f"=== {name}: {step.status} in {step.seconds:.0f} s; {step.note}", flush=True)
        steps.append(step)
    return steps


def _markdown(steps: list[StepResult], header: dict[str, Any]) -> str:
    lines = ["# gpu-run", "", f"machine: {header['machine']}; dry run: {header['dry_run']}; "
             f"data: {header['data']}; total {header['seconds']:.0f} s of {header['budget_seconds']:.0f} s", "",
             "| step | status | seconds | budget | note |", "| --- | --- | ---: | ---: | --- |"]
    for step in steps:
        note = step.note.replace("|", "\\|")
        lines.append(f"| {step.name} | {step.status} | {step.seconds:.0f} | {step.budget_seconds:.0f} | {note} |")
    for step in steps:
        if step.name == "bench" and "table" in step.result:
            lines += ["", "## bench: training FLOP/s as a fraction of the matmul peak", "", step.result["table"]]
        elif "report" in step.result:
            lines += ["", f"## {step.name}", "", step.result["report"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fer_lib gpu-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps in smoke size on CPU")
    parser.add_argument("--out", default="runs/gpu-run", help="output folder (at most 8 files)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help=f"folder with {TRAIN_FILE} and {TEST_FILE} (default {DEFAULT_DATA_DIR} when it "
                             "exists; else FER2013 found as usual, or generated data with --dry-run)")
    parser.add_argument("--pack", default=None, metavar="DIR",
                        help="instead: write FER2013 as the two xz files into DIR and exit")
    parser.add_argument("--source", default=None, help="--pack: FER2013 source (default: found as usual)")
    parser.add_argument("--minutes", type=float, default=9.0, help="time budget for all steps (default 9)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.pack is not None:
        try:
            pack_fer2013(args.pack, args.source)
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    if args.minutes <= 0:
        parser.error("--minutes must be > 0")

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: gpu-run needs a CUDA GPU (torch.cuda.is_available() is False); "
              "--dry-run runs the same steps in smoke size on CPU", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fer_lib.device import machine_description
    from fer_lib.fileio import atomic_write_text, to_jsonable

    with open(out / "gpu_run.log", "w", encoding="utf-8") as log, \
            tempfile.TemporaryDirectory(prefix="fer-gpu-run-") as work, \
            contextlib.redirect_stdout(_Tee(sys.stdout, log)), contextlib.redirect_stderr(_Tee(sys.stderr, log)):
        print(f"gpu-run on {machine_description()}; dry run {args.dry_run}; budget {args.minutes:g} min", flush=True)
        try:
            data = _load_data(args.data, args.dry_run)
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
        print(f"data: {data!r}", flush=True)
        steps = run_steps(out, data, dry_run=args.dry_run, total_seconds=60 * args.minutes, work=Path(work),
                          started=started)
        header = {"machine": machine_description(), "torch": str(torch.__version__), "dry_run": args.dry_run,
                  "data": f"{data.format} ({len(data.train)}/{len(data.val)}/{len(data.test)} images)",
                  "budget_seconds": 60 * args.minutes, "seconds": time.perf_counter() - started}
        summary = {**header, "steps": [asdict(step) for step in steps]}
        for step in summary["steps"]:
            step["result"].pop("report", None)  # the markdown file holds it
            step["result"].pop("table", None)
        atomic_write_text(out / "summary.json", json.dumps(to_jsonable(summary), indent=2))
        atomic_write_text(out / "gpu_run.md", _markdown(steps, header))
        failed = [step.name for step in steps if step.status in ("failed", "skipped")]
        print(f"gpu-run: wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}; "
              + (f"not run in full: {', '.join(failed)}" if failed else "every step ran"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
