"""Export a model to ONNX, check the export against PyTorch, and time both on the CPU.

The ONNX graph takes the same input as the PyTorch model: normalised float32
(batch, in_chans, 48, 48), named "input", and returns raw logits (batch, num_classes) named
"logits"; preprocessing (pixel / 255, then (x - mean) / std) stays outside the graph. The
class names and normalisation are stored in the model's metadata_props when metadata is given
(`export_onnx(..., metadata=meta)` with the dict from `fer_lib.weights_io.load_weights`), so a
deployment needs the .onnx file only.

Exporter: the TorchScript-based exporter (`dynamo=False`) first: it needs no onnxscript, takes
~0.2 s for a small CNN and writes one self-contained file. It is deprecated since torch 2.9,
so if it fails (or is removed) the torch.export-based exporter (`dynamo=True`, needs
onnxscript, ~6 s) is used instead.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fer_lib.augment import MEAN, STD
from fer_lib.fileio import atomic_path
from fer_lib.inference import predict_logits, to_model_input

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Opsets torch's exporters accept (torch 2.14: 7-23) and ONNX Runtime runs (7 and up); an
# opset outside is refused before exporting. Old opsets may still fail for a given model
# (an operator without a definition there): that is one ValueError naming the file.
MIN_OPSET = 7
MAX_OPSET = 23


def _first_conv_in_chans(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 1


def _export_legacy(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
                   dynamic_batch: bool) -> None:
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # The deprecation notice of the TorchScript exporter is expected: we choose it on
        # purpose and fall back to the dynamo exporter when it goes away.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=dynamic_axes, do_constant_folding=True)


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
                   dynamic_batch: bool) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=max(opset, 18),
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes=dynamic_shapes, external_data=False, verbose=False)


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: int = 48,
                opset: int = 17, dynamic_batch: bool = True,
                metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` (fp32, eval mode, CPU) as ONNX to `path` atomically; return the path.

    dynamic_batch: any batch size at run time (else batch 1 only). metadata: the weights
    metadata dict; class names, normalisation, input size and model name go into the ONNX
    file's metadata_props as JSON strings. The caller's model is not modified (a CPU fp32
    copy is exported).
    """
    import copy

    import onnx

    path = Path(path)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"{path}: ONNX opset must be {MIN_OPSET}-{MAX_OPSET}, got {opset}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Export a CPU fp32 copy: the caller's model may live on a GPU, in bf16 or in train mode.
    export_model = copy.deepcopy(model).float().cpu().eval()
    example = torch.zeros(2 if dynamic_batch else 1, _first_conv_in_chans(export_model),
                          input_size, input_size)
    with atomic_path(path) as tmp:
        try:
            _export_legacy(export_model, example, tmp, opset, dynamic_batch)
        except Exception as legacy_error:  # noqa: BLE001 - any failure: try the other exporter
            warnings.warn(f"TorchScript ONNX export failed ({legacy_error}); retrying with "
                          "dynamo=True", RuntimeWarning, stacklevel=2)
            _export_dynamo(export_model, example, tmp, opset, dynamic_batch)
        onnx_model = onnx.load(str(tmp))
        try:
            onnx.checker.check_model(onnx_model)
        except onnx.checker.ValidationError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(f"{path}: the model exported at opset {opset} is not valid ONNX "
                             f"({first_line}); try a newer opset such as 17") from exc
        if metadata:
            props = {
                "class_names": metadata.get("class_names"),
                "normalization": metadata.get("normalization"),
                "input_size": metadata.get("input_size", input_size),
                "model": metadata.get("model"),
                "metrics": metadata.get("metrics"),
            }
            for key, value in props.items():
                if value is not None:
                    entry = onnx_model.metadata_props.add()
                    entry.key, entry.value = key, json.dumps(value)
            onnx.save(onnx_model, str(tmp))
    return path


def _session(onnx_path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Match torch's thread count so the latency comparison is like for like.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), sess_options=options,
                                providers=["CPUExecutionProvider"])


def check_onnx_parity(model: nn.Module, onnx_path: str | os.PathLike, faces_uint8: torch.Tensor | np.ndarray, *,
                      mean: float | list[float] = MEAN, std: float | list[float] = STD,
                      input_size: int | None = None) -> float:
    """Max abs logit difference between fer_lib's inference path and onnxruntime on uint8 faces.

    The PyTorch side is `fer_lib.inference.predict_logits` (CPU, fp32, no TTA): the path every
    reported accuracy and the photo predictor use. The ONNX model gets the same normalised input.
    """
    import copy

    reference = copy.deepcopy(model).float().cpu().eval()
    faces = torch.as_tensor(np.asarray(faces_uint8))
    if faces.dim() == 3:
        faces = faces.unsqueeze(1)
    prepare = dict(mean=mean, std=std, input_size=input_size, in_chans=_first_conv_in_chans(reference))
    expected = predict_logits(reference, faces, device="cpu", **prepare).numpy()
    x = to_model_input(faces, **prepare).numpy()
    got = _session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    if got.shape != expected.shape:
        raise ValueError(f"{onnx_path}: ONNX output shape {got.shape} != PyTorch "
                         f"{expected.shape}")
    return float(np.abs(got - expected).max())


def benchmark_latency(model: nn.Module, onnx_path: str | os.PathLike, n: int = 200, *,
                      batch_size: int = 1, input_size: int = 48, warmup: int = 10,
                      threads: int | None = None) -> dict[str, float]:
    """Median CPU latency per face of PyTorch and onnxruntime (figures, not a test).

    batch_size=1 is the webcam case (one face per call). Uses torch.get_num_threads()
    threads for both unless `threads` is given. The median of n calls resists the noise of a
    shared machine better than the mean.
    """
    import copy

    if threads is not None:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        cpu_model = copy.deepcopy(model).float().cpu().eval()
        x = torch.randn(batch_size, _first_conv_in_chans(cpu_model), input_size, input_size,
                        generator=torch.Generator().manual_seed(0))
        session = _session(onnx_path, threads)
        feed = {INPUT_NAME: x.numpy()}

        def timed(fn) -> float:
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(n):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return float(np.median(times)) * 1000.0 / batch_size

        with torch.inference_mode():
            torch_ms = timed(lambda: cpu_model(x))
        ort_ms = timed(lambda: session.run([OUTPUT_NAME], feed))
        return {"torch_ms_per_face": torch_ms, "onnxruntime_ms_per_face": ort_ms,
                "batch_size": batch_size, "n": n, "threads": threads or torch.get_num_threads()}
    finally:
        if threads is not None:
            torch.set_num_threads(previous_threads)
