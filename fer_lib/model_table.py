"""Size and compute of every model in the zoo: `python -m fer_lib.model_table`.

Prints a markdown table name | source report | parameters | MFLOPs per image and returns it as a
DataFrame from `model_table()`.

Compute is counted, not estimated: forward hooks on every Conv2d and Linear record their
multiply-accumulates (MACs) for one 48x48 image, and MFLOPs = 2 * MACs / 1e6 (one multiply
plus one add per MAC). BatchNorm, activations, pooling and residual additions are not counted:
they are a few percent of the conv/linear work and cost memory bandwidth rather than FLOPs.
"""
from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from fer_lib.models import create_model, list_models, model_info


def forward_flops(model: nn.Module, input_size: int = 48, in_chans: int = 1) -> int:
    """FLOPs of one forward pass of `model` on a (1, in_chans, size, size) input.

    Counted by torch.utils.flop_counter.FlopCounterMode (torch >= 2.1): matmuls and
    convolutions at 2 FLOPs per multiply-accumulate; BatchNorm, activations and pooling are
    not counted (memory-bound, a few percent of the arithmetic). Eval mode, no grad: the
    count does not depend on the mode, and BatchNorm1d cannot run a batch of one in training.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, in_chans, input_size, input_size, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, input_size: int = 48, in_chans: int = 1) -> int:
    """Multiply-accumulates of one (in_chans, size, size) image: half of `forward_flops`."""
    return forward_flops(model, input_size, in_chans) // 2


def model_table(names: list[str] | None = None) -> pd.DataFrame:
    """One row per model (default: all registered): name, source, params, mflops (per 48x48 image).

    params = sum(p.numel()) over all parameters (all are trainable); mflops = 2 * MACs / 1e6.
    """
    rows = []
    for name in names if names is not None else list_models():
        model = create_model(name)
        rows.append({
            "name": name,
            "source": model_info(name)["source"],
            "params": sum(p.numel() for p in model.parameters()),
            "mflops": 2 * count_macs(model) / 1e6,
        })
    return pd.DataFrame(rows, columns=["name", "source", "params", "mflops"])


def to_markdown(table: pd.DataFrame) -> str:
    """The table as GitHub markdown, parameters with thousands separators."""
    from fer_lib.evaluation import to_markdown as frame_to_markdown

    shown = pd.DataFrame({
        "name": table["name"],
        "source report": table["source"],
        "parameters": [f"{p:,}" for p in table["params"]],
        "MFLOPs per image (48x48)": table["mflops"].astype(float),
    })
    return frame_to_markdown(shown, floatfmt=",.1f")


def main(argv: list[str] | None = None) -> int:
    """`python -m fer_lib model-table [--csv]`: print the table (markdown, or CSV)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fer_lib model-table",
                                     description="Parameters and MFLOPs of every registered model.")
    parser.add_argument("--csv", action="store_true", help="print CSV instead of a markdown table")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    table = model_table()
    if args.csv:
        print(table.to_csv(index=False), end="")
        return 0
    print(to_markdown(table))
    print("\nMFLOPs = 2 x multiply-accumulates of Conv2d/Linear layers, one 1x48x48 image.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
