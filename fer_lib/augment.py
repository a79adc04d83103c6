"""Batched, per-sample-random data augmentation on device tensors.

The training engine keeps the whole split as a uint8 tensor on the training device and
augments whole batches there (no PIL, no DataLoader workers). Every transform draws its
random parameters PER SAMPLE from a ``torch.Generator``, so one call on a batch of 64 gives
64 different rotations, flips, crops... as a per-image torchvision pipeline would.

Names and argument ranges mirror ``torchvision.transforms`` so notebooks read like the
experiment reports: ``RandomHorizontalFlip(p)``, ``RandomRotation(degrees)``,
``RandomAffine(degrees, translate, scale, shear)``, ``Pad``, ``RandomCrop(size, padding,
padding_mode)``, ``RandomResizedCrop(size, scale, ratio)``, ``ColorJitter(brightness,
contrast)``, ``GaussianBlur(kernel_size, sigma)``, ``RandomErasing(p, scale, ratio, value)``,
plus ``FlaggedBrightness`` (the reports' brightness jitter for upsampled copies) and
``Compose``. Inputs are the NORMALISED float batches produced by :func:`to_float`; the
photometric transforms and the geometric fill value are converted so that they act exactly
as torchvision acts on the 0..1 image (fill 0 = black, brightness scales the 0..1 image,
results clamped to the valid 0..1 range). ``RandomErasing.value`` is taken in the normalised
space, as torchvision's RandomErasing after ``Normalize`` does.

Geometric transforms are fused: ``Compose`` multiplies the per-sample 3x3 matrices of
consecutive geometric transforms (flip, rotation, affine, pad, crop, resized crop) into one
matrix per sample and warps once with ``grid_sample`` (bilinear). Runs made only of flips and
integer crops skip interpolation altogether (``torch.where`` on a flipped view, and one
``gather`` from the padded batch).

Why hand-written torch instead of a library (measured on a 2-core AMD EPYC, AVX2, torch
2.14.1, 1 torch thread, batch 64 x 1 x 48 x 48, best of 7 x 20 calls, ms per batch; the CPU
was shared with other jobs, so +-20%):

  =======================================================  ========
  pipeline                                                  ms/batch
  =======================================================  ========
  PIL per image (ToPILImage, flip, rotation 10, ToTensor)      18.7
  torchvision.transforms.v2 flip+rotation on the batch          1.6  <- ONE draw per batch
  torchvision.transforms.v2 flip+rotation looped per sample    19.5
  kornia 0.9.0 AugmentationSequential flip+rotation             5.1
  kornia 0.9.0 exp5-like (flip, rotation, affine scale,        18.0
               jitter, blur, erasing)
  this module "exp3" (flip + rotation 10, one warp)             1.4
  this module "exp5"                                            4.1
  this module "exp6" (pad/crop + flip + rotation, one warp)     1.4
  this module "khaireddin"                                      3.3
  this module "fast" (flip + reflect-pad crop, no warp)         0.6
  =======================================================  ========

torchvision.transforms.v2 applied to a (B,1,H,W) tensor treats the batch as ONE image: a
single flip decision and a single angle for the whole batch (checked: per call either all 64
samples are flipped or none, and all rotated copies of one image are identical), so it is
not an option for batches; looping it per sample is as slow as PIL. kornia does draw per
sample, but costs 4x more than the fused path here (per-op parameter dictionaries, one warp
per geometric transform, ``affine_grid``), which on a small CNN (~35 ms per step of 64 on
this CPU) would eat 15-50% of the step; it would also be a new dependency (it was installed
into a scratch folder for this measurement only and is not a requirement).

``F.affine_grid`` alone costs ~3 ms for 64x48x48 on this CPU (a bmm with inner size 3), so
the grid is built with two broadcast adds instead (~0.4 ms); ``grid_sample`` itself is
~0.6 ms. Likewise RandomAffine's 3x3 inverse is written out (``torch.linalg.inv`` on a
batch of 3x3 matrices costs milliseconds here).

Random parameters are drawn on the generator's device (CPU by default) and moved to the
batch's device, so a CPU generator gives the same augmentation on CPU and CUDA and its
state (``generator.get_state()``) is all a checkpoint needs to resume exactly.

On a GPU every operation on the batch is a kernel launch, and a training step of the small
nets here is bounded by launches rather than arithmetic (one H200: docs/speed.md). So the
per-sample work stays on the generator's side as far as it can: a fused warp's matrices and
pixel coordinates, RandomErasing's row and column masks and RandomCrop's gather offsets are
built there and reach the batch's device in one copy each. Counted on a batch of 128 (a
dispatch counter; views excluded): "khaireddin" runs 10 operations and 2 copies on the
batch's device per call (66 and 6 before), "fast" 6 and 2 (11 and 3). On a CPU, where both
sides are the same, the results are bit-identical to the earlier layout.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# FER2013 "Training" usage rows (28,709 images) of fer2013.csv.gz, pixels / 255, mean and
# population std over all pixels, computed once with numpy (float64):
#   df = pd.read_csv("fer2013.csv.gz"); tr = df[df.Usage == "Training"]
#   x = np.stack([np.array(s.split(), np.uint8) for s in tr.pixels]) / 255
#   x.mean() = 0.5077424252283127, x.std() = 0.25500860441703666
MEAN: float = 0.5077424
STD: float = 0.2550086

__all__ = [
    "MEAN",
    "STD",
    "to_float",
    "generator_device",
    "Augment",
    "Compose",
    "RandomHorizontalFlip",
    "RandomRotation",
    "RandomAffine",
    "Pad",
    "RandomCrop",
    "RandomResizedCrop",
    "ColorJitter",
    "GaussianBlur",
    "RandomErasing",
    "FlaggedBrightness",
    "PRESETS",
    "build_augment",
]


def to_float(images_uint8: Tensor, mean: float = MEAN, std: float = STD) -> Tensor:
    """uint8 images (N,H,W) or (N,1,H,W), any device -> normalised float32 (N,1,H,W).

    ``(x / 255 - mean) / std`` folded into one multiply-add so it costs one pass.
    """
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 tensor, got {images_uint8.dtype}")
    if images_uint8.dim() == 3:
        images_uint8 = images_uint8.unsqueeze(1)
    elif images_uint8.dim() != 4:
        raise ValueError(
            f"to_float expects (N,H,W) or (N,1,H,W) images, got shape {tuple(images_uint8.shape)}"
        )
    scale = 1.0 / (255.0 * std)
    return images_uint8.to(torch.float32).mul_(scale).sub_(mean / std)


# --------------------------------------------------------------------------------------
# random draws


def generator_device(generator: torch.Generator | None) -> torch.device:
    """Where `generator` draws (torch's default generator: the CPU)."""
    return generator.device if generator is not None else torch.device("cpu")


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """n uniform [0,1) numbers drawn on the generator's device, returned on `device`."""
    return torch.rand(n, generator=generator, device=generator_device(generator)).to(device)


def _uniform(n: int, low: float, high: float, generator, device) -> Tensor:
    return _rand(n, generator, device) * (high - low) + low


def _pair(value, name: str, center: float = 0.0, min_value: float | None = None) -> tuple[float, float]:
    """torchvision's convention: a number v means (center - v, center + v); a pair is a range."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
        low, high = center - value, center + value
    else:
        low, high = (float(v) for v in value)
        if low > high:
            raise ValueError(f"{name} range must be (low, high) with low <= high, got {value}")
    if min_value is not None:
        low = max(low, min_value)
    return float(low), float(high)


def _size2(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


# --------------------------------------------------------------------------------------
# base classes


class Augment(nn.Module):
    """A batched augmentation: ``aug(x, needs_aug=None, generator=None) -> x``.

    x: float (B,C,H,W) normalised with ``mean``/``std`` (see :func:`to_float`).
    needs_aug: optional bool (B,) flags (upsampled copies); only FlaggedBrightness reads it.
    generator: torch.Generator for the per-sample draws (None: torch's default generator).
    """

    def __init__(self, mean: float = MEAN, std: float = STD):
        super().__init__()
        self.mean = float(mean)
        self.std = float(std)

    def set_normalization(self, mean: float, std: float) -> None:
        self.mean, self.std = float(mean), float(std)

    # pixel value (0..1 scale) -> the same value in the normalised space of the batch
    def _norm(self, pixel: float) -> float:
        return (pixel - self.mean) / self.std

    @property
    def is_identity(self) -> bool:
        """True when the magnitudes are zero: Compose drops the transform."""
        return False

    def forward(self, x: Tensor, needs_aug: Tensor | None = None, generator=None) -> Tensor:
        raise NotImplementedError


class GeometricAugment(Augment):
    """A transform that is a per-sample affine map; Compose fuses neighbours into one warp.

    Subclasses implement ``theta(batch, height, width, generator, device)`` returning the
    (B,3,3) matrix that maps OUTPUT normalised coordinates ([-1,1], x right, y down, pixel
    centres as with ``align_corners=False``) to INPUT normalised coordinates, and the output
    size. Chaining transforms 1..n multiplies theta_1 @ theta_2 @ ... @ theta_n.
    """

    # "zeros" (filled with `fill`, a 0..1 pixel value), "reflection" or "border"; None for
    # transforms that never sample outside the image (flips).
    padding_mode: str | None = "zeros"
    fill: float = 0.0
    # True when forward() has an interpolation-free path (flips, integer crops).
    cheap: bool = False

    def theta(self, batch: int, height: int, width: int, generator, device) -> tuple[Tensor, tuple[int, int]]:
        raise NotImplementedError

    def forward(self, x: Tensor, needs_aug: Tensor | None = None, generator=None) -> Tensor:
        return _warp_chain([self], x, generator)


def _eye(batch: int, device) -> Tensor:
    return torch.eye(3, device=device).expand(batch, 3, 3).clone()


def _grid(theta: Tensor, out_h: int, out_w: int, device: torch.device) -> Tensor:
    """affine_grid(theta, (B,C,out_h,out_w), align_corners=False), on `device`.

    F.affine_grid runs a bmm with inner size 3, ~3 ms for 64x48x48 on a CPU; two broadcast
    adds are ~0.4. theta (B,2,3) and the pixel-centre coordinates are built where theta was
    drawn (the CPU generator's side) and reach `device` in ONE copy, and the grid itself is
    3 operations there: on a GPU each operation is a kernel launch, and a step of the small
    nets here is bounded by launches, not by arithmetic (docs/speed.md).
    """
    batch, dtype = theta.shape[0], torch.float32
    xs = (torch.arange(out_w, device=theta.device, dtype=dtype) * 2 + 1) / out_w - 1
    ys = (torch.arange(out_h, device=theta.device, dtype=dtype) * 2 + 1) / out_h - 1
    packed = torch.cat([theta.to(dtype).reshape(-1), xs, ys]).to(device)
    theta, xs, ys = packed.split([batch * 6, out_w, out_h])
    theta = theta.view(batch, 2, 3)
    along_x = theta[:, :, 0, None] * xs  # (B, 2, W)
    along_y = theta[:, :, 1, None] * ys + theta[:, :, 2, None]  # (B, 2, H)
    # built as (B, 2, H, W), W innermost, and handed over as a (B, H, W, 2) view: on a CPU
    # this build is ~5x faster than writing the interleaved layout, and grid_sample reading
    # the view costs less than that saves (1.6 against 2.3 ms for 128 faces, one thread)
    return (along_x[:, :, None, :] + along_y[:, :, :, None]).permute(0, 2, 3, 1)


def _warp_chain(ops: Sequence[GeometricAugment], x: Tensor, generator) -> Tensor:
    """Apply consecutive geometric transforms with ONE grid_sample (or none if all cheap)."""
    if all(op.cheap for op in ops):
        for op in ops:
            x = op.cheap_forward(x, generator)
        return x
    batch, _, height, width = x.shape
    gen_device = generator_device(generator)
    theta = None
    h, w = height, width
    for op in ops:
        op_theta, (h, w) = op.theta(batch, h, w, generator, gen_device)
        theta = op_theta if theta is None else theta @ op_theta
    padding_mode, fill = _chain_padding(ops)
    grid = _grid(theta[:, :2], h, w, x.device)
    if padding_mode == "zeros":
        # grid_sample fills with 0; shift so that it fills with the normalised `fill` value.
        offset = ops[0]._norm(fill)
        out = F.grid_sample(x - offset, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.add_(offset)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode=padding_mode, align_corners=False)


def _chain_padding(ops: Iterable[GeometricAugment]) -> tuple[str, float]:
    for op in ops:
        if op.padding_mode is not None:
            return op.padding_mode, op.fill
    return "zeros", 0.0


def _padding_key(op: GeometricAugment):
    return None if op.padding_mode is None else (op.padding_mode, op.fill if op.padding_mode == "zeros" else None)


def _apply_p(theta: Tensor, p: float, generator, device) -> Tensor:
    """Replace theta by the identity where a per-sample coin with probability p says no."""
    if p >= 1.0:
        return theta
    skip = _rand(theta.shape[0], generator, device) >= p
    theta[skip] = torch.eye(3, device=theta.device, dtype=theta.dtype)
    return theta


def _inverse_affine(fwd: Tensor) -> Tensor:
    """Inverse of (B,3,3) affine matrices [[A, t], [0, 1]] in closed form.

    torch.linalg.inv on a batch of 3x3 matrices costs ~3 ms on this CPU (LAPACK per call);
    the 2x2 adjugate is a few elementwise ops.
    """
    a, b, c, d = fwd[:, 0, 0], fwd[:, 0, 1], fwd[:, 1, 0], fwd[:, 1, 1]
    det = a * d - b * c
    inv = torch.zeros_like(fwd)
    inv[:, 0, 0], inv[:, 0, 1] = d / det, -b / det
    inv[:, 1, 0], inv[:, 1, 1] = -c / det, a / det
    inv[:, :2, 2] = -(inv[:, :2, :2] @ fwd[:, :2, 2:3]).squeeze(-1)
    inv[:, 2, 2] = 1.0
    return inv


def _aspect(mat2: Tensor, height: int, width: int) -> Tensor:
    """A (B,2,2) map in pixel units -> the same map in normalised coordinates."""
    if height == width:
        return mat2
    s = torch.tensor([width / 2.0, height / 2.0], dtype=mat2.dtype, device=mat2.device)
    return mat2 * (1.0 / s)[:, None] * s[None, :]


def _rotation_theta(angles_deg: Tensor, height: int, width: int) -> Tensor:
    """Inverse map (output -> input) of a counter-clockwise rotation by `angles_deg`.

    Matches torchvision.transforms.functional.rotate (positive = counter-clockwise on screen).
    """
    a = torch.deg2rad(angles_deg)
    c, s = torch.cos(a), torch.sin(a)
    theta = _eye(a.shape[0], a.device)
    # forward CCW rotation on screen (y down) is [[c, s], [-s, c]]; its inverse is the transpose
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    theta[:, :2, :2] = _aspect(rot, height, width)
    return theta


# --------------------------------------------------------------------------------------
# geometric transforms


class RandomHorizontalFlip(GeometricAugment):
    """Mirror left-right with probability p, independently per sample."""

    padding_mode = None
    cheap = True

    def __init__(self, p: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.p = float(p)

    @property
    def is_identity(self) -> bool:
        return self.p <= 0.0

    def _draw(self, batch, generator, device) -> Tensor:
        return _rand(batch, generator, device) < self.p

    def theta(self, batch, height, width, generator, device):
        flip = self._draw(batch, generator, device)
        theta = _eye(batch, device)
        theta[:, 0, 0] = torch.where(flip, -1.0, 1.0)
        return theta, (height, width)

    def cheap_forward(self, x: Tensor, generator) -> Tensor:
        flip = self._draw(x.shape[0], generator, x.device).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(flip, x.flip(-1), x)

    def forward(self, x, needs_aug=None, generator=None):
        return self.cheap_forward(x, generator)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RandomRotation(GeometricAugment):
    """Rotate by an angle drawn per sample from U(-degrees, degrees) (or the given range).

    Bilinear, area outside the image filled with `fill` (0..1 pixel value, 0 = black as in
    torchvision). `p` (an extension) applies the rotation to a random fraction of samples,
    as ``RandomApply([RandomRotation(...)], p)`` does.
    """

    def __init__(self, degrees, fill: float = 0.0, p: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.degrees = _pair(degrees, "degrees")
        self.fill = float(fill)
        self.p = float(p)

    @property
    def is_identity(self) -> bool:
        return self.degrees == (0.0, 0.0) or self.p <= 0.0

    def theta(self, batch, height, width, generator, device):
        angles = _uniform(batch, *self.degrees, generator, device)
        theta = _rotation_theta(angles, height, width)
        return _apply_p(theta, self.p, generator, device), (height, width)

    def extra_repr(self) -> str:
        return f"degrees={self.degrees}, fill={self.fill}, p={self.p}"


class RandomAffine(GeometricAugment):
    """torchvision.transforms.RandomAffine with per-sample parameters.

    degrees: rotation range; translate=(a, b): shift by up to a*W, b*H pixels (rounded to
    whole pixels as torchvision does); scale=(lo, hi); shear: x-shear degrees (number, pair)
    or 4 numbers (x range, y range). Fill outside the image with `fill` (0..1 pixel value).
    """

    def __init__(self, degrees=0.0, translate=None, scale=None, shear=None, fill: float = 0.0, p: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.degrees = _pair(degrees, "degrees")
        self.translate = None if translate is None else (float(translate[0]), float(translate[1]))
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))
        if shear is None:
            self.shear = None
        elif isinstance(shear, (int, float)):
            self.shear = (-float(shear), float(shear), 0.0, 0.0)
        elif len(shear) == 2:
            self.shear = (float(shear[0]), float(shear[1]), 0.0, 0.0)
        else:
            self.shear = tuple(float(v) for v in shear)
        self.fill = float(fill)
        self.p = float(p)

    @property
    def is_identity(self) -> bool:
        return (
            self.p <= 0.0
            or (
                self.degrees == (0.0, 0.0)
                and (self.translate is None or self.translate == (0.0, 0.0))
                and (self.scale is None or self.scale == (1.0, 1.0))
                and (self.shear is None or all(v == 0.0 for v in self.shear))
            )
        )

    def theta(self, batch, height, width, generator, device):
        angle = torch.deg2rad(_uniform(batch, *self.degrees, generator, device))
        if self.translate is not None:
            max_dx, max_dy = self.translate[0] * width, self.translate[1] * height
            tx = torch.round(_uniform(batch, -max_dx, max_dx, generator, device))
            ty = torch.round(_uniform(batch, -max_dy, max_dy, generator, device))
        else:
            tx = ty = torch.zeros(batch, device=device)
        if self.scale is not None:
            scale = _uniform(batch, *self.scale, generator, device)
        else:
            scale = torch.ones(batch, device=device)
        if self.shear is not None:
            shx = torch.deg2rad(_uniform(batch, self.shear[0], self.shear[1], generator, device))
            shy = torch.deg2rad(_uniform(batch, self.shear[2], self.shear[3], generator, device))
        else:
            shx = shy = torch.zeros(batch, device=device)
        # forward map in pixel units around the centre, torchvision's T * R(a) * S * ShY * ShX
        # with its conventions (checked against TF.affine): positive angles and shears turn
        # clockwise on screen (TF.rotate, and so RandomRotation, turns counter-clockwise).
        c, s = torch.cos(angle), torch.sin(angle)
        one, zero = torch.ones_like(c), torch.zeros_like(c)
        rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
        shear_x = torch.stack([torch.stack([one, -torch.tan(shx)], -1), torch.stack([zero, one], -1)], -2)
        shear_y = torch.stack([torch.stack([one, zero], -1), torch.stack([-torch.tan(shy), one], -1)], -2)
        forward = rot @ shear_y @ shear_x * scale[:, None, None]
        fwd = _eye(batch, device)
        fwd[:, :2, :2] = _aspect(forward, height, width)
        fwd[:, 0, 2] = tx * 2.0 / width
        fwd[:, 1, 2] = ty * 2.0 / height
        return _apply_p(_inverse_affine(fwd), self.p, generator, device), (height, width)

    def extra_repr(self) -> str:
        return (f"degrees={self.degrees}, translate={self.translate}, scale={self.scale}, shear={self.shear}, "
                f"fill={self.fill}, p={self.p}")


class Pad(GeometricAugment):
    """Pad every side by `padding` pixels (int), like transforms.Pad; output grows by 2*padding."""

    cheap = True

    def __init__(self, padding: int, fill: float = 0.0, padding_mode: str = "constant", **kwargs):
        super().__init__(**kwargs)
        self.padding = int(padding)
        self.fill = float(fill)
        self.torch_mode, self.padding_mode = _padding_modes(padding_mode)

    @property
    def is_identity(self) -> bool:
        return self.padding == 0

    def theta(self, batch, height, width, generator, device):
        out_h, out_w = height + 2 * self.padding, width + 2 * self.padding
        theta = _eye(batch, device)
        theta[:, 0, 0] = out_w / width
        theta[:, 1, 1] = out_h / height
        return theta, (out_h, out_w)

    def cheap_forward(self, x, generator):
        return _pad(x, self.padding, self.torch_mode, self._norm(self.fill))

    def forward(self, x, needs_aug=None, generator=None):
        return self.cheap_forward(x, generator)


def _padding_modes(padding_mode: str) -> tuple[str, str]:
    """torchvision padding_mode -> (F.pad mode, grid_sample padding_mode for fused warps).

    grid_sample's "reflection" mirrors about the border edge (torchvision's "symmetric"), one
    pixel off from "reflect"; the difference only shows in fused chains.
    """
    table = {
        "constant": ("constant", "zeros"),
        "reflect": ("reflect", "reflection"),
        "symmetric": ("reflect", "reflection"),
        "edge": ("replicate", "border"),
        "replicate": ("replicate", "border"),
    }
    if padding_mode not in table:
        raise ValueError(f"padding_mode must be one of {sorted(table)}, got {padding_mode!r}")
    return table[padding_mode]


def _pad(x: Tensor, padding: int, torch_mode: str, value: float) -> Tensor:
    if padding == 0:
        return x
    if torch_mode == "constant":
        return F.pad(x, (padding,) * 4, mode="constant", value=value)
    return F.pad(x, (padding,) * 4, mode=torch_mode)


class RandomCrop(GeometricAugment):
    """Pad by `padding` then crop `size` at a random integer offset per sample.

    With size == input size this is a random translation by up to `padding` pixels; done with
    one gather (no interpolation) when it is not fused with a rotation/affine.
    """

    cheap = True

    def __init__(self, size, padding: int | None = None, padding_mode: str = "constant", fill: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.size = _size2(size)
        self.padding = int(padding or 0)
        self.fill = float(fill)
        self.torch_mode, self.padding_mode = _padding_modes(padding_mode)

    def _offsets(self, batch, height, width, generator, device):
        ph, pw = height + 2 * self.padding, width + 2 * self.padding
        out_h, out_w = self.size
        if out_h > ph or out_w > pw:
            raise ValueError(f"RandomCrop size {self.size} is larger than the padded input {(ph, pw)}")
        oy = torch.floor(_rand(batch, generator, device) * (ph - out_h + 1))
        ox = torch.floor(_rand(batch, generator, device) * (pw - out_w + 1))
        return oy, ox

    def theta(self, batch, height, width, generator, device):
        oy, ox = self._offsets(batch, height, width, generator, device)
        out_h, out_w = self.size
        # output pixel u maps to input pixel u + o - padding (see module docs for the algebra)
        theta = _eye(batch, device)
        theta[:, 0, 0] = out_w / width
        theta[:, 1, 1] = out_h / height
        theta[:, 0, 2] = out_w / width - 1 + 2 * (ox - self.padding) / width
        theta[:, 1, 2] = out_h / height - 1 + 2 * (oy - self.padding) / height
        return theta, (out_h, out_w)

    def cheap_forward(self, x, generator):
        batch, channels, height, width = x.shape
        gen_device = generator_device(generator)
        oy, ox = self._offsets(batch, height, width, generator, gen_device)
        padded = _pad(x, self.padding, self.torch_mode, self._norm(self.fill))
        pw = padded.shape[-1]
        out_h, out_w = self.size
        # flat offsets of each sample's rows and columns, built on the generator's side and
        # copied once; on the batch's device one add and one gather
        rows = (oy.to(torch.long)[:, None] + torch.arange(out_h, device=gen_device)) * pw
        cols = ox.to(torch.long)[:, None] + torch.arange(out_w, device=gen_device)
        rows, cols = torch.cat([rows, cols], 1).to(x.device).split([out_h, out_w], 1)
        index = (rows[:, :, None] + cols[:, None, :]).view(batch, 1, out_h * out_w)
        out = padded.reshape(batch, channels, -1).gather(2, index.expand(batch, channels, -1))
        return out.view(batch, channels, out_h, out_w)

    def forward(self, x, needs_aug=None, generator=None):
        return self.cheap_forward(x, generator)

    def extra_repr(self) -> str:
        return f"size={self.size}, padding={self.padding}, padding_mode={self.torch_mode}"


class RandomResizedCrop(GeometricAugment):
    """torchvision's RandomResizedCrop parameter search, vectorised over the batch.

    Per sample: up to 10 attempts of area fraction U(scale) and log-uniform aspect ratio; the
    first box that fits inside the image is cropped (bilinear) and resized to `size`;
    otherwise the whole image (torchvision's fallback for square inputs). Boxes keep their
    real-valued size (torchvision rounds to whole pixels).
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.size = _size2(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.attempts = int(attempts)

    def theta(self, batch, height, width, generator, device):
        k = self.attempts
        area = _uniform(batch * k, *self.scale, generator, device).view(batch, k)
        log_r = _uniform(batch * k, math.log(self.ratio[0]), math.log(self.ratio[1]), generator, device)
        aspect = torch.exp(log_r).view(batch, k)
        # box size as a fraction of the image size (box area = area * H * W pixels)
        w_frac = torch.sqrt(area * aspect * (height / width))
        h_frac = torch.sqrt(area / aspect * (width / height))
        ok = (w_frac <= 1.0) & (h_frac <= 1.0)
        first = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), torch.full((batch,), -1, device=device))
        rows = torch.arange(batch, device=device)
        pick = first.clamp(min=0)
        found = first >= 0
        w_frac = torch.where(found, w_frac[rows, pick], torch.ones(batch, device=device))
        h_frac = torch.where(found, h_frac[rows, pick], torch.ones(batch, device=device))
        # box centre uniformly where the box stays inside the image (normalised coordinates)
        cx = (_rand(batch, generator, device) * 2 - 1) * (1 - w_frac)
        cy = (_rand(batch, generator, device) * 2 - 1) * (1 - h_frac)
        theta = _eye(batch, device)
        theta[:, 0, 0], theta[:, 0, 2] = w_frac, cx
        theta[:, 1, 1], theta[:, 1, 2] = h_frac, cy
        return theta, self.size

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}"


# --------------------------------------------------------------------------------------
# photometric transforms


class ColorJitter(Augment):
    """Per-sample brightness and contrast factors, as torchvision on the 0..1 image.

    brightness b: x * f, f ~ U(max(0, 1-b), 1+b); contrast c: f*x + (1-f)*mean(x) per image.
    Applied in that order and clamped to 0..1 (in normalised units). saturation and hue are
    accepted (the reports pass them) but are no-ops on grayscale images, as in torchvision.
    """

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, **kwargs):
        super().__init__(**kwargs)
        self.brightness = _pair(brightness, "brightness", center=1.0, min_value=0.0)
        self.contrast = _pair(contrast, "contrast", center=1.0, min_value=0.0)
        self.saturation, self.hue = saturation, hue  # no effect on 1-channel images

    @property
    def is_identity(self) -> bool:
        return self.brightness == (1.0, 1.0) and self.contrast == (1.0, 1.0)

    def forward(self, x, needs_aug=None, generator=None):
        batch = x.shape[0]
        shape = (batch,) + (1,) * (x.dim() - 1)
        low, high = self._norm(0.0), self._norm(1.0)
        if self.brightness != (1.0, 1.0):
            f = _uniform(batch, *self.brightness, generator, x.device).view(shape).to(x.dtype)
            # (x*std + mean) * f back in normalised units
            x = (x * f + (f - 1) * (self.mean / self.std)).clamp_(low, high)
        if self.contrast != (1.0, 1.0):
            f = _uniform(batch, *self.contrast, generator, x.device).view(shape).to(x.dtype)
            image_mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
            x = (x * f + (1 - f) * image_mean).clamp_(low, high)
        return x

    def extra_repr(self) -> str:
        return f"brightness={self.brightness}, contrast={self.contrast}"


