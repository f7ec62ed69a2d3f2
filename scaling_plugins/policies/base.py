"""The protocol every learning-rate policy follows, so one policy works in every backend.

Per optimizer step a backend does, in this order:

    policy.step(StepObservation(gradients=GradientSample(L, T, n) or None, loss=loss or None))
    for each param group: group["lr"] = policy.learning_rate(group's base lr)
    optimizer.step()

``step`` folds this step's numbers in, fixes this step's learning rate and advances progress. A step the
engine skips (fp16 overflow) is not shown to the policy at all, so the policy does not advance.
Backends call ``configure(world_size, accumulation_steps)`` once at attach time, and again when the world
size changes (Horovod Elastic).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from ..stats import GradientSample


@dataclass(frozen=True)
class StepObservation:
    """What a backend saw in one optimizer step: reduced gradient norms (when the policy asked for them)
    and the training loss (the all-reduced mean, when the caller passed one)."""

    gradients: Optional[GradientSample] = None
    loss: Optional[float] = None


class Policy(ABC):
    """A learning-rate policy: a multiplier or an absolute learning rate per optimizer step, with state."""

    name: ClassVar[str]
    needs_gradient_norms: ClassVar[bool] = False
    needs_loss: ClassVar[bool] = False

    def __init__(self) -> None:
        self.world_size = 1
        self.accumulation_steps = 1
        self.steps = 0

    def configure(self, world_size: int, accumulation_steps: int) -> None:
        """Learn the run's shape: n = world_size × accumulation_steps gradients per optimizer step."""
        if world_size < 1 or accumulation_steps < 1:
            raise ValueError(
                f"world_size and accumulation_steps must be >= 1, got {world_size!r}, {accumulation_steps!r}")
        self.world_size, self.accumulation_steps = int(world_size), int(accumulation_steps)

    @abstractmethod
    def step(self, observation: StepObservation) -> None:
        """Fold in one optimizer step and fix its learning rate; advances progress."""

    @abstractmethod
    def learning_rate(self, base_lr: float) -> float:
        """The learning rate of the current step for a param group whose configured rate is ``base_lr``."""

    @property
    def progress(self) -> float:
        """Progress in base-scale steps (scale-invariant for AdaScale); plain step count otherwise."""
        return float(self.steps)

    @property
    def gain(self) -> float:
        return 1.0

    @property
    def done(self) -> bool:
        return False

    def metrics(self) -> dict[str, Any]:
        """Numbers for the step's telemetry record."""
        return {"gain": self.gain, "progress": self.progress}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "world_size": self.world_size, "accumulation_steps": self.accumulation_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.world_size = int(state["world_size"])
        self.accumulation_steps = int(state["accumulation_steps"])
