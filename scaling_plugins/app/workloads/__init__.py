"""Built-in workloads: real data that ships with installed packages (nothing downloaded) and a synthetic check.

    workload = scaling_plugins.app.workloads.get_workload("digits", seed=0)
    model = workload.make_model()
    x, y = workload.micro_batch_at(seen, rank, world, micro)   # seen: samples of the earlier steps
    workload.evaluate(model)          # Evaluation(loss, accuracy)
"""
from __future__ import annotations

from .base import Evaluation, Workload
from .charlm import CharLM
from .digits import Digits
from .quadratic import NoisyQuadratic

WORKLOADS: dict[str, type[Workload]] = {cls.name: cls for cls in (Digits, CharLM, NoisyQuadratic)}


def get_workload(name: str, seed: int = 0) -> Workload:
    """The workload registered as ``name``, with data and model initialisation drawn from ``seed``."""
    try:
        cls = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; valid workloads: {sorted(WORKLOADS)}") from None
    return cls(seed)


__all__ = ["WORKLOADS", "CharLM", "Digits", "Evaluation", "NoisyQuadratic", "Workload", "get_workload"]
