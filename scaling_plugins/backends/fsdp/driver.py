"""PyTorch FSDP2's driver: :func:`attach` makes an :class:`FSDPDriver` that sets the learning rate of a
``fully_shard`` model's optimizer from a policy, fed by the carrier of ``harvest`` (one small all-reduce per step).

    model = fully_shard(net)                       # after fully_shard on each block
    driver = scaling_plugins.backends.fsdp.attach(model, optimizer, "AdaScale", accumulation_steps=2)
    for micro_step in range(2):
        (loss_fn(model(x), y) / 2).backward()
    driver.step()                                  # this step's learning rate from the fresh gain, optimizer.step()
    optimizer.zero_grad()

Accumulation, gradient clipping (``driver.clip_grad_norm_``), HSDP and what is refused: docs/fsdp.md.
"""
from __future__ import annotations

import logging
import math
import operator
from functools import reduce
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from ...policies.registry import PolicySpec
from ...stats import GradientSample
from ..shared.driver import PolicyDriver, accumulation_sample, torch_all_gather_rows, torch_all_reduce_mean
from . import compat
from .harvest import LocalNormMeter, NormReadingReduceScatter, StepStatistics

log = logging.getLogger(__name__)

Unit = tuple[str, FSDPModule]   # an FSDP unit and its name in the model ("" for the root)


