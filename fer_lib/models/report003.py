"""report-003: the experiment series the notebooks follow (Experiments 1-6).

Experiment 8 returns to the Experiment 3 model, so it has no architecture of its own here.
"""
from __future__ import annotations

import torch
from torch import nn

from fer_lib.models.blocks import conv_pool_stack, init_resnet_weights, make_stage, residual_trunk
from fer_lib.models.registry import register_model

SOURCE = "report-003"


class MLP(nn.Module):
    """Flatten -> Linear -> ReLU -> Linear."""

    def __init__(self, in_features: int, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(torch.flatten(x, 1))))


@register_model("exp1_mlp", source=f"{SOURCE}, Experiment 1")
def exp1_mlp(num_classes: int = 7, in_chans: int = 1, *, hidden_dim: int = 64,
             input_size: int = 48) -> nn.Module:
    """Experiment 1: a two-layer perceptron on the flattened 48x48 image.

    Report: "48x48 = 2304, flatten first, then 2304 -> 64 and 64 -> 7, with ReLU so it is not
    linear" (10 epochs, batch 64, lr 0.02; ~30% test accuracy). Nothing inferred.
    kwargs: hidden_dim=64; input_size=48 (the first layer is sized in_chans*input_size**2).
    """
    return MLP(in_chans * input_size * input_size, hidden_dim, num_classes)


class SmallCNN(nn.Module):
    """Conv blocks (conv3x3-BN-ReLU-maxpool2) -> flatten -> FC hidden -> ReLU -> dropout -> FC."""

    def __init__(self, in_chans: int, widths: tuple[int, ...], hidden_dim: int,
                 dropout_rate: float, num_classes: int, input_size: int = 48) -> None:
        super().__init__()
        self.features, channels = conv_pool_stack(in_chans, widths)
        side = input_size // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout_rate),
            nn.Linear(channels * side * side, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout_rate),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("exp2_cnn", source=f"{SOURCE}, Experiment 2")
def exp2_cnn(num_classes: int = 7, in_chans: int = 1, *, dropout_rate: float = 0.3,
             hidden_dim: int = 128) -> nn.Module:
    """Experiment 2: a small CNN with BatchNorm, max pooling and dropout 0.3.

    Report: "first a simple CNN, using BatchNormalization and max pooling and dropout",
    dropout 0.3, Adam lr 0.001, weight decay, batch 32, 20 epochs, ReduceLROnPlateau
    (~54% test accuracy); it overfits 20 images. Inferred (layers not given): two conv blocks
    conv3x3(32)-BN-ReLU-maxpool, conv3x3(64)-BN-ReLU-maxpool (48->24->12), flatten 9216,
    dropout -> FC 128 -> ReLU -> dropout -> FC 7. Two blocks because Experiment 3 is described
    as the more complex model with "3 CNN" layers; hidden 128 mirrors Experiment 3's default.
    kwargs: dropout_rate=0.3, hidden_dim=128.
    """
    return SmallCNN(in_chans, (32, 64), hidden_dim, dropout_rate, num_classes)


@register_model("exp3_cnn", source=f"{SOURCE}, Experiment 3 (and 8)")
def exp3_cnn(num_classes: int = 7, in_chans: int = 1, *, hidden_dim: int = 128,
             dropout_rate: float = 0.3) -> nn.Module:
    """Experiment 3: three conv blocks + a fully connected layer of width `hidden_dim`.

    Report: "much more complex than the previous one: a fully connected layer and 3 CNN
    [layers]; also BatchNorm, dropout and maxPooling"; augmentation flip + rotation 10.
    default_config: lr 0.001, batch 64, dropout_rate 0.3, weight_decay 1e-5, hidden_dim 128
    (60.6% test); the sweep tried hidden_dim 64/128/256, dropout 0.2/0.3, and its best run
    used hidden_dim 64, dropout 0.2 (60.45% val). Experiment 8 returns to this model.
    Inferred: widths 32-64-128 (doubling from Experiment 2's 32-64), each conv3x3-BN-ReLU-
    maxpool (48->24->12->6), flatten 4608, dropout -> FC hidden_dim -> ReLU -> dropout -> FC 7.
    kwargs: hidden_dim=128, dropout_rate=0.3.
    """
    return SmallCNN(in_chans, (32, 64, 128), hidden_dim, dropout_rate, num_classes)


