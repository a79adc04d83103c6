"""Save and load shipped model weights without pickle.

A shipped model is two files side by side:

    <name>.safetensors   the state dict (safetensors: a JSON header + raw tensor bytes, so
                         loading it can never run code, unlike torch.load/pickle)
    <name>.json          everything needed to USE the weights: registry model name and
                         constructor kwargs, class names, input normalisation, input size,
                         the accuracy and how it was measured, notes, git revision, and the
                         sha256 of the .safetensors file (so a stale json/weights pair is caught)

The model is rebuilt from the registry (`fer_lib.models.create_model(name, **kwargs)`), never
deserialised. The same metadata (without the sha256) is also embedded in the safetensors
header, so a lone .safetensors file that lost its .json still loads.

Both files are written to temporary names in the target folder and renamed into place, so an
interrupted save never leaves a half-written file under the final name.

Nothing in a weights file is trusted: `load_weights` checks the metadata against a schema
(`validate_metadata`: types, ranges, a registry model name, positive finite std, 1-1000
classes, input size 8-512) before any model is built, checks the tensor names and shapes on a
model built on the "meta" device (no memory), refuses NaN/inf weights and checks that the
model gives one output per class name. Each problem is one WeightsError naming the file and
the metadata field.

The packaged default model lives in `fer_lib/weights/` (see `shipped_weights_path`); the
lead trains it and saves it there with `save_weights`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fer_lib.checkpoint import state_mismatch
from fer_lib.fileio import (
    atomic_path,
    atomic_write_json,
    git_dirty,
    git_revision,
    safe_filename,
    sha256_file,
    to_jsonable,
)

FORMAT = "fer_lib.weights"
FORMAT_VERSION = 1
# Key under which the metadata JSON is embedded in the safetensors header.
HEADER_KEY = "fer_lib_metadata"
SHIPPED_NAME = "default"


# Sane bounds for metadata values, checked before a model is built (an absurd num_classes
# would otherwise ask for terabytes).
MAX_CLASSES = 1000
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 8, 512
IN_CHANS = (1, 3)


class WeightsError(ValueError):
    """A weights file or its metadata is missing, inconsistent or not a fer_lib weights file."""


def shipped_weights_path() -> Path:
    """Path of the packaged default model, `fer_lib/weights/default.safetensors`.

    The file may not exist (no trained model has been shipped yet); callers check
    `.exists()` and explain how to pass weights explicitly.
    """
    return Path(__file__).resolve().parent / "weights" / f"{SHIPPED_NAME}.safetensors"


def _norm_value(value: float | Sequence[float], name: str) -> float | list[float]:
    value = to_jsonable(value, strict=True, where=name)
    if isinstance(value, list):
        if not value or not all(isinstance(v, (int, float)) for v in value):
            raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}")
    return float(value)


def build_metadata(*, model_name: str, model_kwargs: Mapping[str, Any] | None,
                   class_names: Sequence[str], mean: float | Sequence[float],
                   std: float | Sequence[float], input_size: int = 48,
                   metrics: Mapping[str, Any] | None = None, notes: str = "") -> dict[str, Any]:
    """The metadata dict stored next to the weights (and returned by `load_weights`).

    `model_kwargs` gets `num_classes=len(class_names)` and `in_chans=1` filled in when absent,
    so that `create_model(metadata["model"]["name"], **metadata["model"]["kwargs"])` rebuilds
    exactly this architecture. Normalisation: x = (pixel / 255 - mean) / std.
    """
    class_names = [str(c) for c in class_names]
    if not class_names:
        raise ValueError("class_names is empty")
    kwargs = dict(to_jsonable(dict(model_kwargs or {}), strict=True, where="model_kwargs"))
    kwargs.setdefault("num_classes", len(class_names))
    kwargs.setdefault("in_chans", 1)
    if kwargs["num_classes"] != len(class_names):
        raise ValueError(f"model_kwargs num_classes={kwargs['num_classes']} but "
                         f"{len(class_names)} class_names were given")
    std_value = _norm_value(std, "std")
    if any(s <= 0 for s in (std_value if isinstance(std_value, list) else [std_value])):
        raise ValueError(f"std must be positive, got {std_value}")
    revision, dirty = git_revision(), git_dirty()
    from fer_lib import __version__ as fer_lib_version

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": str(model_name), "kwargs": kwargs},
        "class_names": class_names,
        "normalization": {"mean": _norm_value(mean, "mean"), "std": std_value,
                          "formula": "x = (pixel / 255 - mean) / std"},
        "input_size": int(input_size),
        "metrics": to_jsonable(dict(metrics or {}), strict=True, where="metrics"),
        "notes": str(notes),
        "git_revision": revision,
        "git_dirty": dirty,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "fer_lib_version": fer_lib_version,
        "torch_version": torch.__version__.split("+")[0],
    }


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile / DataParallel wrappers (their state-dict keys
    carry `_orig_mod.` / `module.` prefixes that the registry model would not accept)."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _resolve_target(dir_or_path: str | os.PathLike, model_name: str) -> Path:
    path = Path(dir_or_path)
    if path.suffix == ".safetensors":
        return path
    if path.suffix and not path.is_dir():
        raise ValueError(f"{path}: give a folder or a path ending in .safetensors")
    return path / f"{safe_filename(model_name)}.safetensors"


def save_weights(dir_or_path: str | os.PathLike, model: nn.Module, *, model_name: str,
                 model_kwargs: Mapping[str, Any] | None, class_names: Sequence[str],
                 mean: float | Sequence[float], std: float | Sequence[float],
                 input_size: int = 48, metrics: Mapping[str, Any], notes: str,
                 verify: bool = True) -> Path:
    """Write `<name>.safetensors` + `<name>.json` atomically; return the .safetensors path.

    dir_or_path: a folder (files are named after `model_name`) or a `.safetensors` path.
    metrics: e.g. {"accuracy": 0.712, "split": "PrivateTest", "tta": "flip", "protocol":
    "standard"}: say how the number was obtained. verify: rebuild the model from the registry
    with `model_kwargs` and check that every tensor name and shape matches, so a wrong kwarg
    fails now instead of when somebody loads the file.
    """
    model = _unwrap(model)
    metadata = build_metadata(model_name=model_name, model_kwargs=model_kwargs,
                              class_names=class_names, mean=mean, std=std,
                              input_size=input_size, metrics=metrics, notes=notes)
    # clone(): safetensors refuses tensors that share storage (tied weights) and non-contiguous
    # ones (channels_last); a private contiguous copy of each tensor avoids both.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    if verify:
        _check_state_matches(state, metadata, source="model passed to save_weights")
    metadata["num_parameters"] = int(sum(p.numel() for p in model.parameters()))

    from safetensors.torch import save_file

    target = _resolve_target(dir_or_path, model_name)
    header = {"format": "pt", HEADER_KEY: json.dumps(metadata, sort_keys=True)}
    # The .json sidecar is replaced just before the weights; a failure in between leaves the
    # old weights with a sidecar whose sha256 no longer matches, which load_weights reports.
    with atomic_path(target) as tmp_weights:
        save_file(state, str(tmp_weights), metadata=header)
        metadata["weights_file"] = target.name
        metadata["weights_sha256"] = sha256_file(tmp_weights)
        atomic_write_json(target.with_suffix(".json"), metadata, sort_keys=True)
    return target


def save_run_weights(run_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Save a finished run's best model (run_dir/best.pt) as shipped weights; return the path.

    run_dir: a run folder written by `fer_lib.experiment.run_experiment` (e.g. each seed of
    `python -m fer_lib reproduce`): its best.pt gives the model (rebuilt from the registry)
    and class names, its results.json the accuracies and how they were measured, which go
    into the metadata. dest: a folder or a `.safetensors` path, as for `save_weights`.
    """
    from fer_lib.augment import MEAN, STD
    from fer_lib.checkpoint import load_model

    run_dir = Path(run_dir)
    best, results_path = run_dir / "best.pt", run_dir / "results.json"
    for needed in (best, results_path):
        if not needed.is_file():
            raise WeightsError(f"{needed}: not found; a finished run folder (one seed of `reproduce`, "
                               "or run_experiment's run_dir) holds best.pt and results.json")
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
        metrics = {key: float(results[key]) for key in ("val_accuracy", "test_accuracy", "test_macro_f1")}
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{results_path}: not a finished run's results ({type(exc).__name__}: {exc})") from exc
    model = load_model(best)
    meta = model.checkpoint_meta
    metrics.update(tta=results.get("tta", "none"), splits="val = PublicTest (chose the epoch), "
                   "test = PrivateTest (evaluated once)")
    what = f"recipe {results['recipe']}" if results.get("recipe") else f"run {results.get('name', run_dir.name)}"
    config = results.get("config") or {}
    how = ", ".join(part for part in (
        f"seed {config['seed']}" if "seed" in config else "",
        f"optimizer {config['optimizer']}" if config.get("optimizer") else "",
        f"EMA {config['ema_decay']}" if config.get("ema_decay") else "",
        "accuracies evaluated in the training precision" if config.get("eval_precision") == "auto" else "")
        if part)
    notes = (f"{what}{f' ({how})' if how else ''}: {results.get('epochs_run', '?')} epochs on "
             f"{results.get('device', '?')}, weights of epoch {results.get('best_epoch', meta.get('epoch'))} "
             f"(best PublicTest); PrivateTest evaluated once")
    return save_weights(dest, model, model_name=model.registry_name, model_kwargs=model.registry_kwargs,
                        class_names=meta["class_names"], mean=MEAN, std=STD, metrics=metrics, notes=notes)


