"""fer_lib.training / checkpoint / device: the engine on tiny models and generated data."""
import math
import os
import platform

import pytest
import torch
from torch import nn

from fer_lib import checkpoint as ckpt_mod
from fer_lib.checkpoint import load_checkpoint, load_model, save_checkpoint
from fer_lib.device import EpochProgress, cpu_bf16_is_faster, cpu_has_bf16, progress_mode, resolve_device
from fer_lib.inference import predict_logits
from fer_lib.synthetic import make_images
from fer_lib.training import (
    FitResult,
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    fit,
    overfit_check,
)


class TinyNet(nn.Module):
    def __init__(self, batchnorm=True, dropout=0.2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8) if batchnorm else nn.Identity(), nn.ReLU(),
            nn.MaxPool2d(4), nn.Dropout(dropout),
        )
        self.head = nn.Linear(8 * 12 * 12, 7)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


@pytest.fixture(scope="module")
def data():
    return make_images(128, seed=0), make_images(64, seed=1)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("FER_LIB_PROGRESS", "off")


CFG = dict(epochs=2, batch_size=32, device="cpu", seed=0)


def test_resolve_device_on_cpu():
    setup = resolve_device("cpu", precision="fp32")
    assert setup.device == torch.device("cpu") and setup.amp_dtype is None and setup.channels_last
    assert resolve_device("cpu", precision="bf16").amp_dtype == torch.bfloat16
    auto = resolve_device("cpu")
    assert auto.amp_dtype == (torch.bfloat16 if cpu_bf16_is_faster() else None)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert not resolve_device("cpu", model=mlp).channels_last
    assert not resolve_device("cpu", channels_last=False).channels_last
    with pytest.raises(ValueError, match="fp16"):
        resolve_device("cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        resolve_device("cpu", precision="int8")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or platform.libc_ver()[0] != "glibc",
                    reason="glibc on Linux only")
def test_cpu_training_keeps_freed_memory_for_the_next_step():
    # By default glibc unmaps a freed 64 MB block at once, so the next step page-faults it in
    # again; once the CPU Engine is made, freed blocks stay in the process for reuse.
    from fer_lib.device import keep_freed_cpu_memory
    from fer_lib.training import Engine

    keep_freed_cpu_memory.cache_clear()
    Engine(TinyNet(), TrainConfig(progress=False), resolve_device("cpu", "fp32"), 4)
    assert keep_freed_cpu_memory.cache_info().misses == 1 and keep_freed_cpu_memory()
    block = torch.ones(16 * 2**20)  # 64 MB, touched
    before = _resident_bytes()
    del block
    assert before - _resident_bytes() < 8 * 2**20


@pytest.fixture
def fresh_cpu_checks():
    """cpu_has_bf16 and cpu_bf16_is_faster read the CPU once per process: a test that fakes
    the CPU or limits its kernels needs them read again, before and after."""
    cpu_has_bf16.cache_clear()
    cpu_bf16_is_faster.cache_clear()
    yield
    cpu_has_bf16.cache_clear()
    cpu_bf16_is_faster.cache_clear()


@pytest.mark.parametrize("name, value", [("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"),
                                         ("ONEDNN_MAX_CPU_ISA", "avx512_core")])
def test_isa_limits_switch_bf16_off_and_are_named(monkeypatch, name, value, fresh_cpu_checks):
    # an AVX2-only machine timed on an AVX-512 one: "auto" must pick fp32 there, and every
    # figure's machine line must say the kernels were limited
    from fer_lib.device import ISA_LIMIT_VARIABLES, cpu_isa_limits, machine_description

    for variable in ISA_LIMIT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(name, value)
    assert cpu_isa_limits() == {name: value}
    assert not cpu_has_bf16()
    assert resolve_device("cpu").amp_dtype is None
    if not torch.cuda.is_available():
        assert f"limited by {name}={value} to " in machine_description()