class FacialExpressionResNet(nn.Module):
    """report-003's ResNet: 7x7/2 stem, 3x3/2 max pool, stages of basic blocks, GAP, dropout, FC."""

    def __init__(self, in_chans: int, num_classes: int, stem_channels: int,
                 widths: tuple[int, ...], blocks_per_stage: int, dropout_rate: float,
                 block_dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, stem_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        channels = stem_channels
        for index, width in enumerate(widths):
            stages.append(make_stage(channels, width, blocks_per_stage,
                                     stride=1 if index == 0 else 2, dropout_rate=block_dropout))
            channels = width
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout_rate)
        self.fc = nn.Linear(channels, num_classes)
        init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layers(x))
        return self.fc(self.dropout(torch.flatten(x, 1)))


@register_model("exp4_resnet", source=f"{SOURCE}, Experiment 4")
def exp4_resnet(num_classes: int = 7, in_chans: int = 1, *, dropout_rate: float = 0.5,
                block_dropout: float = 0.1) -> nn.Module:
    """Experiment 4: FacialExpressionResNet, four stages of two basic blocks 64-128-256-512.

    Report (code excerpt in Experiment 5): conv1 7x7 stride 2 (1->64, bias=False), BN, max pool
    3x3/2; layer1..layer4 = _make_layer(64,64,2,1), (64,128,2,2), (128,256,2,2), (256,512,2,2);
    AdaptiveAvgPool2d(1); Dropout(dropout_rate, default 0.5); Linear(512, 7). On 48x48 the
    maps are 24 -> 12 -> 12, 6, 3, 2. Sweep: dropout 0.3-0.7, label smoothing 0-0.2, lr 1e-4..1e-2;
    it overfit (train 99%, val 58.4%).
    Inferred: the ResidualBlock body is not shown; the report says it has 3x3 convs, a skip
    connection and dropout, so it is conv3x3-BN-ReLU-dropout(block_dropout)-conv3x3-BN +
    shortcut (1x1 conv+BN when the shape changes), ReLU. The in-block dropout rate is not given
    (`_make_layer(in, out, 2, stride)` passes none, so it is a constant of the block): 0.1 is
    assumed. `_initialize_weights()` is not shown: He init (fan_out) for convs, BN to
    identity, N(0, 0.01) for the FC.
    kwargs: dropout_rate=0.5 (before the FC), block_dropout=0.1 (inside each block).
    """
    return FacialExpressionResNet(in_chans, num_classes, 64, (64, 128, 256, 512), 2,
                                  dropout_rate, block_dropout)


@register_model("exp5_resnet3", source=f"{SOURCE}, Experiment 5")
def exp5_resnet3(num_classes: int = 7, in_chans: int = 1, *, stem_channels: int = 64,
                 dropout_rate: float = 0.5, block_dropout: float = 0.1) -> nn.Module:
    """Experiment 5: the Experiment 4 ResNet with layer4 removed (3 stages 64-128-256).

    Report: "exactly the same model with these changes", stronger augmentation, dropout
    0.5-0.8, weight decay 1e-4..1e-2; "let's remove 1 layer" followed by the code excerpt
    with a 64-channel 7x7/2 stem, layer1..layer3 = (64,64), (64,128), (128,256), GAP, dropout,
    Linear(256, 7). That last excerpt is the default here. An earlier excerpt in the same
    section has a 32-channel stem ("# Reduce from 64") and layer1 = _make_layer(32, 64, 2, 1);
    it is `exp5_resnet3_stem32` (or stem_channels=32). Best run: 57.65% val, still overfitting.
    Inferred (as exp4_resnet): block = conv3x3-BN-ReLU-dropout(0.1)-conv3x3-BN + shortcut,
    ReLU; He init.
    kwargs: stem_channels=64, dropout_rate=0.5, block_dropout=0.1.
    """
    return FacialExpressionResNet(in_chans, num_classes, stem_channels, (64, 128, 256), 2,
                                  dropout_rate, block_dropout)


