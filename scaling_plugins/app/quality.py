"""Quality at scale: does a policy keep the S = 1 model quality as the batch grows? (the AdaScale paper's
tables, at CPU scale).

Every built-in workload with real data is trained at scales S ∈ {1, 4, 8, 16, 32} — one rank × S
accumulation steps by default (the sampler makes that the same samples, and the same n = S gradients per
step for AdaScale's estimator, as W ranks × S/W), or ``workers`` ranks × S/workers — with each method:

    reference      SGD + momentum on the base schedule (cosine over the budget) at S = 1
    LinearScaling  lr × S after a gradual warmup from the base rate over the first 10% of the budget
    SqrtScaling    lr × √S, the same warmup
    LEGW           peak lr × √S, warmup epochs × S; the base warmup W0 is 10% of the budget / the largest S
    AdaScale       lr × gain r on scale-invariant progress τ, until τ reaches the budget
    AutoWU         exponential warmup from a·lr toward b·lr until a GP test says the loss stopped falling,
                   then cosine decay to 0 (its rates are absolute: the range (a, b) is its base setting)
    AdaptiveBatch  AdaScale whose batch follows k × the measured noise scale, from one micro-batch per rank up
                   to the cell's S (``ADAPTIVE``, ``scaling-plugins bench quality --adaptive``: it runs at the
                   grid's largest S only, beside AdaScale at fixed S, on 2 ranks)

Base hyperparameters are tuned once, at S = 1 (seed 0, lowest final validation loss), and never per
scale: first the base learning rate among ``LR_FACTORS`` × the workload's default, then AutoWU's range
among ``AUTOWU_RANGES`` × that lr; schedule, momentum and budget are the workload's. Fixed rules see the
reference's samples (the same epochs); AdaScale gets the reference's budget in scale-invariant steps.
A diagnostic rides along: on the ``smoothing_ablation`` workloads, AdaScale at the largest S again with each
smoothing θ in ``SMOOTHING_VALUES`` (the default is max(1 − S/1000, 0.9)), to see how much the gain estimate's
smoothing moves its steps and its quality.

Run folders: ``OUT/<workload>/tune-*`` (the S = 1 sweeps), ``OUT/<workload>/<method>-S<S>-seed<k>`` and
``OUT/<workload>/AdaScale-theta<θ>-S<S>-seed<k>`` (the ablation),
each with ``run.json``, ``metrics.jsonl`` and ``eval.jsonl``. A cell whose folder already holds ``run.json``
(written when a run finishes) is skipped, so an interrupted study resumes where it stopped.
``scaling_plugins.app.quality_report`` turns the folders into the table, the plots and the noise-scale advice.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..policies import policy_class
from .demo import WARMUP_FRACTION, demo_params, run_shape
from .training import RUN_FILE, RunSpec
from .workloads import WORKLOADS

REFERENCE = "reference"
STUDY_METHODS = (REFERENCE, "LinearScaling", "SqrtScaling", "LEGW", "AdaScale", "AutoWU")
METHODS = STUDY_METHODS + ("AdaptiveBatch",)
SCALES = (1, 4, 8, 16, 32)
LR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
SMOOTHING_VALUES = (0.9, 0.99)   # AdaScale's θ in the ablation (default: max(1 − S/1000, 0.9))
AUTOWU_RANGES = ((0.1, 4.0), (0.1, 32.0), (0.01, 4.0), (0.01, 32.0))   # AutoWU's (warmup_min_lr, warmup_max_lr) / lr
S1_METHODS = (REFERENCE, "AutoWU")   # at S = 1 the scaling rules and AdaScale are the reference itself


@dataclasses.dataclass(frozen=True)
class Grid:
    """What the study runs. ``budget`` None: each workload's default; ``tune`` False: the workload's lr."""

    workloads: tuple[str, ...] = ("digits", "charlm")
    scales: tuple[int, ...] = SCALES
    methods: tuple[str, ...] = STUDY_METHODS
    seeds: int = 3
    budget: Optional[float] = None
    tune: bool = True
    evals: int = 4
    workers: int = 1
    smoothing_ablation: tuple[str, ...] = ("digits",)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.workloads) - set(WORKLOADS)) + sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown workload(s)/method(s) {unknown}; workloads: {sorted(WORKLOADS)}, "
                             f"methods: {list(METHODS)}")
        bad = [s for s in self.scales if s < 1 or (s > 1 and s % self.workers)]
        if bad or self.workers < 1 or self.seeds < 1:
            raise ValueError(f"need seeds >= 1, workers >= 1 and every scale > 1 a multiple of workers "
                             f"(S = workers × accumulation); got scales {list(self.scales)}, workers={self.workers}, "
                             f"seeds={self.seeds}")

    def budget_of(self, workload: str) -> float:
        return self.budget if self.budget is not None else float(WORKLOADS[workload].default_budget)


FULL = Grid()
QUICK = Grid(workloads=("digits",), scales=(1, 4, 16), seeds=1, budget=240, tune=False, evals=2,
             smoothing_ablation=())
ADAPTIVE_METHODS = (REFERENCE, "AdaScale", "AdaptiveBatch")
ADAPTIVE = Grid(scales=(1, 8, 32), methods=ADAPTIVE_METHODS, workers=2, smoothing_ablation=())
QUICK_ADAPTIVE = Grid(workloads=("digits",), scales=(1, 8), methods=ADAPTIVE_METHODS, seeds=1, budget=120,
                      tune=False, evals=2, workers=2, smoothing_ablation=())


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the study: its folder and what to train there."""

    folder: Path
    spec: RunSpec

    @property
    def finished(self) -> bool:
        return (self.folder / RUN_FILE).exists()


