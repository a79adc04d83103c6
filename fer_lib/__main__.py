"""Command line: `python -m fer_lib <command> ...` (also installed as `fer`).

    python -m fer_lib predict photo.jpg --weights model.safetensors
    python -m fer_lib predict photo.jpg --weights model.safetensors --json
    python -m fer_lib predict a.jpg b.jpg --weights model.safetensors --out annotated/
    python -m fer_lib predict face48.png --no-detect --weights model.safetensors
    python -m fer_lib predict --video clip.avi --out clip_annotated.avi --weights m.safetensors
    python -m fer_lib predict --video 0 --json --max-frames 300      # webcam 0, JSON lines
    python -m fer_lib export-onnx --weights model.safetensors --out model.onnx
    python -m fer_lib save-weights runs/cpu_record/cpu_record-fer2013/seed0 --out my_model/
    python -m fer_lib sweep exp4 --storage postgresql+psycopg://u:pw@host/db --study s --trials 40

predict --json: one photo prints exactly the list of faces
    [{"box": [x, y, w, h], "label": "Happy", "probabilities": {"Angry": 0.01, ...}}, ...]
(`[]` when no face is found); several photos print [{"file": ..., "faces": [...]}, ...]
with an "error" entry for a photo that could not be read. --video --json prints one JSON
object per predicted frame: {"frame": i, "time_s": t, "faces": [...]}.

Exit codes (every command): 0 success; 1 error (unreadable/missing/too large file, bad
weights, no shipped weights, a file that cannot be written); 2 wrong command-line usage (an
unknown option or extension, --every 0, --device cuda without CUDA, --out naming an input);
3 no face found (in at least one photo, or in the whole video). A failure prints one line,
`error: <file>: <what is wrong>`, on stderr; `python -m fer_lib --debug COMMAND ...` shows the
full traceback instead. --json output is always valid JSON (no NaN).

Outputs never overwrite an input: --out naming (or resolving to) an input photo, video or
weights file is a usage error. With several photos (or --out FOLDER) each photo's annotated
copy is FOLDER/<stem>_annotated.png, made unique (<stem>_annotated-2.png, ...) when two photos
share a stem; an annotated file from an earlier run is replaced. Annotated photos and video
frames are at most 2048 px on the longest side (fer_lib.predict.ANNOTATED_MAX_SIDE); photos
whose decoding would hold more than 50 MP are refused (fer_lib.predict.MAX_DECODE_PIXELS).

Adding a command: write `_add_<name>(subparsers)` that creates the sub-parser and sets
`func=<function(args) -> int>`, and append it to COMMANDS.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_FACE = 3
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C


class UsageError(Exception):
    """The command line asks for something impossible (exit 2), found after parsing."""


def _error(message: str) -> None:
    # One line whatever the message: a script reading stderr gets one line per failure.
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)


def _describe_exception(exc: BaseException) -> str:
    """fer_lib's own errors (ValueError/OSError subclasses) say what is wrong themselves;
    anything else also needs its type to make sense."""
    text = " ".join(str(exc).split())
    if isinstance(exc, (ValueError, OSError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (its default prints the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        _error(f"{message} (see `{self.prog} --help`)")
        self.exit(EXIT_USAGE)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {number}")
    return number


def _device(value: str) -> str:
    """A torch device that exists on this machine (checked before any work is done)."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device (cpu, cuda, "
                                         "cuda:1, mps)") from None
    if device.type == "cpu":
        return value
    backend = getattr(torch.backends, device.type, None) if device.type == "mps" else \
        getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        raise argparse.ArgumentTypeError(f"{value}: {device.type} is not available on this "
                                         "machine; use --device cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{value}: this machine has {count} {device.type} "
                                         "device(s)")
    return value


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (symlinks, '..' and hard links included)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _print_json(value: Any, indent: int | None = 2) -> None:
    from fer_lib.fileio import to_jsonable

    # to_jsonable turns NaN/inf into null; allow_nan=False makes any leftover an error, not
    # a "NaN" that no JSON parser accepts.
    print(json.dumps(to_jsonable(value), indent=indent, allow_nan=False), flush=True)


# --------------------------------------------------------------------------- predict

def _video_source(value: str) -> str | int:
    """'0' -> camera 0 unless a file named '0' exists; anything else is a file path."""
    return int(value) if value.isdigit() and not Path(value).exists() else value