@register_model("exp5_resnet3_stem32", source=f"{SOURCE}, Experiment 5 (32-channel stem excerpt)")
def exp5_resnet3_stem32(num_classes: int = 7, in_chans: int = 1, *, dropout_rate: float = 0.5,
                        block_dropout: float = 0.1) -> nn.Module:
    """Experiment 5, the excerpt with a 32-channel stem: exp5_resnet3 with stem_channels=32.

    Report code: conv1 = Conv2d(1, 32, 7, stride=2, padding=3, bias=False)  # Reduce from 64;
    layer1 = _make_layer(32, 64, 2, stride=1) (its first block projects 32->64 with a 1x1
    conv), layer2 (64->128), layer3 (128->256)  # Remove layer4; Linear(256, 7).
    Inferred (as exp4_resnet): block = conv3x3-BN-ReLU-dropout(0.1)-conv3x3-BN + shortcut,
    ReLU; He init.
    kwargs: dropout_rate=0.5, block_dropout=0.1.
    """
    return FacialExpressionResNet(in_chans, num_classes, 32, (64, 128, 256), 2,
                                  dropout_rate, block_dropout)


class SmallResNet(nn.Module):
    """One conv3x3 stem, then one basic block per stage (each halves the map), GAP, dropout, FC."""

    def __init__(self, in_chans: int, num_classes: int, stem_channels: int,
                 widths: tuple[int, ...], dropout_rate: float, block_dropout: float) -> None:
        super().__init__()
        self.stem, self.blocks, channels = residual_trunk(in_chans, stem_channels, widths, block_dropout)
        self.dropout = nn.Dropout(dropout_rate)
        self.fc = nn.Linear(channels, num_classes)
        init_resnet_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x)).mean(dim=(2, 3))
        return self.fc(self.dropout(x))


@register_model("exp6_resnet_small", source=f"{SOURCE}, Experiment 6 (file 7)")
def exp6_resnet_small(num_classes: int = 7, in_chans: int = 1, *, stem_channels: int = 32,
                      widths: tuple[int, ...] = (64, 128, 256), dropout_rate: float = 0.5,
                      block_dropout: float = 0.0) -> nn.Module:
    """Experiment 6: a simplified ResNet, one conv + 3 residual blocks.

    Report: "the residual block will be smaller, and fewer regularisations ... 3 residual
    blocks and 1 CNN"; augmentation Pad(4) + RandomCrop(48), flip p=0.3, rotation 10; sweep
    dropout 0.3-0.6, lr 5e-4..5e-3, label smoothing 0.1-0.3 (best 58.85% val, still overfits).
    Inferred: the stem is a 3x3 conv (32)-BN-ReLU at full 48x48 (no 7x7/2 stem + max pool,
    which would leave the three blocks only 12->6->3->2); each of the 3 blocks is one basic
    block with stride 2 (48->24->12->6) and widths 64-128-256 (one block per stage instead of
    two: "smaller"); no dropout inside the blocks ("fewer regularisations"); GAP, dropout, FC.
    Default dropout_rate 0.5 is the series' class default (sweep range 0.3-0.6).
    kwargs: stem_channels=32, widths=(64,128,256), dropout_rate=0.5, block_dropout=0.0.
    """
    return SmallResNet(in_chans, num_classes, stem_channels, tuple(widths), dropout_rate,
                       block_dropout)
