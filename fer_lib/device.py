"""Where and how training runs: device, autocast precision, memory format, progress output.

`resolve_device` is the one place these choices are made, so notebooks, the training loop,
the bench and evaluation agree. Measured with torch 2.14.1:

- 2-core Intel Xeon with avx512_bf16 and AMX: bf16 autocast roughly doubles conv training speed (10M-param
  VGG 87 -> 200 img/s) and channels_last helps (small CNN 850 -> 1,800 img/s at batch 64).
- 2-core AMD EPYC (Zen 4) with avx512_bf16 but no AMX: bf16 autocast trains 1.3-1.6x
  faster than fp32 (bench, engine path: fernet_small 572 -> 751 img/s, exp3_cnn 812 -> 1,276;
  2048x2048 matmul 191 -> 406 GFLOP/s), less than with AMX but still a gain, so "auto" picks
  bf16 on avx512_bf16 alone on that CPU.
- 2-core Intel Xeon (family 6 model 207) whose hypervisor hides AMX, avx512_bf16 alone:
  bf16 autocast trains 1.2-1.4x SLOWER than fp32 (bench, engine path: fernet_small 367 vs
  490 img/s, fernet 114 vs 162; 2048x2048 matmul 82 vs 284 GFLOP/s), so "auto" keeps fp32
  on Intel CPUs without AMX (cpu_bf16_is_faster).
- 2-core AMD EPYC with AVX2 only (no avx512_bf16/AMX): bf16 autocast is emulated, exp3_cnn
  training step 8x SLOWER than fp32 (2.05 s vs 0.25 s per batch of 64, 1 thread, busy
  machine), so "auto" keeps fp32 there; channels_last + fused Adam still help (0.25 s vs
  0.32 s for contiguous + default Adam).
- torch.compile on that CPU: 40 s to compile exp3_cnn's training step, then 0.75-0.9x the
  eager speed. On a 2-core Xeon with avx512_bf16 + AMX (bf16 autocast, channels_last, batch
  128): 57 s to compile fernet_small's step, then 0.66x the eager speed (741 vs 1,130 img/s).
  Hence compile is honoured on CUDA only.
- Freed memory kept in the process (keep_freed_cpu_memory, glibc): on a 2-core AMD EPYC
  (Zen 3, AVX2 only) one fit epoch of fast_fp32 at 48x48 took 92 s instead of 102 s; on a
  2-core Xeon with AMX (bf16) a 48x48 epoch of fast_cpu ran at 1,423 against 1,273 img/s.
- A CPU without bf16 can be timed on one with it: ATEN_CPU_CAPABILITY=avx2
  ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 limit torch's, oneDNN's and MKL's
  kernels to AVX2; "auto" then picks fp32, and machine_description names the limit. On the
  2-core Xeon this halves the fp32 matmul peak (434 -> 241 GFLOP/s) and fernet_small trains
  at 492 instead of 778 img/s.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

__all__ = ["DeviceSetup", "resolve_device", "cpu_has_bf16", "cpu_bf16_is_faster", "cpu_bf16_units",
           "cpu_isa_limits", "machine_description", "keep_freed_cpu_memory", "progress_mode", "EpochProgress"]

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DeviceSetup:
    """device; amp_dtype (None = fp32); channels_last; compile (torch.compile, CUDA only)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
        return self.amp_dtype == torch.float16

    def autocast(self):
        """Context manager: autocast to amp_dtype on this device, or nothing for fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> str:
        flags = (" channels_last" if self.channels_last else "") + (" compiled" if self.compile else "")
        return f"{self.device} {self.precision}{flags}"


def _cpuinfo(key: str) -> str | None:
    """The value of the first `key` line of /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# Environment variables that make torch's CPU kernels (ATen), oneDNN's (convolutions) and
# MKL's (matmuls) use fewer instructions than the CPU has, e.g. to time an AVX2-only machine
# on an AVX-512 one.
ISA_LIMIT_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# oneDNN instruction sets below its bf16 ones (AVX512_CORE_BF16, AMX): bf16 is emulated there
_ONEDNN_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}
# /proc/cpuinfo flags of native bf16 matmul instructions, and their names in machine lines
_BF16_FLAGS = {"avx512_bf16": "avx512_bf16", "amx_bf16": "AMX"}


