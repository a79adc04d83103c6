"""Muon for convolution weights, written for fer_lib.

Muon (Jordan et al. 2024, the optimizer of the CIFAR-10 and nanoGPT speedruns) replaces each
weight matrix's momentum update by the nearest semi-orthogonal matrix, computed with a few
Newton-Schulz iterations. torch.optim.Muon accepts only 2-D parameters; a conv weight
(out, in, kh, kw) is treated here as the matrix (out, in*kh*kw), the usual flattened-conv
variant. Parameters in a group with `orthogonalize=False` (BatchNorm, biases, the linear head)
get plain SGD with (Nesterov) momentum in the same optimizer, so one scheduler drives both.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

# The quintic iteration's coefficients from the Muon write-up: chosen so that singular values
# in (0, 1] are pushed towards ~1 quickly rather than exactly (5 steps suffice).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximately U V^T for matrix = U S V^T (singular values end near 1, within about
    0.7..1.2, which is all the update needs). dtype: where the iterations run; bf16 uses a
    CPU's or GPU's matrix units (the Muon write-up runs them in bf16) at ~0.02 from fp32."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(dtype)
    x = x / (x.norm() + eps)  # singular values <= 1, where the iteration converges
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update of each `orthogonalize` parameter is orthogonalised.

    Per parameter group: lr, momentum, nesterov, weight_decay, orthogonalize (bool), ns_steps,
    ns_dtype (the Newton-Schulz iterations' dtype, default float32).
    Weight decay is decoupled (p *= 1 - lr * wd) for orthogonalised parameters and coupled, as
    in torch.optim.SGD, for the others. An orthogonalised update of an (rows x cols) matrix is
    scaled by sqrt(max(1, rows / cols)), so tall and wide layers move alike.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, orthogonalize: bool = True, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.float32):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"Muon: invalid lr {lr}, momentum {momentum} or weight_decay {weight_decay}")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "orthogonalize": orthogonalize, "ns_steps": ns_steps, "ns_dtype": ns_dtype}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer's contract
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buffer = state["momentum_buffer"]
                orthogonal = group["orthogonalize"] and param.ndim >= 2
                if group["weight_decay"] and not orthogonal:  # torch SGD's (coupled) decay
                    grad = grad.add(param, alpha=group["weight_decay"])
                buffer.mul_(momentum).add_(grad)
                update = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
                if orthogonal:
                    matrix = update.reshape(update.shape[0], -1)
                    scale = max(1.0, matrix.shape[0] / matrix.shape[1]) ** 0.5
                    update = orthogonalize(matrix, group["ns_steps"], dtype=group["ns_dtype"]).view_as(param) * scale
                    if group["weight_decay"]:  # decoupled: the update's size does not carry it
                        param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr)
        return loss
