"""Grad-CAM: layer choice, shapes, range, class dependence, no side effects, plotting."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fer_lib.data import CLASS_NAMES
from fer_lib.gradcam import GradCAM, find_last_conv, grad_cam, plot_gradcam
from fer_lib.models import create_model


def registry_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name)
    with torch.no_grad():  # perturb: zero-initialised heads would give all-zero gradients
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def batch(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 48, 48, generator=torch.Generator().manual_seed(seed))


class LeftRightNet(nn.Module):
    """Class 0 = "bright pixels", class 1 = "dark pixels", on 1x1 conv features.

    Channel 0 of the conv is the pixel value, channel 1 is 1 - pixel; each logit is the mean
    of one channel. On an image bright on the left and dark on the right, Grad-CAM of
    class 0 must light up the left half and class 1 the right half.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1)
            self.conv.bias[:] = torch.tensor([0.0, 1.0])
        self.relu = nn.ReLU(inplace=True)  # in place right after the hooked conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x)).mean(dim=(2, 3))


def test_cam_points_at_the_evidence_for_each_class():
    image = torch.zeros(1, 1, 48, 48)
    image[..., :24] = 1.0
    model = LeftRightNet()
    bright, dark = grad_cam(model, image, 0)[0], grad_cam(model, image, 1)[0]
    assert bright[:, :20].min() > 0.9 and bright[:, 28:].max() < 0.1
    assert dark[:, 28:].min() > 0.9 and dark[:, :20].max() < 0.1


@pytest.mark.parametrize("name", ["exp3_cnn", "exp6_resnet_small", "fernet_small"])
def test_shapes_range_and_class_dependence_on_registry_models(name):
    model = registry_model(name)
    images = batch(4)
    cams = grad_cam(model, images)
    assert cams.shape == (4, 48, 48) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1
    assert np.allclose(cams.reshape(4, -1).max(axis=1), 1.0)  # each scaled by its own peak
    happy = grad_cam(model, images, CLASS_NAMES.index("Happy"))
    angry = grad_cam(model, images, CLASS_NAMES.index("Angry"))
    assert np.abs(happy - angry).mean() > 0.01


def test_default_targets_are_the_predicted_classes():
    model = registry_model("exp3_cnn")
    images = batch(3)
    cam = GradCAM(model)
    default = cam(images)
    preds = cam.last_logits.argmax(dim=1)
    np.testing.assert_allclose(default, cam(images, preds), atol=1e-6)
    with pytest.raises(ValueError, match="one class or one per image"):
        cam(images, [0, 1])
    with pytest.raises(ValueError, match="0..6"):
        cam(images, 7)


def test_last_conv_is_found_by_execution_order_not_registration():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Conv2d(8, 8, 3, padding=1)     # registered first, runs last
            self.early = nn.Conv2d(1, 8, 3, padding=1)
            self.head_conv = nn.Conv2d(8, 7, 1)           # runs after pooling: 1x1 output
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            x = self.late(torch.relu(self.early(x)))
            return self.head_conv(self.pool(torch.relu(x))).flatten(1)

    net = Net()
    assert find_last_conv(net) is net.late
    cams = grad_cam(net, batch(2), target_layer=net.early)  # an explicit layer is used as is
    assert cams.shape == (2, 48, 48)


def test_no_side_effects_on_the_model():
    model = registry_model("exp3_cnn")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_cam(model, batch(4))
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_plot_gradcam_grid():
    model = registry_model("exp3_cnn")
    images_uint8 = np.random.default_rng(0).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    x = torch.from_numpy(images_uint8).float().div(255).sub(0.5).div(0.25)[:, None]
    cam = GradCAM(model)
    cams = cam(x)
    preds = cam.last_logits.argmax(1).tolist()
    labels = [3, 3, 0, 6, 4]
    fig = plot_gradcam(images_uint8, cams, labels, preds, CLASS_NAMES, ncols=3)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(fig.axes) == 6 and len(shown) == 5
    assert all(len(ax.images) == 2 for ax in shown)  # face + heatmap overlay
    assert shown[0].get_title() == f"true Happy\npred {CLASS_NAMES[preds[0]]}"
    # Normalised float inputs (N, 1, H, W) are accepted too.
    assert len(plot_gradcam(x, cams).axes) == 5
