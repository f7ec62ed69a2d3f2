"""Handwritten digits: scikit-learn's bundled 8×8 images (1,797 of them, nothing downloaded), a small CNN.

The validation split is a fixed 20% (drawn once with a fixed generator, the same for every training seed),
so runs with different seeds are scored on the same images.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .base import Workload

VALIDATION_FRACTION = 0.2
SPLIT_SEED = 20240607


class DigitsCNN(nn.Module):
    """conv(1→16) → conv(16→32) → max-pool → 64 hidden → 10 classes, for 1×8×8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * 4 * 4, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.out(F.relu(self.hidden(x.flatten(1))))


class Digits(Workload):
    """10-way classification of scikit-learn's digits (pixel values scaled to [0, 1])."""

    name = "digits"
    micro_batch_size = 8
    base_lr = 0.02
    momentum = 0.9
    default_budget = 1600

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError("the digits workload needs scikit-learn: pip install 'scaling_plugins[demo]'") from err
        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
        num_val = int(len(labels) * VALIDATION_FRACTION)
        val, train = order[:num_val], order[num_val:]
        self.train_x, self.train_y = images[train], labels[train]
        self.val_x, self.val_y = images[val], labels[val]

    def build_model(self) -> nn.Module:
        return DigitsCNN()

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def correct(self, output: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
        return (output.argmax(dim=1) == target).sum()
