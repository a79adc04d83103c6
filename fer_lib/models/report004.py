"""report-004: SimpleCNN, ImprovedCNNv1 and BetterCNN."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fer_lib.models.blocks import linear_bn_act
from fer_lib.models.registry import register_model

SOURCE = "report-004"


class ConvThenFC(nn.Module):
    """Conv blocks conv3x3 (-> BN) -> act -> maxpool2, flatten, FC layers, output layer."""

    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, ...],
                 hidden_dims: tuple[int, ...], batch_norm: bool, fc_batch_norm: bool,
                 activation: Callable[[], nn.Module], dropout_rate: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for width in widths:
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [activation(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = 48 // 2 ** len(widths)
        in_features = channels * side * side
        head: list[nn.Module] = [nn.Flatten()]
        for dim in hidden_dims:
            if fc_batch_norm:
                head.append(linear_bn_act(in_features, dim, activation, dropout_rate))
            else:
                head += [nn.Linear(in_features, dim), activation()]
                if dropout_rate > 0:
                    head.append(nn.Dropout(dropout_rate))
            in_features = dim
        head.append(nn.Linear(in_features, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("simple_cnn", source=f"{SOURCE}, SimpleCNN")
def simple_cnn(num_classes: int = 7, in_chans: int = 1, *, hidden_dim: int = 128) -> nn.Module:
    """report-004 SimpleCNN: two conv layers + max pooling, two fully connected layers, ReLU.

    Report: "2 Convolutional layers + MaxPooling, 2 Fully Connected layers, ReLU,
    CrossEntropyLoss, Adam, 10 epochs"; ~50%, underfits. Inferred: conv3x3 32 and 64 with
    padding 1, each ReLU + max pool 2 (48->24->12), flatten 9216 -> 128 -> ReLU -> 7.
    kwargs: hidden_dim=128.
    """
    return ConvThenFC(in_chans, num_classes, (32, 64), (hidden_dim,), batch_norm=False,
                      fc_batch_norm=False, activation=nn.ReLU, dropout_rate=0.0)


@register_model("improved_cnn_v1", source=f"{SOURCE}, ImprovedCNNv1")
def improved_cnn_v1(num_classes: int = 7, in_chans: int = 1, *, hidden_dim: int = 256,
                    dropout_rate: float = 0.5) -> nn.Module:
    """report-004 ImprovedCNNv1: more conv layers with BatchNorm, dropout on the FC layers.

    Report: "more conv layers added; Batch Normalization after every conv layer; Dropout on
    the fully connected layers; learning-rate scheduler; ReLU; 10 epochs" (train 67.5%,
    val 61.6%). Inferred: three conv3x3-BN-ReLU-maxpool layers 32-64-128 (one more than
    SimpleCNN; 48->24->12->6), flatten 4608 -> 256 -> ReLU -> Dropout(0.5) -> 7.
    kwargs: hidden_dim=256, dropout_rate=0.5.
    """
    return ConvThenFC(in_chans, num_classes, (32, 64, 128), (hidden_dim,), batch_norm=True,
                      fc_batch_norm=False, activation=nn.ReLU, dropout_rate=dropout_rate)


@register_model("better_cnn", source=f"{SOURCE}, BetterCNN")
def better_cnn(num_classes: int = 7, in_chans: int = 1, *,
               hidden_dims: tuple[int, ...] = (512, 256), dropout_rate: float = 0.5) -> nn.Module:
    """report-004 BetterCNN: 3 conv blocks and 2 FC blocks with BN and LeakyReLU.

    Report: "3x Conv block: Conv2D -> BatchNorm -> LeakyReLU -> MaxPooling; 2x Fully Connected
    block: Linear -> BatchNorm -> LeakyReLU -> Dropout; Output Layer: Linear(num_classes)";
    Adam, flip/rotation/resized crop, mean 0.5 std 0.5; 60.7/64.2/64.8% val at 10/20/30
    epochs. Inferred: widths 32-64-128 (3x3, padding 1; 48->24->12->6), flatten 4608,
    FC blocks 512 and 256, LeakyReLU slope 0.01, dropout 0.5.
    kwargs: hidden_dims=(512, 256), dropout_rate=0.5.
    """
    return ConvThenFC(in_chans, num_classes, (32, 64, 128), tuple(hidden_dims), batch_norm=True,
                      fc_batch_norm=True, activation=nn.LeakyReLU, dropout_rate=dropout_rate)
