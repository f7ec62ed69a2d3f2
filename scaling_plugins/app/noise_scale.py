"""Gradient noise scale of a run, and the batch-size advice it gives (McCandlish, Kaplan, Amodei et al.,
"An Empirical Model of Large-Batch Training", 2018).

A run that measured gradient statistics (AdaScale with ≥ 2 gradients per step) logs the smoothed σ² and μ²
(scale-1 units) every step; B_simple = B0·σ²/μ² in samples (``scaling_plugins.stats.noise_scale``). It is
the critical batch of McCandlish et al. when the Hessian is well conditioned: with b = B_simple/B0, a step
at scale S (batch S·B0) makes the progress of

    r(S) = S·(1 + b)/(S + b)   base-scale steps   (exactly AdaScale's gain),

so the steps needed relative to S = 1 are (1 + b/S)/(1 + b): they fall ∝ 1/S while S ≪ b and flatten once
S ≫ b. On log-log axes the steps-vs-S curve has slope −b/(S + b): −1 (a doubling halves the steps) for small
S, 0 when flat, and −½ exactly at S = b, where a doubling saves only a quarter of the steps: beyond
B_crit ≈ B_simple, larger batches buy few steps.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..stats import noise_scale

PHASE_FRACTION = 0.1   # "early" and "late" = the first and the last 10% of the steps


@dataclass(frozen=True)
class NoiseScale:
    """B_simple of one run, in samples: median over all its steps, and over its first and last 10%."""

    median: float
    early: float
    late: float
    base_batch: int

    @property
    def scale(self) -> float:
        """B_simple in base batches: the scale S where scaling efficiency falls to 50%."""
        return self.median / self.base_batch


def run_noise_scale(records: Iterable[Mapping[str, Any]], base_batch: int) -> Optional[NoiseScale]:
    """B_simple = B0·σ²/μ² from the step records (``metrics.jsonl``) that have both; None when none has."""
    values = [noise_scale(r["sigma_sq"], r["mu_sq"], base_batch) for r in records
              if r.get("sigma_sq") is not None and r.get("mu_sq") is not None]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    edge = max(1, round(PHASE_FRACTION * len(values)))
    return NoiseScale(statistics.median(values), statistics.median(values[:edge]), statistics.median(values[-edge:]),
                      base_batch)


def steps_ratio(scale: float, b_simple: float, base_batch: int) -> float:
    """Predicted optimizer steps at ``scale`` relative to S = 1 for a constant B_simple: (1 + b/S)/(1 + b)."""
    b = b_simple / base_batch
    return (1 + b / scale) / (1 + b)


def flattening_scale(scales: Sequence[float], steps: Sequence[float]) -> Optional[float]:
    """Where a measured steps-vs-S curve flattens: the S at which its log-log slope reaches −½ (= b for a
    constant noise scale). Slopes between neighbouring scales sit at their geometric mean and are interpolated
    in log S; None when the slope stays steeper than −½ over the measured range (or starts flatter)."""
    if len(scales) != len(steps) or len(scales) < 2:
        raise ValueError(f"need matching scales and steps, at least 2 of each; got {len(scales)} and {len(steps)}")
    points = [(0.5 * (math.log(s0) + math.log(s1)), (math.log(n1) - math.log(n0)) / (math.log(s1) - math.log(s0)))
              for s0, s1, n0, n1 in zip(scales, scales[1:], steps, steps[1:])]
    for (x0, slope0), (x1, slope1) in zip(points, points[1:]):
        if slope0 < -0.5 <= slope1:
            return math.exp(x0 + (x1 - x0) * (-0.5 - slope0) / (slope1 - slope0))
    return None


def batch_size_advice(measured: NoiseScale) -> str:
    """One line of advice from a measured noise scale."""
    b = measured.median
    return (f"gradient noise scale B_simple ≈ {b:.0f} samples (S ≈ {measured.scale:.1f} base batches of "
            f"{measured.base_batch}; first 10% of steps {measured.early:.0f}, last 10% {measured.late:.0f}): "
            f"beyond ≈ B_crit ≈ {b:.0f} samples, larger batches buy few steps")


def advice_lines(runs: Sequence[Any]) -> list[str]:
    """The advice line of every run (``scaling_plugins.app.plots.Run``) that measured the noise scale, for the
    demo's and ``report``'s output."""
    from .workloads import WORKLOADS

    lines = []
    for run in runs:
        workload = WORKLOADS.get(str(run.spec.get("workload")))
        measured = run_noise_scale(run.steps, workload.micro_batch_size) if workload is not None else None
        if measured is not None:
            lines.append(f"{run.label}: {batch_size_advice(measured)}")
    return lines