@pytest.mark.parametrize("flags, limit, expected", [
    ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", None, "bf16 via avx512_bf16 + AMX"),  # Xeon (Sapphire Rapids)
    ("avx2 avx512f avx512_bf16", None, "bf16 via avx512_bf16"),                         # EPYC (Zen 4)
    ("avx2 fma", None, "no bf16"),                                                     # AVX2-only EPYC
    ("avx2 avx512f avx512_bf16 amx_bf16", "AVX2", "no bf16"),                           # limited to AVX2
])
def test_machine_line_names_the_bf16_units(monkeypatch, flags, limit, expected, fresh_cpu_checks):
    # the same "AVX512 kernels" can be a Xeon with AMX or an EPYC without it: figures must say which
    import fer_lib.device as device

    for variable in device.ISA_LIMIT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    if limit:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    monkeypatch.setattr(device, "_cpuinfo", lambda key: flags if key == "flags" else "Test CPU")
    assert device.cpu_bf16_units() == expected
    if not torch.cuda.is_available():
        assert device.machine_description().startswith("Test CPU CPU, ")
        assert f", {expected}, torch " in device.machine_description()


@pytest.mark.parametrize("flags, vendor, limit, faster", [
    ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "GenuineIntel", None, True),   # Xeon with AMX
    ("avx2 avx512f avx512_bf16", "AuthenticAMD", None, True),                     # EPYC (Zen 4)
    ("avx2 avx512f avx512_bf16", "GenuineIntel", None, False),                    # Xeon, AMX hidden
    ("avx2 avx512f avx512_bf16 amx_bf16", "GenuineIntel", "AVX512_CORE_BF16", False),  # AMX limited off
    ("avx2 avx512f avx512_bf16 amx_bf16", "GenuineIntel", "AVX512_CORE_AMX", True),
    ("avx2 fma", "AuthenticAMD", None, False),                                   # AVX2-only EPYC
])
def test_auto_precision_picks_bf16_only_where_it_trains_faster(monkeypatch, flags, vendor, limit, faster,
                                                            fresh_cpu_checks):
    # an Intel CPU with avx512_bf16 but no AMX trained 1.2-1.4x faster in fp32 (bench), a Zen 4
    # without AMX 1.3-1.6x faster in bf16: the flags alone do not decide
    import fer_lib.device as device

    for variable in device.ISA_LIMIT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    if limit:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    info = {"flags": flags, "vendor_id": vendor}
    monkeypatch.setattr(device, "_cpuinfo", lambda key: info.get(key, "Test CPU"))
    assert cpu_bf16_is_faster() is faster
    assert device.cpu_bf16_units().endswith(" unused (fp32 faster)") is ("avx512_bf16" in flags and not faster)
    assert resolve_device("cpu").amp_dtype == (torch.bfloat16 if faster else None)
    assert resolve_device("cpu", precision="bf16").amp_dtype == torch.bfloat16  # asked for: given


def test_train_config_round_trip_and_validation():
    config = TrainConfig(epochs=3, optimizer="sgd", nesterov=True, augment=[("RandomRotation", {"degrees": 5})])
    again = TrainConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lion")


def test_fit_two_epochs_lowers_the_loss(data):
    train, val = data
    model = tiny()
    before = evaluate(model, val)["loss"]
    result = fit(model, train, val, TrainConfig(lr=3e-3, augment="exp3", **CFG))
    assert isinstance(result, FitResult) and len(result.history) == 2
    row = result.history[-1]
    for key in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds", "img_per_s"):
        assert key in row
    assert evaluate(result.model, val)["loss"] < before
    assert result.best_val_accuracy == max(r["val_accuracy"] for r in result.history)
    assert result.best_checkpoint is None  # no run_dir: best weights kept in memory


class _StopAfter:
    """A tracker that interrupts the run (like Ctrl-C) after logging epoch `stop`."""

    def __init__(self, stop):
        self.stop, self.logged = stop, []

    def log(self, metrics, step=None):
        self.logged.append(step)
        if step == self.stop:
            raise KeyboardInterrupt

    def log_summary(self, summary):
        pass

    def log_artifact(self, path, name, type):
        pass


