"""Command line: `python -m fer_lib <command> ...` (also installed as `fer`).

    python -m fer_lib predict photo.jpg --weights model.safetensors
    python -m fer_lib predict photo.jpg --weights model.safetensors --json
    python -m fer_lib predict a.jpg b.jpg --weights model.safetensors --out annotated/
    python -m fer_lib predict face48.png --no-detect --weights model.safetensors
    python -m fer_lib predict --video clip.avi --out clip_annotated.avi --weights m.safetensors
    python -m fer_lib predict --video 0 --json --max-frames 300      # webcam 0, JSON lines
    python -m fer_lib export-onnx --weights model.safetensors --out model.onnx
    python -m fer_lib sweep exp4 --storage postgresql+psycopg://u:pw@host/db --study s --trials 40

predict --json: one photo prints exactly the list of faces
    [{"box": [x, y, w, h], "label": "Happy", "probabilities": {"Angry": 0.01, ...}}, ...]
(`[]` when no face is found); several photos print [{"file": ..., "faces": [...]}, ...]
with an "error" entry for a photo that could not be read. --video --json prints one JSON
object per predicted frame: {"frame": i, "time_s": t, "faces": [...]}.

Exit codes: 0 success; 1 error (unreadable/missing file, bad weights, no shipped weights);
2 wrong command-line usage; 3 no face found (in at least one photo, or in the whole video).

Adding a command: write `_add_<name>(subparsers)` that creates the sub-parser and sets
`func=<function(args) -> int>`, and append it to COMMANDS.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_FACE = 3


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


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


def _annotated_path(out: Path, photo: Path, several: bool) -> Path:
    if several or out.is_dir():
        return out / f"{photo.stem}_annotated.png"
    return out


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
            print(json.dumps({"frame": frame.index, "time_s": round(frame.time_s, 3),
                              "faces": frame.faces}), flush=True)
        else:
            print(f"frame {frame.index} ({frame.time_s:.2f} s): {len(frame.faces)} face(s)")
            if frame.faces:
                print(_describe(frame.faces))
    if not any_face:
        _error(f"{args.video}: no face found in any predicted frame")
        return EXIT_NO_FACE
    return EXIT_OK


def _run_photos(args: argparse.Namespace, predictor: Any) -> int:
    import cv2

    from fer_lib.predict import NoFaceError, PredictionError, annotate, read_image

    photos = [Path(p) for p in args.photos]
    several = len(photos) > 1
    if args.out is not None and several:
        args.out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    status = EXIT_OK
    for photo in photos:
        record: dict[str, Any] = {"file": str(photo), "faces": []}
        try:
            record["faces"] = predictor.predict_image(photo, detect=not args.no_detect)
        except NoFaceError as exc:
            _error(str(exc))
            if status == EXIT_OK:  # an unreadable file (EXIT_ERROR) takes precedence
                status = EXIT_NO_FACE
        except PredictionError as exc:
            _error(str(exc))
            record["error"] = str(exc)
            status = EXIT_ERROR
        records.append(record)
        if not args.json and "error" not in record:
            print(f"{photo}: {len(record['faces'])} face(s)")
            if record["faces"]:
                print(_describe(record["faces"]))
        if args.out is not None and "error" not in record:
            # Drawn on a copy decoded at the detection size: an 8000x6000 photo is written
            # at <= ~3200 px on its longest side.
            image, scale = read_image(photo, grayscale=False, max_side=predictor.detect_max_side)
            target = _annotated_path(args.out, photo, several)
            target.parent.mkdir(parents=True, exist_ok=True)
            ok, encoded = cv2.imencode(target.suffix or ".png",
                                       annotate(image, record["faces"], scale=1 / scale))
            if not ok:
                _error(f"{target}: cannot encode an image with this file extension")
                status = EXIT_ERROR
            else:
                encoded.tofile(target)
                print(f"wrote {target}", file=sys.stderr)
    if args.json:
        if several:
            print(json.dumps(records, indent=2))
        elif "error" not in records[0]:
            print(json.dumps(records[0]["faces"], indent=2))
    return status


def _cmd_predict(args: argparse.Namespace) -> int:
    from fer_lib.predict import PredictionError, load_predictor

    if not args.photos and args.video is None:
        _error("give at least one PHOTO or --video FILE_OR_INDEX")
        return EXIT_USAGE
    if args.photos and args.video is not None:
        _error("give PHOTOs or --video, not both")
        return EXIT_USAGE
    try:
        predictor = load_predictor(args.weights, device=args.device, tta=args.tta,
                                   min_face_size=args.min_face_size)
        if args.video is not None:
            return _run_video(args, predictor)
        return _run_photos(args, predictor)
    except (PredictionError, ValueError, OSError) as exc:
        _error(str(exc))
        return EXIT_ERROR


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
    parser.add_argument("--every", type=int, default=5,
                        help="with --video: predict every k-th frame (default 5)")
    parser.add_argument("--max-frames", type=int, default=None,
                        help="with --video: stop after this many frames (webcams never end)")
    parser.add_argument("--min-face-size", type=int, default=30,
                        help="smallest face side in pixels to detect (default 30)")
    parser.add_argument("--tta", choices=("flip", "none"), default="flip",
                        help="average with the mirrored face (default) or not")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.set_defaults(func=_cmd_predict)


# --------------------------------------------------------------------------- export-onnx

def _cmd_export_onnx(args: argparse.Namespace) -> int:
    import torch

    from fer_lib.export import check_onnx_parity, export_onnx
    from fer_lib.weights_io import load_weights

    try:
        model, metadata = load_weights(args.weights)
        size = int(metadata.get("input_size", 48))
        path = export_onnx(model, args.out, input_size=size, opset=args.opset,
                           dynamic_batch=not args.static_batch, metadata=metadata)
        print(f"wrote {path}", file=sys.stderr)
        if not args.no_check:
            in_chans = int(metadata["model"]["kwargs"].get("in_chans", 1))
            batch = torch.randn(1 if args.static_batch else 8, in_chans, size, size,
                                generator=torch.Generator().manual_seed(0))
            diff = check_onnx_parity(model, path, batch)
            print(f"max abs logit difference PyTorch vs onnxruntime: {diff:.2e}")
            if diff > 1e-3:
                _error(f"{path}: ONNX output differs from PyTorch by {diff:.2e}")
                return EXIT_ERROR
    except (ValueError, OSError) as exc:
        _error(str(exc))
        return EXIT_ERROR
    return EXIT_OK


def _add_export_onnx(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export-onnx", help="export saved weights to ONNX and check it against PyTorch",
        description="Input 'input': normalised float32 (batch, 1, 48, 48); output 'logits'.")
    parser.add_argument("--weights", type=Path, required=True, help="model .safetensors")
    parser.add_argument("--out", type=Path, required=True, help="output .onnx path")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--static-batch", action="store_true",
                        help="fix the batch size to 1 (default: dynamic batch)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the onnxruntime parity check")
    parser.set_defaults(func=_cmd_export_onnx)


# --------------------------------------------------------------------------- sweep

def _add_sweep(subparsers: Any) -> None:
    from fer_lib.study import add_sweep_parser  # the command lives with its code

    add_sweep_parser(subparsers)


# --------------------------------------------------------------------------- entry point

# Commands whose module parses its own arguments (`main(argv)`): the rest of the line goes there.
DELEGATED: dict[str, tuple[str, str]] = {
    "series": ("fer_lib.series", "run the notebook series headless (papermill)"),
    "reproduce": ("fer_lib.recipes", "train a recipe for N seeds, print mean +- std"),
    "bench": ("fer_lib.bench", "throughput: seed-style pipeline vs engine vs bare step"),
    "model-table": ("fer_lib.model_table", "parameters and MFLOPs of every model"),
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
    _add_sweep,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fer_lib",
                                     description="fer_lib: facial expression recognition")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; return its exit code (argparse usage errors exit with 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        result = importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
        return result if isinstance(result, int) else EXIT_OK
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