class GaussianBlur(Augment):
    """Gaussian blur with sigma ~ U(sigma) per sample, separable, reflect padding (torchvision)."""

    def __init__(self, kernel_size=3, sigma=(0.1, 2.0), **kwargs):
        super().__init__(**kwargs)
        kh, kw = _size2(kernel_size)
        if kh != kw or kh % 2 == 0 or kh <= 0:
            raise ValueError(f"GaussianBlur kernel_size must be one odd positive number, got {kernel_size}")
        self.kernel_size = kh
        self.sigma = _pair(sigma, "sigma") if not isinstance(sigma, (int, float)) else (float(sigma), float(sigma))

    def forward(self, x, needs_aug=None, generator=None):
        batch, channels, height, width = x.shape
        sigma = _uniform(batch, *self.sigma, generator, x.device).to(x.dtype)
        half = self.kernel_size // 2
        offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
        kernel = kernel / kernel.sum(1, keepdim=True)  # (B, k)
        kernel = kernel.repeat_interleave(channels, 0)  # (B*C, k)
        flat = F.pad(x.reshape(1, batch * channels, height, width), (half,) * 4, mode="reflect")
        flat = F.conv2d(flat, kernel.view(-1, 1, 1, self.kernel_size), groups=batch * channels)
        flat = F.conv2d(flat, kernel.view(-1, 1, self.kernel_size, 1), groups=batch * channels)
        return flat.view(batch, channels, height, width)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma}"


