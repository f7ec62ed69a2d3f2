"""One policy driving one optimizer's learning rates: the engine-independent half of a backend.

A backend harvests its engine's reduced numbers and hands them to :meth:`PolicyDriver.observe`, which
follows the policy protocol (``scaling_plugins.policies.base``):

    policy.step(StepObservation(gradients=GradientSample(L, T, n) or None, loss=mean loss or None))
    for each param group: group["lr"] = policy.learning_rate(that group's initial lr)

and the backend then steps the optimizer.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..policies import build_policy
from ..policies.base import StepObservation
from ..policies.registry import PolicySpec
from ..stats import GradientSample

LOSS_REDUCTIONS = ("mean", "sum")


def accumulation_sample(local_sq_mean: float, mean_sq_norm: float, world_size: int, accumulation_steps: int,
                        loss_reduction: str) -> GradientSample:
    """The step's ``GradientSample`` from the all-reduced numbers of ``world_size`` workers.

    local_sq_mean: (1/W)·Σ_workers Σ_micro-batches ‖g‖² of each micro-batch's gradient as measured;
    mean_sq_norm: ‖accumulated, worker-averaged gradient‖². With A = accumulation_steps and
    n = W·A micro-batch gradients g_i (AdaScale, Johnson et al., ICML 2020):

    - ``"mean"`` (each micro-batch loss divided by A): each measured gradient is g_i/A and the
      accumulated average is ḡ, so L = W·A²·local_sq_mean and T = mean_sq_norm;
    - ``"sum"`` (micro-batch losses summed): each measured gradient is g_i and the accumulated average
      is A·ḡ, so L = W·local_sq_mean and T = mean_sq_norm/A².
    """
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
    acc = accumulation_steps
    if loss_reduction == "mean":
        local_sq_mean *= acc * acc
    else:
        mean_sq_norm /= acc * acc
    return GradientSample(local_sq_sum=local_sq_mean * world_size, mean_sq_norm=mean_sq_norm,
                          count=world_size * acc)


class PolicyDriver:
    """Steps ``policy`` once per optimizer step and sets every param group's learning rate from it."""

    def __init__(self, optimizer: torch.optim.Optimizer, policy: PolicySpec, world_size: int,
                 accumulation_steps: int = 1, loss_reduction: str = "mean") -> None:
        if not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.loss_reduction = loss_reduction
        self.world_size = world_size
        self.policy = build_policy(policy)
        self.policy.configure(world_size, accumulation_steps)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.apply_learning_rate()

    def resize(self, world_size: int, accumulation_steps: Optional[int] = None) -> None:
        """Follow a new world size (Horovod Elastic) or accumulation: the policy's scale follows; estimates carry
        over."""
        if accumulation_steps is None:
            accumulation_steps = self.accumulation_steps
        if (world_size, accumulation_steps) != (self.policy.world_size, self.policy.accumulation_steps):
            self.policy.configure(world_size, accumulation_steps)
        self.world_size, self.accumulation_steps = world_size, accumulation_steps

    def observe(self, gradients: Optional[GradientSample], loss: Optional[float]) -> None:
        """Fold this step into the policy and set this step's learning rates."""
        self.policy.step(StepObservation(gradients=gradients, loss=loss))
        self.apply_learning_rate()

    def apply_learning_rate(self) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.policy.learning_rate(base_lr)

    # -- what users read ------------------------------------------------------------------------------------
    @property
    def gain(self) -> float:
        return self.policy.gain

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def progress(self) -> float:
        return self.policy.progress

    @property
    def scale(self) -> float:
        return getattr(self.policy, "scale", float(self.world_size * self.accumulation_steps))

    @property
    def done(self) -> bool:
        return self.policy.done

    def metrics(self) -> dict[str, Any]:
        """The step's telemetry numbers: step, learning rate and the policy's own (gain, progress, σ², ...)."""
        return {"step": self.policy.steps, "lr": self.lr, **self.policy.metrics()}

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.base_lrs = list(state["base_lrs"])
        self.apply_learning_rate()