def _describe(faces: list[dict[str, Any]]) -> str:
    lines = []
    for face in faces:
        x, y, w, h = face["box"]
        ranked = sorted(face["probabilities"].items(), key=lambda kv: kv[1], reverse=True)
        others = ", ".join(f"{name} {p:.2f}" for name, p in ranked[1:3])
        lines.append(f"  [x={x} y={y} w={w} h={h}] {face['label']} "
                     f"{face['probabilities'][face['label']]:.2f}  ({others})")
    return "\n".join(lines)


def _annotated_targets(out: Path | None, photos: list[Path]) -> list[Path | None]:
    """Where each photo's annotated copy goes; UsageError for an impossible --out.

    One photo and an --out with an image extension: that file. Otherwise --out is a folder
    and each photo gets <stem>_annotated.png there, numbered when two photos share a stem or
    when the name is one of the inputs: nothing is overwritten within one command.
    """
    from fer_lib.fileio import safe_filename
    from fer_lib.predict import can_write_image

    if out is None:
        return [None] * len(photos)
    for photo in photos:
        if _same_file(out, photo):
            raise UsageError(f"--out {out} is the input photo {photo}; refusing to overwrite it")
    if len(photos) == 1 and not out.is_dir() and out.suffix:
        if not can_write_image(out):
            raise UsageError(f"--out {out}: unknown image file extension {out.suffix!r}; use "
                             ".png, .jpg, .webp, .bmp or .tiff (or a folder)")
        return [out]
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; with several photos --out is a folder")
    # Identities of the inputs: real paths (symlinks, "..") and inodes (hard links).
    taken = {os.path.realpath(photo) for photo in photos}
    inodes = {_inode(photo) for photo in photos} - {None}
    targets: list[Path | None] = []
    for photo in photos:
        stem, number = safe_filename(photo.stem), 1
        while True:
            target = out / (f"{stem}_annotated.png" if number == 1
                            else f"{stem}_annotated-{number}.png")
            if os.path.realpath(target) not in taken and _inode(target) not in inodes:
                break
            number += 1
        taken.add(os.path.realpath(target))
        targets.append(target)
    return targets


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _run_video(args: argparse.Namespace, predictor: Any) -> int:
    from fer_lib.predict import annotate_video, iter_video

    source = _video_source(args.video)
    detect = not args.no_detect
    if args.out is not None:
        count = annotate_video(predictor, source, args.out, every=args.every, detect=detect,
                               max_frames=args.max_frames)
        print(f"wrote {count} annotated frames to {args.out}", file=sys.stderr)
        return EXIT_OK
    any_face = False
    for frame in iter_video(predictor, source, every=args.every, detect=detect,
                            max_frames=args.max_frames):
        if not frame.fresh:
            continue
        any_face = any_face or bool(frame.faces)
        if args.json:
            _print_json({"frame": frame.index, "time_s": round(frame.time_s, 3),
                         "faces": frame.faces}, indent=None)
        else:
            print(f"frame {frame.index} ({frame.time_s:.2f} s): {len(frame.faces)} face(s)")
            if frame.faces:
                print(_describe(frame.faces))
    if not any_face:
        _error(f"{args.video}: no face found in any predicted frame")
        return EXIT_NO_FACE
    return EXIT_OK


