"""One policy driving one optimizer's learning rates: the per-step logic every backend shares.

Per optimizer step a backend calls :meth:`PolicyDriver.advance`, which does (policy protocol,
``scaling_plugins.policies.base``):

    L, T  = backend.reduced_norms()                 the step's reduced numbers, read with one host sync
    loss  = backend.reduced_loss(loss)              the mean training loss over ranks (policies that use it)
    policy.step(StepObservation(GradientSample(L, T, n), loss))
    for each param group: group["lr"] = policy.learning_rate(group["initial_lr"])

and the backend then steps the optimizer. A backend keeps only what is specific to its engine: where the
numbers ride (``reduced_norms``, ``all_reduce_mean``) and when the step happens.

The base learning rate of each param group is the group's own ``initial_lr`` (the key torch's LR schedulers
keep it under), set from the group's ``lr`` the first time the driver sees the group; a group added to the
optimizer after attach follows the policy from its first step, and a second driver on the same optimizer
starts from the same base rates instead of the first driver's scaled ones.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch

from ..policies import build_policy
from ..policies.base import StepObservation
from ..policies.registry import PolicySpec
from ..stats import GradientSample

LOSS_REDUCTIONS = ("mean", "sum")
INITIAL_LR = "initial_lr"


def check_loss_reduction(loss_reduction: str) -> None:
    """``ValueError`` unless ``loss_reduction`` is one of ``LOSS_REDUCTIONS``."""
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")


def check_accumulation_steps(accumulation_steps: Any) -> None:
    """``ValueError`` unless ``accumulation_steps`` is an int ≥ 1."""
    if not (isinstance(accumulation_steps, int) and not isinstance(accumulation_steps, bool)
            and accumulation_steps >= 1):
        raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")


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
    acc = accumulation_steps
    if loss_reduction == "mean":
        local_sq_mean *= acc * acc
    else:
        mean_sq_norm /= acc * acc
    return GradientSample(local_sq_sum=local_sq_mean * world_size, mean_sq_norm=mean_sq_norm,
                          count=world_size * acc)


def torch_all_reduce_mean(value: torch.Tensor, group: Any = None) -> float:
    """The mean over the ranks of ``group`` (torch.distributed) of a one-element tensor, in float64."""
    import torch.distributed as dist

    total = value.detach().to(torch.float64).reshape(1).clone()
    dist.all_reduce(total, group=group)
    return total.item() / dist.get_world_size(group)


class PolicyDriver:
    """Steps one policy once per optimizer step and sets every param group's learning rate from it.

    Subclasses (one per engine) provide :meth:`reduced_norms` and :meth:`all_reduce_mean`, and say in
    ``backward_hint`` and ``loss_hint`` how their users hand over gradients and the loss.
    """

    backward_hint: ClassVar[str] = "call loss.backward() before the optimizer step"
    loss_hint: ClassVar[str] = "pass the loss to the step"

    def __init__(self, optimizer: torch.optim.Optimizer, policy: PolicySpec, world_size: int,
                 accumulation_steps: int = 1, loss_reduction: str = "mean") -> None:
        check_accumulation_steps(accumulation_steps)
        check_loss_reduction(loss_reduction)
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.loss_reduction = loss_reduction
        self.world_size = world_size
        self.policy = build_policy(policy)
        self.policy.configure(world_size, accumulation_steps)
        self.apply_learning_rate()

    # -- what each engine provides --------------------------------------------------------------------------
    def reduced_norms(self) -> Optional[tuple[float, float]]:
        """(mean over ranks of Σ_micro-batches ‖g‖² as measured, ‖reduced gradient‖²) of this step, or None
        when no gradients were reduced since the last step; resets for the next step."""
        raise NotImplementedError

    def all_reduce_mean(self, value: torch.Tensor) -> float:
        """The mean over this driver's ranks of a one-element tensor."""
        raise NotImplementedError

    def reduced_loss(self, loss: Optional[torch.Tensor | float]) -> float:
        """This step's training loss, averaged over ranks (one 1-element all-reduce)."""
        if loss is None:
            raise ValueError(f"policy {self.policy.name!r} uses the training loss: {self.loss_hint}")
        return self.all_reduce_mean(torch.as_tensor(loss, dtype=torch.float64).detach().reshape(1))

    # -- per step -------------------------------------------------------------------------------------------
    def advance(self, loss: Optional[torch.Tensor | float] = None) -> None:
        """Fold this optimizer step's statistics (and loss) into the policy and set this step's learning rates."""
        gradients = self._gradient_sample() if self.policy.needs_gradient_norms else None
        mean_loss = self.reduced_loss(loss) if self.policy.needs_loss else None
        self.policy.step(StepObservation(gradients=gradients, loss=mean_loss))
        self.apply_learning_rate()

    def _gradient_sample(self) -> GradientSample:
        reduced = self.reduced_norms()
        if reduced is None:
            raise RuntimeError(f"no gradients were reduced since the last step: {self.backward_hint}")
        local_sq_mean, mean_sq_norm = reduced
        return accumulation_sample(local_sq_mean, mean_sq_norm, self.world_size, self.accumulation_steps,
                                   self.loss_reduction)

    def resize(self, world_size: int, accumulation_steps: Optional[int] = None) -> None:
        """Follow a new world size (Horovod Elastic) or accumulation: the policy's scale follows; estimates carry
        over."""
        if accumulation_steps is None:
            accumulation_steps = self.accumulation_steps
        if (world_size, accumulation_steps) != (self.policy.world_size, self.policy.accumulation_steps):
            self.policy.configure(world_size, accumulation_steps)
        self.world_size, self.accumulation_steps = world_size, accumulation_steps

    def apply_learning_rate(self) -> None:
        """lr = policy.learning_rate(initial lr) for every param group visible now (a new group's initial lr is
        its lr when first seen; ZeRO-1/2 show DeepSpeed's basic optimizer only the group it is stepping)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.policy.learning_rate(group.setdefault(INITIAL_LR, group["lr"]))

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
        return {"policy": self.policy.state_dict(),
                "base_lrs": [group.get(INITIAL_LR, group["lr"]) for group in self.optimizer.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = self.optimizer.param_groups
        if len(state["base_lrs"]) != len(groups):
            raise ValueError(f"the checkpoint has initial lrs for {len(state['base_lrs'])} param groups, the "
                             f"optimizer has {len(groups)}")
        self.policy.load_state_dict(state["policy"])
        for group, initial_lr in zip(groups, state["base_lrs"]):
            group[INITIAL_LR] = initial_lr
        self.apply_learning_rate()
