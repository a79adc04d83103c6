"""What only a CUDA GPU can check: skipped without one (CI), run by `python -m fer_lib gpu-run`."""
import math

import pytest
import torch
from torch import nn

from fer_lib.synthetic import make_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _split(n, seed=0):
    images, labels = make_images(n, seed=seed)
    return images, labels


def test_fit_trains_on_cuda_with_autocast_channels_last_and_ema():
    from fer_lib.training import TrainConfig, evaluate, fit

    config = TrainConfig(epochs=2, batch_size=32, lr=0.05, optimizer="sgd", nesterov=True, scheduler="onecycle",
                         augment="fast", ema_decay=0.99, label_smoothing=0.1, tta="flip", progress=False,
                         checkpoint_every_epoch=False)
    result = fit("fernet_small", _split(256), _split(64, seed=1), config)
    assert result.setup.device.type == "cuda" and result.setup.channels_last
    assert result.setup.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert all(math.isfinite(row["train_loss"]) and 0 <= row["val_accuracy"] <= 1 for row in result.history)
    assert next(result.model.parameters()).is_cuda
    # the kept model evaluates with flip TTA on the GPU, in the training precision
    flip = evaluate(result.model, _split(64, seed=1), tta="flip", setup=result.setup)
    assert flip["logits"].shape == (64, 7) and 0 <= flip["accuracy"] <= 1


def test_cuda_and_cpu_logits_agree_in_fp32():
    from fer_lib.models import create_model
    from fer_lib.training import predict_logits

    images, _ = _split(32)
    torch.manual_seed(0)
    model = create_model("exp3_cnn").eval()
    cpu = predict_logits(model, images, device="cpu")
    # TF32 would round the GPU's convolutions and matmuls to 10 mantissa bits: compare true fp32
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gpu = predict_logits(model, images, device="cuda")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    assert gpu.device.type == "cpu"  # predict_logits hands back CPU tensors
    assert torch.allclose(cpu, gpu, atol=1e-3, rtol=1e-3)


class _NaNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(48 * 48, 7)

    def forward(self, x):
        return self.linear(x.flatten(1)) * float("nan")


def test_a_nan_loss_is_caught_on_cuda_where_the_engine_syncs_only_every_50_steps():
    from fer_lib.training import NonFiniteLossError, TrainConfig, fit

    config = TrainConfig(epochs=1, batch_size=16, progress=False, checkpoint_every_epoch=False)
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        fit(_NaNNet(), _split(64), None, config)


def test_matmul_peak_and_fraction_of_peak_on_cuda():
    from fer_lib import bench

    peak = bench.matmul_peak(device="cuda", size=4096, repeats=3)
    assert peak["device"].startswith("cuda") and peak["gflops"] > 0
    result = bench.peak_fraction(["exp3_cnn"], seconds=0.5, batch_size=64, device="cuda", peak=peak,
                                 rounds=1, verbose=False)
    (row,) = result["rows"]
    assert row["engine_img_s"] > 0 and 0 < row["bare_fraction"]


def test_muon_on_cuda_pads_into_one_batch_and_matches_the_cpu_step():
    from fer_lib.models import create_model
    from fer_lib.training import TrainConfig, make_optimizer

    torch.manual_seed(0)
    cpu_model = create_model("fernet_small")
    cuda_model = create_model("fernet_small").cuda()
    cuda_model.load_state_dict(cpu_model.state_dict())
    # the recipes' Muon: conv weights orthogonalised at muon_lr, the rest Nesterov SGD at lr
    config = TrainConfig(optimizer="muon", lr=0.05, muon_lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4)
    optimizers = [make_optimizer(model, config, next(model.parameters()).device) for model in (cpu_model, cuda_model)]
    for _ in range(3):
        for cpu_p, cuda_p in zip(cpu_model.parameters(), cuda_model.parameters()):
            cpu_p.grad = torch.randn_like(cpu_p)
            cuda_p.grad = cpu_p.grad.cuda()
        for optimizer in optimizers:
            optimizer.step()
    for cpu_p, cuda_p in zip(cpu_model.parameters(), cuda_model.parameters()):
        torch.testing.assert_close(cuda_p.cpu(), cpu_p, atol=1e-4, rtol=1e-3)
