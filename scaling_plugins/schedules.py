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

from .config import build_from_params

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


def cosine(total_num_steps: float, cos_min_ratio: float = 0.0) -> Schedule:
    """lr(t) = c + (1 − c)·½(1 + cos(π·min(t, T)/T)) (Loshchilov & Hutter 2017, no restarts), T =
    ``total_num_steps``, c = ``cos_min_ratio`` (DeepSpeed's WarmupCosineLR names)."""
    _require_positive("total_num_steps", total_num_steps)
    return lambda t: cos_min_ratio + (1 - cos_min_ratio) * 0.5 * (
        1 + math.cos(math.pi * min(t, total_num_steps) / total_num_steps))


def polynomial(total_num_steps: float, power: float = 1.0, end_factor: float = 0.0) -> Schedule:
    """lr(t) = e + (1 − e)·(1 − min(t, T)/T)^p (the "poly" policy LEGW scales), T = ``total_num_steps``."""
    _require_positive("total_num_steps", total_num_steps)
    return lambda t: end_factor + (1 - end_factor) * (1 - min(t, total_num_steps) / total_num_steps) ** power


def linear_warmup(warmup_num_steps: float, warmup_min_ratio: float = 0.0, after: ScheduleSpec = None) -> Schedule:
    """lr(t) = (s + (1 − s)·t/W)·after(W) for t < W, then after(t) (Goyal et al. 2017's gradual warmup), W =
    ``warmup_num_steps``, s = ``warmup_min_ratio`` (DeepSpeed's WarmupCosineLR names)."""
    if warmup_num_steps < 0:
        raise ValueError(f"warmup_num_steps must be >= 0, got {warmup_num_steps!r}")
    rest = build_schedule(after)
    if warmup_num_steps == 0:
        return rest

    def schedule(t: float) -> float:
        if t >= warmup_num_steps:
            return rest(t)
        return (warmup_min_ratio + (1 - warmup_min_ratio) * t / warmup_num_steps) * rest(warmup_num_steps)

    return schedule


# DeepSpeed-named schedules (deepspeed.runtime.lr_schedules' names and parameter names). They are multipliers
# like every schedule here: DeepSpeed's curve divided by its peak, so the optimizer's configured lr is the peak.
# DeepSpeed's own WarmupLR/WarmupDecayLR take absolute rates; here only their ratio
# warmup_min_lr/warmup_max_lr matters, and with the optimizer's lr equal to warmup_max_lr (DeepSpeed's default
# when warmup_max_lr is omitted) the rates are DeepSpeed's. schedule(t) is DeepSpeed's value at
# last_batch_iteration = t; t may be fractional (AdaScale's progress τ).
WARMUP_TYPES = ("log", "linear")


def _deepspeed_warmup(warmup_num_steps: float, warmup_type: str, start: float) -> Callable[[float], float]:
    """w(t) = a + (1 − a)·γ(t) with γ(t) = ln(t + 1)/ln(W) ("log") or t/W ("linear"), W = max(2, warmup_num_steps)."""
    _require_positive("warmup_num_steps", warmup_num_steps)
    if warmup_type not in WARMUP_TYPES:
        raise ValueError(f"warmup_type must be one of {WARMUP_TYPES}, got {warmup_type!r}")
    if not 0 <= start <= 1:
        raise ValueError(f"the warmup start ratio must lie in [0, 1], got {start!r}")
    steps = max(2.0, float(warmup_num_steps))
    if warmup_type == "log":
        return lambda t: start + (1 - start) * math.log(t + 1) / math.log(steps)
    return lambda t: start + (1 - start) * t / steps


def _min_ratio(warmup_min_lr: float, warmup_max_lr: Union[None, float]) -> float:
    if warmup_max_lr is None:
        if warmup_min_lr != 0:
            raise ValueError(f"warmup_min_lr={warmup_min_lr!r} needs warmup_max_lr: schedules are multipliers of "
                             "the optimizer's lr, so only warmup_min_lr/warmup_max_lr is used")
        return 0.0
    _require_positive("warmup_max_lr", warmup_max_lr)
    if not 0 <= warmup_min_lr <= warmup_max_lr:
        raise ValueError(f"warmup_min_lr must lie in [0, warmup_max_lr={warmup_max_lr!r}], got {warmup_min_lr!r}")
    return warmup_min_lr / warmup_max_lr


