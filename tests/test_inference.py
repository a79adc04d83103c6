"""fer_lib.inference: the one inference path and its one meaning of test-time augmentation."""
import numpy as np
import pytest
import torch
from torch import nn

from fer_lib.inference import predict_logits

SCALED = {"mean": 0.0, "std": 1.0}  # input = pixel / 255: easy to compute by hand


def _scaled(x):
    return x.float() / 255.0


# ------------------------------------------------------------------------------ TTA
class ColumnReader(nn.Module):
    """Logits from the first and last image columns: NOT flip invariant (flip swaps them)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0))
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        left = x[:, 0, :, 0].mean(dim=1)
        right = x[:, 0, :, -1].mean(dim=1)
        return self.scale * torch.stack([left, right, left * 0.0], dim=1)


class MeanReader(nn.Module):
    """Logits from the image mean: flip invariant."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, -1.0, 0.5]))

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None] * self.weight[None, :]


def _images(n=5, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 48, 48), dtype=np.uint8))


def test_tta_none_returns_raw_logits():
    model = ColumnReader()
    images = _images()
    out = predict_logits(model, images, tta="none", **SCALED)
    expected = model(_scaled(images).unsqueeze(1))
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, expected.detach())


def test_tta_flip_changes_a_column_reader_but_not_a_flip_invariant_model():
    images = _images()
    invariant = MeanReader()
    none = predict_logits(invariant, images, tta="none", **SCALED)
    flip = predict_logits(invariant, images, tta="flip", **SCALED)
    torch.testing.assert_close(flip, torch.log_softmax(none, dim=1), atol=1e-5, rtol=1e-5)

    reader = ColumnReader()
    none = predict_logits(reader, images, tta="none", **SCALED)
    flip = predict_logits(reader, images, tta="flip", **SCALED)
    assert not torch.allclose(torch.softmax(flip, 1), torch.softmax(none, 1), atol=1e-3)
    x = _scaled(images).unsqueeze(1)
    expected = (torch.softmax(reader(x), 1) + torch.softmax(reader(torch.flip(x, [-1])), 1)) / 2
    torch.testing.assert_close(torch.softmax(flip, 1), expected.detach(), atol=1e-5, rtol=1e-5)


def test_tta_tencrop_averages_ten_crops_of_crop_size():
    reader = ColumnReader()
    images = _images(n=4)
    out = predict_logits(reader, images, tta="tencrop", crop_size=40, **SCALED)
    assert out.shape == (4, 3)
    assert reader.calls == [(4, 1, 40, 40)] * 10
    x = _scaled(images).unsqueeze(1)
    crops = [x[..., t:t + 40, l:l + 40] for t, l in ((0, 0), (0, 8), (8, 0), (8, 8), (4, 4))]
    crops += [torch.flip(c, [-1]) for c in crops]
    expected = sum(torch.softmax(reader(c), 1) for c in crops) / 10
    torch.testing.assert_close(torch.softmax(out, 1), expected.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="crop_size"):
        predict_logits(reader, images, tta="tencrop", **SCALED)


def test_tta_flip_translate_pads_with_the_black_pixel_value():
    seen = []

    class TopLeft(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, x):
            seen.append(x[:, 0, 0, 0].clone())
            return x[:, 0, 0, :2] * self.w

    images = torch.full((2, 48, 48), 255, dtype=torch.uint8)
    # mean 0.5, std 0.5 map black (0) to -1 and white (255) to +1
    out = predict_logits(TopLeft(), images, tta="flip_translate", mean=0.5, std=0.5)
    assert out.shape == (2, 2) and len(seen) == 10
    corner_values = sorted(float(v[0]) for v in seen)
    # shifting down or right by 2 uncovers the top-left pixel: 4 of 10 views see black
    assert corner_values == [-1.0] * 4 + [1.0] * 6


def test_tta_batches_restore_training_mode_and_reject_bad_input():
    reader = ColumnReader()
    reader.train()
    images = _images(n=7)
    big = predict_logits(reader, images, tta="flip", **SCALED)
    small = predict_logits(reader, images, tta="flip", batch_size=3, **SCALED)
    torch.testing.assert_close(big, small)
    assert reader.training
    with pytest.raises(ValueError, match="unknown TTA mode"):
        predict_logits(reader, images, tta="rotate", **SCALED)
    with pytest.raises(ValueError, match="shape"):
        predict_logits(reader, images[0, 0], **SCALED)


def test_tta_default_preprocess_is_the_training_normalisation():
    from fer_lib import augment

    model = MeanReader()
    images = _images(n=3)
    out = predict_logits(model, images, tta="none")
    torch.testing.assert_close(out, model(augment.to_float(images)).detach())


def test_a_model_predicted_with_can_still_be_trained():
    """predict_logits moves a contiguous conv net to channels_last: outside inference mode, so
    the re-made parameters are ordinary tensors that autograd can train (08's ladder did this)."""
    from fer_lib.models import create_model
    from fer_lib.synthetic import make_images
    from fer_lib.training import TrainConfig, fit

    torch.manual_seed(0)
    model = create_model("fernet_small")
    images, labels = make_images(32, seed=0)
    predict_logits(model, images, precision="fp32")
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.is_inference() for p in model.parameters())
    config = TrainConfig(epochs=1, batch_size=16, lr=0.05, optimizer="sgd", progress=False,
                         checkpoint_every_epoch=False, precision="fp32", device="cpu")
    before = model.stem[0].weight.detach().clone()
    fit(model, (images, labels), None, config)
    assert not torch.equal(model.stem[0].weight.detach(), before)
