"""The benchmarks' models: ``mlp``, a 10.5M-parameter MLP of 8 parameter tensors (1024-2048-2048-2048-16), and
``many``, a residual MLP of 48 blocks (Linear + LayerNorm) and a head: 194 parameter tensors and 3.2M parameters
(the shape of real models, which have hundreds of tensors).

``model_and_widths(name)`` gives (model, input width, output width) for ``--model mlp`` or ``--model many``.
"""
from __future__ import annotations

import torch

WIDTHS = (1024, 2048, 2048, 2048, 16)
BLOCKS, WIDTH, OUT = 48, 256, 16
MODELS = ("mlp", "many")


def build_model() -> torch.nn.Module:
    """The 8-tensor MLP."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for width_in, width_out in zip(WIDTHS, WIDTHS[1:]):
        layers += [torch.nn.Linear(width_in, width_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


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
