"""Batch-size control from the gradient noise scale: the limits a user sets, and the choice made within them.

Pure arithmetic on numbers every rank already shares (no torch.distributed): the same inputs give the same
choice on every rank.

Why the noise scale. McCandlish, Kaplan, Amodei et al. ("An Empirical Model of Large-Batch Training", 2018)
model the optimizer steps S and the training samples E needed to reach a given loss at batch B as

    S(B) = S_min·(1 + B_noise/B),        E(B) = E_min·(1 + B/B_noise),

with B_noise ≈ B_simple = B0·σ²/μ² (``scaling_plugins.stats.noise_scale``) when the Hessian is well
conditioned. Below B_noise a bigger batch buys almost proportionally fewer steps at almost no extra samples;
above it a bigger batch buys few steps at many more samples. At B = k·B_noise the cost is (1 + 1/k)·S_min
steps and (1 + k)·E_min samples. B_simple grows during training (the gradient's mean shrinks faster than its
noise), so the batch that balances the two grows too. Smith, Kindermans, Ying & Le ("Don't Decay the Learning
Rate, Increase the Batch Size", ICLR 2018) grow the batch where a schedule would decay the learning rate;
Pollux (Qiao et al., OSDI 2021, in AdaptDL) re-chooses the batch during training by its measured efficiency.
Here the batch is k·B_simple, moved in whole accumulation steps, within the user's limits:

    A = clamp(round(k·B_simple / (W·m)), A_low, A_high)

with W workers, m samples per micro-batch on each worker, A_low the smallest accumulation whose batch W·A·m is at
least ``min_batch`` and gives ≥ 2 gradients per step (the variance σ² needs two), and A_high the largest with
W·A·m ≤ ``max_batch`` and A ≤ ``max_accumulation_steps``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

MIN_GRADIENTS = 2   # gradients per step the noise scale needs (σ² is a variance over them)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class BatchLimits:
    """The user's limits on the effective batch: ``min_batch`` and ``max_batch`` in samples (None: no limit beyond
    the accumulation's) and ``max_accumulation_steps`` (micro-batches per worker per optimizer step). Checked on
    construction: ``ValueError`` naming the key, the value and what is allowed."""

    min_batch: Optional[int] = None
    max_batch: Optional[int] = None
    max_accumulation_steps: int = 16

    def __post_init__(self) -> None:
        for key in ("min_batch", "max_batch"):
            value = getattr(self, key)
            if value is not None and not _is_count(value):
                raise ValueError(f"{key} = {value!r}: must be an integer >= 1 (samples per optimizer step) or null")
        if not _is_count(self.max_accumulation_steps):
            raise ValueError(f"max_accumulation_steps = {self.max_accumulation_steps!r}: must be an integer >= 1")
        if self.min_batch is not None and self.max_batch is not None and self.min_batch > self.max_batch:
            raise ValueError(f"min_batch = {self.min_batch} > max_batch = {self.max_batch}: min_batch must be "
                             f"<= max_batch")

    def accumulation_range(self, world_size: int, micro_batch_size: Optional[int]) -> tuple[int, int]:
        """(A_low, A_high): the accumulation steps whose batch W·A·m lies within the limits (module docstring),
        for ``world_size`` workers of ``micro_batch_size`` samples per micro-batch. ``micro_batch_size`` None counts
        the batch in micro-batches and is allowed only without ``min_batch``/``max_batch`` (which are in samples).
        ``ValueError`` when a limit is not a multiple of W·m or the limits leave no accumulation."""
        if micro_batch_size is None and (self.min_batch is not None or self.max_batch is not None):
            key = "min_batch" if self.min_batch is not None else "max_batch"
            raise ValueError(f"{key} = {getattr(self, key)} is in samples, so micro_batch_size (samples per "
                             "micro-batch on each worker) is needed: give micro_batch_size (DeepSpeed takes it from "
                             "train_micro_batch_size_per_gpu)")
        per_step = world_size * (micro_batch_size or 1)
        low = max(1, math.ceil(MIN_GRADIENTS / world_size))
        high = self.max_accumulation_steps
        for key in ("min_batch", "max_batch"):
            value = getattr(self, key)
            if value is not None and value % per_step:
                raise ValueError(f"{key} = {value} is not a multiple of micro_batch_size × workers = "
                                 f"{micro_batch_size} × {world_size} = {per_step}: allowed are {per_step}, "
                                 f"{2 * per_step}, {3 * per_step}, ...")
        if self.min_batch is not None:
            low = max(low, self.min_batch // per_step)
        if self.max_batch is not None:
            high = min(high, self.max_batch // per_step)
        if low > high:
            raise ValueError(f"no batch size fits the limits with {world_size} worker(s) × micro_batch_size "
                             f"{micro_batch_size or 1}: accumulation steps from {low} (min_batch = {self.min_batch}, "
                             f"and >= {MIN_GRADIENTS} gradients per step) to {high} (max_batch = {self.max_batch}, "
                             f"max_accumulation_steps = {self.max_accumulation_steps})")
        return low, high


def noise_scale_accumulation(noise_scale: float, factor: float, samples_per_accumulation: float,
                             low: int, high: int) -> int:
    """A = clamp(round(k·B_simple / (W·m)), low, high) for ``noise_scale`` B_simple and the batch
    ``samples_per_accumulation`` = W·m one accumulation step adds (module docstring); an infinite B_simple
    (μ² = 0: no measurable mean gradient) gives ``high``. Rounds half up."""
    if not math.isfinite(noise_scale):
        return high
    wanted = math.floor(factor * noise_scale / samples_per_accumulation + 0.5)
    return min(max(wanted, low), high)
