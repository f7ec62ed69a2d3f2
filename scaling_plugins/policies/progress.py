"""Policies that count progress in base-scale steps and set the learning rate as a factor of the base rate.

AdaScale (τ advances by the gain r_t) and the fixed scaling rules (τ advances by k) share this shape:

    lr_t = base_lr · factor_t,      τ_{t+1} = τ_t + increment_t,      done once τ ≥ total_num_steps

where τ is measured in steps of the base batch B0 the schedule was tuned at (Johnson et al., ICML 2020).
"""
from __future__ import annotations

from typing import Any, Optional

from ..state_check import Entry, number
from .base import Policy


class BaseScaleProgress(Policy):
    """τ, this step's factor and the budget, with their state; subclasses decide factor and increment."""

    def __init__(self, total_num_steps: Optional[float] = None) -> None:
        super().__init__()
        if total_num_steps is not None and not total_num_steps > 0:
            raise ValueError(f"total_num_steps must be > 0, got {total_num_steps!r}")
        self.total_num_steps = total_num_steps
        self._progress = 0.0
        self._factor = 1.0

    def advance(self, factor: float, increment: float) -> None:
        """Fix this step's factor, then move τ on by ``increment`` base-scale steps."""
        self._factor = factor
        self._progress += increment
        self.steps += 1

    def learning_rate(self, base_lr: float) -> float:
        return base_lr * self._factor

    @property
    def progress(self) -> float:
        return self._progress

    @property
    def done(self) -> bool:
        return self.total_num_steps is not None and self._progress >= self.total_num_steps

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "progress": self._progress, "factor": self._factor}

    def state_layout(self) -> dict[str, Entry]:
        return {**super().state_layout(), "progress": number(minimum=0), "factor": number()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._progress = float(state["progress"])
        self._factor = float(state["factor"])
