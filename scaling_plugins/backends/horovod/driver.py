"""Horovod's driver: one policy following the reduced gradients of one Horovod ``DistributedOptimizer``.

The numbers ride Horovod's fusion buffer (``harvest.FusionBufferCarrier``); the driver reads them once per step,
feeds the policy and sets the learning rates. ``optimizer.DistributedOptimizer`` builds it; users reach it as
``opt.scaling``. docs/horovod.md.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional

import torch

from ...policies.registry import PolicySpec
from ..shared.driver import (PolicyDriver, PolicyReadings, base_lrs_state, check_accumulation_steps,
                             check_driver_state, optimizer_device, unshared_policy)
from ..shared.fused_norms import ChunkedNormMeter
from . import compat
from .compat import horovod_torch
from .harvest import FusionBufferCarrier

LOSS_NAME = "scaling_plugins.mean_loss"


class HorovodDriver(PolicyDriver):
    """Drives the policy of one Horovod ``DistributedOptimizer`` (``opt.scaling``) from what its carrier harvests.

    Args:
        optimizer: the optimizer ``hvd.DistributedOptimizer`` made.
        policy: a registered name, ``{"type": name, "params": {...}}`` or a Policy.
        backward_passes_per_step: Horovod's accumulation, the policy's n per worker.
        gradient_predivide_factor: Horovod's, applied to the carried sum as to the gradients.
        process_set: the Horovod process set the gradients are reduced over.
        loss_reduction: "mean" or "sum" over the passes of a step.
    """

    active = True           # False for :class:`InactiveDriver` (a rank outside the process set)
    backward_hint = "call loss.backward() before opt.step()"
    loss_hint = "call opt.step(loss=loss)"
    accumulation_name = "backward_passes_per_step"

    def __init__(self, optimizer: torch.optim.Optimizer, policy: PolicySpec, backward_passes_per_step: int,
                 gradient_predivide_factor: float, process_set: Any, loss_reduction: str) -> None:
        super().__init__(optimizer, policy, process_set.size(), backward_passes_per_step, loss_reduction)
        self.hvd = horovod_torch()
        self.process_set = process_set
        if not compat.in_elastic_job():   # elastic workers start at different times: every sync checks instead
            self.agree_across_ranks()
        self.op = compat.reduction_op(optimizer)
        average = self.op == self.hvd.Average
        scale_factors = (1.0 / gradient_predivide_factor, gradient_predivide_factor) if average else (1.0, 1.0)
        self.carrier: Optional[FusionBufferCarrier] = None
        if self.policy.needs_gradient_norms:
            self.carrier = FusionBufferCarrier(optimizer, self.op, scale_factors, process_set,
                                               lambda: self.accumulation_steps)

    def observe_step(self, loss: Optional[torch.Tensor | float]) -> None:
        """Follow the world size, feed the policy this step's statistics (and loss), set the learning rates."""
        self.resize(self.process_set.size())
        self.advance(loss)

    def reduced_norms(self) -> Optional[tuple[float, float]]:
        reduced = self.carrier.take() if self.carrier is not None else None
        if reduced is None:
            return None
        reduced_local, reduced_sq = torch.stack(reduced).tolist()     # the one host sync per step
        if self.op == self.hvd.Sum:           # Sum: Σ over ranks, not the mean
            world = self.world_size
            reduced_local /= world
            reduced_sq /= world * world
        return reduced_local, reduced_sq

    def backward_counter(self) -> Optional[ChunkedNormMeter]:
        return self.carrier.meter if self.carrier is not None else None

    def backward_passes(self) -> Optional[int]:
        """Passes counted by the carrier's end-of-backward callback (policies that measure norms; None otherwise)."""
        return self.carrier.take_passes() if self.carrier is not None else None

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        return self.hvd.allgather(row.reshape(1, -1), name="scaling_plugins.settings", process_set=self.process_set)

    def all_reduce_mean(self, value: torch.Tensor) -> float:
        value = value.detach().to(torch.float64).reshape(1)
        return self.hvd.allreduce(value, op=self.hvd.Average, name=LOSS_NAME, process_set=self.process_set).item()

    def set_accumulation_steps(self, accumulation_steps: int) -> None:
        """Through ``opt.set_backward_passes_per_step`` (Horovod's, then the policy follows)."""
        self.optimizer.set_backward_passes_per_step(accumulation_steps)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.carrier is not None:
            self.carrier.reset()


class InactiveDriver(PolicyReadings):
    """``opt.scaling`` on a rank outside the optimizer's ``process_set``: Horovod steps locally there, so the policy
    is not driven (no collective, the learning rates stay the user's). It holds the policy state only so that
    ``state_dict()``/``load_state_dict()`` round-trip it; ``gain`` and ``scale`` are 1, ``metrics()`` has only
    ``lr`` and ``accumulation_steps``. docs/horovod.md, "Process sets".
    """

    active = False
    carrier = None

    def __init__(self, optimizer: torch.optim.Optimizer, policy: PolicySpec, backward_passes_per_step: int,
                 process_set: Any) -> None:
        check_accumulation_steps(backward_passes_per_step)
        optimizer_device(optimizer)                 # the same refusals as inside the set
        self.optimizer = optimizer
        self.process_set = process_set
        self.world_size = process_set.size()        # the set's, as inside it
        self.accumulation_steps = backward_passes_per_step
        self.policy = unshared_policy(policy)
        self.policy.configure(self.world_size, backward_passes_per_step)
        self.gain = self.scale = 1.0

    def observe_step(self, loss: Optional[torch.Tensor | float]) -> None:
        """Nothing: the policy is not driven outside the set (``loss`` is accepted and ignored)."""

    def follow_batch_request(self) -> None:
        """Nothing: no policy asks for a batch here."""

    def resize(self, world_size: int, accumulation_steps: Optional[int] = None) -> None:
        if accumulation_steps is not None:
            self.accumulation_steps = accumulation_steps

    def extra_backward(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def metrics(self) -> dict[str, Any]:
        """Only what holds outside the set: this rank's learning rate and backward passes per step."""
        return {"lr": self.lr, "accumulation_steps": self.accumulation_steps}

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "base_lrs": base_lrs_state(self.optimizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep the policy state for the next ``state_dict()``; the learning rates are not touched. The whole state
        is checked first, as inside the set (``check_driver_state``)."""
        check_driver_state(state, self.optimizer, self.policy)
        self.policy.load_state_dict(state["policy"])