def test_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    train, val = data
    config = TrainConfig(epochs=4, batch_size=32, device="cpu", augment="exp5", scheduler="onecycle",
                         ema_decay=0.9, weighted_sampling=True, seed=3)
    full = fit(tiny(), train, val, config, run_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(), train, val, config, run_dir=tmp_path / "cut", tracker=_StopAfter(2))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 2
    torch.manual_seed(999)  # the global RNG state comes from the checkpoint, not from here
    resumed = fit(tiny(seed=5), train, val, config, run_dir=tmp_path / "cut", resume=True)
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in full.history]
    assert resumed.best_epoch == full.best_epoch
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _NanAfter(nn.Module):
    """TinyNet whose training forward returns NaN from the `bad_call`-th call on."""

    def __init__(self, bad_call):
        super().__init__()
        self.net, self.bad_call, self.calls = TinyNet(), bad_call, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.bad_call:
                out = out * float("nan")
        return out


def test_nan_loss_raises_naming_epoch_and_step(data):
    train, val = data
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 2 ") as info:
        fit(_NanAfter(bad_call=6), train, val, TrainConfig(**CFG))  # 4 steps per epoch
    assert isinstance(info.value, NonFiniteLossError)


def test_early_stopping_stops_when_val_accuracy_stalls(data):
    train, val = data
    # lr 0 and no BatchNorm/dropout: the val accuracy never changes after epoch 1
    model = tiny(batchnorm=False, dropout=0.0)
    result = fit(model, train, val, TrainConfig(epochs=10, batch_size=32, lr=0.0, early_stopping_patience=2,
                                                device="cpu"))
    assert len(result.history) == 3 and result.stopped_early and result.best_epoch == 1


def test_ema_changes_the_evaluated_weights_not_the_training(data):
    train, val = data
    plain = fit(tiny(), train, val, TrainConfig(lr=3e-3, **CFG))
    ema = fit(tiny(), train, val, TrainConfig(lr=3e-3, ema_decay=0.9, **CFG))
    assert [r["train_loss"] for r in plain.history] == [r["train_loss"] for r in ema.history]
    assert [r["val_loss"] for r in plain.history] != [r["val_loss"] for r in ema.history]
    weight = "head.weight"
    assert not torch.equal(plain.model.state_dict()[weight], ema.model.state_dict()[weight])


def test_checkpoint_round_trip_is_weights_only_and_atomic(tmp_path, monkeypatch):
    model = tiny()
    path = save_checkpoint(tmp_path / "m.pt", model, config=TrainConfig().to_dict(), epoch=3,
                           metrics={"val_accuracy": 0.5}, class_names=("a", "b"))
    assert os.listdir(tmp_path) == ["m.pt"]  # no temporary file left behind
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3 and raw["class_names"] == ["a", "b"] and raw["torch_version"] == str(torch.__version__)
    assert "git_revision" in raw and raw["config"]["batch_size"] == 64
    other = tiny(seed=1)
    other.load_state_dict(load_checkpoint(path)["model_state"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))

    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, tiny(seed=2), epoch=4)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.pt"]


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)


def test_fit_by_model_name_writes_checkpoints_that_load_model_rebuilds(data, tmp_path):
    train, val = data
    tracker = _Recorder()
    result = fit("exp3_cnn", train, val, TrainConfig(epochs=1, batch_size=32, max_steps_per_epoch=1, device="cpu"),
                 run_dir=tmp_path, tracker=tracker)
    assert result.best_checkpoint == tmp_path / "best.pt" and result.last_checkpoint == tmp_path / "last.pt"
    rebuilt = load_model(result.best_checkpoint)
    assert rebuilt.registry_name == "exp3_cnn" and not rebuilt.training
    a, b = result.model.state_dict(), rebuilt.state_dict()
    assert all(torch.equal(a[k].cpu(), b[k]) for k in a)
    assert tracker.steps == [1] and tracker.summary["best_epoch"] == 1
    assert tracker.artifacts == [(tmp_path / "best.pt", "exp3_cnn-best", "model")]