def warmup_lr(warmup_min_lr: float = 0.0, warmup_max_lr: Union[None, float] = None,
              warmup_num_steps: float = 1000, warmup_type: str = "log") -> Schedule:
    """DeepSpeed's WarmupLR: lr(t) = a + (1 − a)·γ(t) for t < W, then 1, with a = warmup_min_lr/warmup_max_lr."""
    warmup = _deepspeed_warmup(warmup_num_steps, warmup_type, _min_ratio(warmup_min_lr, warmup_max_lr))
    steps = max(2.0, float(warmup_num_steps))
    return lambda t: warmup(t) if t < steps else 1.0


def warmup_decay_lr(total_num_steps: float, warmup_min_lr: float = 0.0, warmup_max_lr: Union[None, float] = None,
                    warmup_num_steps: float = 1000, warmup_type: str = "log") -> Schedule:
    """DeepSpeed's WarmupDecayLR: WarmupLR's warmup, then lr(t) = a + (1 − a)·max(0, (T − t)/max(1, T − W))
    (linear back down to a = warmup_min_lr/warmup_max_lr at T)."""
    start = _min_ratio(warmup_min_lr, warmup_max_lr)
    warmup = _deepspeed_warmup(warmup_num_steps, warmup_type, start)
    steps = max(2.0, float(warmup_num_steps))
    _require_total_after_warmup(total_num_steps, warmup_num_steps)
    decay_steps = max(1.0, total_num_steps - steps)
    return lambda t: warmup(t) if t < steps else start + (1 - start) * max(0.0, (total_num_steps - t) / decay_steps)


def warmup_cosine_lr(total_num_steps: float, warmup_min_ratio: float = 0.0, warmup_num_steps: float = 1000,
                     cos_min_ratio: float = 0.0001, warmup_type: str = "log") -> Schedule:
    """DeepSpeed's WarmupCosineLR: warmup from warmup_min_ratio, then
    lr(t) = c + (1 − c)·½(1 + cos(π·p)), p = min(1, (t − W + 1)/max(1, T − W)), c = cos_min_ratio."""
    warmup = _deepspeed_warmup(warmup_num_steps, warmup_type, warmup_min_ratio)
    steps = max(2.0, float(warmup_num_steps))
    _require_total_after_warmup(total_num_steps, warmup_num_steps)
    if not 0 <= cos_min_ratio <= 1:
        raise ValueError(f"cos_min_ratio must lie in [0, 1], got {cos_min_ratio!r}")
    decay_steps = max(1.0, total_num_steps - steps)

    def schedule(t: float) -> float:
        if t < steps:
            return warmup(t)
        progress = min(1.0, (t - steps + 1) / decay_steps)
        return max(0.0, cos_min_ratio + (1 - cos_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    return schedule


def _require_total_after_warmup(total_num_steps: float, warmup_num_steps: float) -> None:
    _require_positive("total_num_steps", total_num_steps)
    if total_num_steps < warmup_num_steps:
        raise ValueError(f"total_num_steps={total_num_steps!r} must be >= warmup_num_steps={warmup_num_steps!r}")


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "step": step_decay,
    "multistep": multi_step,
    "exponential": exponential,
    "cosine": cosine,
    "polynomial": polynomial,
    "linear_warmup": linear_warmup,
    "WarmupLR": warmup_lr,
    "WarmupDecayLR": warmup_decay_lr,
    "WarmupCosineLR": warmup_cosine_lr,
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
    nested = params.pop("params", None) or {}
    if not isinstance(nested, Mapping):
        raise ValueError(f"schedule.params must be a mapping of parameter name to value, got {nested!r}")
    params.update(nested)
    factory = SCHEDULES.get(name)
    if factory is None:
        raise ValueError(f"schedule.type={name!r} is not a known schedule; valid: {sorted(SCHEDULES)}")
    try:
        return build_from_params(factory, params, where=f"schedule {name!r}")
    except TypeError as err:   # a required parameter missing
        raise ValueError(f"schedule {name!r}: bad parameters {params!r} ({err})") from err


def _require_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{key} must be > 0, got {value!r}")
