"""Does LoFT recover AdamW at full rank? splice's LoFT and, when given, the reference code
(tnurbek/loft's `LoFTAdamW`), each against torch's AdamW on the same full-rank factorisation.

The spec (volume-2 §5) found with a numpy emulation that the reference's update order (A
processed first, so B's gradient is rescaled with the freshly updated A) and its RᵀVR
conjugation match AdamW only for betas (0, 0). This runs the reference code itself, unmodified,
from a local copy (`--reference DIR`, the folder that holds `loft_optim/`; it is not a
dependency of splice and is never downloaded here):

    git --git-dir=<mirror of tnurbek/loft> archive HEAD loft_optim | tar -x -C /tmp/loftref
    .venv/bin/python bench/loft_reference_order.py --reference /tmp/loftref

W = B A (m = n = r, no frozen base, scale 1 as the reference assumes, no weight decay: the
reference's decay omits the learning rate), a tanh regression loss, 30 steps, lr 0.005, eps
1e-8 and 1e-2 (the reference's own sanity check uses 1e-2: with a tiny eps and beta2 = 0,
AdamW divides by the current |G|, which float32 rounding near G_ij = 0 turns into noise).
splice runs in float64 and float32, the reference in float32 (it keeps its second moments in
float32 whatever the parameters' dtype, and fails on float64 ones). The number is the largest
relative gap of W from AdamW's W over the steps. Writes bench/results/loft_reference_order.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common_report import write_results  # noqa: E402

from splice.optim import LoFT  # noqa: E402
from splice.optim.loft import FactorPair  # noqa: E402

BETAS = [(0.0, 0.0), (0.9, 0.0), (0.0, 0.999), (0.9, 0.999)]
SIZE, STEPS, LR = 6, 30, 0.005
EPSILONS = (1e-8, 1e-2)


class Factorised(nn.Module):
    """W = B A with the parameter names the reference code looks for (lora_A / lora_B .weight)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.lora_A = nn.Linear(A.shape[1], A.shape[0], bias=False, dtype=A.dtype)
        self.lora_B = nn.Linear(B.shape[1], B.shape[0], bias=False, dtype=B.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(A)
            self.lora_B.weight.copy_(B)

    def weight(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight


def problem(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(SIZE, 3 * SIZE, generator=g, dtype=dtype)
    Y = torch.tanh(torch.randn(SIZE, 3 * SIZE, generator=g, dtype=dtype))
    A = torch.eye(SIZE, dtype=dtype) + 0.3 * torch.randn(SIZE, SIZE, generator=g, dtype=dtype)
    B = 0.5 * torch.eye(SIZE, dtype=dtype) + 0.2 * torch.randn(SIZE, SIZE, generator=g, dtype=dtype)
    return X, Y, A, B


def loss(W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(W @ X) - Y).pow(2).mean()


def gap(betas: tuple[float, float], make: str, reference_cls: type | None, dtype: torch.dtype, eps: float) -> float:
    """Largest relative difference of W from AdamW's W over the trajectory, in `dtype`."""
    X, Y, A, B = problem(dtype)
    W = nn.Parameter(B @ A)
    adamw = torch.optim.AdamW([W], lr=LR, betas=betas, eps=eps, weight_decay=0.0)
    model = Factorised(A, B)
    if make == "splice":
        optimizer = LoFT(LoFT.groups([FactorPair(model.lora_A.weight, model.lora_B.weight, 1.0)]), lr=LR,
                         betas=betas, eps=eps, damping=1e-14)
    else:
        optimizer = reference_cls(model.parameters(), lr=LR, betas=betas, eps=eps, weight_decay=0.0, model=model)
    worst = 0.0
    start = W.detach().clone()
    for _ in range(STEPS):
        adamw.zero_grad()
        loss(W, X, Y).backward()
        adamw.step()
        optimizer.zero_grad()
        loss(model.weight(), X, Y).backward()
        optimizer.step()
        worst = max(worst, float((W - model.weight()).norm() / (W - start).norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, help="folder holding the reference code's loft_optim/")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reference_cls = None
    if args.reference is not None:
        sys.path.insert(0, str(args.reference))
        from loft_optim.optimizer import LoFTAdamW as reference_cls  # noqa: N813
    runs = {"splice float64": ("splice", torch.float64), "splice float32": ("splice", torch.float32)}
    if reference_cls is not None:  # its second moments are float32 tensors whatever the parameters' dtype
        runs["reference float32"] = ("reference", torch.float32)
    makes = list(runs)
    rows = [{"betas": list(betas), "eps": eps, **{name: gap(betas, runs[name][0], reference_cls, runs[name][1], eps)
                                                  for name in makes}} for eps in EPSILONS for betas in BETAS]
    lines = ["| eps | betas | " + " | ".join(f"{m}: gap" for m in makes) + " |", "|---|---|" + "---|" * len(makes)]
    lines += [f"| {row['eps']:g} | {tuple(row['betas'])} | " + " | ".join(f"{row[m]:.1e}" for m in makes) + " |"
              for row in rows]
    markdown = "\n".join([
        "# LoFT against AdamW at full rank",
        "",
        f"W = B A, {SIZE} x {SIZE} at rank {SIZE}, {STEPS} steps, lr {LR}, no weight decay; "
        "the largest relative gap of W from torch AdamW's W over the steps (`bench/loft_reference_order.py`).",
        "",
        *lines,
    ])
    result = {"rows": rows, "steps": STEPS, "lr": LR, "size": SIZE}
    write_results(args.out_dir, "loft_reference_order", result, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
