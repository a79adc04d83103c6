"""Grad-CAM (Selvaraju et al. 2017) for any model of the fer_lib registry.

Which pixels made the model say "Happy"? Grad-CAM takes the feature maps A (C, h, w) of a
convolutional layer, weights each channel by the mean gradient of the class score over that
map, sums, keeps the positive part and upsamples to the input size:

    cam = relu(sum_c mean_ij(d score / d A_c,ij) * A_c)   -> (48, 48), scaled to [0, 1]

Written here with a forward hook and `torch.autograd.grad` instead of using the `grad-cam`
pip package: that package depends on the full `opencv-python`, which conflicts with the
`opencv-python-headless` fer_lib pins (both install a `cv2` module and overwrite each other).

The layer defaults to the last Conv2d that runs in the forward pass whose output still has a
spatial extent (> 1x1): found by running the model once with hooks on every Conv2d, because
the order in which modules are registered need not be the order in which they run.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def find_last_conv(model: nn.Module, example: torch.Tensor | None = None,
                   input_size: int = 48) -> nn.Module:
    """The last nn.Conv2d executed by `model` whose output is larger than 1x1.

    example: an input batch to trace with (default: zeros (1, C, 48, 48), trying C = the
    first registered Conv2d's in_channels, then 1 and 3).
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer; pass target_layer")
    if example is None:
        param = next(model.parameters())
        errors = []
        for in_chans in dict.fromkeys((convs[0].in_channels, 1, 3)):
            example = torch.zeros(1, in_chans, input_size, input_size, device=param.device,
                                  dtype=param.dtype)
            try:
                return find_last_conv(model, example)
            except RuntimeError as exc:  # wrong channel count for this model
                errors.append(f"{in_chans} channels: {exc}")
        raise ValueError(f"cannot trace {type(model).__name__}; pass example or target_layer "
                         f"({'; '.join(errors)})")
    executed: list[nn.Module] = []

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        if (isinstance(output, torch.Tensor) and output.dim() == 4
                and output.shape[-1] * output.shape[-2] > 1):
            executed.append(module)

    handles = [m.register_forward_hook(record) for m in convs]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not executed:
        raise ValueError(f"no Conv2d of {type(model).__name__} produced a spatial map larger "
                         "than 1x1; pass target_layer")
    return executed[-1]


class GradCAM:
    """Grad-CAM on one layer of `model`.

        cam = GradCAM(model)                      # last conv layer, found automatically
        heatmaps = cam(images)                    # (N, 48, 48) in [0, 1], predicted classes
        heatmaps = cam(images, target_classes=3)  # for class 3 ("Happy") instead

    images: normalised float (N, C, H, W) as the model takes them. After a call,
    `last_logits` holds the model's logits (N, num_classes) for those images.
    """

    def __init__(self, model: nn.Module, target_layer: nn.Module | None = None) -> None:
        self.model = model
        self.target_layer = target_layer
        self.last_logits: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor,
                 target_classes: int | Sequence[int] | torch.Tensor | None = None) -> np.ndarray:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if self.target_layer is None:  # found once, then reused for later calls
            self.target_layer = find_last_conv(self.model, images)
        layer = self.target_layer
        captured: dict[str, torch.Tensor] = {}

        def keep_output(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            captured["activation"] = output
            # Hand a copy downstream so an in-place op after the layer (ReLU(inplace=True))
            # cannot overwrite the activations we keep.
            return output.clone()

        handle = layer.register_forward_hook(keep_output)
        was_training = self.model.training
        # eval(): dropout off and BatchNorm on running statistics; a train-mode forward would
        # also update those statistics as a side effect of explaining a prediction.
        self.model.eval()
        try:
            with torch.enable_grad():
                # requires_grad on the input: the graph exists even for a frozen model.
                x = images.detach().clone().requires_grad_(True)
                logits = self.model(x)
                if "activation" not in captured:
                    raise ValueError("target_layer did not run in the forward pass")
                activation = captured["activation"]
                targets = self._targets(target_classes, logits)
                score = logits.gather(1, targets[:, None]).sum()
                # autograd.grad rather than backward(): no .grad is left on the parameters.
                (gradient,) = torch.autograd.grad(score, activation)
        finally:
            handle.remove()
            self.model.train(was_training)
        self.last_logits = logits.detach()
        weights = gradient.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activation.detach()).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam.float(), size=images.shape[-2:], mode="bilinear",
                            align_corners=False)[:, 0]
        peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
        return (cam / peak).clamp_(0, 1).cpu().numpy().astype(np.float32)

    @staticmethod
    def _targets(target_classes: int | Sequence[int] | torch.Tensor | None,
                 logits: torch.Tensor) -> torch.Tensor:
        n, num_classes = logits.shape
        if target_classes is None:
            return logits.argmax(dim=1)
        targets = torch.as_tensor(target_classes, dtype=torch.long, device=logits.device)
        if targets.dim() == 0:
            targets = targets.expand(n)
        if targets.shape != (n,):
            raise ValueError(f"target_classes must be one class or one per image ({n}), got "
                             f"shape {tuple(targets.shape)}")
        if targets.min() < 0 or targets.max() >= num_classes:
            raise ValueError(f"target_classes must lie in 0..{num_classes - 1}")
        return targets


def grad_cam(model: nn.Module, images: torch.Tensor,
             target_classes: int | Sequence[int] | torch.Tensor | None = None, *,
             target_layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM heatmaps float32 (N, H, W) in [0, 1] (each scaled by its own maximum).

    images: normalised float (N, C, H, W) on the model's device. target_classes: None for each
    image's predicted class, one class index for all, or one per image.
    """
    return GradCAM(model, target_layer)(images, target_classes)


def _display_images(images: Any) -> np.ndarray:
    """(N, H, W) float in [0, 1] for display from uint8 or (normalised) float images."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    array = np.asarray(images)
    if array.ndim == 4:
        array = array[:, 0]
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    low = array.min(axis=(1, 2), keepdims=True)
    high = array.max(axis=(1, 2), keepdims=True)
    return (array - low) / np.maximum(high - low, 1e-12)


def plot_gradcam(images: Any, cams: np.ndarray, labels: Sequence[int] | None = None,
                 preds: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                 *, ncols: int = 6, alpha: float = 0.45, cmap: str = "jet"):
    """Grid of faces with their Grad-CAM overlaid; returns a matplotlib Figure.

    images: uint8 (N, 48, 48) / (N, 1, 48, 48) or normalised floats; cams: (N, 48, 48).
    Titles show "true / pred" (pred green when right, red when wrong) where given.
    The Figure is built without pyplot, so nothing is shown twice or kept open in notebooks.
    """
    from matplotlib.figure import Figure

    faces = _display_images(images)
    cams = np.asarray(cams)
    if len(faces) != len(cams):
        raise ValueError(f"{len(faces)} images but {len(cams)} cams")
    if class_names is None:
        from fer_lib.data import CLASS_NAMES as class_names  # noqa: N811
    n = len(faces)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(1.8 * ncols, 2.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(faces[i], cmap="gray", vmin=0, vmax=1)
        ax.imshow(cams[i], cmap=cmap, alpha=alpha, vmin=0, vmax=1)
        parts, colour = [], "black"
        if labels is not None:
            parts.append(f"true {class_names[int(labels[i])]}")
        if preds is not None:
            parts.append(f"pred {class_names[int(preds[i])]}")
            if labels is not None:
                colour = "green" if int(preds[i]) == int(labels[i]) else "red"
        if parts:
            ax.set_title("\n".join(parts), fontsize=8, color=colour)
    return fig