def _build_model(metadata: Mapping[str, Any], *, source: str,
                 device: str | None = None) -> nn.Module:
    """The registry model `metadata` describes (on `device`, e.g. "meta": no memory)."""
    from fer_lib.models import create_model

    name = metadata["model"]["name"]
    kwargs = metadata["model"].get("kwargs") or {}
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return create_model(name, **kwargs)
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"{source}: cannot build registry model {name!r} with kwargs "
                           f"{kwargs}: {exc}") from exc


def _check_state_matches(state: Mapping[str, Any], metadata: Mapping[str, Any], *,
                         source: str) -> None:
    """Check that `state` (tensors, or name -> shape) fits the registry model of `metadata`
    exactly, on a model built on the meta device (nothing allocated)."""
    skeleton = _build_model(metadata, source=source, device="meta")
    problem = state_mismatch(skeleton.state_dict(), state)
    if problem:
        raise WeightsError(f"{source}: tensors do not match registry model "
                           f"{metadata['model']['name']!r} with kwargs "
                           f"{metadata['model'].get('kwargs') or {}}: {problem}")


def _resolve_pair(path: str | os.PathLike) -> tuple[Path, Path]:
    """(.safetensors, .json) paths for a path given with either suffix or none."""
    path = Path(path)
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


_OTHER_KINDS = {
    ".pt": "a training checkpoint? Save its run folder for prediction with "
           "`python -m fer_lib save-weights RUN_FOLDER --out DIR` (fer_lib.weights_io.save_run_weights)",
    ".onnx": "an ONNX export; pass the .safetensors file it was exported from",
}
_OTHER_KINDS[".pth"] = _OTHER_KINDS[".ckpt"] = _OTHER_KINDS[".pt"]