class RandomErasing(Augment):
    """torchvision RandomErasing, vectorised: with probability p per sample erase one box.

    Up to 10 attempts of area fraction U(scale), log-uniform aspect ratio, whole-pixel box
    that must fit strictly inside; samples with no fitting attempt stay unchanged. `value`
    is in the normalised space (torchvision's RandomErasing runs after Normalize): a number,
    or "random" for per-pixel standard normal noise.
    """

    def __init__(self, p: float = 0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value: float | str = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.p = float(p)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        if isinstance(value, str) and value != "random":
            raise ValueError(f"RandomErasing value must be a number or 'random', got {value!r}")
        self.value = value

    @property
    def is_identity(self) -> bool:
        return self.p <= 0.0

    def forward(self, x, needs_aug=None, generator=None):
        batch, channels, height, width = x.shape
        k = 10
        # the boxes are drawn and turned into per-sample row and column masks where the
        # generator lives (the CPU by default); one copy takes them to the batch's device,
        # where the mask and the fill are two operations (kernel launches on a GPU)
        device = generator_device(generator)
        apply = _rand(batch, generator, device) < self.p
        area = _uniform(batch * k, *self.scale, generator, device).view(batch, k) * (height * width)
        log_ratio = _uniform(batch * k, math.log(self.ratio[0]), math.log(self.ratio[1]), generator, device)
        aspect = torch.exp(log_ratio).view(batch, k)
        h = torch.round(torch.sqrt(area * aspect))
        w = torch.round(torch.sqrt(area / aspect))
        ok = (h < height) & (w < width)
        first = ok.to(torch.int8).argmax(1)
        rows = torch.arange(batch, device=device)
        h, w = h[rows, first], w[rows, first]
        apply = apply & ok.any(1)
        top = torch.floor(_rand(batch, generator, device) * (height - h + 1))
        left = torch.floor(_rand(batch, generator, device) * (width - w + 1))
        ys = torch.arange(height, device=device)
        xs = torch.arange(width, device=device)
        in_rows = (ys[None, :] >= top[:, None]) & (ys[None, :] < (top + h)[:, None]) & apply[:, None]
        in_cols = (xs[None, :] >= left[:, None]) & (xs[None, :] < (left + w)[:, None])
        in_rows, in_cols = torch.cat([in_rows, in_cols], 1).to(x.device).split([height, width], 1)
        mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
        if self.value == "random":
            noise = torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)
            return torch.where(mask, noise, x)
        return torch.where(mask, float(self.value), x)

    def extra_repr(self) -> str:
        return f"p={self.p}, scale={self.scale}, ratio={self.ratio}, value={self.value}"


