"""Mixed-precision loss scaling (``torch.amp.GradScaler``) around a driven optimizer step.

With a scaler the user calls ``scaler.scale(loss).backward()``, so every harvested gradient is s·g for the
scale s in force during that backward: L and T come out s² too large and are divided by s² (read before the
scaler updates it), so the statistics are in true units. ``scaler.unscale_`` then divides the reduced
gradients by s and records whether any is inf/NaN. The gradients are already all-reduced at that point, so an
overflow on any one rank's gradients shows on every rank alike: every rank skips the same steps.
"""
from __future__ import annotations

from typing import Any

import torch


def check_grad_scaler(grad_scaler: Any) -> None:
    """``ValueError`` unless ``grad_scaler`` is a ``torch.amp.GradScaler`` that is enabled."""
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise ValueError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    if not grad_scaler.is_enabled():
        raise ValueError("grad_scaler is disabled (enabled=False): pass grad_scaler=None instead")


def unscale_and_find_overflow(grad_scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Unscale the optimizer's gradients in place; True when one of them is inf or NaN (the scaler's step then
    skips ``optimizer.step()``). Reads the per-device flags ``unscale_`` records (torch 2.x)."""
    grad_scaler.unscale_(optimizer)
    flags = grad_scaler._found_inf_per_device(optimizer)
    return any(flag.item() > 0 for flag in flags.values())
