"""The demo: one built-in workload at a large scale with AdaScale and the baselines, against the S = 1 reference.

``plan`` turns the options into run specs (the S = 1 reference on one rank, then each policy at scale S =
workers × accumulation); ``run_demo`` checks them all (``check_runs``: backend, workload, the policy built
and configured as the ranks will), creates the output folder, and only then trains them one after another on
local processes, prints the comparison table and writes
``<out>/<timestamp>/<run>/{run.json,metrics.jsonl,eval.jsonl}`` and the figures. Bad input is a
``ValueError`` (or ``BackendUnavailable``) raised before any rank is spawned.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from .engines import require_backend
from .inputs import make_folder
from .noise_scale import advice_lines
from .plots import comparison_table, load_run, render
from ..batch_size import MIN_GRADIENTS
from ..config import allowed_keys
from ..policies import POLICIES, build_policy, policy_class
from ..policies.scaling_rule import ScalingRule
from .spawn import run_local
from .training import RunSpec, counts_base_steps, policy_entry
from .workloads import WORKLOADS, Workload, get_workload

REFERENCE = "reference"
MAX_SEED = 2 ** 63 - 1   # torch's generators take seeds that fit in a signed 64-bit integer
LINEAR_SCALING_NAMES = ("LinearScaling", "LinearScalingWarmup", "Linear")
WARMUP_FRACTION = 0.1


def default_policies() -> list[str]:
    """AdaScale, plus linear scaling with warmup when the registry has it."""
    linear = [name for name in LINEAR_SCALING_NAMES if name in POLICIES]
    return ["AdaScale"] + linear[:1]


# the S = 1 reference (plain SGD on one rank) where the chosen engine has no one-rank run: FSDP2 on one rank has
# nothing to shard and no reduce-scatter to read the gradient norm from; the same SGD steps run under DDP
REFERENCE_BACKENDS = {"fsdp": "ddp"}


def plan(workload: str, backend: str, policies: Sequence[str], workers: int, scale: int,
         budget: Optional[float], seed: int, reference: bool = True, evals: int = 8) -> list[RunSpec]:
    """The runs of a demo: the S = 1 reference (AdaScale on one rank = plain SGD on the base schedule; on DDP for
    an engine in ``REFERENCE_BACKENDS``), then
    each policy at ``scale`` on ``workers`` ranks with accumulation scale / workers (a batch-size controller:
    up to ``scale``, :func:`run_shape`)."""
    if scale < workers or scale % workers:
        raise ValueError(f"scale must be a multiple of workers (scale = workers × accumulation), "
                         f"got scale={scale}, workers={workers}")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; valid workloads: {sorted(WORKLOADS)}")
    if budget is not None:
        check_budget(budget)
    check_seed(seed)
    budget = budget if budget is not None else WORKLOADS[workload].default_budget
    common = dict(workload=workload, backend=backend, budget=budget, seed=seed, evals=evals)
    reference_backend = REFERENCE_BACKENDS.get(backend, backend)
    runs = [RunSpec(name=f"{REFERENCE}-S1", policy="AdaScale", workers=1, accumulation=1,
                    **{**common, "backend": reference_backend})] if reference else []
    for policy in policies:
        accumulation, limits = run_shape(policy, workers, scale)
        runs.append(RunSpec(name=f"{policy.lower()}-S{scale}", policy=policy, workers=workers,
                            accumulation=accumulation, policy_params={**demo_params(policy, budget, scale), **limits},
                            **common))
    return runs


def run_shape(policy: str, workers: int, scale: int) -> tuple[int, dict[str, int]]:
    """(accumulation, limits) of ``policy`` at scale S on ``workers`` ranks: S / workers at a fixed batch; a
    batch-size controller (``controls_batch``) starts at its smallest batch (one micro-batch per rank; two on one
    rank, for the 2 gradients a noise scale needs) and may grow to S (``max_accumulation_steps`` = S / workers)."""
    if policy_class(policy).controls_batch:
        return math.ceil(MIN_GRADIENTS / workers), {"max_accumulation_steps": scale // workers}
    return scale // workers, {}


def check_budget(budget: Any) -> None:
    """A budget is a finite number of base-scale steps > 0 (an infinite one would never end)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a finite number of base-scale steps > 0, got {budget!r}")


def check_seed(seed: Any) -> None:
    """A seed is an integer in [0, MAX_SEED]."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed!r}")


def demo_params(policy: str, budget: float, scale: int) -> dict[str, float]:
    """Settings the demo adds to a policy: a gradual warmup over the first WARMUP_FRACTION of the budget at the
    demo's scale, for rules that take one in base-scale steps (Goyal et al. warm up over the first ~5 of 90
    epochs). A rule whose warmup grows with the scale (LEGW: × k) gets a base warmup that long / its growth."""
    cls = policy_class(policy)
    if counts_base_steps(cls) and "warmup_num_steps" in allowed_keys(cls):
        growth = cls.warmup_growth(scale) if issubclass(cls, ScalingRule) else 1.0
        return {"warmup_num_steps": WARMUP_FRACTION * budget / growth}
    return {}


def _checked_policy(spec: RunSpec, workload: Workload) -> None:
    """Build ``spec``'s policy from the entry its ranks will get and configure it at the run's shape, as
    ``attach`` does (warnings are left to the ranks, which give them again)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_policy(policy_entry(spec.resolved(workload))).configure(spec.workers, spec.accumulation)


def check_runs(specs: Sequence[RunSpec]) -> None:
    """Raise ``ValueError`` (``BackendUnavailable`` for a backend) naming the run, for anything its ranks would
    fail on at start: duplicate run names, the backend, the workload's data, the policy at the run's shape."""
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"runs {duplicates} would share a folder: give each policy once")
    workloads: dict[tuple[str, int], Workload] = {}
    for spec in specs:
        require_backend(spec.backend)
        try:
            key = (spec.workload, spec.seed)
            if key not in workloads:
                workloads[key] = get_workload(*key)
            _checked_policy(spec, workloads[key])
        except (ValueError, TypeError, ImportError) as err:
            raise ValueError(f"run {spec.name!r} ({spec.policy} on {spec.workload}, {spec.workers} worker(s) × "
                             f"{spec.accumulation} accumulation): {err}") from err


def make_demo_folder(out: Path) -> Path:
    """Create and return ``out/<timestamp>`` (``-2``, ``-3``, ... when taken); ``ValueError`` saying why when
    ``out`` cannot hold it."""
    out = make_folder(out, "the runs (--out)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while True:
        folder = out / (stamp if suffix == 1 else f"{stamp}-{suffix}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            suffix += 1
        except OSError as err:
            raise ValueError(f"cannot write the runs (--out) into {out}: {err.strerror or err}") from None


def run_demo(specs: Sequence[RunSpec], out: Path, progress_bar: bool = True) -> Path:
    """Check every spec and the output folder, then train every spec, print the table, write the figures;
    returns the demo's folder."""
    check_runs(specs)
    folder = make_demo_folder(out)
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
