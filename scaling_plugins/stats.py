"""Gradient statistics for one optimizer step: variance σ², squared mean μ², AdaScale gain, noise scale.

Pure arithmetic on already-reduced numbers; nothing here talks to torch.distributed, so every rank that
feeds the same reduced numbers computes the same estimates bit for bit.

Estimator (Johnson et al., "AdaScale SGD", ICML 2020, Appendix; units of the scale-1 batch).
With S the scale, n = workers × micro-batches independent gradients g_i of batch S·B0/n each,
L = Σ_i ‖g_i‖² and T = ‖ḡ‖² for the averaged gradient ḡ:

    E‖g_i‖² = μ² + σ²·n/S,      E‖ḡ‖² = μ² + σ²/S
    σ̂² = S·(L/n − T)/(n − 1),   μ̂² = T − σ̂²/S,     clamped σ̂² ≥ ε·S·(L/n)/(n − 1), μ̂² ≥ 0

The variance floor is relative: ε = 1e-9 of the largest σ̂² the same sample could give (the one with T = 0),
so multiplying the loss by any factor c multiplies σ̂², μ̂² by c² and leaves the gain unchanged, also late in
training when the squared norms are far below 1 (an absolute floor pins the gain at S there). ε is far above
float64 rounding and far below any variance a gain could be told from.

Both are smoothed with a bias-corrected exponential moving average (θ = max(1 − S/1000, 0.9) by default) and
the gain is r = (σ² + μ²)/(σ²/S + μ²) ∈ [1, S]. The simple gradient noise scale of McCandlish et al.
("An Empirical Model of Large-Batch Training", 2018) is B_simple = B0·σ²/μ².
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .state_check import check_fields, fields, flag, number

RELATIVE_VARIANCE_FLOOR = 1e-9
MIN_DEFAULT_SMOOTHING = 0.9   # the default θ averages over at least ~10 steps


@dataclass(frozen=True)
class GradientSample:
    """The reduced numbers of one optimizer step.

    local_sq_sum: L, the sum over every micro-batch of every worker of that micro-batch's own ‖g_i‖².
    mean_sq_norm: T, the squared norm of the averaged gradient ‖ḡ‖².
    count: n, the number of independent gradients summed into L (workers × micro-batches).
    """

    local_sq_sum: float
    mean_sq_norm: float
    count: int

    @property
    def informative(self) -> bool:
        """Finite (no fp16 overflow, no NaN loss) and not all gradients zero (0/0 carries no statistics)."""
        return math.isfinite(self.local_sq_sum) and math.isfinite(self.mean_sq_norm) and self.local_sq_sum > 0


def default_smoothing(scale: float) -> float:
    """θ = max(1 − S/1000, 0.9): the AdaScale paper's default EMA coefficient, floored at 0.9. The paper's θ falls
    to 0 at S = 1000, where one step's μ̂² is mostly noise near S ≈ B_simple: simulated at S = 1,024–4,096 the
    unsmoothed gain spreads up to 34% from step to step and is biased up to +14%; θ = 0.9 brings that to 7% and
    +3% (benchmarks/RESULTS.md, "Simulation to 4,096 workers"). S ≤ 100 is unchanged."""
    return max(1.0 - scale / 1000.0, MIN_DEFAULT_SMOOTHING)


def estimate_moments(sample: GradientSample, scale: float) -> tuple[float, float]:
    """One step's unbiased (σ̂², μ̂²) in scale-1 units, clamped to σ̂² ≥ ε·S·(L/n)/(n − 1) and μ̂² ≥ 0."""
    n = sample.count
    if n < 2:
        raise ValueError(f"variance needs at least 2 gradients per step, got count={n}")
    sigma_sq = scale * (sample.local_sq_sum / n - sample.mean_sq_norm) / (n - 1)
    largest = scale * (sample.local_sq_sum / n) / (n - 1)
    sigma_sq = max(sigma_sq, RELATIVE_VARIANCE_FLOOR * largest)
    mu_sq = max(sample.mean_sq_norm - sigma_sq / scale, 0.0)
    return sigma_sq, mu_sq


def adascale_gain(sigma_sq: float, mu_sq: float, scale: float) -> float:
    """r = (σ² + μ²)/(σ²/S + μ²), clipped to [1, S] against rounding."""
    gain = (sigma_sq + mu_sq) / (sigma_sq / scale + mu_sq)
    return min(max(gain, 1.0), scale)