class FlaggedBrightness(Augment):
    """The reports' jitter for upsampled copies, applied ONLY where needs_aug is True.

    mode="scale" (report-000): the 0..1 image times U(factor), default U(0.9, 1.1).
    mode="shift" (report-002): plus U(-shift, shift), default 10/255 (+-10 grey levels).
    needs_aug=None means no sample is flagged (identity).
    """

    def __init__(self, mode: str = "scale", factor=(0.9, 1.1), shift: float = 10 / 255, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("scale", "shift"):
            raise ValueError(f"FlaggedBrightness mode must be 'scale' or 'shift', got {mode!r}")
        self.mode = mode
        self.factor = (float(factor[0]), float(factor[1]))
        self.shift = float(shift)

    def forward(self, x, needs_aug=None, generator=None):
        batch = x.shape[0]
        # draw for every sample so the generator advances the same way whatever the flags
        if self.mode == "scale":
            draw = _uniform(batch, *self.factor, generator, x.device)
        else:
            draw = _uniform(batch, -self.shift, self.shift, generator, x.device)
        if needs_aug is None:
            return x
        shape = (batch,) + (1,) * (x.dim() - 1)
        flags = needs_aug.to(x.device, torch.bool).view(shape)
        draw = draw.view(shape).to(x.dtype)
        if self.mode == "scale":
            changed = x * draw + (draw - 1) * (self.mean / self.std)
        else:
            changed = x + draw / self.std
        changed = changed.clamp_(self._norm(0.0), self._norm(1.0))
        return torch.where(flags, changed, x)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, factor={self.factor}, shift={self.shift:.4f}"


# --------------------------------------------------------------------------------------
# composition


class _FusedGeometric(nn.Module):
    """Consecutive geometric transforms applied as one warp (see _warp_chain)."""

    def __init__(self, ops: list[GeometricAugment]):
        super().__init__()
        self.ops = nn.ModuleList(ops)

    def forward(self, x, needs_aug=None, generator=None):
        return _warp_chain(list(self.ops), x, generator)


class Compose(Augment):
    """Apply transforms in order; consecutive geometric ones share one grid_sample.

    Geometric transforms are grouped while their padding agrees (fill value / mode); a
    transform whose magnitudes are zero is dropped. ``Compose([])`` is the identity.
    """

    def __init__(self, transforms: Sequence[Augment], mean: float = MEAN, std: float = STD):
        super().__init__(mean=mean, std=std)
        self.transforms = nn.ModuleList(transforms)
        for t in self.transforms:
            _set_normalization(t, mean, std)
        self.stages = nn.ModuleList(_plan(list(self.transforms)))

    @property
    def is_identity(self) -> bool:
        return len(self.stages) == 0

    def forward(self, x: Tensor, needs_aug: Tensor | None = None, generator=None) -> Tensor:
        for stage in self.stages:
            x = stage(x, needs_aug, generator)
        return x

    def __repr__(self) -> str:
        inner = "\n".join(f"  {t!r}" for t in self.transforms)
        return f"Compose(\n{inner}\n)" if inner else "Compose()"


def _set_normalization(module: nn.Module, mean: float, std: float) -> None:
    for m in module.modules():
        if isinstance(m, Augment):
            m.set_normalization(mean, std)


def _plan(transforms: list[Augment]) -> list[nn.Module]:
    stages: list[nn.Module] = []
    group: list[GeometricAugment] = []
    key = None

    def close():
        nonlocal group, key
        if group:
            stages.append(_FusedGeometric(group))
        group, key = [], None

    for t in transforms:
        if t.is_identity:
            continue
        if isinstance(t, GeometricAugment):
            k = _padding_key(t)
            if k is not None and key is not None and k != key:
                close()
            group.append(t)
            if k is not None:
                key = k
        else:
            close()
            stages.append(t)
    close()
    return stages


# --------------------------------------------------------------------------------------
# specs and presets

_REGISTRY: dict[str, Callable[..., Augment]] = {
    cls.__name__: cls
    for cls in (
        RandomHorizontalFlip,
        RandomRotation,
        RandomAffine,
        Pad,
        RandomCrop,
        RandomResizedCrop,
        ColorJitter,
        GaussianBlur,
        RandomErasing,
        FlaggedBrightness,
    )
}

# Each preset is a plain spec so notebooks can print it next to the report's torchvision code.
PRESETS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "none": [],
    # report-003 experiment 3: RandomHorizontalFlip(), RandomRotation(10)
    "exp3": [("RandomHorizontalFlip", {"p": 0.5}), ("RandomRotation", {"degrees": 10})],
    # report-003 experiment 4: the get_transforms code the report quotes at the start of
    # experiment 5 ("the previous one"): RandomHorizontalFlip(p=0.5), RandomRotation(10),
    # ColorJitter(brightness=0.3, contrast=0.3, saturation=0.1, hue=0.1) (saturation and hue
    # do nothing to grayscale), RandomAffine(degrees=0, scale=(0.8, 1.2)). The prose also
    # names padding, which that code does not do, so neither do we.
    "exp4": [
        ("RandomHorizontalFlip", {"p": 0.5}),
        ("RandomRotation", {"degrees": 10}),
        ("ColorJitter", {"brightness": 0.3, "contrast": 0.3}),
        ("RandomAffine", {"degrees": 0, "scale": (0.8, 1.2)}),
    ],
    # report-003 experiment 5 (second get_transforms): flip, rotation 15, ColorJitter 0.4,
    # RandomAffine scale 0.7-1.3, RandomErasing p=0.3 scale 0.02-0.15, GaussianBlur 3.
    # Blur runs before erasing so the erased box stays sharp-edged as with tensor erasing.
    "exp5": [
        ("RandomHorizontalFlip", {"p": 0.5}),
        ("RandomRotation", {"degrees": 15}),
        ("RandomAffine", {"degrees": 0, "scale": (0.7, 1.3)}),
        ("ColorJitter", {"brightness": 0.4, "contrast": 0.4}),
        ("GaussianBlur", {"kernel_size": 3, "sigma": (0.1, 2.0)}),
        ("RandomErasing", {"p": 0.3, "scale": (0.02, 0.15)}),
    ],
    # report-003 experiment 6 (file 7): Pad(4), RandomCrop(48), flip p=0.3, rotation 10
    "exp6": [
        ("RandomCrop", {"size": 48, "padding": 4}),
        ("RandomHorizontalFlip", {"p": 0.3}),
        ("RandomRotation", {"degrees": 10}),
    ],
    # Khaireddin & Chen 2021: RandomResizedCrop(48, scale=(0.8, 1.2)), RandomApply(
    # RandomAffine(0, translate=(0.2, 0.2)), p=0.5), flip, RandomApply(RandomRotation(10),
    # p=0.5), RandomErasing. Their TenCrop(40) training views are left to the model/TTA.
    "khaireddin": [
        ("RandomResizedCrop", {"size": 48, "scale": (0.8, 1.2)}),
        ("RandomAffine", {"degrees": 0, "translate": (0.2, 0.2), "p": 0.5}),
        ("RandomHorizontalFlip", {"p": 0.5}),
        ("RandomRotation", {"degrees": 10, "p": 0.5}),
        ("RandomErasing", {"p": 0.5}),
    ],
    # airbench-style: flip + random translation by reflect-padding 3 px (2 px at 32x32
    # scaled to 48) and cropping back; no interpolation at all.
    "fast": [
        ("RandomHorizontalFlip", {"p": 0.5}),
        ("RandomCrop", {"size": 48, "padding": 3, "padding_mode": "reflect"}),
    ],
}


