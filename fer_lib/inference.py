"""The one way fer_lib runs a trained model on faces: batched, with one meaning of TTA.

Everything that turns face images into predictions goes through `predict_logits`: `evaluate`
(so every accuracy the notebooks, the README and the recipes report), the per-epoch
validation in `fit`, ensembles, the photo predictor (`fer_lib.predict`), Grad-CAM's default
target class and the ONNX parity check. So a reported accuracy is measured exactly the way
`python -m fer_lib predict` predicts.

Test-time augmentation (TTA) averages the softmax probabilities of the views and returns the
log of that average: softmax() of the result is the averaged probability, argmax the TTA
prediction, cross-entropy on it the loss of the averaged prediction. Why probabilities and not
logits: both were measured on PublicTest with eight trained models (docs/measurements.md,
"flip TTA: logits or probabilities"); they differ by at most 0.25 points on seven models and
probability averaging is 0.76 points better on the one whose single views are over-confident,
it is what the predictor shows and what ensembles average. With tta="none" the raw logits are
returned unchanged.

Modes: "none"; "flip" (image + horizontal mirror); "tencrop" (4 corner crops + the centre crop
of `crop_size`, each also mirrored: for models trained on random crops, e.g. 40x40 of 48x48);
"flip_translate" (image and mirror, each also shifted by `shift` pixels up/down/left/right: 10
views). Uncovered pixels of a shifted view get the value of a black pixel, like the zero
padding of the training augmentation.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fer_lib.augment import MEAN, STD, to_float
from fer_lib.device import DeviceSetup, resolve_device

__all__ = ["TTA_MODES", "to_model_input", "tta_views", "predict_logits", "predict_probs"]

TTA_MODES = ("none", "flip", "tencrop", "flip_translate")

Stat = float | Sequence[float]


def _as_uint8_batch(images: Any) -> Tensor:
    """uint8 (N, 1, H, W) tensor from a tensor/array of shape (N, H, W) or (N, 1, H, W)."""
    tensor = images if isinstance(images, Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if tensor.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (0..255 pixels), got {tensor.dtype}")
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.dim() != 4 or tensor.shape[1] != 1:
        raise ValueError(f"images must have shape (N, H, W) or (N, 1, H, W), got {tuple(tensor.shape)}")
    return tensor


def to_model_input(images_uint8: Tensor, *, mean: Stat = MEAN, std: Stat = STD, input_size: int | None = None,
                   in_chans: int = 1) -> Tensor:
    """uint8 faces (N, 1, H, W) on any device -> the normalised float input the model was trained on.

    The training arithmetic (pixel / 255, then (x - mean) / std; `augment.to_float` for the
    usual scalar statistics). A model trained on smaller inputs (e.g. 40x40 crops) gets the
    centre crop; a larger `input_size` is reached by bilinear resizing; a model with several
    input channels gets the gray image repeated.
    """
    scalar_stats = np.ndim(mean) == 0 and np.ndim(std) == 0
    size = images_uint8.shape[-1]
    if scalar_stats and input_size in (None, size):
        x = to_float(images_uint8, float(mean), float(std))
    else:
        x = images_uint8.float().div_(255.0)
        if input_size is not None and input_size < size:
            top = (size - input_size) // 2
            x = x[..., top:top + input_size, top:top + input_size]
        elif input_size is not None and input_size > size:
            x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
        stat = {"dtype": torch.float32, "device": x.device}
        x = (x - torch.as_tensor(mean, **stat).reshape(1, -1, 1, 1)) / torch.as_tensor(std, **stat).reshape(1, -1, 1, 1)
    if x.shape[1] != in_chans:
        x = x.expand(-1, in_chans, -1, -1)
    return x.contiguous()


def tta_views(batch: Tensor, mode: str, *, crop_size: int | None = None, shift: int = 2,
              fill: float = 0.0) -> list[Tensor]:
    """The TTA views of a normalised batch (B, C, H, W); `fill` is the normalised black pixel."""
    if mode == "none":
        return [batch]
    if mode == "flip":
        return [batch, batch.flip(-1)]
    height, width = batch.shape[-2:]
    if mode == "tencrop":
        size = int(crop_size)
        corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
                   ((height - size) // 2, (width - size) // 2)]
        crops = [batch[..., top:top + size, left:left + size] for top, left in corners]
        return crops + [crop.flip(-1) for crop in crops]
    padded = F.pad(batch, (shift, shift, shift, shift), value=fill)
    views = []
    for source in (padded, padded.flip(-1)):
        for dy, dx in ((0, 0), (-shift, 0), (shift, 0), (0, -shift), (0, shift)):
            views.append(source[..., shift + dy:shift + dy + height, shift + dx:shift + dx + width])
    return views


def _check_mode(mode: str, crop_size: int | None, shift: int, height: int, width: int) -> None:
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; expected one of {TTA_MODES}")
    if mode == "tencrop":
        if crop_size is None:
            raise ValueError("tta='tencrop' needs crop_size (the crop size the model was trained on, e.g. 40)")
        if not 0 < int(crop_size) <= min(height, width):
            raise ValueError(f"crop_size={crop_size} does not fit images of {height}x{width}")
    if mode == "flip_translate" and not 0 < shift < min(height, width):
        raise ValueError(f"shift={shift} must be between 1 and the image size - 1")


def _model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def predict_logits(model: nn.Module, images_uint8: Any, *, tta: str = "none", batch_size: int = 512,
                   device: str | torch.device | None = None, precision: str = "fp32",
                   setup: DeviceSetup | None = None, mean: Stat = MEAN, std: Stat = STD,
                   input_size: int | None = None, in_chans: int = 1, crop_size: int | None = None,
                   shift: int = 2) -> Tensor:
    """Logits (N, C) float32 on the CPU for uint8 faces (N, H, W) or (N, 1, H, W).

    tta: see the module docstring ("none" raw logits; otherwise the log of the views' mean
    softmax). device None: the model's device. precision "fp32" (exact) or "auto"/"bf16";
    `setup` (a DeviceSetup, e.g. the training one) overrides device and precision. mean, std,
    input_size, in_chans: the model's input (`to_model_input`). The model runs in eval mode
    and gets its train/eval mode back afterwards. Without `setup`, a conv net is moved to the
    device in channels_last memory format, in place, as training does (its weights too: with
    only the input in channels_last oneDNN reorders the weights at every call; 2.4x fewer
    seconds for fernet with bf16 on a 2-core Xeon, docs/speed.md).
    """
    images = _as_uint8_batch(images_uint8)
    height, width = images.shape[-2:]
    _check_mode(tta, crop_size, shift, height, width)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if setup is None:
        setup = resolve_device(_model_device(model) if device is None else device, precision=precision,
                               model=model)
        # Outside inference mode: parameters re-made inside it (a move to another device or
        # memory format) would be inference tensors, and the model could not be trained again.
        model.to(setup.device, memory_format=setup.memory_format())
    prepare = dict(mean=mean, std=std, input_size=input_size, in_chans=in_chans)
    fill = float(to_model_input(torch.zeros(1, 1, 1, 1, dtype=torch.uint8), **{**prepare, "input_size": None})
                 .reshape(-1)[0]) if tta == "flip_translate" else 0.0
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                # uint8 crosses to the device (4x fewer bytes than float), then is normalised there
                batch = to_model_input(images[start:start + batch_size].to(setup.device, non_blocking=True), **prepare)
                batch = batch.contiguous(memory_format=setup.memory_format())
                with setup.autocast():
                    if tta == "none":
                        out.append(model(batch).float().cpu())
                        continue
                    views = tta_views(batch, tta, crop_size=crop_size, shift=shift, fill=fill)
                    probs = sum(torch.softmax(model(view).float(), dim=1) for view in views) / len(views)
                out.append(torch.log(probs.clamp_min(1e-12)).cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("no images to predict (an empty batch)")
    return torch.cat(out)


def predict_probs(model: nn.Module, images_uint8: Any, **kwargs: Any) -> Tensor:
    """Class probabilities (N, C) float32 on the CPU: softmax of `predict_logits(..., **kwargs)`."""
    return torch.softmax(predict_logits(model, images_uint8, **kwargs), dim=1)