def noise_scale(sigma_sq: float, mu_sq: float, base_batch: float = 1.0) -> float:
    """B_simple = B0·σ²/μ² (McCandlish et al. 2018); infinite while μ² is 0."""
    return base_batch * sigma_sq / mu_sq if mu_sq > 0 else math.inf


class BiasCorrectedEMA:
    """m_t = θ·m_{t−1} + (1 − θ)·x_t, read as m_t/(1 − θ^t) (Adam's bias correction)."""

    STATE_LAYOUT = {"raw": number(), "weight": number(minimum=0)}

    def __init__(self, smoothing: float) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing θ must lie in [0, 1), got {smoothing!r}")
        self.smoothing = smoothing
        self._raw = 0.0
        self._weight = 0.0

    def update(self, value: float) -> None:
        self._raw = self.smoothing * self._raw + (1.0 - self.smoothing) * value
        self._weight = self.smoothing * self._weight + (1.0 - self.smoothing)

    @property
    def value(self) -> Optional[float]:
        return self._raw / self._weight if self._weight > 0 else None

    def state_dict(self) -> dict:
        return {"raw": self._raw, "weight": self._weight}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s; ``ValueError`` naming the entry, before any change, for a damaged one."""
        check_fields(state, self.STATE_LAYOUT, "moving average state")
        self._raw, self._weight = float(state["raw"]), float(state["weight"])


class GradientStatistics:
    """Smoothed σ², μ² and the gain derived from them, updated once per optimizer step.

    A step whose L or T is not finite (fp16 overflow, NaN loss), or whose gradients are all zero, is skipped:
    the previous estimates stand and ``last_update_skipped`` says so for the step's telemetry.
    """

    STATE_LAYOUT = {"scale": number(minimum=1), "sigma_sq": fields(BiasCorrectedEMA.STATE_LAYOUT),
                    "mu_sq": fields(BiasCorrectedEMA.STATE_LAYOUT), "last_update_skipped": flag()}

    def __init__(self, scale: float, smoothing: Optional[float] = None) -> None:
        if not scale >= 1.0:
            raise ValueError(f"scale must be >= 1, got {scale!r}")
        self.scale = float(scale)
        self._user_smoothing = smoothing
        theta = default_smoothing(self.scale) if smoothing is None else smoothing
        self._sigma_sq = BiasCorrectedEMA(theta)
        self._mu_sq = BiasCorrectedEMA(theta)
        self.last_update_skipped = False

    def rescale(self, scale: float) -> None:
        """Follow a new scale (e.g. an elastic world-size change). σ², μ² are in scale-1 units and carry over;
        a default θ follows the new scale."""
        if not scale >= 1.0:
            raise ValueError(f"scale must be >= 1, got {scale!r}")
        self.scale = float(scale)
        if self._user_smoothing is None:
            theta = default_smoothing(self.scale)
            self._sigma_sq.smoothing = self._mu_sq.smoothing = theta

    @property
    def smoothing(self) -> float:
        return self._sigma_sq.smoothing

    def update(self, sample: GradientSample) -> bool:
        """Fold one step in; returns False (and keeps the old estimates) when the sample is not informative."""
        self.last_update_skipped = not sample.informative
        if self.last_update_skipped:
            return False
        sigma_sq, mu_sq = estimate_moments(sample, self.scale)
        self._sigma_sq.update(sigma_sq)
        self._mu_sq.update(mu_sq)
        return True

    @property
    def sigma_sq(self) -> Optional[float]:
        return self._sigma_sq.value

    @property
    def mu_sq(self) -> Optional[float]:
        return self._mu_sq.value

    @property
    def gain(self) -> float:
        """The smoothed gain; 1 before the first finite step."""
        if self.sigma_sq is None:
            return 1.0
        return adascale_gain(self.sigma_sq, self.mu_sq, self.scale)

    def noise_scale(self, base_batch: float = 1.0) -> Optional[float]:
        if self.sigma_sq is None:
            return None
        return noise_scale(self.sigma_sq, self.mu_sq, base_batch)

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "sigma_sq": self._sigma_sq.state_dict(),
            "mu_sq": self._mu_sq.state_dict(),
            "last_update_skipped": self.last_update_skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s; the whole state is checked first (``ValueError`` naming the entry, nothing
        changed). A policy checks it as its ``statistics`` entry before loading anything."""
        check_fields(state, self.STATE_LAYOUT, "statistics state")
        self.scale = float(state["scale"])
        self._sigma_sq.load_state_dict(state["sigma_sq"])
        self._mu_sq.load_state_dict(state["mu_sq"])
        self.last_update_skipped = bool(state["last_update_skipped"])
