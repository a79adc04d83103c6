"""Checkpoints: atomic writes, safe loads (``weights_only=True``), rebuilding models by name.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs on load):

    format_version, model_state (weights to evaluate with: the EMA weights when EMA is on),
    model_name, model_kwargs, config, class_names, epoch, metrics, history, best_epoch,
    best_val_accuracy, git_revision, torch_version, created,
    train_state (only in "last" checkpoints: optimizer, scheduler, grad scaler, EMA, raw
    weights, early-stopping counters and RNG states: everything `fit(resume=...)` needs).

Writes go through `fer_lib.fileio.atomic_path`, so a crash or a full disk mid-write leaves
the previous checkpoint intact (a full disk is one `WriteError` naming the file).

Loads say which file is wrong and why, in one `CheckpointError` (a ValueError): an empty file,
a file that is not a PyTorch zip archive, a truncated archive, a pickle holding code (never
unpickled), a dict without weights, or weights that do not fit the model they are loaded
into (`load_state`/`load_checkpoint_into` name the file and both models).
"""
from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fer_lib.fileio import atomic_path, git_revision

__all__ = ["FORMAT_VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint", "load_model",
           "load_state", "load_checkpoint_into", "state_mismatch", "to_plain"]

FORMAT_VERSION = 1
# torch.save has written zip archives since torch 1.6; every fer_lib checkpoint is one.
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint file is unusable; the message names the file and the cause."""


def to_plain(obj: Any) -> Any:
    """Convert to what weights_only loading accepts: tensors, numbers, str, None, lists, dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (int, str)) else k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays
        return obj.tolist()
    return repr(obj)


def _state_to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # contiguous: a channels_last training run stores weights any run can load
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | dict[str, torch.Tensor],
    *,
    config: dict[str, Any] | None = None,
    epoch: int | None = None,
    metrics: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    class_names: list[str] | tuple[str, ...] | None = None,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    best_epoch: int | None = None,
    best_val_accuracy: float | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (tmp file in the same folder + os.replace); return its path.

    model: the module (its state_dict is stored) or a state_dict. model_name/model_kwargs
    default to the module's `registry_name` / `registry_kwargs` attributes if present.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, nn.Module):
        state = model.state_dict()
        model_name = model_name if model_name is not None else getattr(model, "registry_name", None)
        if model_kwargs is None:
            model_kwargs = getattr(model, "registry_kwargs", None)
    else:
        state = model
    payload = {
        "format_version": FORMAT_VERSION,
        "model_state": _state_to_cpu(state),
        "model_name": model_name,
        "model_kwargs": to_plain(model_kwargs or {}),
        "config": to_plain(config or {}),
        "class_names": list(class_names) if class_names is not None else None,
        "epoch": epoch,
        "metrics": to_plain(metrics or {}),
        "history": to_plain(history or []),
        "best_epoch": best_epoch,
        "best_val_accuracy": best_val_accuracy,
        "git_revision": git_revision(),
        "torch_version": str(torch.__version__),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if train_state is not None:
        payload["train_state"] = to_plain(train_state)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())  # the rename must not reach the disk before the data
    return path


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    """The CheckpointError for a file torch.load refused, with the likely cause first."""
    import pickle

    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, pickle.UnpicklingError):
        # torch's own message advises weights_only=False, i.e. running the file's code: no.
        return CheckpointError(f"{path}: not a fer_lib checkpoint: it holds pickled Python "
                               "objects that a weights-only load refuses (a torch.save(model) "
                               "file?); fer_lib never unpickles code")
    return CheckpointError(f"{path}: not a fer_lib checkpoint, or truncated (an interrupted "
                           f"copy or download): {first_line}")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with torch.load(weights_only=True).

    FileNotFoundError when the file is missing; CheckpointError naming the file when it is
    empty, truncated, not a fer_lib checkpoint, or would need unpickling code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(len(_ZIP_MAGIC))
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes): not a fer_lib checkpoint, or "
                              "a write or copy that never finished")
    if head != _ZIP_MAGIC:
        raise CheckpointError(f"{path}: not a fer_lib checkpoint (not a PyTorch zip archive)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types; each means "unusable"
        raise _unreadable(path, err) from err
    if not isinstance(ckpt, dict) or "model_state" not in ckpt:
        raise CheckpointError(f"{path}: not a fer_lib checkpoint (no 'model_state')")
    return ckpt


def state_mismatch(expected: Mapping[str, Any], got: Mapping[str, Any]) -> str:
    """"" when two state dicts (or name -> shape dicts) have the same names and shapes, else a
    short description: missing and unexpected names, shape differences (first 5 of each)."""
    def shape(value: Any) -> tuple[int, ...]:
        return tuple(value.shape) if hasattr(value, "shape") else tuple(value)

    want = {k: shape(v) for k, v in expected.items()}
    have = {k: shape(v) for k, v in got.items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    details = []
    if missing:
        details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        details.append("shape mismatch " + ", ".join(f"{k}: {have[k]} vs {want[k]}"
                                                     for k in wrong[:5]))
    return "; ".join(details)


def _label(name: str | None, kwargs: Mapping[str, Any] | None) -> str:
    """'exp3_cnn' {'num_classes': 7, ...}: a model as error messages name it."""
    return f"{name or 'unknown'!r}" + (f" {dict(kwargs)}" if kwargs else "")


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, path: str | os.PathLike,
               saved_model: str | None = None,
               saved_kwargs: Mapping[str, Any] | None = None) -> None:
    """model.load_state_dict(state), strict; a mismatch is one CheckpointError naming `path`,
    the model the weights were saved from (`saved_model`, `saved_kwargs`) and `model`."""
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        target = _label(getattr(model, "registry_name", None) or type(model).__name__,
                        getattr(model, "registry_kwargs", None))
        raise CheckpointError(f"{path}: weights of model {_label(saved_model, saved_kwargs)} do "
                              f"not fit model {target}: {problem}")
    model.load_state_dict(state)


def load_checkpoint_into(model: nn.Module, path: str | os.PathLike,
                         map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the checkpoint's `model_state` into `model` (see load_state); return the checkpoint."""
    ckpt = load_checkpoint(path, map_location=map_location)
    load_state(model, ckpt["model_state"], path=path, saved_model=ckpt.get("model_name"),
               saved_kwargs=ckpt.get("model_kwargs"))
    return ckpt


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from the registry (fer_lib.models.create_model) and load its weights.

    Returns the model in eval mode (create_model records registry_name/registry_kwargs), with
    `checkpoint_meta` (epoch, metrics, class_names, config) attached for reference.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    name = ckpt.get("model_name")
    if not name:
        raise CheckpointError(
            f"{path}: the checkpoint records no model name; build the model yourself and call "
            "fer_lib.checkpoint.load_checkpoint_into(model, path)")
    from fer_lib.models import create_model

    kwargs = dict(ckpt.get("model_kwargs") or {})
    try:
        model = create_model(name, **kwargs)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot rebuild model {name!r} with {kwargs}: {err}") from err
    load_state(model, ckpt["model_state"], path=path, saved_model=name, saved_kwargs=kwargs)
    model.checkpoint_meta = {k: ckpt.get(k) for k in ("epoch", "metrics", "class_names", "config", "best_val_accuracy")}
    return model.eval()
