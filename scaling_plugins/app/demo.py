"""The demo: one built-in workload at a large scale with AdaScale and the baselines, against the S = 1 reference.

``plan`` turns the options into run specs (the S = 1 reference on one rank, then each policy at scale S =
workers × accumulation); ``run_demo`` trains them one after another on local processes, prints the
comparison table and writes ``<out>/<timestamp>/<run>/{run.json,metrics.jsonl,eval.jsonl}`` and the figures.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from .noise_scale import advice_lines
from .plots import comparison_table, load_run, render
from ..config import allowed_keys
from ..policies import POLICIES, policy_class
from ..policies.scaling_rule import ScalingRule
from .spawn import run_local
from .training import RunSpec, counts_base_steps
from .workloads import WORKLOADS

REFERENCE = "reference"
LINEAR_SCALING_NAMES = ("LinearScaling", "LinearScalingWarmup", "Linear")
WARMUP_FRACTION = 0.1


def default_policies() -> list[str]:
    """AdaScale, plus linear scaling with warmup when the registry has it."""
    linear = [name for name in LINEAR_SCALING_NAMES if name in POLICIES]
    return ["AdaScale"] + linear[:1]


def plan(workload: str, backend: str, policies: Sequence[str], workers: int, scale: int,
         budget: Optional[float], seed: int, reference: bool = True, evals: int = 8) -> list[RunSpec]:
    """The runs of a demo: the S = 1 reference (AdaScale on one rank = plain SGD on the base schedule), then
    each policy at ``scale`` on ``workers`` ranks with accumulation scale / workers."""
    if scale < workers or scale % workers:
        raise ValueError(f"scale must be a multiple of workers (scale = workers × accumulation), "
                         f"got scale={scale}, workers={workers}")
    budget = budget if budget is not None else WORKLOADS[workload].default_budget
    common = dict(workload=workload, backend=backend, budget=budget, seed=seed, evals=evals)
    runs = [RunSpec(name=f"{REFERENCE}-S1", policy="AdaScale", workers=1, accumulation=1, **common)] if reference else []
    runs += [RunSpec(name=f"{policy.lower()}-S{scale}", policy=policy, policy_params=demo_params(policy, budget, scale),
                     workers=workers, accumulation=scale // workers, **common) for policy in policies]
    return runs


def demo_params(policy: str, budget: float, scale: int) -> dict[str, float]:
    """Settings the demo adds to a policy: a gradual warmup over the first WARMUP_FRACTION of the budget at the
    demo's scale, for rules that take one in base-scale steps (Goyal et al. warm up over the first ~5 of 90
    epochs). A rule whose warmup grows with the scale (LEGW: × k) gets a base warmup that long / its growth."""
    cls = policy_class(policy)
    if counts_base_steps(cls) and "warmup_num_steps" in allowed_keys(cls):
        growth = cls.warmup_growth(scale) if issubclass(cls, ScalingRule) else 1.0
        return {"warmup_num_steps": WARMUP_FRACTION * budget / growth}
    return {}


def run_demo(specs: Sequence[RunSpec], out: Path, progress_bar: bool = True) -> Path:
    """Train every spec, print the table, write the figures; returns the demo's folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(out) / stamp
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = Path(out) / f"{stamp}-{suffix}"
    for spec in specs:
        print(f"== {spec.name}: {spec.policy} on {spec.workload}, {spec.backend}, {spec.workers} worker(s) × "
              f"{spec.accumulation} accumulation (S = {spec.scale})", flush=True)
        run_local(spec, folder / spec.name, progress_bar=progress_bar)
    runs = [load_run(folder / spec.name) for spec in specs]
    print("\n" + comparison_table(runs))
    for line in advice_lines(runs):
        print(line)
    for path in render(runs, folder):
        print(f"wrote {path}")
    return folder
