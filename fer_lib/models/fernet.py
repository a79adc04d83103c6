"""fernet: our network, designed for time-to-accuracy on 48x48 FER2013.

Target: a few CPU cores with bf16 autocast + channels_last, and GPUs. The layout follows the
fast CIFAR-10 trainers (airbench, docs/published_results.md): few, wide 3x3 convs; pooling
inside each stage right after its first conv, so the second conv and the BN/GELU run on the
quarter-size map; no large FC layer (global max pool -> one bias-free linear), which keeps
parameters low and the compute in convolutions, where channels_last/bf16 kernels are fast.

Every op here (conv, max pool, BN, GELU, amax/mean, linear) has a channels_last and a bf16
autocast path; nothing uses .view or in-place ops on views.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fer_lib.models.registry import register_model

SOURCE = "ours (fer_lib)"


def _conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


# Activations and ways to halve the map. GELU and 2x2 max pooling are the airbench choices;
# on a 2-core Xeon with AMX in bf16, fernet_small's whole step ran 1.13x faster with ReLU and
# 1.11x with 2x2 average pooling (timed whole; torch.profiler put 14% of the step in GELU and
# 22% in max pooling, and on a Zen 4 it misled), so both are offered as cheaper alternatives
# (docs/ablations.md measures what they cost in accuracy).
# GELU's erf runs in fp32 whatever the dtype, so on a CPU whose bf16 halves only the convs
# (a Zen 4) it weighs more: ReLU made the step 1.1-1.25x faster there. SiLU and Hardswish are
# cheaper smooth ones (0.58x and 0.28x GELU's cost); all three lost PublicTest at 5 epochs.
# stem_act sets the stem's activation alone. Its map is the largest (48x48: about a third of
# fernet_small's activation work), and behind a whitened stem, whose filters come in +- pairs,
# ReLU keeps both halves of every filter's response, so GELU's smoothness may matter least there.
# "stride" halves the map in the stage's first conv itself (stride 2, no pooling): half the
# FLOPs of the net. In fp32 with AVX2 kernels its epochs took 0.6x the time, but at equal
# time (8 epochs against 5) it ended 1.4 PublicTest points lower, so no recipe uses it
# (docs/ablations.md).
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "hardswish": nn.Hardswish}
DOWNSAMPLES = ("max", "avg", "stride")


def _activation(name: str, kwarg: str = "act") -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"fernet: {kwarg} must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class FerStage(nn.Module):
    """conv3x3 -> pool2 -> BN -> act -> [conv3x3 -> BN -> act] x (convs - 1).

    downsample: "max" (2x2 max pooling), "avg" (2x2 average pooling) or "stride" (the first
    conv with stride 2 in place of conv + pooling; the same weights).
    """

    def __init__(self, in_channels: int, out_channels: int, convs: int = 2, act: str = "gelu",
                 downsample: str = "max") -> None:
        super().__init__()
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"fernet: downsample must be one of {', '.join(DOWNSAMPLES)}, got {downsample!r}")
        if downsample == "stride":
            layers: list[nn.Module] = [_conv(in_channels, out_channels, stride=2)]
        else:
            layers = [_conv(in_channels, out_channels), nn.MaxPool2d(2) if downsample == "max" else nn.AvgPool2d(2)]
        layers += [nn.BatchNorm2d(out_channels), _activation(act)]
        for _ in range(convs - 1):
            layers += [_conv(out_channels, out_channels), nn.BatchNorm2d(out_channels), _activation(act)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class FerNet(nn.Module):
    """Stem conv, three pooled stages (48->24->12->6), global pool, scaled bias-free linear."""

    def __init__(self, in_chans: int, num_classes: int, widths: tuple[int, ...],
                 stem_width: int, convs_per_stage: int, pool: str, dropout_rate: float,
                 logit_scale: float, act: str = "gelu", downsample: str = "max",
                 stem_act: str | None = None) -> None:
        super().__init__()
        if pool not in ("max", "avgmax"):
            raise ValueError(f"fernet: pool must be 'max' or 'avgmax', got {pool!r}")
        if convs_per_stage < 1:
            raise ValueError(f"fernet: convs_per_stage must be >= 1, got {convs_per_stage}")
        self.stem = nn.Sequential(_conv(in_chans, stem_width), nn.BatchNorm2d(stem_width),
                                  _activation(act) if stem_act is None else _activation(stem_act, "stem_act"))
        stages = []
        channels = stem_width
        for width in widths:
            stages.append(FerStage(channels, width, convs_per_stage, act, downsample))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = pool
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.head = nn.Linear(channels, num_classes, bias=False)
        # A fixed temperature below 1 starts training from near-uniform predictions and
        # slows the head relative to the convs (airbench multiplies its logits by 1/9).
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        pooled = torch.amax(x, dim=(2, 3))
        if self.pool == "avgmax":
            pooled = pooled + x.mean(dim=(2, 3))
        return self.head(self.dropout(pooled)) * self.logit_scale


def _fernet(num_classes: int, in_chans: int, widths: tuple[int, ...], stem_width: int | None,
            convs_per_stage: int, pool: str, dropout_rate: float,
            logit_scale: float, act: str, downsample: str, stem_act: str | None) -> nn.Module:
    widths = tuple(widths)
    if len(widths) < 1:
        raise ValueError("fernet: widths needs at least one stage width")
    stem = stem_width if stem_width is not None else max(widths[0] // 2, 8)
    return FerNet(in_chans, num_classes, widths, stem, convs_per_stage, pool, dropout_rate,
                  logit_scale, act, downsample, stem_act)


@register_model("fernet", source=SOURCE)
def fernet(num_classes: int = 7, in_chans: int = 1, *,
           widths: tuple[int, ...] = (64, 128, 256), stem_width: int | None = None,
           convs_per_stage: int = 2, pool: str = "max", dropout_rate: float = 0.0,
           logit_scale: float = 1 / 9, act: str = "gelu", downsample: str = "max",
           stem_act: str | None = None) -> nn.Module:
    """Our fast FER net: stem + 3 pooled stages 64-128-256, global max pool, linear (~1.2M).

    Not from a report: designed for time-to-accuracy on 48x48 (airbench-like layout).
    stem conv3x3 (in -> stem_width, default widths[0]//2 = 32) -> BN -> GELU; per stage
    conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU (48->24->12->6); global max
    pool ("avgmax" adds the mean); dropout; Linear(no bias) * logit_scale.
    Convs have no bias (BN follows). With 3 stages the map entering the pool is 6x6.
    kwargs: widths=(64,128,256), stem_width=None, convs_per_stage=2, pool="max"|"avgmax",
    dropout_rate=0.0, logit_scale=1/9, act="gelu"|"relu"|"silu"|"hardswish", downsample="max"|"avg"|"stride" (how
    each stage halves the map: pooling after its first conv, or that conv at stride 2),
    stem_act=None (the stem's activation; None = act).
    """
    return _fernet(num_classes, in_chans, widths, stem_width, convs_per_stage, pool,
                   dropout_rate, logit_scale, act, downsample, stem_act)


@register_model("fernet_small", source=SOURCE)
def fernet_small(num_classes: int = 7, in_chans: int = 1, *,
                 widths: tuple[int, ...] = (32, 64, 128), stem_width: int | None = None,
                 convs_per_stage: int = 2, pool: str = "max", dropout_rate: float = 0.0,
                 logit_scale: float = 1 / 9, act: str = "gelu", downsample: str = "max",
                 stem_act: str | None = None) -> nn.Module:
    """fernet at half width (32-64-128, stem 16, ~0.3M): the fastest recipe, ~4x fewer FLOPs.

    Not from a report. Same layout and kwargs as `fernet`.
    """
    return _fernet(num_classes, in_chans, widths, stem_width, convs_per_stage, pool,
                   dropout_rate, logit_scale, act, downsample, stem_act)


@register_model("fernet_large", source=SOURCE)
def fernet_large(num_classes: int = 7, in_chans: int = 1, *,
                 widths: tuple[int, ...] = (96, 192, 384), stem_width: int | None = None,
                 convs_per_stage: int = 2, pool: str = "max", dropout_rate: float = 0.0,
                 logit_scale: float = 1 / 9, act: str = "gelu", downsample: str = "max",
                 stem_act: str | None = None) -> nn.Module:
    """fernet at 1.5x width (96-192-384, stem 48, ~2.6M): trades speed for accuracy.

    Not from a report. Same layout and kwargs as `fernet`; convs_per_stage=3 deepens it
    further instead of widening.
    """
    return _fernet(num_classes, in_chans, widths, stem_width, convs_per_stage, pool,
                   dropout_rate, logit_scale, act, downsample, stem_act)


# --------------------------------------------------------------------------------------
# Initialisations from the fast CIFAR-10 trainers, measured one by one in docs/ablations.md


@torch.no_grad()
def whiten_stem_(model: FerNet, images_uint8: torch.Tensor, *, eps: float = 5e-4, sample: int = 5000,
                 freeze: bool = True, freeze_bn: bool = False) -> FerNet:
    """Patch-whitening stem (airbench): the stem conv's filters become the whitening basis of
    3x3 training patches, each eigenvector scaled by 1/sqrt(eigenvalue + eps) and used with
    both signs (GELU keeps only one half of each). The top min(stem_width, 2*9) / 2 directions
    by variance are used; further filters keep their random weights. freeze: the stem conv
    weight is not trained. freeze_bn: the stem BN's scale and bias are not trained either
    (they stay 1 and 0; it still normalises with batch statistics); with freeze, nothing
    before stage 1 learns, so backward stops at stage 1's first conv: no gradient for its
    input, no BN or GELU backward over the stem's full-size maps. images_uint8: training faces
    (N, 48, 48) or (N, 1, 48, 48).
    """
    from fer_lib.augment import to_float

    conv = model.stem[0]
    if conv.kernel_size != (3, 3) or conv.in_channels != 1:
        raise ValueError("whiten_stem_ needs fernet's 3x3 single-channel stem conv")
    images = torch.as_tensor(images_uint8[:sample])
    x = to_float(images.reshape(len(images), 1, *images.shape[-2:]))
    patches = F.unfold(x, 3).transpose(1, 2).reshape(-1, 9).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))  # ascending
    order = eigenvalues.argsort(descending=True)
    pairs = min(conv.out_channels // 2, 9)
    basis = (eigenvectors[:, order[:pairs]] / (eigenvalues[order[:pairs]] + eps).sqrt()).T  # (pairs, 9)
    filters = torch.cat([basis, -basis]).reshape(2 * pairs, 1, 3, 3)
    conv.weight[:2 * pairs] = filters.to(conv.weight.dtype)
    conv.weight.requires_grad_(not freeze)
    if freeze_bn:
        for parameter in model.stem[1].parameters():
            parameter.requires_grad_(False)
    return model


@torch.no_grad()
def identity_init_(model: nn.Module) -> nn.Module:
    """Identity-initialise every 3x3 conv after the stem (hlb-CIFAR10/airbench): the first
    in_channels filters of a conv with out >= in start as the Dirac identity, the rest keep
    their random weights, so each stage starts close to passing its input through."""
    for name, module in model.named_modules():
        if (isinstance(module, nn.Conv2d) and not name.startswith("stem")
                and module.kernel_size == (3, 3) and module.out_channels >= module.in_channels):
            nn.init.dirac_(module.weight[:module.in_channels])
    return model


def freeze_bn_scales_(model: nn.Module) -> nn.Module:
    """BatchNorm scales fixed at 1 (not trained), biases still learned (airbench)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and module.weight is not None:
            with torch.no_grad():
                module.weight.fill_(1.0)
            module.weight.requires_grad_(False)
    return model


# name -> function(model, training images uint8) applied to a new model before training;
# recipes (Recipe.prepare) and ablations name them
PREPARATIONS = {
    "whiten_stem": lambda model, images: whiten_stem_(model, images),
    # fp32 steps of fernet_small 1.05-1.09x faster on 2 Zen 3 cores (interleaved timings), but
    # fast_fp32 ended lower on PublicTest at 5 and 12 epochs, so no recipe uses it (docs/ablations.md)
    "whiten_stem_frozen_bn": lambda model, images: whiten_stem_(model, images, freeze_bn=True),
    "identity_init": lambda model, images: identity_init_(model),
    "frozen_bn_scales": lambda model, images: freeze_bn_scales_(model),
}


# a preparation that does another one and more: "whiten_stem_frozen_bn" whitens the stem as
# "whiten_stem" does, then freezes its BN. Combined with the one it includes (a whitening
# recipe's ablation variant), the included one is left out instead of whitening twice.
INCLUDES = {"whiten_stem_frozen_bn": "whiten_stem"}


def combine_preparations(*names: str | None) -> list[str]:
    """The preparations to apply, in order, for several sources (a recipe's, then a variant's):
    each once, None skipped, and none that another one in the list includes (INCLUDES)."""
    wanted = list(dict.fromkeys(name for name in names if name))
    included = {INCLUDES[name] for name in wanted if name in INCLUDES}
    return [name for name in wanted if name not in included]


def prepare_model(name: str, model: nn.Module, train_images) -> nn.Module:
    """Apply the named preparation (PREPARATIONS) to a new model; train_images: uint8 faces."""
    if name not in PREPARATIONS:
        raise ValueError(f"unknown model preparation {name!r}; known: {', '.join(PREPARATIONS)}")
    PREPARATIONS[name](model, torch.as_tensor(train_images))
    return model