class FSDPDriver(PolicyDriver):
    """Drives one policy for one ``fully_shard`` model and its optimizer. Build it with :func:`attach`."""

    backward_hint = ("call loss.backward() before driver.step(), with gradient sync on for the last micro-step "
                     "(model.set_requires_gradient_sync(True))")
    loss_hint = "call driver.step(loss)"

    def __init__(self, model: FSDPModule, optimizer: torch.optim.Optimizer, policy: PolicySpec = "AdaScale",
                 accumulation_steps: int = 1, loss_reduction: str = "mean") -> None:
        units = fsdp_units(model)
        params = check_every_parameter_sharded(model, units)
        mesh, replicas = data_parallel_layout(params)
        group = statistics_group(mesh)
        super().__init__(optimizer, policy, mesh.size(), accumulation_steps, loss_reduction, device=mesh_device(mesh))
        self.process_group = group
        self.meter: Optional[LocalNormMeter] = None
        if self.policy.needs_gradient_norms:
            check_readable_reductions(units, mesh.size() // replicas)
        self.agree_across_ranks()
        self.refuse_other_optimizer_steps()
        self.statistics = StepStatistics(params, self.process_group, mesh.size(), replicas, self.device)
        self._reduced: Optional[tuple[float, float]] = None   # the step's (L/W, T) once reduced
        self._reductions_per_step = accumulation_steps
        if self.policy.needs_gradient_norms:
            self.meter = LocalNormMeter(self.device)
            for index, (_, unit) in enumerate(units):
                predivide = max((compat.predivide_factor(g) for g in compat.param_groups(unit)), default=1.0)
                unit.set_custom_reduce_scatter(NormReadingReduceScatter(self.meter, index, predivide))
            log.info("scaling_plugins: FSDP2 adds one all-reduce of 2 float64 numbers per optimizer step (the "
                     "local and the reduced squared gradient norms; shared with driver.clip_grad_norm_)")

    def step(self, loss: Optional[torch.Tensor | float] = None) -> None:
        """Feed this step's statistics (and loss) to the policy, set the learning rate, step the optimizer; then a
        batch-size controller's choice becomes ``accumulation_steps`` for the next step."""
        with self.stepping_optimizer():
            self.advance(loss)
            self.optimizer.step()
        self.follow_batch_request()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` on the sharded gradients, by the
        statistics' own all-reduce: total = √T = ‖ḡ‖₂, each gradient × min(1, max_norm / (total + 1e-6)). Call it
        after the backward and before ``step()``; the statistics are those of the unclipped gradients. Returns
        the total norm (float64)."""
        reduced = self._reduce()
        if reduced is None:
            raise RuntimeError(f"no gradients were reduced since the last step: {self.backward_hint}")
        self._reduced = reduced if self.meter is not None else None
        total = math.sqrt(reduced[1])
        grads = [param.grad.to_local() for param in self.statistics.params if param.grad is not None]
        torch._foreach_mul_(grads, min(1.0, max_norm / (total + 1e-6)))
        return torch.tensor(total, dtype=torch.float64)

    def reduced_norms(self) -> Optional[tuple[float, float]]:
        reduced, self._reduced = self._reduced, None
        return self._reduce() if reduced is None else reduced

    def _reduce(self) -> Optional[tuple[float, float]]:
        """(L/W, T) of this step with the one all-reduce, or None when nothing was reduce-scattered since the last
        step; records how many reductions each unit made (``_reductions_per_step``)."""
        if self.meter is None:
            return self.statistics.reduce(torch.zeros((), dtype=torch.float64, device=self.device))
        local_sq, reductions = self.meter.take()
        if not reductions:
            return None
        self._reductions_per_step = reductions_per_step(reductions, self.accumulation_steps)
        return self.statistics.reduce(local_sq)

    def _gradient_sample(self) -> GradientSample:
        """The step's sample: with a reduction per micro-batch, n = W·A micro-batch gradients
        (``accumulation_sample``); with one reduction of the accumulated gradient
        (``set_requires_gradient_sync(False)`` on the other micro-steps), n = W, each rank's accumulated gradient
        being one gradient of the whole per-rank batch — with ``loss_reduction="sum"`` it is A times the batch's
        mean gradient, so L and T are divided by A²."""
        reduced = self.reduced_norms()
        if reduced is None:
            raise RuntimeError(f"no gradients were reduced since the last step: {self.backward_hint}")
        local_sq_mean, mean_sq_norm = reduced
        acc = self.accumulation_steps
        if self._reductions_per_step == acc:
            return accumulation_sample(local_sq_mean, mean_sq_norm, self.world_size, acc, self.loss_reduction)
        divisor = acc * acc if self.loss_reduction == "sum" else 1
        return accumulation_sample(local_sq_mean / divisor, mean_sq_norm / divisor, self.world_size, 1, "mean")

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        return torch_all_gather_rows(row, self.process_group)

    def all_reduce_mean(self, value: torch.Tensor) -> float:
        return torch_all_reduce_mean(value, self.process_group)


def fsdp_units(model: Any) -> list[Unit]:
    """The model's FSDP units (``fully_shard`` modules), root first; ``ValueError`` for a model that is not one."""
    if isinstance(model, FullyShardedDataParallel):
        raise ValueError("attach() got a FullyShardedDataParallel (FSDP1) wrapper, which scaling_plugins does not "
                         "drive: build the model with torch.distributed.fsdp.fully_shard (FSDP2) instead — "
                         "fully_shard(block) for each block, then fully_shard(model)")
    if not isinstance(model, FSDPModule):
        raise ValueError(f"attach() needs a model built with torch.distributed.fsdp.fully_shard, got "
                         f"{type(model).__name__}, which is not an FSDPModule: call fully_shard(block) on each block "
                         "and fully_shard(model) on the root, then attach(model, ...); for a DDP model use "
                         "scaling_plugins.backends.ddp.attach")
    return [(name, module) for name, module in model.named_modules() if isinstance(module, FSDPModule)]


def unit_label(name: str) -> str:
    return f"FSDP unit {name!r}" if name else "the root FSDP unit"


def check_every_parameter_sharded(model: torch.nn.Module, units: list[Unit]) -> list[torch.nn.Parameter]:
    """The trainable parameters the units reduce, each once; ``ValueError`` naming any trainable parameter of the
    model outside every FSDP unit (its gradient would be neither reduced nor measured)."""
    managed = {id(param): param for _, unit in units for group in compat.param_groups(unit)
               for param in compat.managed_parameters(group) if param.requires_grad}
    outside = [name for name, param in model.named_parameters() if param.requires_grad and id(param) not in managed]
    if outside:
        raise ValueError(f"parameters {outside} are outside every FSDP unit: fully_shard did not take them, so their "
                         "gradients are never reduced across ranks. Call fully_shard on a module that holds them (the "
                         "root: fully_shard(model) after the blocks), or set requires_grad=False")
    if not managed:
        raise ValueError("the model has no trainable parameters in its FSDP units")
    return list(managed.values())


def data_parallel_layout(params: list[torch.nn.Parameter]) -> tuple[DeviceMesh, int]:
    """(the device mesh every parameter is sharded on, R = ranks holding each shard: the product of the mesh's
    replicate dimensions, 1 without HSDP); ``ValueError`` when the parameters use different meshes."""
    mesh = params[0].device_mesh
    if any(param.device_mesh != mesh for param in params):
        raise ValueError("the FSDP units shard their parameters on different device meshes: pass the same mesh to "
                         "every fully_shard call")
    sizes = [mesh.size(dim) for dim, placement in enumerate(params[0].placements) if placement.is_replicate()]
    return mesh, reduce(operator.mul, sizes, 1)


def statistics_group(mesh: DeviceMesh) -> Optional[dist.ProcessGroup]:
    """The process group of all the mesh's ranks, for the step's all-reduce: a 1-D mesh's own group, or the
    default group (None) for a 2-D HSDP mesh, which must then span every rank."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() != dist.get_world_size():
        raise ValueError(f"the FSDP mesh {tuple(mesh.shape)} spans {mesh.size()} of the {dist.get_world_size()} ranks:"
                         " a multi-dimensional mesh must be the data-parallel mesh of the whole world (HSDP: "
                         "replicate × shard); FSDP combined with tensor or pipeline parallelism is not supported")
    return None


def mesh_device(mesh: DeviceMesh) -> torch.device:
    """The device the mesh's collectives take tensors on (the current accelerator, or the CPU)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())


def check_readable_reductions(units: list[Unit], shard_size: int) -> None:
    """``ValueError`` for set-ups whose reduce-scatter cannot carry the local norms: a shard group of one rank
    (FSDP then skips the reduce-scatter), a unit with several parameter groups, a reduce-scatter set already and a
    custom gradient divide factor (the reduction is then not the average)."""
    if shard_size == 1:
        raise ValueError("the FSDP mesh shards over 1 rank, so FSDP skips its reduce-scatter and the local gradient "
                         "norms cannot be read: shard over at least 2 ranks, or use a rule policy (LinearScaling, "
                         "SqrtScaling, LEGW), which needs no gradient statistics")
    for name, unit in units:
        groups = compat.param_groups(unit)
        if len(groups) > 1:
            raise ValueError(f"{unit_label(name)} has {len(groups)} parameter groups (shard_placement_fn with "
                             "per-parameter meshes); its reduce-scatter, which carries the statistics, must be one: "
                             "shard the unit's parameters on one mesh")
        for group in groups:
            if compat.has_custom_reduce_scatter(group):
                raise ValueError(f"{unit_label(name)} already has a custom reduce-scatter "
                                 "(set_custom_reduce_scatter): attach() sets its own there to read the local "
                                 "gradient norms; remove yours (attach before setting any), or use a rule policy")
            if compat.divides_by_custom_factor(group):
                raise ValueError(f"{unit_label(name)} has a custom gradient divide factor "
                                 "(set_gradient_divide_factor), so the reduced gradient is not the average over "
                                 "ranks that the statistics assume: leave the factor unset")


def reductions_per_step(reductions: dict[int, int], accumulation_steps: int) -> int:
    """k, the reduce-scatters each unit made in this step: A (every micro-batch reduced) or 1 (the accumulated
    gradient, reduced at the last micro-step); ``RuntimeError`` otherwise (pieces of unequal batches)."""
    counts = set(reductions.values())
    if len(counts) == 1 and counts <= {1, accumulation_steps}:
        return counts.pop()
    times = " or ".join(map(str, sorted(counts)))
    raise RuntimeError(f"the FSDP units reduce-scattered their gradients {times} times in a step of "
                       f"{accumulation_steps} micro-batches: reduce every micro-batch's gradients (the default), "
                       "or only the accumulated ones (model.set_requires_gradient_sync(False) for every micro-step "
                       "but the last), the same for every unit")


def attach(model: FSDPModule, optimizer: torch.optim.Optimizer, policy: PolicySpec = "AdaScale",
           accumulation_steps: int = 1, loss_reduction: str = "mean") -> FSDPDriver:
    """Drive ``optimizer``'s learning rates by ``policy``, with each rank's local gradient norm read from FSDP2's
    reduce-scatter input and ‖ḡ‖² from the gradient shards (one all-reduce of two numbers per step).

    Call after ``fully_shard`` and before the first backward pass: it sets each unit's reduce-scatter.

    Args:
        model: the root module built with ``torch.distributed.fsdp.fully_shard`` (per block, then the root).
        optimizer: the optimizer of the model's (sharded) parameters; each param group's lr is its base lr.
        policy: a registered name (``scaling_plugins.POLICIES``), ``{"type": name, "params": {...}}`` or a Policy.
        accumulation_steps: micro-batches per optimizer step on each rank.
        loss_reduction: "mean" (each micro-batch loss divided by ``accumulation_steps``) or "sum".

    Returns:
        the :class:`FSDPDriver`: ``step(loss=None)``, ``clip_grad_norm_(max_norm)``, ``done``, ``gain``, ``lr``,
        ``metrics()``, ``state_dict()``.
    """
    return FSDPDriver(model, optimizer, policy, accumulation_steps, loss_reduction)