def _predict_photo(args: argparse.Namespace, predictor: Any, photo: Path,
                   target: Path | None) -> tuple[dict[str, Any], int]:
    """(JSON record, exit status) of one photo; its errors are reported and recorded so that
    the other photos still get predicted."""
    from fer_lib.predict import NoFaceError, PredictionError, annotated_photo, write_image

    record: dict[str, Any] = {"file": str(photo), "faces": []}
    try:
        record["faces"] = predictor.predict_image(photo, detect=not args.no_detect)
        status = EXIT_OK
    except NoFaceError as exc:
        _error(str(exc))
        status = EXIT_NO_FACE
    except (PredictionError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        _error(_describe_exception(exc))
        record["error"] = " ".join(str(exc).split())
        return record, EXIT_ERROR
    if not args.json:
        print(f"{photo}: {len(record['faces'])} face(s)")
        if record["faces"]:
            print(_describe(record["faces"]))
    if target is not None:
        try:
            write_image(target, annotated_photo(photo, record["faces"]))
        except (PredictionError, OSError) as exc:
            _error(_describe_exception(exc))
            record["error"] = " ".join(str(exc).split())
            return record, EXIT_ERROR
        record["annotated"] = str(target)
        print(f"wrote {target}", file=sys.stderr)
    return record, status


def _run_photos(args: argparse.Namespace, predictor: Any, targets: list[Path | None]) -> int:
    photos = [Path(p) for p in args.photos]
    records: list[dict[str, Any]] = []
    status = EXIT_OK
    for photo, target in zip(photos, targets, strict=True):
        record, photo_status = _predict_photo(args, predictor, photo, target)
        records.append(record)
        # an unreadable file (EXIT_ERROR) takes precedence over a photo without a face
        if photo_status == EXIT_ERROR or (photo_status == EXIT_NO_FACE and status == EXIT_OK):
            status = photo_status
    if args.json:
        if len(photos) > 1:
            _print_json(records)
        elif "error" not in records[0]:
            _print_json(records[0]["faces"])
    return status


def _cmd_predict(args: argparse.Namespace) -> int:
    from fer_lib.predict import load_predictor

    if not args.photos and args.video is None:
        raise UsageError("give at least one PHOTO or --video FILE_OR_INDEX")
    if args.photos and args.video is not None:
        raise UsageError("give PHOTOs or --video, not both")
    targets: list[Path | None] = []
    if args.video is not None and args.out is not None:
        _check_video_out(args.out, args.video)
    elif args.photos:
        # checked before the model is loaded: a wrong --out costs nothing
        targets = _annotated_targets(args.out, [Path(p) for p in args.photos])
    predictor = load_predictor(args.weights, device=args.device, tta=args.tta,
                               min_face_size=args.min_face_size)
    if args.video is not None:
        return _run_video(args, predictor)
    return _run_photos(args, predictor, targets)


def _check_video_out(out: Path, video: str) -> None:
    from fer_lib.predict import VIDEO_SUFFIXES

    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise UsageError(f"--out {out}: a video output must end in {', '.join(VIDEO_SUFFIXES)}")
    if not video.isdigit() and _same_file(out, Path(video)):
        raise UsageError(f"--out {out} is the input video; refusing to overwrite it")


def _add_predict(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predict", help="classify the facial expressions in photos or a video",
        description="Detect faces (OpenCV Haar cascade), crop them like FER2013 and classify "
                    "them. Exit code 3 when no face is found.")
    parser.add_argument("photos", nargs="*", metavar="PHOTO", help="image files")
    parser.add_argument("--weights", type=Path, default=None,
                        help="model .safetensors saved by fer_lib.weights_io.save_weights "
                             "(default: the model shipped in fer_lib/weights/)")
    parser.add_argument("--out", type=Path, default=None,
                        help="annotated image (a folder for several photos) or, with --video, "
                             "an annotated .avi/.mp4")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--no-detect", action="store_true",
                        help="treat each whole image as one face crop (e.g. 48x48 FER images)")
    parser.add_argument("--video", default=None, metavar="FILE_OR_INDEX",
                        help="video file, or camera index (0 = default webcam)")
    parser.add_argument("--every", type=_positive_int, default=5,
                        help="with --video: predict every k-th frame (default 5)")
    parser.add_argument("--max-frames", type=_positive_int, default=None,
                        help="with --video: stop after this many frames (webcams never end)")
    parser.add_argument("--min-face-size", type=_positive_int, default=30,
                        help="smallest face side in pixels to detect (default 30)")
    parser.add_argument("--tta", choices=("flip", "none"), default="flip",
                        help="average with the mirrored face (default) or not")
    parser.add_argument("--device", type=_device, default="cpu",
                        help="torch device (default cpu); must exist on this machine")
    parser.set_defaults(func=_cmd_predict)


# --------------------------------------------------------------------------- export-onnx

def _opset(value: str) -> int:
    from fer_lib.export import MAX_OPSET, MIN_OPSET

    number = _positive_int(value)
    if not MIN_OPSET <= number <= MAX_OPSET:
        raise argparse.ArgumentTypeError(f"ONNX opset must be {MIN_OPSET}-{MAX_OPSET}, got "
                                         f"{number}")
    return number


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    import torch

    from fer_lib.export import check_onnx_parity, export_onnx
    from fer_lib.weights_io import load_weights

    weights = Path(args.weights)
    for protected in (weights, weights.with_suffix(".json"), weights.with_suffix(".safetensors")):
        if _same_file(args.out, protected):
            raise UsageError(f"--out {args.out} is the weights file {protected}; refusing to "
                             "overwrite it")
    model, metadata = load_weights(args.weights)
    size = int(metadata.get("input_size", 48))
    path = export_onnx(model, args.out, input_size=size, opset=args.opset,
                       dynamic_batch=not args.static_batch, metadata=metadata)
    print(f"wrote {path}", file=sys.stderr)
    if not args.no_check:
        faces = torch.randint(0, 256, (1 if args.static_batch else 8, 48, 48), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(0))
        norm = metadata["normalization"]
        diff = check_onnx_parity(model, path, faces, mean=norm["mean"], std=norm["std"], input_size=size)
        print(f"max abs logit difference PyTorch vs onnxruntime: {diff:.2e}")
        if diff > 1e-3:
            _error(f"{path}: ONNX output differs from PyTorch by {diff:.2e}")
            return EXIT_ERROR
    return EXIT_OK


