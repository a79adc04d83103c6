"""report-001: the 64-128-256-512 CNN (Adam vs SGD), ImprovedFaceCNN and AdvancedFaceCNN."""
from __future__ import annotations

import torch
from torch import nn

from fer_lib.models.blocks import BasicBlock, conv_pool_stack, linear_bn_act
from fer_lib.models.registry import register_model

SOURCE = "report-001"


class CNN4(nn.Module):
    """Four conv3x3-BN-ReLU-maxpool layers, flatten, FC -> ReLU -> dropout -> FC."""

    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, ...],
                 hidden_dim: int, dropout_rate: float) -> None:
        super().__init__()
        self.features, channels = conv_pool_stack(in_chans, widths)
        side = 48 // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * side * side, hidden_dim), nn.ReLU(),
            nn.Dropout(dropout_rate), nn.Linear(hidden_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("cnn4", source=f"{SOURCE}, first model (Adam) / second model (SGD)")
def cnn4(num_classes: int = 7, in_chans: int = 1, *, hidden_dim: int = 512,
         dropout_rate: float = 0.5) -> nn.Module:
    """report-001 CNN: four conv layers 64-128-256-512 with BN, ReLU, max pool, and two FC.

    Report: "4 convolutional layers (64, 128, 256, 512 filters), batch normalisation and
    ReLU activation, max pooling layers, 2 fully connected layers"; Adam lr 0.001, Dropout 0.5,
    weight decay 1e-5, ReduceLROnPlateau. The second model is the same network trained with
    SGD (49%). Inferred: 3x3 convs with padding 1 (48->24->12->6->3), flatten 4608,
    FC 512 -> ReLU -> Dropout(0.5) -> 7.
    kwargs: hidden_dim=512, dropout_rate=0.5.
    """
    return CNN4(in_chans, num_classes, (64, 128, 256, 512), hidden_dim, dropout_rate)


def _conv_bn_lrelu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.LeakyReLU()]


class ImprovedFaceCNN(nn.Module):
    """Four pooled conv layers (one residual skip block after the third), GAP, BN/dropout head."""

    def __init__(self, in_chans: int, num_classes: int, dropout_rate: float) -> None:
        super().__init__()
        self.block1 = nn.Sequential(*_conv_bn_lrelu(in_chans, 64), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*_conv_bn_lrelu(64, 128), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*_conv_bn_lrelu(128, 256), nn.MaxPool2d(2))
        self.skip_block = BasicBlock(256, 256, activation=nn.LeakyReLU)
        self.block4 = nn.Sequential(*_conv_bn_lrelu(256, 512), nn.MaxPool2d(2))
        self.head = nn.Sequential(linear_bn_act(512, 256, nn.LeakyReLU, dropout_rate),
                                  nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        x = self.block4(self.skip_block(x))
        return self.head(x.mean(dim=(2, 3)))


@register_model("improved_face_cnn", source=f"{SOURCE}, third model (ImprovedFaceCNN)")
def improved_face_cnn(num_classes: int = 7, in_chans: int = 1, *,
                      dropout_rate: float = 0.5) -> nn.Module:
    """report-001 ImprovedFaceCNN: 64-128-256-512 convs, BN, LeakyReLU, a skip block, GAP, FC.

    Report (~66%): conv layers 64, 128, 256, 512 with Batch Normalization after each; Leaky
    ReLU instead of ReLU; "adding a skip block lets information bypass specific layers"
    (ResNet-like); Global Average Pooling instead of large FC layers; a two-layer FC block
    512 -> 256 -> 7 with Batch Normalization and Dropout; Adam, weight_decay 1e-5,
    ReduceLROnPlateau. Inferred: each conv is 3x3 + BN + LeakyReLU(0.01) + max pool 2
    (48->24->12->6->3); the skip block is one residual block (two 3x3 convs 256->256, identity
    shortcut) placed after the third conv (at 6x6, where it is cheaper than at 512);
    dropout 0.5 (the report's earlier rate).
    kwargs: dropout_rate=0.5.
    """
    return ImprovedFaceCNN(in_chans, num_classes, dropout_rate)


class AdvancedFaceCNN(nn.Module):
    """Four blocks of [conv-BN-LReLU x2, maxpool, dropout], GAP, BN/dropout head (no skip)."""

    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, ...],
                 block_dropout: float, dropout_rate: float) -> None:
        super().__init__()
        blocks = []
        channels = in_chans
        for width in widths:
            blocks.append(nn.Sequential(*_conv_bn_lrelu(channels, width),
                                        *_conv_bn_lrelu(width, width),
                                        nn.MaxPool2d(2), nn.Dropout(block_dropout)))
            channels = width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(linear_bn_act(channels, 256, nn.LeakyReLU, dropout_rate),
                                  nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@register_model("advanced_face_cnn", source=f"{SOURCE}, fourth model (AdvancedFaceCNN)")
def advanced_face_cnn(num_classes: int = 7, in_chans: int = 1, *, block_dropout: float = 0.25,
                      dropout_rate: float = 0.5) -> nn.Module:
    """report-001 AdvancedFaceCNN: four blocks of two convs 64-128-256-512, no skip connection.

    Report (65%): "convolutional layers (64, 128, 256, 512) grouped into feature blocks, each
    with two conv layers with Batch Normalization, LeakyReLU, Max Pooling and Dropout";
    Dropout(0.25) inside the feature blocks; the skip connection of ImprovedFaceCNN removed.
    Trained with AdamW, OneCycleLR, label smoothing 0.1, RandomAffine/GaussianBlur/
    RandomErasing, normalisation mean 0.485 std 0.229. Inferred: 3x3 convs; the head is kept
    from ImprovedFaceCNN (the report lists only the changes): GAP, 512 -> 256 (BN, LeakyReLU,
    Dropout 0.5) -> 7.
    kwargs: block_dropout=0.25, dropout_rate=0.5 (head).
    """
    return AdvancedFaceCNN(in_chans, num_classes, (64, 128, 256, 512), block_dropout,
                           dropout_rate)
