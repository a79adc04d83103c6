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
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fer_lib.fileio import atomic_path, git_revision

__all__ = ["FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "load_model", "to_plain"]

FORMAT_VERSION = 1


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


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which file
        raise ValueError(f"checkpoint {path} could not be loaded: {err}") from err
    if not isinstance(ckpt, dict) or "model_state" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a fer_lib checkpoint (no 'model_state')")
    return ckpt


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from the registry (fer_lib.models.create_model) and load its weights.

    Returns the model in eval mode (create_model records registry_name/registry_kwargs), with
    `checkpoint_meta` (epoch, metrics, class_names, config) attached for reference.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    name = ckpt.get("model_name")
    if not name:
        raise ValueError(
            f"checkpoint {path} records no model name; build the model yourself and call "
            "model.load_state_dict(load_checkpoint(path)['model_state'])"
        )
    from fer_lib.models import create_model

    kwargs = dict(ckpt.get("model_kwargs") or {})
    model = create_model(name, **kwargs)
    model.load_state_dict(ckpt["model_state"])
    model.checkpoint_meta = {k: ckpt.get(k) for k in ("epoch", "metrics", "class_names", "config", "best_val_accuracy")}
    return model.eval()
