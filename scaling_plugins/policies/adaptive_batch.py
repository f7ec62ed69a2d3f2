"""AdaptiveBatch: AdaScale SGD whose effective batch follows the measured gradient noise scale.

AdaScale (Johnson et al., ICML 2020) already measures the gradient variance σ² and squared mean μ² of every step
from numbers the engine's own all-reduce carries, and with them the simple noise scale B_simple = B0·σ²/μ²
(McCandlish et al., 2018). This policy adds a batch-size controller on top: every ``change_interval`` optimizer
steps it sets the accumulation steps A of the following steps to (``scaling_plugins.batch_size``)

    A = clamp(round(k·B_simple / (W·m)), A_low, A_high),     effective batch B = W·A·m

with k = ``noise_scale_factor``, W workers and m samples per micro-batch on each worker, within the user's
``min_batch``, ``max_batch`` and ``max_accumulation_steps``. Everything else is AdaScale: lr_t = base_lr · r_t ·
schedule(τ_t) with the gain r_t = (σ² + μ²)/(σ²/S + μ²) at this step's scale S = B/B0, and τ += r_t. When the
batch changes, S follows the new batch, σ² and μ² (in units of the base batch) carry over, and τ carries on.
The choice uses only those smoothed, all-reduced σ², μ², the step count and the run's shape, so every rank makes
the same one.

Defaults (why, with the measured figures: docs/adaptive-batch.md):
- ``noise_scale_factor`` k = 2: in McCandlish et al.'s model a batch of k·B_noise costs (1 + 1/k)× the minimum
  optimizer steps and (1 + k)× the minimum samples; raise k to trade samples for steps, lower it to save samples.
- ``noise_scale_smoothing`` θ = 0.95 (a bias-corrected EMA over about 20 steps), the controller's own: AdaScale's
  θ = 1 − S/1000 (kept for the gain) averages over hundreds of steps at small batches and lags a growing noise
  scale.
- ``change_interval`` = 10 optimizer steps: with that smoothing B_simple moves little in 10 steps.
- ``max_accumulation_steps`` = 16: the batch may grow 16× over one micro-batch per worker.
- ``min_batch`` None: one micro-batch per worker, and at least 2 gradients per step (σ² is a variance; on one
  worker that means A ≥ 2). ``max_batch`` None: limited by ``max_accumulation_steps`` only.
- ``micro_batch_size`` None: DeepSpeed fills it from ``train_micro_batch_size_per_gpu``; under DDP and Horovod
  give it when ``min_batch``/``max_batch`` are set (they are in samples) or to have batch sizes reported in samples.
  ``base_batch`` B0 None: the micro-batch (AdaScale's default S = workers × accumulation). With neither,
  batches are counted in micro-batches.

The step's telemetry adds ``accumulation_steps``, ``batch_size`` and ``scale`` (of the step just taken) and
``batch_noise_scale`` (the B_simple the controller follows).
Scope: the training loop must read the accumulation each step (``driver.accumulation_steps`` under DDP and
Horovod, whose ``backward_passes_per_step`` follows too; under DeepSpeed ``engine.set_train_batch_size`` does it). The
Hugging Face Trainer fixes its own accumulation, so the policy is refused there.
"""
from __future__ import annotations

from typing import Any, Optional

from ..batch_size import BatchLimits, noise_scale_accumulation
from ..schedules import ScheduleSpec
from ..state_check import Entry, fields, integer, nullable, number, row
from ..stats import GradientStatistics
from .adascale import AdaScale
from .base import StepObservation
from .registry import register

DEFAULT_NOISE_SCALE_FACTOR = 2.0
DEFAULT_NOISE_SCALE_SMOOTHING = 0.95
DEFAULT_CHANGE_INTERVAL = 10


