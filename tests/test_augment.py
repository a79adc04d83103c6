"""fer_lib.augment: batched per-sample augmentation on generated tensors."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fer_lib import augment as A

LOW, HIGH = (0 - A.MEAN) / A.STD, (1 - A.MEAN) / A.STD  # normalised black and white


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _batch(n=16, seed=0):
    return A.to_float(torch.randint(0, 256, (n, 48, 48), dtype=torch.uint8, generator=_gen(seed)))


def _to_unit(x):
    return x * A.STD + A.MEAN


def test_to_float_shapes_values_and_errors():
    u8 = torch.tensor([[0, 255], [128, 64]], dtype=torch.uint8).expand(3, 2, 2).contiguous()
    out = A.to_float(u8)
    assert out.shape == (3, 1, 2, 2) and out.dtype == torch.float32
    assert torch.allclose(_to_unit(out[0, 0]), u8[0].float() / 255, atol=1e-6)
    assert torch.equal(A.to_float(u8.unsqueeze(1)), out)
    with pytest.raises(TypeError, match="uint8"):
        A.to_float(u8.float())
    with pytest.raises(ValueError, match="shape"):
        A.to_float(u8[0])


def test_mean_std_constants_are_plausible_fer2013_statistics():
    assert 0.45 < A.MEAN < 0.55 and 0.2 < A.STD < 0.3


def test_flip_rate_is_about_half_and_per_sample():
    x = torch.zeros(2000, 1, 4, 4)
    x[..., 0] = 1.0  # bright left column: flipped samples have it on the right
    out = A.RandomHorizontalFlip(0.5)(x, generator=_gen())
    flipped = out[:, 0, 0, -1] == 1.0
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])
    assert 0.45 < flipped.float().mean().item() < 0.55


@pytest.mark.parametrize("aug", [
    A.RandomRotation(10),
    A.RandomAffine(0, scale=(0.7, 1.3)),
    A.RandomCrop(48, padding=4),
    A.ColorJitter(brightness=0.4, contrast=0.4),
    A.GaussianBlur(3, (0.1, 2.0)),
    A.RandomResizedCrop(48, scale=(0.5, 1.0)),
])
def test_parameters_differ_between_samples_of_one_batch(aug):
    x = _batch(1).expand(32, 1, 48, 48).contiguous()  # 32 copies of one image
    out = aug(x, generator=_gen())
    distinct = {tuple(o.flatten()[:2000].tolist()) for o in out}
    assert len(distinct) > 16


@pytest.mark.parametrize("preset", sorted(A.PRESETS))
def test_presets_keep_dtype_shape_and_valid_range(preset):
    x = _batch(16)
    aug = A.build_augment(preset)
    out = aug(x, needs_aug=torch.ones(16, dtype=torch.bool), generator=_gen())
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= LOW - 1e-4 and out.max() <= HIGH + 1e-4
    if preset != "none":
        assert not torch.equal(out, x)


def test_zero_magnitudes_are_the_identity():
    x = _batch(8)
    aug = A.Compose([
        A.RandomHorizontalFlip(0.0), A.RandomRotation(0), A.RandomAffine(0, translate=(0, 0), scale=(1, 1)),
        A.ColorJitter(0, 0), A.RandomErasing(p=0.0), A.Pad(0),
    ])
    assert aug.is_identity
    assert torch.equal(aug(x, generator=_gen()), x)
    # the warp itself is exact for an identity matrix (no half-pixel shift)
    warped = A._warp_chain([A.RandomRotation((0, 0)), A.RandomAffine(0, scale=(1, 1))], x, _gen())
    assert torch.allclose(warped, x, atol=1e-5)
    rrc = A.RandomResizedCrop(48, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(rrc(x, generator=_gen()), x, atol=1e-5)


def test_same_seed_same_output_different_seed_different_output():
    x = _batch(16)
    aug = A.build_augment("exp5")
    first, again = aug(x, generator=_gen(3)), aug(x, generator=_gen(3))
    assert torch.equal(first, again)
    assert not torch.equal(first, aug(x, generator=_gen(4)))


def test_flagged_brightness_changes_only_flagged_samples():
    x = _batch(64)
    flags = torch.arange(64) % 2 == 0
    for mode in ("scale", "shift"):
        aug = A.FlaggedBrightness(mode=mode)
        out = aug(x, needs_aug=flags, generator=_gen())
        assert torch.equal(out[~flags], x[~flags])
        changed = (out[flags] != x[flags]).flatten(1).any(1)
        assert changed.float().mean() > 0.9
        # the jitter is small: at most 10% of the 0..1 range or +-10 grey levels
        assert (_to_unit(out) - _to_unit(x)).abs().max() <= 0.1 + 1e-4
        assert torch.equal(aug(x, needs_aug=None, generator=_gen()), x)


def test_rotation_matches_torchvision_rotate():
    image = torch.rand(1, 1, 48, 48, generator=_gen())
    ours = _to_unit(A.RandomRotation((25, 25))((image - A.MEAN) / A.STD, generator=_gen()))
    theirs = TF.rotate(image, 25, interpolation=InterpolationMode.BILINEAR)
    assert (ours - theirs).abs().max() < 1e-4


def test_affine_matches_torchvision_affine():
    image = torch.rand(1, 1, 48, 48, generator=_gen())
    aug = A.RandomAffine(degrees=(20, 20), scale=(1.1, 1.1), shear=(10, 10, 5, 5))
    ours = _to_unit(aug((image - A.MEAN) / A.STD, generator=_gen()))
    theirs = TF.affine(image, angle=20, translate=[0, 0], scale=1.1, shear=[10.0, 5.0],
                       interpolation=InterpolationMode.BILINEAR)
    assert (ours - theirs).abs().max() < 1e-4


def test_fused_crop_equals_gather_crop_and_translates():
    x = _batch(16)
    crop = A.RandomCrop(48, padding=4)
    cheap = crop(x, generator=_gen(5))
    # forcing the warp path: same draws, bilinear at integer offsets == gather
    fused = A._warp_chain([crop, A.RandomRotation((0, 0))], x, _gen(5))
    assert torch.allclose(cheap, fused, atol=1e-5)
    # each output is the input shifted by whole pixels, black where it came from the padding
    for out, img in zip(cheap, x):
        found = False
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                shifted = torch.full_like(img, LOW)
                src = img[:, max(0, -dy):48 - max(0, dy), max(0, -dx):48 - max(0, dx)]
                shifted[:, max(0, dy):48 - max(0, -dy), max(0, dx):48 - max(0, -dx)] = src
                found = found or torch.allclose(out, shifted, atol=1e-5)
        assert found


def test_compose_fuses_consecutive_geometric_transforms():
    aug = A.build_augment("exp6")
    assert len(aug.stages) == 1  # pad/crop + flip + rotation: one grid_sample
    aug5 = A.build_augment("exp5")
    stages = [type(s).__name__ for s in aug5.stages]
    assert stages == ["_FusedGeometric", "ColorJitter", "GaussianBlur", "RandomErasing"]


def test_random_erasing_boxes_per_sample():
    x = torch.full((200, 1, 48, 48), 1.0)
    out = A.RandomErasing(p=1.0, scale=(0.02, 0.15), value=0.0)(x, generator=_gen())
    erased = (out == 0.0).flatten(1).float().mean(1)
    assert (erased > 0).all()
    assert erased.min() >= 0.015 and erased.max() <= 0.16
    assert len(set(erased.tolist())) > 20


def test_color_jitter_brightness_range_and_clamp():
    x = torch.full((500, 1, 8, 8), (0.5 - A.MEAN) / A.STD)
    out = _to_unit(A.ColorJitter(brightness=0.4)(x, generator=_gen()))
    means = out.mean((1, 2, 3))
    assert 0.5 * 0.6 - 1e-4 <= means.min() < 0.5 * 0.7 and 0.5 * 1.3 < means.max() <= 0.5 * 1.4 + 1e-4
    bright = torch.full((50, 1, 4, 4), HIGH)
    assert A.ColorJitter(brightness=0.4)(bright, generator=_gen()).max() <= HIGH + 1e-5


def test_gaussian_blur_keeps_constants_and_smooths():
    flat = torch.full((4, 1, 16, 16), 0.7)
    assert torch.allclose(A.GaussianBlur(3, (0.5, 2.0))(flat, generator=_gen()), flat, atol=1e-6)
    noisy = _batch(8)
    assert A.GaussianBlur(3, (1.0, 2.0))(noisy, generator=_gen()).var() < noisy.var()


def test_build_augment_spec_forms_and_errors():
    x = _batch(4)
    as_pairs = A.build_augment([("RandomRotation", {"degrees": 10}), ("RandomHorizontalFlip", {"p": 0.5})])
    as_dicts = A.build_augment([{"name": "RandomRotation", "degrees": 10}, {"name": "RandomHorizontalFlip"}])
    assert torch.equal(as_pairs(x, generator=_gen()), as_dicts(x, generator=_gen()))
    assert A.build_augment(None).is_identity and A.build_augment("none").is_identity
    with pytest.raises(ValueError, match="RandomTwirl"):
        A.build_augment([{"name": "RandomTwirl"}])
    with pytest.raises(ValueError, match="preset"):
        A.build_augment("exp99")
    with pytest.raises(ValueError, match="RandomRotation"):
        A.build_augment([("RandomRotation", {"angle": 3})])


def test_resized_crop_changes_output_size():
    out = A.RandomResizedCrop(40, scale=(0.8, 1.0))(_batch(4), generator=_gen())
    assert out.shape == (4, 1, 40, 40)


class _DeviceWork(TorchDispatchMode):
    """Counts, for a batch on the 'meta' device (shapes only: it stands for a GPU's), the
    operations that touch it and the copies from the host to it; views launch nothing."""

    def __init__(self):
        super().__init__()
        self.ops, self.copies = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if devices == {"cpu", "meta"}:
            self.copies += 1
        elif "meta" in devices and not func.is_view:
            self.ops += 1
        return out


@pytest.mark.parametrize("preset, most_ops, most_copies", [("khaireddin", 12, 2), ("fast", 8, 2)])
def test_per_sample_draws_reach_the_batch_device_in_few_operations(preset, most_ops, most_copies):
    # on a GPU each operation on the batch is a kernel launch, and the recipes' steps are
    # bounded by launches (docs/speed.md): the per-sample parameters are worked out on the
    # generator's side and copied once per fused warp / erasing (khaireddin was 66 + 6 copies)
    aug = A.build_augment(preset)
    x = torch.empty(128, 1, 48, 48, device="meta")
    with _DeviceWork() as work:
        out = aug(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.device.type == "meta"
    assert work.ops <= most_ops and work.copies <= most_copies, (work.ops, work.copies)
