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
import torch.nn.functional as F
from torch import Tensor

# The quintic iteration's coefficients from the Muon write-up: chosen so that singular values
# in (0, 1] are pushed towards ~1 quickly rather than exactly (5 steps suffice).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximately U V^T for matrix = U S V^T (singular values end near 1, within about
    0.7..1.2, which is all the update needs). dtype: where the iterations run; bf16 uses a
    CPU's or GPU's matrix units (the Muon write-up runs them in bf16) at ~0.02 from fp32."""
    return orthogonalize_many([matrix], steps, eps, dtype)[0]


def orthogonalize_many(matrices: list[Tensor], steps: int = 5, eps: float = 1e-7,
                       dtype: torch.dtype = torch.float32, pad: bool = False) -> list[Tensor]:
    """`orthogonalize` of each matrix, the iterations batched: one batched product per step
    for all matrices of one shape (tall ones are turned wide first).

    pad: zero-pad every matrix to the largest rows and columns and run them as ONE batch.
    That is exact (a zero row or column of x stays zero through x x^T and every iteration,
    and the norm is per matrix), so it only trades arithmetic for fewer kernel launches:
    what a GPU wants, where a training step of these small nets is bounded by launches
    (docs/speed.md); on a CPU the padding's extra arithmetic costs more than it saves.
    """
    if not matrices:
        return []
    a, b, c = NS_COEFFICIENTS
    wide = [m.to(dtype) for m in matrices]
    tall = [m.shape[0] > m.shape[1] for m in wide]
    wide = [m.T if t else m for m, t in zip(wide, tall)]
    groups: dict[tuple[int, int], list[int]] = {}
    if pad:
        rows, cols = max(m.shape[0] for m in wide), max(m.shape[1] for m in wide)
        groups[(rows, cols)] = list(range(len(wide)))
    else:
        for index, m in enumerate(wide):
            groups.setdefault(tuple(m.shape), []).append(index)
    out: list[Tensor | None] = [None] * len(wide)
    for (rows, cols), indices in groups.items():
        parts = [wide[i] if wide[i].shape == (rows, cols)
                 else F.pad(wide[i], (0, cols - wide[i].shape[1], 0, rows - wide[i].shape[0])) for i in indices]
        x = parts[0] if len(parts) == 1 else torch.stack(parts)  # a lone matrix stays 2-D: plain mm
        # singular values <= 1, where the iteration converges
        x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)
        for _ in range(steps):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
        for slot, index in enumerate(indices):
            r, k = wide[index].shape
            result = x if x.ndim == 2 else x[slot]
            result = result if (r, k) == (rows, cols) else result[:r, :k]
            out[index] = (result.T if tall[index] else result).to(matrices[index].dtype)
    return out  # type: ignore[return-value]


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update of each `orthogonalize` parameter is orthogonalised.

    Per parameter group: lr, momentum, nesterov, weight_decay, orthogonalize (bool), ns_steps,
    ns_dtype (the Newton-Schulz iterations' dtype, default float32).
    Weight decay is decoupled (p *= 1 - lr * wd) for orthogonalised parameters and coupled, as
    in torch.optim.SGD, for the others. An orthogonalised update of an (rows x cols) matrix is
    scaled by sqrt(max(1, rows / cols)), so tall and wide layers move alike.

    A step is a handful of `torch._foreach_*` calls per group and one batched Newton-Schulz
    (`orthogonalize_many`, zero-padded into a single batch on CUDA) instead of a Python loop
    of ~55 operations per conv weight and ~5 per other tensor: the loop was about half of a
    training step on a GPU, where each operation is a kernel launch (docs/speed.md).
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
            params = [p for p in group["params"] if p.grad is not None]
            orthogonal = [group["orthogonalize"] and p.ndim >= 2 for p in params]
            for flag in (False, True):
                chosen = [p for p, o in zip(params, orthogonal) if o is flag]
                if chosen:
                    self._update(group, chosen, orthogonal=flag)
        return loss

    def _update(self, group: dict[str, Any], params: list[Tensor], *, orthogonal: bool) -> None:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        buffers = []
        for param, grad in zip(params, grads):
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad)
            buffers.append(state["momentum_buffer"])
        if decay and not orthogonal:  # torch SGD's (coupled) decay
            grads = torch._foreach_add(grads, params, alpha=decay)
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        updates = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
        if orthogonal:
            matrices = [u.reshape(u.shape[0], -1) for u in updates]
            updates = orthogonalize_many(matrices, group["ns_steps"], dtype=group["ns_dtype"],
                                         pad=params[0].device.type == "cuda")
            scales = [max(1.0, m.shape[0] / m.shape[1]) ** 0.5 for m in matrices]
            updates = [u.view_as(p) for u, p in zip(torch._foreach_mul(updates, scales), params)]
            if decay:  # decoupled: the update's size does not carry it
                torch._foreach_mul_(params, 1 - lr * decay)
        torch._foreach_add_(params, updates, alpha=-lr)