@dataclasses.dataclass(frozen=True)
class Base:
    """A workload's base hyperparameters, set once at S = 1: the learning rate and AutoWU's range (a, b)."""

    lr: float
    autowu_range: tuple[float, float] = AUTOWU_RANGES[0]


def cell_name(method: str, scale: int, seed: int) -> str:
    return f"{method}-S{scale}-seed{seed}"


def method_spec(grid: Grid, workload: str, method: str, scale: int, seed: int, base: Base) -> RunSpec:
    """The run of ``method`` at ``scale``: the same base settings, schedule and budget at every scale."""
    budget = grid.budget_of(workload)
    workers = 1 if scale == 1 else grid.workers
    policy = "AdaScale" if method == REFERENCE else method   # the reference: one gradient per step, gain 1
    accumulation, limits = run_shape(policy, workers, scale)
    common = dict(name=cell_name(method, scale, seed), workload=workload, workers=workers,
                  accumulation=accumulation, budget=budget, lr=base.lr, seed=seed, evals=grid.evals,
                  tensorboard=False)
    if method == REFERENCE:
        return RunSpec(policy="AdaScale", **common)   # plain SGD on the schedule
    if method == "LEGW":   # W0 optimizer steps at every k: a 10% warmup (in epochs) at the largest scale
        params = {"warmup_num_steps": WARMUP_FRACTION * budget / max(grid.scales)}
    elif method == "AutoWU":
        low, high = base.autowu_range
        params = {"warmup_min_lr": low * base.lr, "warmup_max_lr": high * base.lr, "seed": seed}
    else:
        params = demo_params(method, budget, scale)
    return RunSpec(policy=method, policy_params={**params, **limits}, **common)


def _tune_cell(grid: Grid, out: Path, workload: str, method: str, base: Base, name: str) -> Cell:
    spec = dataclasses.replace(method_spec(grid, workload, method, 1, 0, base), name=name)
    return Cell(out / workload / name, spec)


def lr_sweep(grid: Grid, out: Path, workload: str) -> list[tuple[Cell, Base]]:
    """The reference at S = 1 (seed 0) with ``LR_FACTORS`` × the workload's default lr."""
    default = WORKLOADS[workload].base_lr
    bases = [Base(factor * default) for factor in LR_FACTORS]
    return [(_tune_cell(grid, out, workload, REFERENCE, base, f"tune-lr{factor:g}x"), base)
            for factor, base in zip(LR_FACTORS, bases)]


def autowu_sweep(grid: Grid, out: Path, workload: str, lr: float) -> list[tuple[Cell, Base]]:
    """AutoWU at S = 1 (seed 0) with each range in ``AUTOWU_RANGES`` × the tuned lr."""
    return [(_tune_cell(grid, out, workload, "AutoWU", Base(lr, (low, high)), f"tune-autowu-{low:g}-{high:g}x"),
             Base(lr, (low, high))) for low, high in AUTOWU_RANGES]


def best(sweep: Sequence[tuple[Cell, Base]]) -> Base:
    """The settings of the finished sweep run with the lowest final validation loss."""
    def loss(entry: tuple[Cell, Base]) -> float:
        return json.loads((entry[0].folder / RUN_FILE).read_text())["summary"]["final_val_loss"]

    return min(sweep, key=loss)[1]


def grid_cells(grid: Grid, out: Path, bases: dict[str, Base]) -> list[Cell]:
    """Every cell of the study, seed-major (a study cut short still covers every method with seed 0)."""
    cells = []
    for seed in range(grid.seeds):
        for workload in grid.workloads:
            for method in grid.methods:
                for scale in grid.scales:
                    if scale == 1 and method not in S1_METHODS or scale > 1 and method == REFERENCE:
                        continue
                    if method != REFERENCE and policy_class(method).controls_batch and scale < max(grid.scales):
                        continue   # a batch-size controller runs once, up to the largest S
                    spec = method_spec(grid, workload, method, scale, seed, bases[workload])
                    cells.append(Cell(out / workload / spec.name, spec))
    return cells + ablation_cells(grid, out, bases)


