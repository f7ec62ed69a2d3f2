"""A noisy quadratic with known gradient statistics, for exact checks of the estimator and the gain.

Per-sample loss f(w; x) = ½‖w − x‖² with x ~ N(0, ν·I_d): the per-sample gradient is w − x, so in scale-1
units (one sample per base batch) the gradient variance is σ² = d·ν and the squared mean gradient is
μ² = ‖w‖², hence the exact AdaScale gain at scale S is (σ² + μ²)/(σ²/S + μ²). The training "data" is a
fixed draw of ``NUM_TRAIN`` noise vectors; validation draws its own. The model starts at w₀ = 1 (every
coordinate) and the minimiser is w = 0, where the expected loss is ½·d·ν.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Workload

DIMENSION = 16
NOISE_VARIANCE = 1.0
NUM_TRAIN = 16384
NUM_VAL = 4096


class QuadraticModel(nn.Module):
    """A parameter vector w; ``forward(x)`` returns each sample's loss ½‖w − x‖²."""

    def __init__(self, dimension: int, start: float = 1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((dimension,), start))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.w - x).pow(2).sum(dim=1)


class NoisyQuadratic(Workload):
    """Minimise E_x ½‖w − x‖²; ``exact_gain`` gives the gain the estimator should converge to."""

    name = "quadratic"
    micro_batch_size = 1
    base_lr = 0.05
    momentum = 0.0
    default_budget = 800

    def __init__(self, seed: int = 0, dimension: int = DIMENSION, noise_variance: float = NOISE_VARIANCE) -> None:
        super().__init__(seed)
        self.dimension, self.noise_variance = dimension, noise_variance
        generator = torch.Generator().manual_seed(seed)
        std = noise_variance ** 0.5
        self.train_x = torch.randn(NUM_TRAIN, dimension, generator=generator) * std
        self.val_x = torch.randn(NUM_VAL, dimension, generator=generator) * std
        self.train_y = torch.zeros(NUM_TRAIN)
        self.val_y = torch.zeros(NUM_VAL)

    def build_model(self) -> nn.Module:
        return QuadraticModel(self.dimension)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.mean()

    def exact_moments(self, w: torch.Tensor) -> tuple[float, float]:
        """(σ², μ²) at parameters ``w`` in scale-1 units: (d·ν, ‖w‖²)."""
        return self.dimension * self.noise_variance, float(w.detach().double().pow(2).sum())

    def exact_gain(self, w: torch.Tensor, scale: float) -> float:
        """r = (σ² + μ²)/(σ²/S + μ²) at parameters ``w``."""
        sigma_sq, mu_sq = self.exact_moments(w)
        return (sigma_sq + mu_sq) / (sigma_sq / scale + mu_sq)