def _add_export_onnx(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export-onnx", help="export saved weights to ONNX and check it against PyTorch",
        description="Input 'input': normalised float32 (batch, 1, 48, 48); output 'logits'.")
    parser.add_argument("--weights", type=Path, required=True, help="model .safetensors")
    parser.add_argument("--out", type=Path, required=True, help="output .onnx path")
    parser.add_argument("--opset", type=_opset, default=17,
                        help="ONNX opset (default 17; 7-23 accepted)")
    parser.add_argument("--static-batch", action="store_true",
                        help="fix the batch size to 1 (default: dynamic batch)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the onnxruntime parity check")
    parser.set_defaults(func=_cmd_export_onnx)


# --------------------------------------------------------------------------- save-weights

def _cmd_save_weights(args: argparse.Namespace) -> int:
    from fer_lib.weights_io import load_weights, save_run_weights

    path = save_run_weights(args.run, args.out)
    _, metadata = load_weights(path)  # read back: the file loads and its tensors check out
    metrics = metadata["metrics"]
    print(f"wrote {path} ({metadata['model']['name']}, PublicTest {100 * metrics['val_accuracy']:.2f}%, "
          f"PrivateTest {100 * metrics['test_accuracy']:.2f}%, {metrics['tta']} TTA)")
    return EXIT_OK


def _add_save_weights(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "save-weights", help="save a finished run's best model as weights for predict/export-onnx",
        description="Reads RUN/best.pt and RUN/results.json (one seed folder of `reproduce`) and writes "
                    "<name>.safetensors + <name>.json with the accuracies and how they were measured.")
    parser.add_argument("run", type=Path, metavar="RUN", help="finished run folder (holds best.pt, results.json)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder (files named after the model) or a .safetensors path")
    parser.set_defaults(func=_cmd_save_weights)


# --------------------------------------------------------------------------- sweep

def _add_sweep(subparsers: Any) -> None:
    from fer_lib.study import add_sweep_parser  # the command lives with its code

    add_sweep_parser(subparsers)


# --------------------------------------------------------------------------- entry point

# Commands whose module parses its own arguments (`main(argv)`): the rest of the line goes there.
DELEGATED: dict[str, tuple[str, str]] = {
    "series": ("fer_lib.series", "run the notebook series headless (papermill)"),
    "reproduce": ("fer_lib.recipes", "train a recipe for N seeds, print mean +- std"),
    "ablate": ("fer_lib.ablation", "each idea alone on a recipe and budget, against the recipe"),
    "bench": ("fer_lib.bench", "throughput: seed-style pipeline vs engine vs bare step"),
    "model-table": ("fer_lib.model_table", "parameters and MFLOPs of every model"),
    "gpu-run": ("fer_lib.gpu_run", "one budgeted GPU session: CUDA tests, bench, recipes (--pack, --dry-run)"),
}


def _add_delegated(subparsers: Any) -> None:
    """List the delegated commands in --help; main() hands their arguments on untouched."""
    for command, (_, help_text) in DELEGATED.items():
        subparsers.add_parser(command, help=help_text, add_help=False)


# One line per command: each adds its sub-parser and sets func=<callable(args) -> exit code>.
COMMANDS: list[Callable[[Any], None]] = [
    _add_delegated,
    _add_predict,
    _add_export_onnx,
    _add_save_weights,
    _add_sweep,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fer_lib",
                     description="fer_lib: facial expression recognition")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def _run(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        import importlib

        result = importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
        return result if isinstance(result, int) else EXIT_OK
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; return its exit code (usage errors raise SystemExit(2) while parsing).

    Any failure is one line on stderr and exit code 1 (2 for usage errors found after
    parsing), unless --debug comes first: then the traceback is shown.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"
    try:
        # a delegated command parses its own options, so a leading --debug is taken off here
        return _run(argv[1:] if debug and argv[1:2] and argv[1] in DELEGATED else argv)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        _error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the promise: one line, never a traceback
        if debug:
            raise
        _error(_describe_exception(exc))
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
