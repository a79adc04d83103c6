"""Building blocks shared by several model families.

Convolutions followed by BatchNorm have no bias: BN subtracts the batch mean, so a bias there is
a parameter that never receives a useful gradient. All modules use reshape/flatten rather than
`.view`, so they also run on channels_last tensors, and no in-place op touches a view (both
matter under bf16 autocast + channels_last on CPU).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ActivationFactory = Callable[[], nn.Module]


def conv_bn_act(in_channels: int, out_channels: int, activation: ActivationFactory = nn.ReLU,
                kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (same padding, no bias) -> BatchNorm -> activation."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                  padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        activation(),
    )


def conv_pool_stack(in_chans: int, widths: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """(conv3x3 (no bias) -> BN -> ReLU -> maxpool2) per width, flat in one Sequential (so the
    weight names are features.<i>.*); returns the stack and its output channels."""
    layers: list[nn.Module] = []
    channels = in_chans
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                   nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    return nn.Sequential(*layers), channels


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-act-(dropout)-conv3x3-BN, plus shortcut, then act.

    The shortcut is the identity when shape is kept, else a 1x1 strided conv + BN projection
    (ResNet option B). `dropout_rate` > 0 inserts dropout between the two convs (report-003's
    ResidualBlock and report-000's CustomBlock both mention a dropout inside the block).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 dropout_rate: float = 0.0, activation: ActivationFactory = nn.ReLU) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = activation()
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = activation()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.act1(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


def make_stage(in_channels: int, out_channels: int, num_blocks: int, stride: int,
               dropout_rate: float = 0.0) -> nn.Sequential:
    """`num_blocks` basic blocks; only the first changes stride/width (like _make_layer)."""
    blocks = [BasicBlock(in_channels, out_channels, stride, dropout_rate)]
    blocks += [BasicBlock(out_channels, out_channels, 1, dropout_rate)
               for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): channel gates from globally pooled features.

    fc1 squeezes channels by `reduction`, fc2 restores them; a sigmoid gate rescales each
    channel of the input.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=(2, 3))
        gates = torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))
        return x * gates[:, :, None, None]


def linear_bn_act(in_features: int, out_features: int, activation: ActivationFactory = nn.ReLU,
                  dropout_rate: float = 0.0) -> nn.Sequential:
    """Linear (no bias: BN follows) -> BatchNorm1d -> activation -> dropout (an FC 'block')."""
    layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=False),
                               nn.BatchNorm1d(out_features), activation()]
    if dropout_rate > 0:
        layers.append(nn.Dropout(dropout_rate))
    return nn.Sequential(*layers)


def linear_bn_act_stack(in_features: int, dims: tuple[int, ...],
                        dropout_rate: float = 0.0) -> tuple[nn.Sequential, int]:
    """FC blocks of widths `dims` in a row; returns them and the last width (for the classifier)."""
    blocks = []
    for dim in dims:
        blocks.append(linear_bn_act(in_features, dim, dropout_rate=dropout_rate))
        in_features = dim
    return nn.Sequential(*blocks), in_features


def residual_trunk(in_chans: int, stem_channels: int, widths: tuple[int, ...],
                   dropout_rate: float) -> tuple[nn.Sequential, nn.Sequential, int]:
    """conv3x3-BN-ReLU stem, then one stride-2 BasicBlock per width.

    Returns (stem, blocks, out_channels); the small residual nets of report-000 and
    report-003 (experiment 6) share this trunk and differ only in their heads.
    """
    stem = nn.Sequential(nn.Conv2d(in_chans, stem_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(stem_channels), nn.ReLU())
    blocks, channels = [], stem_channels
    for width in widths:
        blocks.append(BasicBlock(channels, width, stride=2, dropout_rate=dropout_rate))
        channels = width
    return stem, nn.Sequential(*blocks), channels


def init_resnet_weights(model: nn.Module) -> None:
    """He init for convs (fan_out, as torchvision's ResNet), BN to identity, small normal FC.

    report-003's FacialExpressionResNet calls `self._initialize_weights()` without showing it;
    this is the usual body of such a method.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
