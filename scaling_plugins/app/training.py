"""The built-in trainer: one run of a built-in workload under one backend and one policy, with telemetry.

A run is described by a :class:`RunSpec`. Its length is a budget in base-scale steps (B0 = the workload's
micro-batch): a policy that measures its progress in base-scale steps (AdaScale's τ, which advances by the
gain; the scaling rules', which advance by k) runs until that progress reaches the budget; any other policy
runs until it has seen budget × B0 samples (the same number of epochs as the S = 1 reference).

:func:`train` runs inside an already-started distributed job (one process per rank: spawned by
``scaling_plugins.app.spawn`` or started by a launcher) and writes, on rank 0, ``metrics.jsonl`` (one record
per step, see ``scaling_plugins.telemetry``), ``eval.jsonl`` and ``run.json`` (the spec and the summary).
"""
from __future__ import annotations

import dataclasses
import json
import math
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from ..config import allowed_keys
from .engines import check_replicas, make_adapter
from ..policies import Policy, policy_class
from ..telemetry import TelemetryWriter, record_from
from .workloads import WORKLOADS, Workload, get_workload

RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoint"


@dataclasses.dataclass
class RunSpec:
    """One training run. Scale S = workers × accumulation (a batch-size controller's starting one: it then reads
    the accumulation of each step from the policy).

    name: the run's folder name and label in tables and plots.
    policy: a registered policy name; ``policy_params`` are passed to it (validated by the policy).
    budget: base-scale steps; None = the workload's default.
    lr: base learning rate for B0; None = the workload's tuned one.
    schedule: the base schedule as a function of base-scale steps (a ``scaling_plugins.schedules`` entry);
        None = cosine decay over the budget.
    evals: validation evaluations spread over the run (plus one before the first step).
    checkpoint_every: save a checkpoint to ``run_dir/checkpoint`` every that many optimizer steps, and resume
        from it when it is there at the start (a restarted job, e.g. torchrun ``--max-restarts``); None = never.
        A resumed run goes on exactly as the uninterrupted one would: the data order is fixed by the step, and
        model, optimizer, policy and the loop's counters come back. Delete the folder to start afresh.
    replicas: FSDP2's HSDP: the mesh (replicas, workers / replicas), shards within consecutive ranks, replicas
        across them (``scaling_plugins.app.engines.FSDPAdapter``); must divide ``workers``; 1 = plain FSDP2, and
        the only value the other backends take.
    """

    name: str
    workload: str = "digits"
    backend: str = "ddp"
    policy: str = "AdaScale"
    policy_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    workers: int = 2
    accumulation: int = 1
    budget: Optional[float] = None
    lr: Optional[float] = None
    schedule: Optional[dict[str, Any]] = None
    seed: int = 0
    evals: int = 8
    tensorboard: bool = True
    checkpoint_every: Optional[int] = None
    replicas: int = 1

    def __post_init__(self) -> None:
        for key in ("workers", "accumulation", "evals", "checkpoint_every"):
            value = getattr(self, key)
            if not (isinstance(value, int) and value >= 1) and not (key == "checkpoint_every" and value is None):
                raise ValueError(f"{key} must be an int >= 1, got {value!r}")
        if self.budget is not None and not self.budget > 0:
            raise ValueError(f"budget must be > 0 base-scale steps, got {self.budget!r}")
        policy_class(self.policy)   # unknown names fail here, listing the valid ones
        check_replicas(self.backend, self.replicas, self.workers)

    @property
    def scale(self) -> int:
        return self.workers * self.accumulation

    def resolved(self, workload: Workload) -> "RunSpec":
        """This spec with the workload's defaults filled in (budget, lr, schedule)."""
        budget = self.budget if self.budget is not None else workload.default_budget
        return dataclasses.replace(
            self, budget=budget, lr=self.lr if self.lr is not None else workload.base_lr,
            schedule=self.schedule if self.schedule is not None else {"type": "cosine", "total_num_steps": budget})


def counts_base_steps(cls: type[Policy]) -> bool:
    """Whether ``cls`` measures progress in base-scale steps (it overrides ``Policy.progress``, as AdaScale's τ
    and the scaling rules do) rather than in optimizer steps (the protocol's default)."""
    return cls.progress is not Policy.progress