@register
class AdaptiveBatch(AdaScale):
    """AdaScale with a batch-size controller that follows k × the smoothed gradient noise scale (module docstring).

    Args (all optional):
        min_batch, max_batch: the effective batch's limits in samples (multiples of micro_batch_size × workers).
        max_accumulation_steps: the most micro-batches per worker in one optimizer step (default 16).
        change_interval: optimizer steps between decisions (default 10).
        noise_scale_factor: k, the target batch is k·B_simple (default 2).
        noise_scale_smoothing: θ of the controller's bias-corrected EMA of σ², μ² (default 0.95).
        micro_batch_size: m, samples per micro-batch on each worker (DeepSpeed: its train_micro_batch_size_per_gpu).
        base_batch: B0 in samples, the batch the base learning rate was tuned at (default: m); S = W·A·m/B0.
        smoothing, schedule, total_num_steps: as AdaScale's.

    Every ``change_interval`` steps: A = clamp(round(k·B_simple / (W·m)), A_low, A_high), B_simple = B0·σ²/μ²
    (McCandlish et al., "An Empirical Model of Large-Batch Training", 2018); the rest is AdaScale.

    Example::

        policy = AdaptiveBatch(micro_batch_size=32, max_batch=2048, total_num_steps=5000)
        driver = attach(ddp_model, optimizer, policy)
        # each step: run driver.accumulation_steps micro-batches, then driver.step()
    """

    name = "AdaptiveBatch"
    controls_batch = True

    def __init__(self, min_batch: Optional[int] = None, max_batch: Optional[int] = None,
                 max_accumulation_steps: int = 16, change_interval: int = DEFAULT_CHANGE_INTERVAL,
                 noise_scale_factor: float = DEFAULT_NOISE_SCALE_FACTOR,
                 noise_scale_smoothing: float = DEFAULT_NOISE_SCALE_SMOOTHING, micro_batch_size: Optional[int] = None,
                 base_batch: Optional[float] = None, smoothing: Optional[float] = None,
                 schedule: ScheduleSpec = None, total_num_steps: Optional[float] = None) -> None:
        self.limits = BatchLimits(min_batch, max_batch, max_accumulation_steps)
        if not (isinstance(change_interval, int) and change_interval >= 1):
            raise ValueError(f"change_interval = {change_interval!r}: must be an integer >= 1 (optimizer steps)")
        if not noise_scale_factor > 0:
            raise ValueError(f"noise_scale_factor = {noise_scale_factor!r}: must be > 0")
        if not 0 <= noise_scale_smoothing < 1:
            raise ValueError(f"noise_scale_smoothing = {noise_scale_smoothing!r}: must lie in [0, 1)")
        if micro_batch_size is not None and not (isinstance(micro_batch_size, int) and micro_batch_size >= 1):
            raise ValueError(f"micro_batch_size = {micro_batch_size!r}: must be an integer >= 1 or null")
        if base_batch is not None and not base_batch > 0:
            raise ValueError(f"base_batch = {base_batch!r}: must be > 0 or null")
        super().__init__(smoothing=smoothing, schedule=schedule, total_num_steps=total_num_steps,
                         single_gradient="error")
        self.change_interval = change_interval
        self.noise_scale_factor = noise_scale_factor
        self.micro_batch_size = micro_batch_size
        self._base_batch = base_batch
        self.base_batch = base_batch or micro_batch_size or 1.0
        self.noise = GradientStatistics(1.0, noise_scale_smoothing)   # σ², μ² as the controller smooths them
        self._requested_gradients: Optional[int] = None   # W·A chosen at the last decision
        self._stepped: Optional[tuple[int, int, float]] = None   # (A, W, S) of the step just taken

    def set_micro_batch_size(self, micro_batch_size: int) -> None:
        if self.micro_batch_size is not None and self.micro_batch_size != micro_batch_size:
            raise ValueError(f"micro_batch_size = {self.micro_batch_size} but the engine's micro-batch is "
                             f"{micro_batch_size} (train_micro_batch_size_per_gpu): leave micro_batch_size out or "
                             "make them equal")
        self.micro_batch_size = micro_batch_size
        self.base_batch = self._base_batch or micro_batch_size

    def accumulation_range(self, world_size: int) -> tuple[int, int]:
        """(A_low, A_high) the limits allow with ``world_size`` workers (``BatchLimits.accumulation_range``)."""
        return self.limits.accumulation_range(world_size, self.micro_batch_size)

    def configure(self, world_size: int, accumulation_steps: int) -> None:
        """Check the limits at this shape (``ValueError`` naming the bad one), then AdaScale's: S = W·A·m/B0."""
        low, high = self.accumulation_range(world_size)
        per_step = world_size * (self.micro_batch_size or 1)
        if not low <= accumulation_steps <= high:
            raise ValueError(f"accumulation_steps = {accumulation_steps} with {world_size} worker(s) gives a batch of "
                             f"{accumulation_steps * per_step}, outside {self.name}'s limits: allowed accumulation "
                             f"steps are {low} to {high} (batches {low * per_step} to {high * per_step})")
        if self._base_batch is not None and self.micro_batch_size is None:
            raise ValueError(f"base_batch = {self._base_batch:g} is in samples, so micro_batch_size is needed too")
        if low * per_step < self.base_batch:
            raise ValueError(f"the smallest batch, {low * per_step} samples, is below base_batch = "
                             f"{self.base_batch:g}: the scale S = batch / base_batch must be >= 1 (raise min_batch)")
        super().configure(world_size, accumulation_steps)
        self.noise.rescale(self.scale)

    def shape_scale(self) -> float:
        return self.num_gradients * (self.micro_batch_size or 1) / self.base_batch

    def step(self, observation: StepObservation) -> None:
        self._stepped = (self.accumulation_steps, self.world_size, self.scale)
        super().step(observation)
        self.noise.update(observation.gradients)   # AdaScale's step refused a missing sample; n >= 2 (configure)
        if self.steps % self.change_interval == 0:
            self._decide()

    def _decide(self) -> None:
        """A for the next steps from k·B_simple (``batch_size.noise_scale_accumulation``); nothing before σ², μ²
        have an estimate."""
        noise = self.noise.noise_scale(self.base_batch)
        if noise is None:
            return
        low, high = self.accumulation_range(self.world_size)
        accumulation = noise_scale_accumulation(noise, self.noise_scale_factor,
                                                self.world_size * (self.micro_batch_size or 1), low, high)
        self._requested_gradients = accumulation * self.world_size

    @property
    def requested_accumulation_steps(self) -> int:
        """The last decision (the current accumulation before the first), for this world size: W·A chosen, over
        the current W, within the limits (a resume on another number of workers keeps the batch as near as the
        limits allow)."""
        if self._requested_gradients is None:
            return self.accumulation_steps
        low, high = self.accumulation_range(self.world_size)
        return min(max(round(self._requested_gradients / self.world_size), low), high)

    def metrics(self) -> dict[str, Any]:
        """AdaScale's, with ``accumulation_steps``, ``batch_size`` and ``scale`` of the step just taken, and
        ``batch_noise_scale``: B_simple in samples as the controller smooths it (the one its choices follow)."""
        accumulation, world, scale = self._stepped or (self.accumulation_steps, self.world_size, self.scale)
        batch = accumulation * world * self.micro_batch_size if self.micro_batch_size is not None else None
        return {**super().metrics(), "accumulation_steps": accumulation, "batch_size": batch, "scale": scale,
                "batch_noise_scale": self.noise.noise_scale(self.base_batch)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "noise": self.noise.state_dict(),
                "requested_gradients": self._requested_gradients,
                "stepped": None if self._stepped is None else list(self._stepped)}

    def state_layout(self) -> dict[str, Entry]:
        return {**super().state_layout(), "noise": fields(GradientStatistics.STATE_LAYOUT),
                "requested_gradients": nullable(integer(1)),
                "stepped": nullable(row(integer(1), integer(1), number(minimum=1)))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.noise.load_state_dict(state["noise"])
        requested, stepped = state["requested_gradients"], state["stepped"]
        self._requested_gradients = None if requested is None else int(requested)
        self._stepped = None if stepped is None else (int(stepped[0]), int(stepped[1]), float(stepped[2]))
