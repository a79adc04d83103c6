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

The packaged default model lives in `fer_lib/weights/` (see `shipped_weights_path`); the
lead trains it and saves it there with `save_weights`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fer_lib.fileio import atomic_path, atomic_write_json, git_dirty, git_revision, to_jsonable

FORMAT = "fer_lib.weights"
FORMAT_VERSION = 1
# Key under which the metadata JSON is embedded in the safetensors header.
HEADER_KEY = "fer_lib_metadata"
SHIPPED_NAME = "default"


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_target(dir_or_path: str | os.PathLike, model_name: str) -> Path:
    path = Path(dir_or_path)
    if path.suffix == ".safetensors":
        return path
    if path.suffix and not path.is_dir():
        raise ValueError(f"{path}: give a folder or a path ending in .safetensors")
    return path / f"{model_name}.safetensors"


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
        metadata["weights_sha256"] = _sha256(tmp_weights)
        atomic_write_json(target.with_suffix(".json"), metadata, sort_keys=True)
    return target


def _check_state_matches(state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], *,
                         source: str) -> nn.Module:
    """Build the registry model described by `metadata` and check `state` fits it exactly."""
    from fer_lib.models import create_model

    name = metadata["model"]["name"]
    kwargs = metadata["model"]["kwargs"]
    try:
        fresh = create_model(name, **kwargs)
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"{source}: cannot build registry model {name!r} with kwargs "
                           f"{kwargs}: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong_shape:
            details.append("shape mismatch " + ", ".join(
                f"{k}: {got[k]} vs {expected[k]}" for k in wrong_shape[:5]))
        raise WeightsError(f"{source}: tensors do not match registry model {name!r} with "
                           f"kwargs {kwargs}: " + "; ".join(details))
    return fresh


def _resolve_pair(path: str | os.PathLike) -> tuple[Path, Path]:
    """(.safetensors, .json) paths for a path given with either suffix or none."""
    path = Path(path)
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a weights file without loading tensors (the .json, else the header)."""
    weights_path, json_path = _resolve_pair(path)
    if json_path.is_file():
        try:
            metadata = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{json_path}: not readable JSON metadata: {exc}") from exc
    elif weights_path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights_path), framework="pt") as f:
                header = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{weights_path}: not a safetensors file: {exc}") from exc
        if HEADER_KEY not in header:
            raise WeightsError(f"{weights_path}: no {json_path.name} next to it and no fer_lib "
                               "metadata in its header; save weights with "
                               "fer_lib.weights_io.save_weights")
        metadata = json.loads(header[HEADER_KEY])
    else:
        raise WeightsError(f"{weights_path}: weights file not found")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise WeightsError(f"{json_path}: not fer_lib weights metadata (format != {FORMAT!r})")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise WeightsError(f"{json_path}: metadata format_version {metadata['format_version']} "
                           f"is newer than this fer_lib understands ({FORMAT_VERSION})")
    for key in ("model", "class_names", "normalization", "input_size"):
        if key not in metadata:
            raise WeightsError(f"{json_path}: metadata lacks the {key!r} entry")
    return metadata


def load_weights(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 check_hash: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from a file written by `save_weights`.

    path: the .safetensors or .json file (or their common stem). Never unpickles anything:
    tensors come from safetensors, the architecture from the registry.
    """
    from safetensors.torch import load_file

    weights_path, _ = _resolve_pair(path)
    if not weights_path.is_file():
        raise WeightsError(f"{weights_path}: weights file not found")
    metadata = read_metadata(path)
    expected_hash = metadata.get("weights_sha256")
    if check_hash and expected_hash and _sha256(weights_path) != expected_hash:
        raise WeightsError(f"{weights_path}: sha256 differs from the one recorded in its .json: "
                           "the two files come from different saves")
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise WeightsError(f"{weights_path}: not a readable safetensors file: {exc}") from exc
    model = _check_state_matches(state, metadata, source=str(weights_path))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), metadata
