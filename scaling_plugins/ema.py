"""The EMA scaling rule: keep a model EMA right when the batch grows.

Busbridge, Ramapuram, Ablin, Likhomanenko, Dhekane, Suau & Webb, "How to Scale Your EMA" (NeurIPS 2023):
an EMA of the model, θ̄ ← ρ·θ̄ + (1 − ρ)·θ, tuned with momentum ρ at base batch B0, keeps its dynamics at
batch κ·B0 when the momentum becomes

    ρ_κ = ρ^κ

(each large-batch step stands for κ base steps). With AdaScale, a step stands for r_t base steps (its gain),
so κ = r_t step by step: pass ``kappa=driver.gain`` to :meth:`ModelEMA.update`.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch


def scale_ema_momentum(momentum: float, kappa: float) -> float:
    """ρ^κ: the EMA momentum at κ × the base batch for momentum ``momentum`` tuned at the base batch."""
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum (ρ) must lie in [0, 1), got {momentum!r}")
    if not kappa >= 1:
        raise ValueError(f"kappa (κ, the batch multiple) must be >= 1, got {kappa!r}")
    return momentum ** kappa


class ModelEMA:
    """An exponential moving average of a model's parameters, kept alongside training.

    ``momentum`` is ρ as tuned at the base batch; ``kappa`` the batch multiple κ of this run (default 1).
    Each :meth:`update` after an optimizer step applies θ̄ ← ρ^κ·θ̄ + (1 − ρ^κ)·θ to every floating-point
    parameter and copies the buffers (e.g. BatchNorm statistics). ``update(model, kappa=r)`` uses another κ
    for that step, e.g. AdaScale's gain. The average lives in ``self.module`` (a copy of the model).
    """

    def __init__(self, model: torch.nn.Module, momentum: float = 0.999, kappa: float = 1.0) -> None:
        scale_ema_momentum(momentum, kappa)  # validates both
        self.momentum = momentum
        self.kappa = kappa
        self.updates = 0
        self.module = _detached_copy(model)

    def update(self, model: torch.nn.Module, kappa: Optional[float] = None) -> None:
        """Fold in the model's current weights with momentum ρ^κ (κ = ``kappa`` or the configured one)."""
        decay = scale_ema_momentum(self.momentum, self.kappa if kappa is None else kappa)
        with torch.no_grad():
            for average, current in zip(self.module.parameters(), model.parameters()):
                if average.is_floating_point():
                    average.lerp_(current.detach(), 1.0 - decay)
                else:
                    average.copy_(current)
            for average, current in zip(self.module.buffers(), model.buffers()):
                average.copy_(current)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "momentum": self.momentum, "kappa": self.kappa,
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.momentum = float(state["momentum"])
        self.kappa = float(state["kappa"])
        self.updates = int(state["updates"])


def _detached_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` (unwrapped from DDP when wrapped) that never takes gradients."""
    source = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    clone = copy.deepcopy(source)
    for parameter in clone.parameters():
        parameter.requires_grad_(False)
    return clone