def _existing_weights(path: str | os.PathLike) -> Path:
    """The .safetensors file `path` means; WeightsError naming what was given otherwise."""
    given = Path(path)
    weights_path, _ = _resolve_pair(given)
    if weights_path.is_file():
        return weights_path
    if given.is_dir():
        raise WeightsError(f"{given}: is a folder; give the .safetensors weights file")
    if given.is_file():  # e.g. best.pt: it exists, it just is not weights
        hint = _OTHER_KINDS.get(given.suffix.lower(), "weights are saved by "
                                "fer_lib.weights_io.save_weights")
        raise WeightsError(f"{given}: not a .safetensors weights file ({hint})")
    if given.suffix in (".json", ".safetensors"):
        raise WeightsError(f"{weights_path}: weights file not found")
    raise WeightsError(f"{given}: weights file not found (nor {weights_path.name})")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_stat(value: Any, field: str, source: str, *, positive: bool) -> None:
    values = value if isinstance(value, list) else [value]
    if not values or not all(_is_number(v) for v in values):
        raise WeightsError(f"{source}: metadata field {field!r} must be a number or a list of "
                           f"numbers, got {value!r}")
    if not all(math.isfinite(v) for v in values):
        raise WeightsError(f"{source}: metadata field {field!r} must be finite, got {value!r}")
    if positive and any(v <= 0 for v in values):
        raise WeightsError(f"{source}: metadata field {field!r} must be positive, got {value!r}")


