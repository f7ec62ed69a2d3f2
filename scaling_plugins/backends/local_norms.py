"""Each micro-batch's own local squared gradient norm, summed over micro-batches, without a host sync.

A tensor hook on every trainable parameter sees that parameter's gradient of the current backward pass
before it is accumulated into ``.grad`` (so before accumulation, before any reduction and before an engine
overwrites it in place) and adds ⟨g, g⟩ to one float64 device scalar. The dot product is taken in the
gradient's own dtype (one read of the gradient, as fast as ``torch.dot``) and accumulated in float64.
"""
from __future__ import annotations

from typing import Iterable

import torch


class LocalNormMeter:
    """Σ over backward passes and parameters of ‖g‖², as a float64 scalar tensor; ``take()`` reads and resets."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        params = [p for p in parameters if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters to measure")
        device = params[0].device
        self._total = torch.zeros((), dtype=torch.float64, device=device)
        for param in params:
            param.register_hook(self._add)

    def _add(self, grad: torch.Tensor) -> None:
        flat = grad.reshape(-1)
        self._total += torch.dot(flat, flat).to(torch.float64)

    def take(self) -> torch.Tensor:
        """The sum so far (a new tensor), then reset to 0 for the next optimizer step."""
        value = self._total.clone()
        self._total.zero_()
        return value


def squared_norm_sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ_t ⟨t, t⟩ as one float64 scalar tensor (per-tensor dot in the tensor's dtype, sum in float64)."""
    total = None
    for tensor in tensors:
        flat = tensor.reshape(-1)
        value = torch.dot(flat, flat).to(torch.float64)
        total = value if total is None else total + value
    if total is None:
        raise ValueError("no gradients to measure")
    return total
