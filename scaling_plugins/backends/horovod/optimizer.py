"""A drop-in ``hvd.DistributedOptimizer`` whose learning rate follows a policy.

    import scaling_plugins.backends.horovod as sph
    opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), policy="AdaScale")

The returned object *is* Horovod's optimizer (same class, same methods) with members added in place (Horovod's
methods call ``super(self.__class__, self)``, so its class cannot be subclassed): ``step()`` feeds the policy
before the update, each gradient's all-reduce goes through the carrier (``harvest``), ``opt.scaling`` is the
driver and ``state_dict()`` carries the policy state under ``"scaling_plugins"``. On a rank outside
``process_set`` it is Horovod's local optimizer with the same members and the policy not driven
(:class:`~.driver.InactiveDriver`). A state without the entry (a plain Horovod or torch optimizer's) loads with a
fresh policy and one warning. docs/horovod.md.
"""
from __future__ import annotations

import abc
import contextlib
import inspect
import logging
import math
from typing import Any, Callable, Optional

import torch

from ...policies import build_policy
from ...policies.registry import PolicySpec
from ...user_warnings import warn_user
from ..shared.driver import INITIAL_LR, check_loss_reduction, initial_lr
from . import compat
from .compat import horovod_torch
from .driver import HorovodDriver, InactiveDriver
from .elastic import register_state_handler

log = logging.getLogger(__name__)

STATE_KEY = "scaling_plugins"
READ_THROUGH = ("gain", "lr", "progress", "scale", "done", "extra_backward",
                "accumulation_steps")   # opt.<name> reads opt.scaling.<name>


class ScaledOptimizer(abc.ABC):
    """Marker type: ``isinstance(opt, ScaledOptimizer)`` is true for optimizers made by :func:`DistributedOptimizer`."""


