"""FSDP2's harvest: each rank's local ‖g_i‖², read from the packed buffer FSDP reduce-scatters, and
T = ‖ḡ‖² from the reduced gradient shards, both summed over the ranks by one small all-reduce per step.

    unit.set_custom_reduce_scatter(NormReadingReduceScatter(meter, unit_index))   # what ``fsdp.attach`` does

In every FSDP unit's post-backward, FSDP packs this rank's unsharded gradients of the unit into one buffer
(padding with zeros) and reduce-scatters it. :class:`NormReadingReduceScatter` reads ⟨buffer, buffer⟩ (one fused
read, no copy) and then runs the same ``reduce_scatter_single`` torch's default runs. At the step,
:meth:`StepStatistics.reduce` all-reduces [Σ_units ‖local buffer‖², Σ_params ‖local gradient shard‖²] (two
float64 numbers) over the data-parallel ranks (AdaScale: Johnson et al., ICML 2020):

    L/W = (1/W)·Σ_ranks Σ_reductions ‖packed local gradients‖²,   T = (1/R)·Σ_ranks Σ_params ‖shard of ḡ‖²

with W the data-parallel ranks and R the replicas (HSDP: each shard is held by R ranks; plain FSDP: R = 1).
docs/fsdp.md has the whole path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..shared.fused_norms import EXACT_NUMEL, squared_norm_sum
from . import compat


class LocalNormMeter:
    """This rank's Σ‖packed local gradients‖² since the last step (a float64 device scalar) and how many times
    each FSDP unit reduce-scattered."""

    def __init__(self, device: torch.device) -> None:
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.reductions: dict[int, int] = {}

    def add(self, unit: int, packed: torch.Tensor, predivide: float = 1.0) -> None:
        """Add predivide²·⟨packed, packed⟩ (one fused read, in rows on CPU): the squared norm of the gradients
        FSDP divided by ``predivide`` into ``packed``; count one reduction of ``unit``."""
        self.total += squared_norm_sum([packed], rows_above=EXACT_NUMEL) * (predivide * predivide)
        self.reductions[unit] = self.reductions.get(unit, 0) + 1

    def take(self) -> tuple[torch.Tensor, dict[int, int]]:
        """(the sum, the reductions per unit) since the last take; then reset."""
        total, reductions = self.total.clone(), self.reductions
        self.total.zero_()
        self.reductions = {}
        return total, reductions


class NormReadingReduceScatter(compat.ReduceScatter):
    """One FSDP unit's reduce-scatter: reads this rank's packed local gradients into ``meter``, then reduce-scatters
    them as torch's default does (``dist.reduce_scatter_single`` with FSDP's op: ``ReduceOp.AVG`` for fp32/bf16;
    for fp16, ``SUM`` of gradients FSDP divided by ``predivide`` first, ``compat.predivide_factor``)."""

    def __init__(self, meter: LocalNormMeter, unit: int, predivide: float = 1.0) -> None:
        self.meter = meter
        self.unit = unit
        self.predivide = predivide

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: dist.ReduceOp, async_op: bool = False) -> Optional[dist.Work]:
        self.meter.add(self.unit, input_tensor, self.predivide)
        return dist.reduce_scatter_single(output_tensor, input_tensor, group=group, op=op, async_op=async_op)


class StepStatistics:
    """The one all-reduce of a step: [local sum, Σ‖local gradient shards‖²] summed over the ``world`` data-parallel
    ranks of ``group``, of which ``replicas`` hold each shard.

    ``reduce`` returns (L/W, T): the mean over ranks of the local sums, and ‖ḡ‖² = (1/R)·Σ_ranks ‖shards‖². The sum
    is the all-reduce's, so every rank gets the same numbers.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], group: Optional[dist.ProcessGroup], world: int,
                 replicas: int, device: torch.device) -> None:
        self.params = list(params)
        self.group = group
        self.world = world
        self.replicas = replicas
        self.device = device

    def shard_sq(self) -> torch.Tensor:
        """Σ over the parameters of ‖this rank's shard of the reduced gradient‖² (float64)."""
        shards = [param.grad.to_local() for param in self.params if param.grad is not None]
        return squared_norm_sum(shards, self.device)

    def reduce(self, local_sq: torch.Tensor) -> tuple[float, float]:
        """(L/W, T) from this rank's local sum, with one all-reduce of two float64 numbers and one host sync."""
        numbers = torch.stack([local_sq.to(self.device), self.shard_sq().to(self.device)])
        dist.all_reduce(numbers, group=self.group)
        local_total, shards_total = numbers.tolist()
        return local_total / self.world, shards_total / self.replicas