class _Recorder:
    def __init__(self):
        self.steps, self.summary, self.artifacts = [], None, []

    def log(self, metrics, step=None):
        self.steps.append(step)

    def log_summary(self, summary):
        self.summary = summary

    def log_artifact(self, path, name, type):
        self.artifacts.append((path, name, type))


def test_overfit_check_reaches_full_accuracy_and_leaves_model_alone(data):
    (images, labels), _ = data
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = overfit_check(model, images, labels, n=20, max_steps=300, lr=3e-3)
    assert result["reached"] and result["accuracy"] == 1.0 and result["steps"] < 300
    assert len(result["losses"]) == result["steps"] and result["losses"][-1] < result["losses"][0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_evaluate_predict_logits_and_flip_tta(data):
    _, (images, labels) = data
    model = tiny().eval()
    out = evaluate(model, (images, labels), batch_size=16)
    assert out["logits"].shape == (64, 7) and out["preds"].shape == (64,) and out["labels"].shape == (64,)
    assert 0.0 <= out["accuracy"] <= 1.0 and math.isfinite(out["loss"])
    logits = predict_logits(model, images, batch_size=16)
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert torch.allclose(logits, out["logits"], atol=1e-5)
    flipped = predict_logits(model, images[:, :, ::-1].copy())
    tta = predict_logits(model, images, tta="flip")  # the softmax of image and mirror, averaged
    assert torch.allclose(tta.softmax(1), (logits.softmax(1) + flipped.softmax(1)) / 2, atol=1e-5)
    assert not torch.allclose(tta, logits)


def test_progress_modes(monkeypatch, data, capsys):
    monkeypatch.delenv("FER_LIB_PROGRESS")
    assert progress_mode(True) == "plain"  # pytest is not an interactive Jupyter
    assert progress_mode(False) == "off"
    monkeypatch.setenv("FER_LIB_PROGRESS", "bar")
    assert progress_mode(True) == "bar"
    monkeypatch.setenv("FER_LIB_PROGRESS", "plain")
    monkeypatch.setattr(EpochProgress, "plain_interval", 0.0)  # a step line every step
    train, val = data
    fit(tiny(), train, val, TrainConfig(**CFG))
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and "\r" not in printed and "Widget" not in printed
    assert lines[0].startswith("epoch 1/2 loss ") and " | val loss " in lines[0] and "img/s" in lines[0]
    assert "  epoch 1/2 step 4/4 loss " in printed


def test_balancing_options_and_schedulers_run(data):
    train, val = data
    images, labels = train
    keep = (labels != 1) | (torch.arange(len(labels)).numpy() < 40)  # make class 1 rare-ish
    skewed = (images[keep], labels[keep])
    config = TrainConfig(epochs=2, batch_size=32, device="cpu", upsample=True, class_weights=True,
                         augment=["RandomHorizontalFlip", {"name": "FlaggedBrightness"}], scheduler="cosine",
                         warmup_epochs=1, max_steps_per_epoch=3, tta="flip", grad_clip=1.0, label_smoothing=0.1)
    result = fit(tiny(), skewed, val, config)
    # cosine with a 1-epoch (3-step) warmup: epoch 1 starts at lr/3, epoch 2 at the peak
    assert [r["lr"] for r in result.history] == pytest.approx([1e-3 / 3, 1e-3])
    plateau = fit(tiny(), train, val, TrainConfig(epochs=4, batch_size=32, device="cpu", scheduler="plateau",
                                                  plateau_patience=0, plateau_factor=0.5, lr=1e-2,
                                                  weighted_sampling=True, optimizer="sgd", nesterov=True))
    lrs = [r["lr"] for r in plateau.history]
    assert lrs == sorted(lrs, reverse=True)
    assert all(math.log2(1e-2 / lr) == pytest.approx(round(math.log2(1e-2 / lr))) for lr in lrs)


def test_class_weights_weight_the_loss_as_computed_by_hand(data):
    from fer_lib.augment import to_float
    from fer_lib.balance import class_weights

    images, labels = data[0]
    model = tiny(dropout=0.0)
    with torch.no_grad():
        model.head.weight.mul_(30)  # confident, unequal predictions: per-class losses differ
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # one full batch, lr 0 (the weights stay as they are), fp32, no augmentation
    config = TrainConfig(epochs=1, batch_size=len(labels), lr=0.0, device="cpu", precision="fp32",
                         channels_last=False, class_weights=True)
    result = fit(model, (images, labels), None, config)
    reference = tiny(dropout=0.0)
    reference.load_state_dict(before)
    reference.train()  # the engine's forward: BatchNorm on batch statistics
    with torch.no_grad():
        logits = reference(to_float(torch.as_tensor(images)))
    weight = class_weights(labels, num_classes=7)
    by_hand = torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels).long(), weight=weight)
    unweighted = torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels).long())
    assert result.history[0]["train_loss"] == pytest.approx(float(by_hand), rel=1e-5)
    assert abs(float(by_hand) - float(unweighted)) > 0.01  # the weights really change this loss


