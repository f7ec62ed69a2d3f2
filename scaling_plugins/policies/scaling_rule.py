"""The shared mechanics of fixed batch-size scaling rules (linear, square-root, LEGW).

A rule is tuned at base batch B0 and run at k·B0. Each optimizer step then consumes k base batches, so
progress τ (in base-scale steps, the unit every schedule in ``scaling_plugins.schedules`` takes) advances
by k per step, exactly as AdaScale's τ advances by its gain. The learning rate of a step at progress τ is

    lr = base_lr · k^e · f(τ),   f(τ) = (s/k^e + (1 − s/k^e)·τ/W_k) · schedule(W_k)   for τ < W_k,
                                  f(τ) = schedule(τ)                                     for τ ≥ W_k

with e the rule's exponent (1 linear, ½ square-root and LEGW), s = ``warmup_start_factor`` (where the
warmup starts, as a fraction of the unscaled rate) and W_k the warmup in base-scale steps: f is
``schedules.linear_warmup``. W_k is ``warmup_num_steps`` (the same epochs at every k) unless the rule says
otherwise (LEGW: k × it).

k is ``scale`` when given; else ``micro_batch_size`` × workers × accumulation steps / ``base_batch`` when
``base_batch`` is given; else workers × accumulation steps (each worker's micro-batch is the base batch).
``micro_batch_size`` comes from the engine where it knows it (DeepSpeed: ``train_micro_batch_size_per_gpu``,
through ``set_micro_batch_size``), so there ``base_batch`` alone is enough; under DDP and Horovod give both.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

from ..schedules import Schedule, ScheduleSpec, build_schedule, linear_warmup
from .base import StepObservation
from .progress import BaseScaleProgress


class ScalingRule(BaseScaleProgress):
    """A fixed scaling rule over a base schedule. Subclasses set ``exponent`` (and may change the warmup).

    Args (all optional):
        scale: k = effective batch / base batch (>= 1); default from the run's shape (module docstring).
        base_batch, micro_batch_size: B0 and the per-worker micro-batch, in samples, to derive k instead
            (DeepSpeed fills ``micro_batch_size`` from ``train_micro_batch_size_per_gpu``).
        schedule: the base schedule of τ (base-scale steps), as tuned at B0: a name, ``{"type": ...}`` or a
            callable; default constant.
        warmup_num_steps: the warmup, in base-scale steps (see the rule for how k changes it); default 0.
        warmup_start_factor: where the warmup starts, as a fraction of the unscaled rate; default the
            rule's own (``default_warmup_start_factor``).
        total_num_steps: the budget in base-scale steps; ``done`` once τ reaches it.
    """

    exponent: ClassVar[float]
    default_warmup_start_factor: ClassVar[float]

    def __init__(self, scale: Optional[float] = None, base_batch: Optional[float] = None,
                 micro_batch_size: Optional[float] = None, schedule: ScheduleSpec = None,
                 warmup_num_steps: float = 0, warmup_start_factor: Optional[float] = None,
                 total_num_steps: Optional[float] = None) -> None:
        super().__init__(total_num_steps)
        if scale is not None and not scale >= 1:
            raise ValueError(f"scale (k) must be >= 1, got {scale!r}")
        if base_batch is not None and scale is not None:
            raise ValueError("give either scale or base_batch with micro_batch_size, not both")
        if not ((base_batch is None or base_batch > 0) and (micro_batch_size is None or micro_batch_size > 0)):
            raise ValueError(f"base_batch and micro_batch_size must be > 0, got {base_batch!r}, {micro_batch_size!r}")
        if not warmup_num_steps >= 0:
            raise ValueError(f"warmup_num_steps must be >= 0, got {warmup_num_steps!r}")
        if warmup_start_factor is None:
            warmup_start_factor = self.default_warmup_start_factor
        if not 0 <= warmup_start_factor <= 1:
            raise ValueError(f"warmup_start_factor must lie in [0, 1], got {warmup_start_factor!r}")
        self.base_schedule = build_schedule(schedule)
        self.warmup_num_steps = warmup_num_steps
        self.warmup_start_factor = warmup_start_factor
        self._user_scale = scale
        self.base_batch = base_batch
        self.micro_batch_size = micro_batch_size
        self._given_micro_batch_size = micro_batch_size   # the user's, not the engine's (set_micro_batch_size)
        self._rescale(check=base_batch is None)  # a k from batch sizes is checked once configure() knows n

    def set_micro_batch_size(self, micro_batch_size: int) -> None:
        """The engine's samples per micro-batch on each worker (DeepSpeed's ``train_micro_batch_size_per_gpu``,
        before ``configure``): fills ``micro_batch_size`` when it was left out; a different one is refused."""
        if self.micro_batch_size is not None and self.micro_batch_size != micro_batch_size:
            raise ValueError(f"micro_batch_size = {self.micro_batch_size:g} but the engine's micro-batch is "
                             f"{micro_batch_size} (train_micro_batch_size_per_gpu): leave micro_batch_size out or "
                             "make them equal")
        self.micro_batch_size = micro_batch_size

    @staticmethod
    def warmup_growth(k: float) -> float:
        """How many times longer, in epochs, the warmup is at batch multiple ``k`` than as tuned at B0: 1 by
        default, the same epochs at every k (Goyal et al.); LEGW overrides it."""
        return 1.0

    def scaled_warmup_steps(self, k: float) -> float:
        """The warmup's length in base-scale steps at batch multiple ``k``."""
        return self.warmup_growth(k) * self.warmup_num_steps

    @property
    def peak_factor(self) -> float:
        """k^e: the multiplier of the base learning rate once the warmup is over."""
        return self.scale ** self.exponent

    def configure(self, world_size: int, accumulation_steps: int) -> None:
        """Check that the batch sizes pair up (here, not at construction: DeepSpeed fills ``micro_batch_size``
        between the two), then fix k and the warmup for this shape."""
        if self.base_batch is not None and self.micro_batch_size is None:
            raise ValueError(f"base_batch = {self.base_batch:g} is in samples, so micro_batch_size is needed too "
                             "(samples per micro-batch on each worker; DeepSpeed takes it from "
                             "train_micro_batch_size_per_gpu): base_batch and micro_batch_size go together")
        if self.base_batch is None and self._given_micro_batch_size is not None:
            raise ValueError(f"micro_batch_size = {self._given_micro_batch_size:g} without base_batch: base_batch "
                             "and micro_batch_size go together (k = micro_batch_size × workers × accumulation "
                             "steps / base_batch); give base_batch too, or leave micro_batch_size out")
        super().configure(world_size, accumulation_steps)
        self._rescale()

    def _rescale(self, check: bool = True) -> None:
        """Fix k (and the warmup, which may depend on it) for the run's current shape."""
        n = self.world_size * self.accumulation_steps
        if self._user_scale is not None:
            k = float(self._user_scale)
        elif self.base_batch is not None and self.micro_batch_size is not None:
            k = n * (self.micro_batch_size / self.base_batch)
        else:
            k = float(n)
        if check and not k >= 1:
            raise ValueError(f"the batch multiple k = {n} gradients × micro_batch_size / base_batch = {k!r} "
                             "must be >= 1")
        warmup = self.scaled_warmup_steps(k)
        if check and self.total_num_steps is not None and warmup >= self.total_num_steps:
            raise ValueError(f"warmup_num_steps={self.warmup_num_steps!r} is a warmup of {warmup:g} base-scale steps "
                             f"at k={k:g}, not shorter than total_num_steps={self.total_num_steps!r}")
        self.scale = k
        start = self.warmup_start_factor / k ** self.exponent
        self.schedule: Schedule = linear_warmup(warmup, start, after=self.base_schedule)
        self._factor = self.peak_factor * self.schedule(self._progress)

    def step(self, observation: StepObservation) -> None:
        self.advance(self.peak_factor * self.schedule(self._progress), self.scale)

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "scale": self.scale, "lr_factor": self._factor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._rescale()                        # k and the warmup of the restored run's shape
        self._factor = float(state["factor"])  # the saved step's own factor, not one recomputed from τ