def _check_model_entry(model: Any, class_count: int, source: str) -> int:
    """Check metadata["model"]; return in_chans."""
    from fer_lib.models import list_models

    if not isinstance(model, dict):
        raise WeightsError(f"{source}: metadata field 'model' must be an object with 'name' and "
                           f"'kwargs', got {type(model).__name__}")
    name = model.get("name")
    if not isinstance(name, str) or not name:
        raise WeightsError(f"{source}: metadata field 'model.name' is missing or not a string")
    if name not in list_models():
        raise WeightsError(f"{source}: metadata field 'model.name' {name!r} is not a registry "
                           f"model (fer_lib.models.list_models())")
    kwargs = model.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise WeightsError(f"{source}: metadata field 'model.kwargs' must be an object, got "
                           f"{type(kwargs).__name__}")
    num_classes = kwargs.get("num_classes", class_count)
    if not _is_int(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise WeightsError(f"{source}: metadata field 'model.kwargs.num_classes' must be a whole "
                           f"number 1-{MAX_CLASSES}, got {num_classes!r}")
    if num_classes != class_count:
        raise WeightsError(f"{source}: metadata field 'model.kwargs.num_classes' is "
                           f"{num_classes} but 'class_names' has {class_count} names")
    in_chans = kwargs.get("in_chans", 1)
    if not _is_int(in_chans) or in_chans not in IN_CHANS:
        raise WeightsError(f"{source}: metadata field 'model.kwargs.in_chans' must be 1 or 3, "
                           f"got {in_chans!r}")
    return in_chans


def _check_class_names(names: Any, source: str) -> int:
    if not isinstance(names, list):
        # a string would give one-letter labels
        raise WeightsError(f"{source}: metadata field 'class_names' must be a list of names, "
                           f"got {type(names).__name__}")
    if not 1 <= len(names) <= MAX_CLASSES:
        raise WeightsError(f"{source}: metadata field 'class_names' must hold 1-{MAX_CLASSES} "
                           f"names, got {len(names)}")
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise WeightsError(f"{source}: metadata field 'class_names' must hold non-empty strings")
    if len(set(names)) != len(names):
        raise WeightsError(f"{source}: metadata field 'class_names' repeats a name: {names}")
    return len(names)


def validate_metadata(metadata: Any, source: str | os.PathLike) -> dict[str, Any]:
    """Check weights metadata against the schema before anything is built; return it.

    Checked: format and version; model.name a registry model; model.kwargs an object with
    num_classes (1-MAX_CLASSES, = the number of class names) and in_chans (1 or 3);
    class_names a list of distinct non-empty strings; normalization.mean finite and
    normalization.std finite and positive (a number, or one per input channel); input_size
    MIN_INPUT_SIZE-MAX_INPUT_SIZE. Each problem is one WeightsError naming `source` and the
    field.
    """
    source = str(source)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise WeightsError(f"{source}: not fer_lib weights metadata (format != {FORMAT!r})")
    version = metadata.get("format_version", 0)
    if not _is_int(version):
        raise WeightsError(f"{source}: metadata field 'format_version' must be a whole number")
    if version > FORMAT_VERSION:
        raise WeightsError(f"{source}: metadata format_version {version} is newer than this "
                           f"fer_lib understands ({FORMAT_VERSION})")
    for key in ("model", "class_names", "normalization", "input_size"):
        if key not in metadata:
            raise WeightsError(f"{source}: metadata lacks the {key!r} entry")
    class_count = _check_class_names(metadata["class_names"], source)
    in_chans = _check_model_entry(metadata["model"], class_count, source)
    norm = metadata["normalization"]
    if not isinstance(norm, dict):
        raise WeightsError(f"{source}: metadata field 'normalization' must be an object with "
                           "'mean' and 'std'")
    for key in ("mean", "std"):
        if key not in norm:
            raise WeightsError(f"{source}: metadata field 'normalization.{key}' is missing")
        _check_stat(norm[key], f"normalization.{key}", source, positive=key == "std")
        if isinstance(norm[key], list) and len(norm[key]) not in (1, in_chans):
            raise WeightsError(f"{source}: metadata field 'normalization.{key}' has "
                               f"{len(norm[key])} values for {in_chans} input channel(s)")
    size = metadata["input_size"]
    if not _is_int(size) or not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE:
        raise WeightsError(f"{source}: metadata field 'input_size' must be a whole number "
                           f"{MIN_INPUT_SIZE}-{MAX_INPUT_SIZE}, got {size!r}")
    return metadata


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Validated metadata of a weights file without loading tensors (the .json, else the
    safetensors header); see validate_metadata."""
    weights_path, json_path = _resolve_pair(path)
    if json_path.is_file():
        source = json_path
        try:
            metadata = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{json_path}: not readable JSON metadata: {exc}") from exc
    else:
        source = _existing_weights(path)
        from safetensors import safe_open

        try:
            with safe_open(str(source), framework="pt") as f:
                header = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{source}: not a safetensors file: {exc}") from exc
        if HEADER_KEY not in header:
            raise WeightsError(f"{source}: no {json_path.name} next to it and no fer_lib "
                               "metadata in its header; save weights with "
                               "fer_lib.weights_io.save_weights")
        try:
            metadata = json.loads(header[HEADER_KEY])
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{source}: fer_lib metadata in the header is not JSON: "
                               f"{exc}") from exc
    return validate_metadata(metadata, source)


def _file_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise WeightsError(f"{weights_path}: not a readable safetensors file: {exc}") from exc


def _check_outputs(model: nn.Module, metadata: Mapping[str, Any], source: str) -> None:
    """One forward pass on a blank input: the model accepts input_size and gives one finite
    output per class name."""
    size = metadata["input_size"]
    in_chans = metadata["model"].get("kwargs", {}).get("in_chans", 1)
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_chans, size, size))
    except RuntimeError as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise WeightsError(f"{source}: model {metadata['model']['name']!r} does not accept the "
                           f"metadata field 'input_size' {size}: {first_line}") from exc
    if out.ndim != 2 or out.shape[1] != len(metadata["class_names"]):
        raise WeightsError(f"{source}: the model gives outputs of shape {tuple(out.shape)}, but "
                           f"metadata field 'class_names' has {len(metadata['class_names'])} names")


def load_weights(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 check_hash: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from a file written by `save_weights`.

    path: the .safetensors or .json file (or their common stem). Never unpickles anything:
    tensors come from safetensors, the architecture from the registry. Nothing in the file is
    trusted (see the module docstring); every problem is one WeightsError naming the file.
    """
    from safetensors.torch import load_file

    weights_path = _existing_weights(path)
    metadata = read_metadata(path)
    expected_hash = metadata.get("weights_sha256")
    if check_hash and expected_hash and sha256_file(weights_path) != expected_hash:
        raise WeightsError(f"{weights_path}: sha256 differs from the one recorded in its .json: "
                           "the two files come from different saves")
    # Names and shapes first, on a model that allocates nothing: a kwarg that would build a
    # huge model fails here instead of asking for the memory.
    _check_state_matches(_file_shapes(weights_path), metadata, source=str(weights_path))
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise WeightsError(f"{weights_path}: not a readable safetensors file: {exc}") from exc
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"{weights_path}: tensor {key!r} holds NaN or infinite values "
                               "(a diverged training?)")
    model = _build_model(metadata, source=str(weights_path))
    model.load_state_dict(state, strict=True)
    model.eval()
    _check_outputs(model, metadata, str(weights_path))
    return model.to(device), metadata