def ablation_cells(grid: Grid, out: Path, bases: dict[str, Base]) -> list[Cell]:
    """AdaScale at the largest scale with each smoothing θ in ``SMOOTHING_VALUES``, every seed, on the workloads
    in ``grid.smoothing_ablation``: does the gain estimate's smoothing explain a shortfall?"""
    scale = max(grid.scales)
    cells = []
    for seed in range(grid.seeds):
        for workload in (w for w in grid.smoothing_ablation if w in grid.workloads):
            for theta in SMOOTHING_VALUES:
                spec = dataclasses.replace(method_spec(grid, workload, "AdaScale", scale, seed, bases[workload]),
                                           name=f"AdaScale-theta{theta:g}-S{scale}-seed{seed}",
                                           policy_params={"smoothing": theta})
                cells.append(Cell(out / workload / spec.name, spec))
    return cells


# -- running ----------------------------------------------------------------------------------------------
def _init_single_rank(threads: int) -> None:
    """Pool initializer: this process becomes rank 0 of its own one-rank gloo group, for every run it takes."""
    import torch
    import torch.distributed as dist

    from .spawn import free_port

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)


def _train_single_rank(spec: RunSpec, folder: str) -> dict[str, Any]:
    from .training import train

    return train(spec, folder, rank=0, world=1, progress_bar=False)


def run_cells(cells: Sequence[Cell], jobs: int = 2, log: Callable[[str], None] = print) -> None:
    """Train every unfinished cell. One-rank cells go to ``jobs`` long-lived processes (no start-up per run);
    multi-rank cells are spawned one at a time with ``scaling_plugins.app.spawn.run_local``."""
    todo = [cell for cell in cells if not cell.finished]
    if len(todo) < len(cells):
        log(f"{len(cells) - len(todo)} of {len(cells)} cells already finished: skipped")
    if not todo:
        return
    started = time.perf_counter()
    done = 0

    def report(cell: Cell, summary: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        elapsed = time.perf_counter() - started
        left = elapsed / done * (len(todo) - done)
        accuracy = summary.get("final_val_accuracy")
        log(f"[{done}/{len(todo)}] {cell.folder.parent.name}/{cell.spec.name}: val loss "
            f"{summary['final_val_loss']:.4f}" + ("" if accuracy is None else f", acc {100 * accuracy:.1f}%")
            + f", {summary['steps']} steps, gain {summary['mean_gain']:.2f}, {summary['wall_s']:.0f}s"
            f" | {elapsed / 60:.1f} min elapsed, ~{left / 60:.1f} min left")

    multi = [cell for cell in todo if cell.spec.workers > 1]
    single = [cell for cell in todo if cell.spec.workers == 1]
    if single:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_init_single_rank,
                                 initargs=(max(1, (os.cpu_count() or 1) // jobs),)) as pool:
            pending: dict[Future, Cell] = {pool.submit(_train_single_rank, cell.spec, str(cell.folder)): cell
                                           for cell in single}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    report(pending.pop(future), future.result())
    if multi:
        from .spawn import run_local

        for cell in multi:
            report(cell, run_local(cell.spec, cell.folder, progress_bar=False))


def tune(grid: Grid, out: Path, jobs: int = 2, log: Callable[[str], None] = print) -> dict[str, Base]:
    """The S = 1 sweeps (learning rate, then AutoWU's range at that lr when the grid runs AutoWU); the
    workloads' defaults when ``grid.tune`` is off."""
    bases = {workload: Base(WORKLOADS[workload].base_lr) for workload in grid.workloads}
    if not grid.tune:
        return bases
    with_autowu = "AutoWU" in grid.methods
    log(f"== S = 1 sweeps: lr {list(LR_FACTORS)} × each workload's default"
        + (f", then AutoWU's range {list(AUTOWU_RANGES)} × that lr" if with_autowu else ""))
    sweeps_to_run = [lambda workload: lr_sweep(grid, out, workload)]
    if with_autowu:
        sweeps_to_run.append(lambda workload: autowu_sweep(grid, out, workload, bases[workload].lr))
    for sweep in sweeps_to_run:
        sweeps = {workload: sweep(workload) for workload in grid.workloads}
        run_cells([cell for entries in sweeps.values() for cell, _ in entries], jobs, log)
        bases = {workload: best(entries) for workload, entries in sweeps.items()}
    log("base settings: " + "; ".join(f"{workload} lr {base.lr:g}"
                                      + (f", AutoWU range {base.autowu_range} × lr" if with_autowu else "")
                                      for workload, base in bases.items()))
    return bases


def run_study(grid: Grid, out: Path, jobs: int = 2, log: Callable[[str], None] = print) -> dict[str, Base]:
    """Tune at S = 1 (when asked), then train the whole grid into ``out``; returns the base settings used."""
    out = Path(out)
    bases = tune(grid, out, jobs, log)
    cells = grid_cells(grid, out, bases)
    log(f"== {len(cells)} runs: {', '.join(grid.workloads)} × S {list(grid.scales)} × {list(grid.methods)} × "
        f"{grid.seeds} seed(s), {grid.workers} rank(s) per scaled run, {jobs} at a time")
    run_cells(cells, jobs, log)
    return bases
