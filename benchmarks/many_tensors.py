"""The benchmarks' many-tensor model: a residual MLP of 48 blocks (Linear + LayerNorm) and a head, 194 parameter
tensors and 3.2M parameters (issue 14's second model), beside benchmarks/overhead.py's 8-tensor MLP.

``model_and_widths(name)`` gives (model, input width, output width) for ``--model mlp`` or ``--model many``.
"""
from __future__ import annotations

import torch

from benchmarks.overhead import WIDTHS, build_model

BLOCKS, WIDTH, OUT = 48, 256, 16
MODELS = ("mlp", "many")


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm = torch.nn.Linear(WIDTH, WIDTH), torch.nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.linear(x)))


def build_many_tensor_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(Block() for _ in range(BLOCKS)), torch.nn.Linear(WIDTH, OUT))


def model_and_widths(name: str) -> tuple[torch.nn.Module, int, int]:
    if name == "mlp":
        return build_model(), WIDTHS[0], WIDTHS[-1]
    if name == "many":
        return build_many_tensor_model(), WIDTH, OUT
    raise ValueError(f"--model must be one of {MODELS}, got {name!r}")
