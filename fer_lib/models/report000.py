"""report-000: basic CNN, EnhancedNeuralNet, AdvancedNetwork (residual CustomBlock) and
EmotionRecognitionNet (squeeze-and-excitation).

The report describes the layer types and their order but gives no widths or rates; every
number below that the report does not state is marked as inferred in the factory docstring.
"""
from __future__ import annotations

import torch
from torch import nn

from fer_lib.models.blocks import SqueezeExcite, linear_bn_act_stack, residual_trunk
from fer_lib.models.registry import register_model

SOURCE = "report-000"


class BasicCNN(nn.Module):
    """Three convs, each followed by max pool then ReLU (the report's order), two FC layers."""

    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, ...],
                 hidden_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        side = 48 // 2 ** len(widths)
        self.fc1 = nn.Linear(channels * side * side, hidden_dim)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(torch.flatten(self.features(x), 1))))


@register_model("basic_cnn", source=f"{SOURCE}, basic model")
def basic_cnn(num_classes: int = 7, in_chans: int = 1, *, hidden_dim: int = 128) -> nn.Module:
    """report-000 basic CNN: three conv layers 32-64-128, max pool + ReLU after each, two FC.

    Report: "three convolutional layers with increasing filters (32, 64, 128); after each
    conv layer MaxPooling and ReLU; finally two fully connected layers classify 7 emotions";
    Adam lr 0.001, batch 256, 10 epochs (train 81.7%, val 52.4%: overfits). No BN, no dropout.
    Inferred: 3x3 convs with padding 1 (48->24->12->6), FC 4608 -> 128 -> ReLU -> 7.
    kwargs: hidden_dim=128.
    """
    return BasicCNN(in_chans, num_classes, (32, 64, 128), hidden_dim)


class EnhancedNeuralNet(nn.Module):
    """Conv blocks (conv-BN-ReLU-dropout-maxpool) -> FC blocks (linear-BN-ReLU-dropout) -> FC."""

    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, ...],
                 fc_dims: tuple[int, ...], conv_dropout: float, fc_dropout: float) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_chans
        for width in widths:
            blocks.append(nn.Sequential(
                nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(), nn.Dropout(conv_dropout), nn.MaxPool2d(2)))
            channels = width
        self.features = nn.Sequential(*blocks)
        side = 48 // 2 ** len(widths)
        in_features = channels * side * side
        self.fc_blocks, in_features = linear_bn_act_stack(in_features, fc_dims, fc_dropout)
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.classifier(self.fc_blocks(x))


@register_model("enhanced_net", source=f"{SOURCE}, EnhancedNeuralNet")
def enhanced_net(num_classes: int = 7, in_chans: int = 1, *, conv_dropout: float = 0.25,
                 fc_dropout: float = 0.5) -> nn.Module:
    """report-000 EnhancedNeuralNet: four conv blocks with growing width, FC blocks, classifier.

    Report: "four convolutional blocks that increase the number of output channels";
    _create_conv_block = Conv2d with batch normalisation, ReLU, Dropout, then max pooling;
    _create_fc_block = Linear, BatchNorm, ReLU, Dropout; forward = feature layers ->
    "advanced feature processing" layers -> classifier. Batch 256, lr 0.001, 40 epochs.
    Inferred: widths 32-64-128-256 (doubling from the basic model's 32), 3x3 convs,
    48->24->12->6->3, flatten 2304; the "processing" layers are two FC blocks 512 and 256;
    dropout 0.25 in conv blocks, 0.5 in FC blocks.
    kwargs: conv_dropout=0.25, fc_dropout=0.5.
    """
    return EnhancedNeuralNet(in_chans, num_classes, (32, 64, 128, 256), (512, 256),
                             conv_dropout, fc_dropout)


class AdvancedNetwork(nn.Module):
    """Conv block, residual CustomBlocks (each halves the map), adaptive avg pool, FC series."""

    def __init__(self, in_chans: int, num_classes: int, stem_channels: int,
                 widths: tuple[int, ...], drop_prob: float, fc_dims: tuple[int, ...],
                 fc_dropout: float) -> None:
        super().__init__()
        self.stem, self.blocks, channels = residual_trunk(in_chans, stem_channels, widths, drop_prob)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = []
        for dim in fc_dims:
            head += [nn.Linear(channels, dim), nn.ReLU(), nn.Dropout(fc_dropout)]
            channels = dim
        head.append(nn.Linear(channels, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.blocks(self.stem(x))), 1)
        return self.classifier(x)


