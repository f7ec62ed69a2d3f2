"""AdaScale SGD (Johnson, Agrawal, Gu & Guestrin, "AdaScale SGD: A User-Friendly Algorithm for Distributed
Training", ICML 2020).

At optimizer step t with gain r_t = (σ² + μ²)/(σ²/S + μ²) from ``scaling_plugins.stats``:

    lr_t = base_lr · r_t · schedule(τ_t),      τ_{t+1} = τ_t + r_t

and training is done once τ reaches the budget ``total_num_steps`` (in base-scale steps, T_SI).

Scale S defaults to workers × accumulation steps (n). A user whose per-worker batch differs from the base
batch sets ``scale`` = effective batch / base batch. With a single gradient per step (one worker, no
accumulation) there is no variance to measure: the documented fallback ``single_gradient="unit_gain"`` uses
gain 1 and logs a warning once; ``single_gradient="error"`` raises ``ValueError`` instead.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ..schedules import ScheduleSpec, build_schedule
from ..state_check import Entry, fields, flag, number
from ..stats import GradientStatistics
from ..user_warnings import warn_user
from .base import StepObservation
from .progress import BaseScaleProgress
from .registry import register

log = logging.getLogger(__name__)

SINGLE_GRADIENT_CHOICES = ("unit_gain", "error")


@register
class AdaScale(BaseScaleProgress):
    """AdaScale: scale the learning rate by the gain and run the schedule on scale-invariant progress τ.

    Args (all optional; ``AdaScale()`` is the paper's defaults, a constant schedule and no budget):
        scale: S = effective batch / base batch; default workers × accumulation steps.
        smoothing: EMA coefficient θ ∈ [0, 1); default max(1 − S/1000, 0.9).
        schedule: base schedule of τ (a callable, a name from ``SCHEDULES`` or ``{"type": ..., ...}``).
        total_num_steps: budget T_SI in base-scale steps; ``done`` once τ ≥ it.
        single_gradient: "unit_gain" (default fallback when n = 1) or "error".
        base_batch: B0 in samples, only to report the noise scale B_simple = B0·σ²/μ² in samples.

    Each step: gain r = (σ² + μ²)/(σ²/S + μ²) ∈ [1, S], lr = base lr · r · schedule(τ), τ += r (Johnson et al.,
    "AdaScale SGD", ICML 2020).

    Example::

        policy = AdaScale(schedule={"type": "cosine", "total_num_steps": 5000}, total_num_steps=5000)
        driver = scaling_plugins.backends.ddp.attach(ddp_model, optimizer, policy)
    """

    name = "AdaScale"
    needs_gradient_norms = True

    def __init__(self, scale: Optional[float] = None, smoothing: Optional[float] = None,
                 schedule: ScheduleSpec = None, total_num_steps: Optional[float] = None,
                 single_gradient: str = "unit_gain", base_batch: float = 1.0) -> None:
        super().__init__(total_num_steps)
        if scale is not None and not scale >= 1:
            raise ValueError(f"scale must be >= 1, got {scale!r}")
        if smoothing is not None and not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must lie in [0, 1), got {smoothing!r}")
        if single_gradient not in SINGLE_GRADIENT_CHOICES:
            raise ValueError(f"single_gradient must be one of {SINGLE_GRADIENT_CHOICES}, got {single_gradient!r}")
        if not base_batch > 0:
            raise ValueError(f"base_batch must be > 0, got {base_batch!r}")
        self.schedule = build_schedule(schedule)
        self.single_gradient = single_gradient
        self.base_batch = base_batch
        self._user_scale = scale
        self.statistics = GradientStatistics(scale or 1.0, smoothing)
        self._gain = 1.0
        self._factor = self.schedule(0.0)
        self._warned_single = False

    @property
    def scale(self) -> float:
        return self.statistics.scale

    @property
    def num_gradients(self) -> int:
        return self.world_size * self.accumulation_steps

    def configure(self, world_size: int, accumulation_steps: int) -> None:
        super().configure(world_size, accumulation_steps)
        if self.num_gradients < 2 and self.single_gradient == "error":
            raise ValueError("AdaScale needs >= 2 gradients per step (workers × accumulation_steps), got 1 and "
                             "single_gradient='error'; use accumulation_steps >= 2 or single_gradient='unit_gain'")
        self.statistics.rescale(self.shape_scale())

    def shape_scale(self) -> float:
        """S at the configured shape: the user's ``scale``, else n = workers × accumulation steps."""
        return self._user_scale or float(self.num_gradients)

    def step(self, observation: StepObservation) -> None:
        sample = observation.gradients
        if sample is None:
            raise ValueError("AdaScale needs gradient norms every step; the backend passed none")
        if sample.count >= 2:
            if not self.statistics.update(sample):
                log.warning("AdaScale step %d: non-finite gradient norms (L=%s, T=%s); statistics not updated, "
                            "the gain stays %.6g", self.steps + 1, sample.local_sq_sum, sample.mean_sq_norm,
                            self.statistics.gain)
        elif not self._warned_single:
            warn_user("AdaScale: one gradient per step (1 worker, no accumulation) has no measurable variance; "
                      "using gain 1 (single_gradient='unit_gain')")
            self._warned_single = True
        self._gain = self.statistics.gain if sample.count >= 2 else 1.0
        self.advance(self._gain * self.schedule(self._progress), self._gain)

    @property
    def gain(self) -> float:
        return self._gain

    def optimizer_advice(self, optimizer_class: type) -> Optional[str]:
        """None for SGD and its variants (a class named ``*SGD*`` in the MRO); else the advice to use
        ``AdaScaleAdam``: lr × gain is the rule derived for SGD, and an adaptive optimizer's update, normalised by
        √v, calls for lr × √gain."""
        if any("SGD" in cls.__name__ for cls in optimizer_class.__mro__):
            return None
        return (f"policy {self.name!r} multiplies the learning rate by its gain, the rule derived for SGD, but the "
                f"optimizer is {optimizer_class.__name__}: for Adam-type optimizers (Adam, AdamW, LAMB) use "
                "'AdaScaleAdam', which multiplies it by √gain")

    def metrics(self) -> dict[str, Any]:
        return {
            **super().metrics(),
            "scale": self.scale,
            "sigma_sq": self.statistics.sigma_sq,
            "mu_sq": self.statistics.mu_sq,
            "noise_scale": self.statistics.noise_scale(self.base_batch),
            "skipped_update": self.statistics.last_update_skipped,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "statistics": self.statistics.state_dict(), "gain": self._gain,
                "warned_single": self._warned_single}

    def state_layout(self) -> dict[str, Entry]:
        return {**super().state_layout(), "statistics": fields(GradientStatistics.STATE_LAYOUT),
                "gain": number(minimum=1), "warned_single": flag()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.statistics.load_state_dict(state["statistics"])
        self._gain = float(state["gain"])
        self._warned_single = bool(state["warned_single"])