def test_upsampling_trains_every_class_at_the_majority_count(data):
    import numpy as np

    images, labels = data[0]
    counts = np.bincount(labels, minlength=7)
    config = TrainConfig(epochs=1, batch_size=16, device="cpu", upsample=True)
    result = fit(tiny(), (images, labels), None, config)
    present = int((counts > 0).sum())
    expected = present * int(counts.max())  # every present class repeated up to the largest one
    # all batches of the epoch but a final batch of one image (dropped, see steps_per_epoch)
    assert result.history[0]["images"] == expected - (1 if expected % 16 == 1 else 0)
    assert expected > len(labels)


# ---- faults: one run folder per training, resume only what can be continued, best from memory

_HOLD_FOLDER = """
import sys, time, torch
from torch import nn
from fer_lib.synthetic import make_images
from fer_lib.training import TrainConfig, fit

class Slow(nn.Module):  # slow enough that the parent acts while this run trains
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(48 * 48, 7)
    def forward(self, x):
        time.sleep(0.05)
        return self.head(x.flatten(1))

fit(Slow(), make_images(64, seed=0), None, TrainConfig(epochs=1000, batch_size=32, device="cpu", progress=False),
    run_dir=sys.argv[1])
"""


def test_a_second_training_into_the_same_run_folder_is_refused(data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from fer_lib.training import RunFolderBusyError

    run_dir = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", _HOLD_FOLDER, str(run_dir)])
    try:
        deadline = time.monotonic() + 60
        while not ((run_dir / "last.pt").exists() or time.monotonic() > deadline):
            time.sleep(0.1)  # the child holds the folder from before its first epoch
        assert (run_dir / ".lock").read_text() == str(child.pid)
        with pytest.raises(RunFolderBusyError, match=rf"in use by another training \(process {child.pid}\)"):
            fit(tiny(), *data, TrainConfig(**CFG), run_dir=run_dir)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # the lock died with its process: the folder is free again, no stale lock to clean
    assert fit(tiny(), *data, TrainConfig(**CFG), run_dir=run_dir).best_checkpoint == run_dir / "best.pt"


class _OverwriteBest:
    """A tracker that, like another process, writes other weights to best.pt during the run."""

    def __init__(self, path, model):
        self.path, self.model = path, model

    def log(self, row, step=None):
        save_checkpoint(self.path, self.model, epoch=99)

    def log_summary(self, values):
        pass

    def log_artifact(self, path, name, type):
        pass


def test_fit_returns_the_model_it_trained_not_what_is_on_disk(data, tmp_path):
    intruder = tiny(seed=42)
    result = fit(tiny(), *data, TrainConfig(**CFG), run_dir=tmp_path,
                 tracker=_OverwriteBest(tmp_path / "best.pt", intruder))
    ours, theirs = result.model.state_dict(), intruder.state_dict()
    assert not torch.equal(ours["head.weight"], theirs["head.weight"])
    again = fit(tiny(), *data, TrainConfig(**CFG))  # the same run without a folder
    assert all(torch.equal(ours[k], again.model.state_dict()[k]) for k in ours)


def test_resume_refuses_a_longer_one_cycle_schedule_before_training(data, tmp_path):
    from fer_lib.training import ResumeError

    fit(tiny(), *data, TrainConfig(**{**CFG, "scheduler": "onecycle"}), run_dir=tmp_path)
    before = load_checkpoint(tmp_path / "last.pt")
    with pytest.raises(ResumeError, match=r"last\.pt: the onecycle schedule was built for epochs=2, this call asks 3"):
        fit(tiny(), *data, TrainConfig(**{**CFG, "scheduler": "onecycle", "epochs": 3}), run_dir=tmp_path,
            resume=True)
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == before["epoch"] == 2  # nothing trained


def test_resume_with_more_epochs_continues_a_run_without_a_per_step_schedule(data, tmp_path):
    fit(tiny(), *data, TrainConfig(**CFG), run_dir=tmp_path)
    longer = fit(tiny(), *data, TrainConfig(**{**CFG, "epochs": 3}), run_dir=tmp_path, resume=True)
    assert [row["epoch"] for row in longer.history] == [1, 2, 3]


def test_resume_refuses_another_model_or_other_data_naming_the_file(data, tmp_path):
    from fer_lib.training import ResumeError

    train, val = data
    fit("exp1_mlp", train, val, TrainConfig(**CFG), run_dir=tmp_path)
    with pytest.raises(ResumeError, match=r"last\.pt holds a 'exp1_mlp' run; this call trains 'exp3_cnn'"):
        fit("exp3_cnn", train, val, TrainConfig(**CFG), run_dir=tmp_path, resume=True)
    from fer_lib.models import create_model

    with pytest.raises(ResumeError, match=r"last\.pt does not fit this model \(exp1_mlp\)"):
        fit(create_model("exp1_mlp", hidden_dim=32), train, val, TrainConfig(**CFG), run_dir=tmp_path, resume=True)
    with pytest.raises(ResumeError, match=r"last\.pt was trained on other data \(training images: 128 then, 64 now\)"):
        fit("exp1_mlp", val, val, TrainConfig(**CFG), run_dir=tmp_path, resume=True)



def test_one_cycle_with_a_single_warm_up_step_trains(data):
    """2 epochs x 2 steps at pct_start 0.25: one warm-up step, which made torch's OneCycleLR
    divide by zero; the run trains with a two-step warm-up instead."""
    config = TrainConfig(**{**CFG, "scheduler": "onecycle", "pct_start": 0.25, "lr": 0.1,
                            "max_steps_per_epoch": 2, "optimizer": "sgd"})
    result = fit(tiny(), *data, config)
    assert [row["epoch"] for row in result.history] == [1, 2]
    # starts at peak / 25 (torch's div_factor), peaks after step 2, epoch 2 begins annealing
    assert result.history[0]["lr"] == pytest.approx(0.1 / 25)
    assert 0.1 / 25 < result.history[1]["lr"] < 0.1


def test_on_epoch_end_runs_before_last_checkpoint_and_its_stop_keeps_the_epoch(data, tmp_path):
    """A resume never starts after an epoch whose callback did not finish; an exception the
    callback raises to stop the run propagates, with that epoch's last.pt written."""
    seen = []

    class Stop(RuntimeError):
        pass

    def callback(row, model):
        last = tmp_path / "last.pt"
        seen.append(load_checkpoint(last)["epoch"] if last.exists() else None)
        if row["epoch"] == 2:
            raise Stop("budget")

    with pytest.raises(Stop, match="budget"):
        fit(tiny(), *data, TrainConfig(**{**CFG, "epochs": 3}), run_dir=tmp_path, on_epoch_end=callback)
    assert seen == [None, 1]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