@register_model("advanced_net", source=f"{SOURCE}, AdvancedNetwork")
def advanced_net(num_classes: int = 7, in_chans: int = 1, *, drop_prob: float = 0.1,
                 fc_dropout: float = 0.5) -> nn.Module:
    """report-000 AdvancedNetwork: one conv block, residual CustomBlocks, GAP, FC layers.

    Report: CustomBlock = two conv layers with batch norm and ReLU, a skip connection, and
    Dropout when drop_prob > 0; the network "starts with one convolutional block", then
    several CustomBlocks "that increase the channels and reduce the spatial size", adaptive
    average pooling to 1x1, and a classifier made of a series of fully connected layers.
    Batch 256, lr 0.001, 40 epochs; the report's chosen (best) model.
    Inferred: stem conv3x3 64-BN-ReLU; three CustomBlocks 64->128->256->512, each stride 2
    (48->24->12->6) with a 1x1 projection shortcut; drop_prob 0.1; classifier
    512 -> 256 -> ReLU -> Dropout(0.5) -> 7.
    kwargs: drop_prob=0.1 (inside the blocks), fc_dropout=0.5.
    """
    return AdvancedNetwork(in_chans, num_classes, 64, (128, 256, 512), drop_prob, (256,),
                           fc_dropout)


class EmotionRecognitionNet(nn.Module):
    """Feature blocks (some pooled), processing blocks (unpooled), SE, flatten, FC blocks."""

    def __init__(self, in_chans: int, num_classes: int, feature_widths: tuple[int, ...],
                 pooled: tuple[bool, ...], processing_width: int, conv_dropout: float,
                 fc_dims: tuple[int, ...], fc_dropout: float, se_reduction: int) -> None:
        super().__init__()

        def conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(cout), nn.ReLU(),
                                       nn.Dropout2d(conv_dropout)]
            if pool:
                layers.append(nn.MaxPool2d(2))
            return nn.Sequential(*layers)

        channels = in_chans
        side = 48
        self.feature_layers = nn.ModuleList()
        for width, pool in zip(feature_widths, pooled):
            self.feature_layers.append(conv_block(channels, width, pool))
            channels = width
            side //= 2 if pool else 1
        self.processing_layers = nn.ModuleList()
        for _ in range(2):
            self.processing_layers.append(conv_block(channels, processing_width, False))
            channels = processing_width
        self.se = SqueezeExcite(channels, se_reduction)
        in_features = channels * side * side
        self.fc_blocks, in_features = linear_bn_act_stack(in_features, fc_dims, fc_dropout)
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.feature_layers:
            x = layer(x)
        for layer in self.processing_layers:
            x = layer(x)
        x = torch.flatten(self.se(x), 1)
        return self.classifier(self.fc_blocks(x))


@register_model("emotion_recognition_net", source=f"{SOURCE}, EmotionRecognitionNet")
def emotion_recognition_net(num_classes: int = 7, in_chans: int = 1, *,
                            conv_dropout: float = 0.1, fc_dropout: float = 0.5,
                            se_reduction: int = 16) -> nn.Module:
    """report-000 EmotionRecognitionNet: conv blocks, unpooled processing blocks, SE, FC blocks.

    Report: four conv blocks in an nn.ModuleList (conv, batch norm, ReLU, nn.Dropout2d;
    "Max Pooling is used in some blocks"); two more "processing" conv blocks without max
    pooling "to keep more information"; a Squeeze-and-Excitation block with fc1 and fc2;
    classifier = Flatten, several FC blocks (BN, ReLU, Dropout), output layer.
    Inferred: widths 32-64-128-256 with max pooling in the first three blocks
    (48->24->12->6), processing blocks 256->256 at 6x6, SE reduction 16 (256->16->256,
    sigmoid gates), flatten 9216 -> FC block 256 -> FC block 128 -> 7; Dropout2d 0.1 in conv
    blocks, dropout 0.5 in FC blocks.
    kwargs: conv_dropout=0.1, fc_dropout=0.5, se_reduction=16.
    """
    return EmotionRecognitionNet(in_chans, num_classes, (32, 64, 128, 256),
                                 (True, True, True, False), 256, conv_dropout, (256, 128),
                                 fc_dropout, se_reduction)