def policy_entry(spec: RunSpec) -> dict[str, Any]:
    """``{"type", "params"}`` for the run: the budget (in the policy's own unit of progress) and the base schedule
    where the policy takes them, and a batch-size controller's ``micro_batch_size`` (the workload's), overridden by
    ``spec.policy_params``. Scale is left to the policy, whose default is workers × accumulation = S."""
    cls = policy_class(spec.policy)
    budget = spec.budget if counts_base_steps(cls) else math.ceil(spec.budget / spec.scale)
    facts = {"schedule": spec.schedule, "total_num_steps": budget}
    if cls.controls_batch:   # its batch limits are in samples; the scaling rules take k = S, no micro-batch
        facts["micro_batch_size"] = WORKLOADS[spec.workload].micro_batch_size
    params = {key: value for key, value in facts.items() if key in allowed_keys(cls)}
    return {"type": spec.policy, "params": {**params, **spec.policy_params}}


def train(spec: RunSpec, run_dir: Union[str, Path], rank: int, world: int, progress_bar: bool = True,
          on_step: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Train ``spec`` on this rank of an initialised ``world``-rank job; returns the summary (on every rank):
    final validation loss/accuracy, optimizer steps, samples, wall time of the training loop (rank 0's
    evaluations included), mean gain, scale (the starting one), the range of scales the steps ran at (a
    batch-size controller moves it) and final progress. ``progress_bar``: rank 0 shows its progress,
    as a bar on a terminal and as periodic plain lines (:class:`ProgressLines`) when stderr is a file (a batch
    job's log). ``on_step`` receives every step's record, on every rank."""
    if world != spec.workers:
        raise ValueError(f"run {spec.name!r} wants {spec.workers} workers but the job has {world} ranks")
    run_dir = Path(run_dir)
    workload = get_workload(spec.workload, spec.seed)
    spec = spec.resolved(workload)
    adapter = make_adapter(spec.backend, workload.make_model(), workload, spec.lr, policy_entry(spec),
                           spec.accumulation, run_dir=run_dir, replicas=spec.replicas)
    base_steps = counts_base_steps(type(adapter.policy))
    eval_every = spec.budget / spec.evals
    checkpoints = run_dir / CHECKPOINT_DIR
    counters = {"step": 0, "samples": 0, "base_progress": 0.0, "next_eval": 0.0, "gains": [], "scales": []}
    resumed = adapter.load_checkpoint(checkpoints) if spec.checkpoint_every else None
    if resumed is not None:
        counters = resumed
        print(f"rank {rank}: resumed from {checkpoints} at step {counters['step']}", file=sys.stderr, flush=True)
    step, samples, base_progress = counters["step"], counters["samples"], counters["base_progress"]
    next_eval, gains, scales = counters["next_eval"], list(counters["gains"]), list(counters["scales"])
    bar = _progress_bar(spec, rank, enabled=progress_bar and rank == 0, done=min(base_progress, spec.budget),
                        steps=step)
    started = time.perf_counter()
    with TelemetryWriter(run_dir, rank, tensorboard=spec.tensorboard,
                         resume_after=step if resumed is not None else None) as telemetry:
        while base_progress < spec.budget:
            if base_progress >= next_eval:
                evaluated = adapter.evaluation_module()   # on every rank: an FSDP2 model is gathered here
                if rank == 0:
                    result = workload.evaluate(evaluated)
                    telemetry.write_eval(step, samples, result.loss, result.accuracy)
                next_eval += eval_every
            accumulation = adapter.accumulation_steps   # a batch-size controller sets it for each step
            loss_sum = torch.zeros((), dtype=torch.float64)
            for micro in range(accumulation):
                x, y = workload.micro_batch_at(samples, rank, world, micro)
                loss_sum += adapter.forward_backward(x, y, last=micro == accumulation - 1)
            mean_loss = adapter.mean_over_ranks(loss_sum / accumulation)
            adapter.step(mean_loss)
            step += 1
            batch = world * accumulation * workload.micro_batch_size
            samples += batch
            record = record_from(adapter.metrics(), step=step, samples=samples, loss=mean_loss, batch_size=batch,
                                 accumulation_steps=accumulation)
            telemetry.write_step(record)
            if on_step is not None:
                on_step(record)
            gains.append(record["gain"] if record["gain"] is not None else 1.0)
            scales.append(world * accumulation)
            previous, base_progress = base_progress, (adapter.policy.progress if base_steps
                                                      else samples / workload.micro_batch_size)
            if bar is not None:
                bar.update(min(base_progress, spec.budget) - min(previous, spec.budget))
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{record['lr']:.3g}", gain=f"{gains[-1]:.2f}")
            if spec.checkpoint_every and step % spec.checkpoint_every == 0:
                adapter.save_checkpoint(checkpoints, {"step": step, "samples": samples, "base_progress": base_progress,
                                                     "next_eval": next_eval, "gains": gains, "scales": scales})
        wall = time.perf_counter() - started
        final = workload.evaluate(adapter.evaluation_module())
        telemetry.write_eval(step, samples, final.loss, final.accuracy)
    if bar is not None:
        bar.close()
    summary = {"final_val_loss": final.loss, "final_val_accuracy": final.accuracy, "steps": step, "samples": samples,
               "wall_s": wall, "mean_gain": sum(gains) / len(gains), "scale": spec.scale,
               "scale_range": [min(scales), max(scales)], "final_progress": base_progress,
               "resumed_from": counters["step"] if resumed is not None else None}
    if rank == 0:
        (run_dir / RUN_FILE).write_text(json.dumps({"spec": dataclasses.asdict(spec), "summary": summary}, indent=2))
    return summary


class ProgressLines:
    """Progress as plain lines for logs that are files (a batch job's stdout/stderr): one line each time a
    tenth of the budget is done, and at the end, e.g.

        progress sp-n1 rank 0 | adascale S=4 | 8.7/8 base steps, step 5 | loss 13.2 lr 0.0174 gain 1.74

    It offers the part of tqdm's interface the training loop uses (update, set_postfix, close)."""

    def __init__(self, spec: RunSpec, rank: int, stream: Any = None, parts: int = 10, done: float = 0.0,
                 steps: int = 0) -> None:
        self.label = f"progress {socket.gethostname()} rank {rank} | {spec.name} S={spec.scale}"
        self.total = float(spec.budget)
        self.stream = stream if stream is not None else sys.stderr
        self.every = self.total / parts
        self.done = done   # a resumed run starts where its checkpoint was
        self.steps = steps
        self.next_line = self.every * (math.floor(done / self.every) + 1)
        self.postfix: dict[str, str] = {}
        self.printed_at: Optional[float] = None

    def update(self, amount: float) -> None:
        self.done += amount
        self.steps += 1

    def set_postfix(self, **values: str) -> None:
        """Called after :meth:`update` each step: prints the line when the next tenth is reached."""
        self.postfix = values
        if self.done >= self.next_line:
            self._line()
            while self.next_line <= self.done:
                self.next_line += self.every

    def close(self) -> None:
        """The last line, unless the last step printed it already."""
        if self.printed_at != self.done:
            self._line()

    def _line(self) -> None:
        values = " ".join(f"{key} {value}" for key, value in self.postfix.items())
        self.stream.write(f"{self.label} | {self.done:.4g}/{self.total:.4g} base steps, step {self.steps}"
                          f" | {values}\n")
        self.stream.flush()
        self.printed_at = self.done


def _progress_bar(spec: RunSpec, rank: int, enabled: bool, done: float = 0.0, steps: int = 0) -> Optional[Any]:
    """A tqdm bar on a terminal, ProgressLines when stderr is not one (tqdm writes to stderr); both start at
    ``done`` base steps (a resumed run's)."""
    if not enabled:
        return None
    if not sys.stderr.isatty():
        return ProgressLines(spec, rank, done=done, steps=steps)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print("(no progress bar: pip install tqdm)")
        return None
    return tqdm(total=spec.budget, initial=done, desc=f"{spec.name} S={spec.scale}", unit="base step", mininterval=0.5,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} base steps [{elapsed}<{remaining}{postfix}]")