def cpu_isa_limits() -> dict[str, str]:
    """The ISA_LIMIT_VARIABLES set in this process's environment (empty: all of the CPU is used)."""
    return {name: os.environ[name] for name in ISA_LIMIT_VARIABLES if os.environ.get(name)}


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (avx512_bf16 or AMX) and they are
    not switched off by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA (see cpu_isa_limits)."""
    limits = cpu_isa_limits()
    if limits.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_WITHOUT_BF16:
        return False
    if limits.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"):
        return False
    flags = _cpuinfo("flags")
    if flags is not None:
        return bool(set(flags.split()) & _BF16_FLAGS.keys())
    # no /proc (macOS, Windows): ask oneDNN, which checks the same instructions
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@lru_cache(maxsize=1)
def cpu_bf16_is_faster() -> bool:
    """True when bf16 autocast trains faster than fp32 on this CPU: "auto" precision's test.

    Native bf16 instructions (cpu_has_bf16) are not enough. Measured with the bench on 2-core
    VMs, torch 2.14.1 (2048^3 matmul GFLOP/s bf16 / fp32; training img/s bf16 / fp32):
    - Intel Xeon with AMX: 2,458 / 434; fernet_small ~2x faster in bf16.
    - AMD EPYC (Zen 4), avx512_bf16 without AMX: 406 / 191; 1.3-1.6x faster in bf16.
    - Intel Xeon (family 6 model 207) whose hypervisor hides AMX, avx512_bf16 alone: 82 / 284;
      fernet_small 367 / 490, fernet 114 / 162, exp3_cnn 609 / 703: fp32 1.2-1.4x FASTER.
    Intel cores run avx512_bf16's dot products no faster than fp32 FMAs, so bf16 only adds
    conversions there; Zen 4 doubles its throughput with them. Hence bf16 needs AMX on an
    Intel CPU and avx512_bf16 on others (an ONEDNN_MAX_CPU_ISA below AMX takes AMX away).
    """
    if not cpu_has_bf16():
        return False
    flags = _cpuinfo("flags")
    if flags is None:  # no /proc: oneDNN said yes, and there is nothing finer to go on
        return True
    onednn_limit = cpu_isa_limits().get("ONEDNN_MAX_CPU_ISA", "").upper()
    if "amx_bf16" in flags.split() and (not onednn_limit or "AMX" in onednn_limit):
        return True
    return _cpuinfo("vendor_id") != "GenuineIntel"


def machine_description() -> str:
    """One line naming the hardware a figure came from (GPU name, or CPU model and cores)."""
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    # platform.processor() is often empty on Linux; /proc/cpuinfo has the model name
    cpu = _cpuinfo("model name") or platform.processor() or platform.machine()
    limits = cpu_isa_limits()
    limited = (" limited by " + " ".join(f"{k}={v}" for k, v in limits.items()) + " to") if limits else ""
    kernels = f"{torch.backends.cpu.get_cpu_capability()} kernels"
    return f"{cpu} CPU, {os.cpu_count()} cores,{limited} {kernels}, {cpu_bf16_units()}, torch {torch.__version__}"


def cpu_bf16_units() -> str:
    """Which bf16 instructions the CPU's training uses: "bf16 via avx512_bf16 + AMX",
    "bf16 via avx512_bf16", "bf16 via avx512_bf16 unused (fp32 faster)" (cpu_bf16_is_faster
    says no: "auto" trains in fp32), or "no bf16" (none, or switched off by cpu_isa_limits).

    Two CPUs with the same kernel level ("AVX512 kernels") can differ here, e.g. a Xeon with
    AMX and an AMD EPYC (Zen 4) with avx512_bf16 alone, and their bf16 speeds differ with it
    (docs/measurements.md), so every figure's machine line names the units.
    """
    if not cpu_has_bf16():
        return "no bf16"
    flags = set((_cpuinfo("flags") or "").split())
    units = [name for flag, name in _BF16_FLAGS.items() if flag in flags]
    unused = "" if cpu_bf16_is_faster() else " unused (fp32 faster)"
    return "bf16 via " + (" + ".join(units) or "oneDNN") + unused


def _has_conv(model: nn.Module | None) -> bool:
    if model is None:
        return True
    return any(isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Conv3d)) for m in model.modules())


def resolve_device(
    device: str | torch.device = "auto",
    precision: str = "auto",
    channels_last: str | bool = "auto",
    *,
    compile: str | bool = False,
    model: nn.Module | None = None,
) -> DeviceSetup:
    """Decide device, autocast dtype, channels_last and torch.compile in one place.

    device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1" or a torch.device.
    precision: "auto" (bf16 on CPUs where it trains faster than fp32, see cpu_bf16_is_faster,
        and on CUDA GPUs with bf16, fp16 on older GPUs, else fp32), "fp32", "bf16" or "fp16".
    channels_last: "auto" (on for conv nets: `model` None or containing a Conv layer), bool.
    compile: torch.compile the model; honoured on CUDA only ("auto" = off: compiling costs
        minutes on a fresh machine and a C++ toolchain on CPU).
    """
    if isinstance(device, torch.device):
        dev = device
    elif device in (None, "auto"):
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch.cuda.is_available() is False")

    if precision in (None, "auto"):
        if dev.type == "cuda":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif dev.type == "cpu":
            amp_dtype = torch.bfloat16 if cpu_bf16_is_faster() else None
        else:
            amp_dtype = None
    elif precision in _PRECISIONS:
        amp_dtype = _PRECISIONS[precision]
    else:
        raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if amp_dtype == torch.float16 and dev.type == "cpu":
        raise ValueError("precision 'fp16' is for CUDA; on CPU use 'bf16' or 'fp32'")

    if channels_last in (None, "auto"):
        use_cl = dev.type in ("cpu", "cuda") and _has_conv(model)
    else:
        use_cl = bool(channels_last)

    use_compile = compile is True and dev.type == "cuda"
    return DeviceSetup(device=dev, amp_dtype=amp_dtype, channels_last=use_cl, compile=use_compile)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# The heap's free top is given back to the kernel only above this (2 GiB - 1, mallopt's int).
_TRIM_THRESHOLD = 2**31 - 1


@lru_cache(maxsize=1)
def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of giving it back.

    A CPU training step allocates and frees the same large activation and gradient buffers
    every batch (fernet_small at batch 128: 19-38 MB each). By default glibc serves blocks
    above its mmap threshold (at most 32 MB) with fresh mmaps and unmaps them when freed, and
    trims the heap's free top; so each step the kernel maps and zeroes those pages again, one
    page fault per 4 KB. On a 2-core AMD EPYC VM (Zen 3, AVX2, fp32) a new 38 MB tensor took
    20 ms against 5 ms with freed memory kept; fast_fp32's training step ran at 344 against
    240 img/s (one process, the two settings alternating), and one fit epoch at 48x48 took
    92 s against 102 s (docs/measurements.md). Here mmap is switched off (large blocks come
    from the heap too) and the heap is trimmed only above 2 GiB free, so the process keeps
    its peak memory until it exits.

    Process-wide and applied once (the Engine calls it for CPU training). Returns True when
    applied (Linux with glibc), False where there is no glibc mallopt (nothing is changed).
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


# --------------------------------------------------------------------------------------
# progress output


def _parent_is_batch_runner() -> bool:
    """True when the kernel was started by papermill / nbconvert / nbclient (not a person).

    papermill sets no environment variable inside the kernel; the kernel's parent process
    (JPY_PARENT_PID, set by jupyter_client) is the runner, so look at its command line.
    """
    pid = os.environ.get("JPY_PARENT_PID")
    if not pid:
        return False
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace").lower()
    except (OSError, ValueError):
        return False
    return any(name in cmdline for name in ("papermill", "nbconvert", "nbclient", "pytest"))


def _interactive_jupyter() -> bool:
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return False
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False
    try:
        import ipywidgets  # noqa: F401  (tqdm.auto needs it for a widget bar)
    except ImportError:
        return False
    return not _parent_is_batch_runner()


def progress_mode(progress: bool | str = True) -> str:
    """"bar" (tqdm widget, interactive Jupyter only), "plain" (text lines) or "off".

    Env FER_LIB_PROGRESS=plain|bar|off overrides. Anything but an interactive Jupyter with
    ipywidgets (papermill, CI, scripts, logs) gets plain lines: widgets in an executed
    notebook store their state in the file, and carriage-return bars garble logs.
    """
    if progress is False or progress == "off":
        return "off"
    env = os.environ.get("FER_LIB_PROGRESS", "").strip().lower()
    if env in ("plain", "bar", "off"):
        return env
    if progress in ("plain", "bar"):
        return progress
    if os.environ.get("CI"):
        return "plain"
    return "bar" if _interactive_jupyter() else "plain"


class EpochProgress:
    """Per-epoch progress: a tqdm.auto bar (interactive Jupyter) or a text line every ~30 s."""

    plain_interval = 30.0  # seconds between "plain" step lines inside an epoch

    def __init__(self, mode: str, epoch: int, epochs: int, steps: int):
        self.mode, self.epoch, self.epochs, self.steps = mode, epoch, epochs, steps
        self.bar = None
        self.start = self.last_line = time.perf_counter()
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False)

    def update(self, step: int, n: int, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        elif self.mode == "plain" and loss is not None:
            now = time.perf_counter()
            if now - self.last_line >= self.plain_interval:
                self.last_line = now
                print(f"  epoch {self.epoch}/{self.epochs} step {step}/{self.steps} loss {loss:.3f} "
                      f"({now - self.start:.0f}s)", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