class _ScaledMembers:
    """What :func:`DistributedOptimizer` adds to the class Horovod built for one optimizer."""

    def synchronize(self) -> None:
        """Horovod's ``synchronize()``, with the norm all-reduce (enqueued here if backward did not) and T."""
        carrier = self.scaling.carrier
        if carrier is not None:
            carrier.before_synchronize()
        self._horovod_synchronize()
        if carrier is not None:
            carrier.after_synchronize(self)

    def step(self, closure: Optional[Callable[[], float]] = None, loss: Optional[torch.Tensor | float] = None) -> Any:
        """Synchronize, feed the policy, set this step's learning rates, then Horovod's step (the update)."""
        synchronize_here = compat.synchronizes_in_step(self)
        if synchronize_here:
            self.synchronize()
        self.scaling.observe_step(loss)
        with self.skip_synchronize() if synchronize_here else contextlib.nullcontext():
            result = self._horovod_step(closure)
        self.scaling.follow_batch_request()
        return result

    def _allreduce_grad_async(self, p: torch.Tensor) -> tuple[Any, Any]:
        carrier = self.scaling.carrier
        return self._horovod_allreduce_grad_async(p) if carrier is None else carrier.allreduce_gradient(self, p)

    def _grouped_allreduce_grad_async(self, params: tuple) -> tuple[Any, tuple]:
        carrier = self.scaling.carrier
        if carrier is None:
            return self._horovod_grouped_allreduce_grad_async(params)
        return carrier.grouped_allreduce(self, params)

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Horovod's ``set_backward_passes_per_step``; the policy's n (and default scale) follows."""
        self._horovod_set_backward_passes_per_step(passes)
        self.scaling.resize(self.scaling.world_size, passes)

    def metrics(self) -> dict[str, Any]:
        """The step's telemetry numbers: step, learning rate and the policy's own (gain, progress, σ², ...)."""
        return self.scaling.metrics()


def _save_scaling_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    state[STATE_KEY] = optimizer.scaling.state_dict()
    return state


def _load_scaling_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """The policy state from the ``"scaling_plugins"`` entry; a state without it (a plain Horovod or torch
    optimizer's) loads with the policy left as it is, each group's saved lr taken as its initial lr, and one
    warning. Outside the process set each group keeps the learning rate the user set (the saved ``lr`` may be a
    policy's)."""
    driver = optimizer.scaling
    state = dict(state)
    if STATE_KEY not in state:
        warn_user(f"the optimizer state has no {STATE_KEY!r} entry (saved by a plain Horovod or torch optimizer): "
                  f"the optimizer state is loaded and policy {driver.policy.name!r} is left as it was (fresh); to "
                  "restore a policy state saved separately, call opt.scaling.load_state_dict(policy_state) after "
                  "this")
        if driver.active:           # the saved lr is the group's initial lr; the policy sets lr from it
            groups = []
            for group in state["param_groups"]:
                base = initial_lr(group)
                groups.append({**group, INITIAL_LR: base, "lr": driver.policy.learning_rate(base)})
            state["param_groups"] = groups
        return state
    scaling_state = state.pop(STATE_KEY)
    driver.load_state_dict(scaling_state)
    if not driver.active:
        state["param_groups"] = [{**group, "lr": base_lr}
                                 for group, base_lr in zip(state["param_groups"], scaling_state["base_lrs"])]
    return state


def _extend(optimizer: torch.optim.Optimizer, driver: HorovodDriver | InactiveDriver) -> None:
    """Add the policy to the optimizer Horovod made: its class gets ``_ScaledMembers``, the optimizer its driver
    (``opt.scaling``) and the state hooks that carry the policy state in ``state_dict()``."""
    compat.extend_optimizer_class(optimizer, _ScaledMembers, READ_THROUGH, ScaledOptimizer)
    optimizer.scaling = driver
    optimizer.register_state_dict_post_hook(_save_scaling_state)
    optimizer.register_load_state_dict_pre_hook(_load_scaling_state)


def check_plain_optimizer(optimizer: Any) -> None:
    """``TypeError`` for an optimizer that is already distributed (ours, or ``hvd.DistributedOptimizer``'s):
    Horovod would wrap it a second time and fail with a ``TypeError`` about missing positional arguments."""
    if isinstance(optimizer, ScaledOptimizer):
        raise TypeError(f"the optimizer passed is already a scaling_plugins DistributedOptimizer (class "
                        f"{type(optimizer).__name__}, policy {optimizer.scaling.policy.name!r}): pass the plain torch "
                        "optimizer, once, e.g. sph.DistributedOptimizer(torch.optim.SGD(...), ...)")
    if compat.is_horovod_optimizer(optimizer):
        raise TypeError(f"the optimizer passed is already wrapped by hvd.DistributedOptimizer (class "
                        f"{type(optimizer).__name__}): pass the plain torch optimizer, e.g. "
                        "sph.DistributedOptimizer(torch.optim.SGD(...), ...), which wraps it with "
                        "hvd.DistributedOptimizer itself and takes the same arguments")


def DistributedOptimizer(optimizer: torch.optim.Optimizer, *args: Any, policy: PolicySpec = "AdaScale",
                         loss_reduction: str = "mean", **kwargs: Any):
    """``hvd.DistributedOptimizer(optimizer, *args, **kwargs)`` whose learning rate follows ``policy``.

    Args:
        optimizer, *args, **kwargs: every argument of ``hvd.DistributedOptimizer``, same names and defaults
            (``op`` must be ``hvd.Average`` or ``hvd.Sum``); ``optimizer`` is the plain torch optimizer (one
            already wrapped by ``hvd.DistributedOptimizer`` or by this function is refused).
        policy: a registered name (``scaling_plugins.POLICIES``), ``{"type": name, "params": {...}}`` or a Policy;
            its scale defaults to workers × ``backward_passes_per_step``.
        loss_reduction: "mean" (each pass's loss divided by ``backward_passes_per_step``) or "sum".

    Returns:
        Horovod's optimizer with the policy added: ``opt.step(loss=None)`` sets this step's learning rate before
        the update; ``opt.scaling`` is the driver; ``opt.gain``, ``opt.lr``, ``opt.done``, ``opt.metrics()``;
        ``opt.state_dict()`` carries the policy state; ``opt.load_state_dict()`` also takes a plain Horovod or
        torch optimizer's state (the policy starts fresh; one warning). Inside ``process_set`` the policy follows
        the set's reduced gradients (world size = the set's size). On a rank outside it this is Horovod's local
        optimizer with the same members, the policy not driven: ``step()`` (``loss=`` accepted) uses the
        learning rates the user set, ``opt.scaling.active`` is False, ``opt.metrics()`` has only ``lr`` and
        ``accumulation_steps``, and no collective is made there.

    Example::

        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), policy="AdaScale")
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    """
    hvd = horovod_torch()
    check_plain_optimizer(optimizer)           # before Horovod builds anything; the same on every rank
    signature = inspect.signature(hvd.DistributedOptimizer)
    try:
        bound = signature.bind(optimizer, *args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{err}; allowed: hvd.DistributedOptimizer's arguments {list(signature.parameters)} "
                        "and policy, loss_reduction") from None
    bound.apply_defaults()
    hvd_args = bound.arguments
    if hvd_args["op"] not in (hvd.Average, hvd.Sum):
        op_name = next((name for name in ("Adasum", "Min", "Max", "Product") if getattr(hvd, name) == hvd_args["op"]),
                       hvd_args["op"])
        raise ValueError(f"op=hvd.{op_name} is not supported (allowed: hvd.Average, hvd.Sum): the policies set the "
                         "learning rate of the averaged gradient, and Adasum (or min/max/product) does not average, "
                         "so AdaScale's gain has no meaning there")
    check_loss_reduction(loss_reduction)
    predivide = hvd_args["gradient_predivide_factor"]
    if not (isinstance(predivide, (int, float)) and math.isfinite(predivide) and predivide > 0):
        raise ValueError(f"gradient_predivide_factor must be a finite number > 0, got {predivide!r}")
    process_set = hvd_args["process_set"]
    if process_set.included() is None:         # never registered: the same on every rank
        raise ValueError(f"process_set {process_set} is not registered with Horovod: pass it to "
                         "hvd.init(process_sets=[...]) or hvd.add_process_set(...) on every rank first")
    policy = build_policy(policy)              # bad policy input fails before Horovod registers hooks
    distributed = hvd.DistributedOptimizer(**hvd_args)
    passes = hvd_args["backward_passes_per_step"]
    if process_set.included():
        driver = HorovodDriver(distributed, policy, passes, hvd_args["gradient_predivide_factor"], process_set,
                               loss_reduction)
    else:                                      # Horovod steps locally here; no collective of ours either
        driver = InactiveDriver(distributed, policy, passes, process_set)
        log.info("rank %d is outside process_set %s: Horovod steps locally here and policy %r is not driven "
                 "(learning rates as set)", hvd.rank(), process_set.ranks, driver.policy.name)
    _extend(distributed, driver)
    register_state_handler(ScaledOptimizer)
    return distributed
