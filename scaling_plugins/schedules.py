"""Base learning-rate schedules as pure functions of (scale-invariant) progress.

A schedule maps progress t (in base-scale optimizer steps, a float: AdaScale advances it by the gain) to a
multiplier of the base learning rate. Every factory here returns such a function; any plain callable
``float -> float`` works the same way wherever a schedule is accepted. In the spirit of optax, schedules are
small total functions that compose (``linear_warmup(..., after=cosine(...))``).

``build_schedule`` turns a config entry — a name, ``{"type": name, ...params}`` or a callable — into one,
so the DeepSpeed JSON, the Horovod kwargs and the DDP API share one vocabulary (``SCHEDULES``).
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, Mapping, Sequence, Union

Schedule = Callable[[float], float]
ScheduleSpec = Union[None, str, Mapping, Schedule]


def constant(value: float = 1.0) -> Schedule:
    """lr(t) = value."""
    return lambda t: value


def step_decay(step_size: float, gamma: float = 0.1) -> Schedule:
    """lr(t) = γ^⌊t/step_size⌋ (torch's StepLR)."""
    _require_positive("step_size", step_size)
    return lambda t: gamma ** math.floor(t / step_size)


def multi_step(milestones: Sequence[float], gamma: float = 0.1) -> Schedule:
    """lr(t) = γ^(number of milestones ≤ t) (Goyal et al. 2017's ÷10 at fixed epochs)."""
    points = sorted(float(m) for m in milestones)
    return lambda t: gamma ** bisect.bisect_right(points, t)


def exponential(gamma: float) -> Schedule:
    """lr(t) = γ^t."""
    _require_positive("gamma", gamma)
    return lambda t: gamma ** t


def cosine(total_steps: float, min_factor: float = 0.0) -> Schedule:
    """lr(t) = m + (1 − m)·½(1 + cos(π·min(t, T)/T)) (Loshchilov & Hutter 2017, no restarts)."""
    _require_positive("total_steps", total_steps)
    return lambda t: min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / total_steps))


def polynomial(total_steps: float, power: float = 1.0, end_factor: float = 0.0) -> Schedule:
    """lr(t) = e + (1 − e)·(1 − min(t, T)/T)^p (the "poly" policy LEGW scales)."""
    _require_positive("total_steps", total_steps)
    return lambda t: end_factor + (1 - end_factor) * (1 - min(t, total_steps) / total_steps) ** power


def linear_warmup(warmup_steps: float, start_factor: float = 0.0, after: ScheduleSpec = None) -> Schedule:
    """lr(t) = (s + (1 − s)·t/W)·after(W) for t < W, then after(t) (Goyal et al. 2017's gradual warmup)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
    rest = build_schedule(after)
    if warmup_steps == 0:
        return rest

    def schedule(t: float) -> float:
        if t >= warmup_steps:
            return rest(t)
        return (start_factor + (1 - start_factor) * t / warmup_steps) * rest(warmup_steps)

    return schedule


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "step": step_decay,
    "multistep": multi_step,
    "exponential": exponential,
    "cosine": cosine,
    "polynomial": polynomial,
    "linear_warmup": linear_warmup,
}


def build_schedule(spec: ScheduleSpec) -> Schedule:
    """A schedule from None (constant 1), a name, ``{"type": name, **params}`` or a callable.

    Unknown names and bad parameters raise ``ValueError`` naming the key, the value and what is allowed.
    """
    if spec is None:
        return constant()
    if callable(spec):
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        raise ValueError(f"schedule must be a name, a mapping with 'type' or a callable, got {spec!r}")
    params = dict(spec)
    name = params.pop("type", None)
    params.update(params.pop("params", {}) or {})
    factory = SCHEDULES.get(name)
    if factory is None:
        raise ValueError(f"schedule.type={name!r} is not a known schedule; valid: {sorted(SCHEDULES)}")
    try:
        return factory(**params)
    except TypeError as err:
        raise ValueError(f"schedule {name!r}: bad parameters {params!r} ({err})") from err


def _require_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{key} must be > 0, got {value!r}")
