"""report-002: BaselineModel, the ImprovedModel iterations and GigaModel (residual).

The report's ImprovedModel class "changes at every iteration"; `improved_model(stage=k)` rebuilds
iteration k+1 of the report (stage 1 = BN added, ..., stage 4 = the 512->256->128->7 head), and
`giga_model(stage=k)` iterations 6 (stage 1) and 7 (stage 2).
"""
from __future__ import annotations

import torch
from torch import nn

from fer_lib.models.blocks import BasicBlock
from fer_lib.models.registry import register_model

SOURCE = "report-002"


def _head(in_features: int, hidden_dims: tuple[int, ...], num_classes: int, batch_norm: bool,
          dropout_rate: float) -> nn.Sequential:
    """Flatten, then [Linear (-> BN) -> ReLU (-> Dropout)] per hidden dim, then the output layer."""
    layers: list[nn.Module] = [nn.Flatten()]
    for dim in hidden_dims:
        layers.append(nn.Linear(in_features, dim, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(dim))
        layers.append(nn.ReLU())
        if dropout_rate > 0:
            layers.append(nn.Dropout(dropout_rate))
        in_features = dim
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


class PlainCNN(nn.Module):
    """Conv blocks in the report's order conv (-> BN) -> maxpool -> ReLU (-> dropout), a head."""

    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, ...],
                 hidden_dims: tuple[int, ...], batch_norm: bool, conv_dropout: float,
                 fc_dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for width in widths:
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.MaxPool2d(2), nn.ReLU()]
            if conv_dropout > 0:
                layers.append(nn.Dropout(conv_dropout))
            channels = width
        self.features = nn.Sequential(*layers)
        side = 48 // 2 ** len(widths)
        self.head = _head(channels * side * side, hidden_dims, num_classes, batch_norm,
                          fc_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("baseline_model", source=f"{SOURCE}, iteration 1 (BaselineModel)")
def baseline_model(num_classes: int = 7, in_chans: int = 1) -> nn.Module:
    """report-002 BaselineModel: three conv layers 32-64-128, each max pooled, Linear(128), 7.

    Report: "32 filter conv2d -> maxpooling(2,2) -> ReLU -> 64 filter conv2d -> maxpooling(2,2)
    -> ReLU -> 128 filter conv2d -> maxpooling(2,2) -> ReLU -> Flatten -> Linear(128) ->
    Output(7)"; 0.77/0.51 train/val accuracy (0.67/0.54 with upsampling). Inferred: 3x3 convs
    with padding 1 (48->24->12->6, flatten 4608) and a ReLU after Linear(128).
    """
    return PlainCNN(in_chans, num_classes, (32, 64, 128), (128,), batch_norm=False,
                    conv_dropout=0.0, fc_dropout=0.0)


@register_model("improved_model", source=f"{SOURCE}, iterations 2-5 (ImprovedModel)")
def improved_model(num_classes: int = 7, in_chans: int = 1, *, stage: int = 4,
                   conv_dropout: float = 0.25, fc_dropout: float = 0.5) -> nn.Module:
    """report-002 ImprovedModel, one of its four iterations (`stage`, default the last).

    Report: stage 1 (iteration 2) adds BatchNorm to the conv layers and the head
    (0.70/0.58); stage 2 (iteration 3) adds dropout layers to the conv layers and the head
    (0.62/0.60); stage 3 (iteration 4) adds "one more 256-filter convolutional block" (no
    gain); stage 4 (iteration 5) makes the head 512 -> 256 -> 128 -> 7 (0.64/0.61).
    Inferred: conv blocks conv3x3 -> BN -> maxpool -> ReLU -> dropout (the baseline's order);
    dropout 0.25 after conv blocks and 0.5 in the head (rates not given); head blocks are
    Linear -> BN -> ReLU -> Dropout. Stage 3+ maps 48->24->12->6->3 (flatten 2304).
    kwargs: stage=4 (1..4), conv_dropout=0.25, fc_dropout=0.5 (both ignored at stage 1).
    """
    if stage not in (1, 2, 3, 4):
        raise ValueError(f"improved_model: stage must be 1, 2, 3 or 4, got {stage!r}")
    widths = (32, 64, 128) if stage < 3 else (32, 64, 128, 256)
    hidden_dims = (128,) if stage < 4 else (512, 256, 128)
    with_dropout = stage >= 2
    return PlainCNN(in_chans, num_classes, widths, hidden_dims, batch_norm=True,
                    conv_dropout=conv_dropout if with_dropout else 0.0,
                    fc_dropout=fc_dropout if with_dropout else 0.0)


class GigaModel(nn.Module):
    """Residual blocks, each followed by max pooling and dropout, then a deep BN/dropout head."""

    def __init__(self, in_chans: int, num_classes: int, pooled_widths: tuple[int, ...],
                 extra_widths: tuple[int, ...], hidden_dims: tuple[int, ...],
                 conv_dropout: float, fc_dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for width in pooled_widths:
            layers += [BasicBlock(channels, width), nn.MaxPool2d(2), nn.Dropout(conv_dropout)]
            channels = width
        for width in extra_widths:  # unpooled: the map is already 3x3
            layers += [BasicBlock(channels, width), nn.Dropout(conv_dropout)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = 48 // 2 ** len(pooled_widths)
        self.head = _head(channels * side * side, hidden_dims, num_classes, batch_norm=True,
                          dropout_rate=fc_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("giga_model", source=f"{SOURCE}, iterations 6-7 (GigaModel)")
def giga_model(num_classes: int = 7, in_chans: int = 1, *, stage: int = 2,
               conv_dropout: float = 0.25, fc_dropout: float = 0.5) -> nn.Module:
    """report-002 GigaModel: the ImprovedModel made residual (stage 1), then deeper (stage 2).

    Report: iteration 6 "added residual blocks to the model; its architecture is in the
    GigaModel class" (no gain); iteration 7 "added 2 more convolutional layers and one fc
    layer to the previous model" (val still ~60%). Inferred: the ImprovedModel stage 4 layout
    with each conv replaced by a residual block (two conv3x3-BN, ReLU, 1x1 projection
    shortcut), widths 32-64-128-256, each followed by max pool 2 and dropout 0.25
    (48->24->12->6->3), head 2304 -> 512 -> 256 -> 128 -> 7 (Linear-BN-ReLU-Dropout 0.5).
    Stage 2 adds one more residual block 256->512 at 3x3 (the "2 more conv layers") and one
    FC layer of 1024 in front of the head (4608 -> 1024 -> 512 -> 256 -> 128 -> 7).
    kwargs: stage=2 (1 or 2), conv_dropout=0.25, fc_dropout=0.5.
    """
    if stage not in (1, 2):
        raise ValueError(f"giga_model: stage must be 1 or 2, got {stage!r}")
    extra_widths = () if stage == 1 else (512,)
    hidden_dims = (512, 256, 128) if stage == 1 else (1024, 512, 256, 128)
    return GigaModel(in_chans, num_classes, (32, 64, 128, 256), extra_widths, hidden_dims,
                     conv_dropout, fc_dropout)