def _from_item(item) -> Augment:
    if isinstance(item, Augment):
        return item
    if isinstance(item, dict):
        kwargs = dict(item)
        if "name" not in kwargs:
            raise ValueError(f"augment spec item {item!r} has no 'name'")
        name = kwargs.pop("name")
    elif isinstance(item, (tuple, list)) and len(item) in (1, 2) and isinstance(item[0], str):
        name = item[0]
        kwargs = dict(item[1]) if len(item) == 2 else {}
    elif isinstance(item, str):
        name, kwargs = item, {}
    else:
        raise ValueError(f"augment spec item {item!r} is not (name, kwargs), a dict with 'name', or an Augment")
    if name not in _REGISTRY:
        raise ValueError(f"unknown augmentation {name!r}; known: {sorted(_REGISTRY)}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for augmentation {name}: {kwargs!r} ({err})") from None


def build_augment(spec=None, *, mean: float = MEAN, std: float = STD) -> Augment:
    """Build a batched augmentation from a preset name, a list of items, or a module.

    spec: None / "none" -> identity; a preset name in PRESETS ("exp3", "exp4", "exp5", "exp6",
    "khaireddin", "fast"); a list of ("RandomRotation", {"degrees": 10}) pairs, dicts like
    {"name": "RandomRotation", "degrees": 10} or Augment instances; or an Augment/Compose.
    Returns a module called as ``aug(x_float, needs_aug=None, generator=None)``.
    """
    if spec is None:
        spec = "none"
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown augment preset {spec!r}; presets: {sorted(PRESETS)}")
        spec = PRESETS[spec]
    if isinstance(spec, Compose):
        return spec
    if isinstance(spec, Augment):
        return Compose([spec], mean=mean, std=std)
    if isinstance(spec, dict):
        spec = [spec]
    return Compose([_from_item(item) for item in spec], mean=mean, std=std)


def plot_augmentations(images_uint8, presets=("exp3", "exp5", "fast"), *, views: int = 8,
                       seed: int = 0):
    """Gallery: one row per preset, `views` random draws of the first image in each column.

    Shows what the network actually receives (after normalisation), so the colour scale is
    shared per row.
    """
    import matplotlib.pyplot as plt

    face = torch.as_tensor(images_uint8[:1])
    x = to_float(face).repeat(views, 1, 1, 1)
    fig, axes = plt.subplots(len(presets), views + 1, figsize=(1.3 * (views + 1), 1.45 * len(presets)),
                             squeeze=False)
    for row, preset in enumerate(presets):
        out = build_augment(preset)(x, generator=torch.Generator().manual_seed(seed + row))
        panels = [x[0, 0]] + [out[i, 0] for i in range(views)]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel.numpy(), cmap="gray", vmin=float(x.min()), vmax=float(x.max()))
            ax.set_xticks([]), ax.set_yticks([])
        axes[row, 0].set_ylabel(preset, fontsize=9)
    axes[0, 0].set_title("original", fontsize=8)
    fig.tight_layout()
    return fig
