"""AdaptiveBatch as every backend test drives it: one policy entry, one data stream, one loop and one set of checks
for DDP (torchrun), Horovod (horovodrun --gloo) and DeepSpeed (the deepspeed launcher), 2 CPU ranks each.

The model is ``policy_cases.Quadratic`` (loss ½‖w − x‖², x ~ N(0, I)): the mean gradient w shrinks as w converges
while the per-sample noise stays, so the noise scale B_simple = σ²/μ² grows and the controller has to grow the
batch. Each script trains ``STEPS`` optimizer steps reading the accumulation before every step, checkpoints after
``RESUME_AT`` steps, then builds a fresh model, optimizer and policy from that checkpoint and trains the rest again:
the resumed steps must be the uninterrupted ones exactly.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Protocol

import torch

from scaling_plugins.batch_size import BatchLimits, noise_scale_accumulation

WORLD, MICRO_BATCH, STEPS, RESUME_AT, BASE_LR = 2, 2, 30, 13, 0.2
PARAMS = {"max_batch": 24, "max_accumulation_steps": 8, "change_interval": 3, "noise_scale_factor": 2.0,
          "noise_scale_smoothing": 0.5}
SPEC = {"type": "AdaptiveBatch", "params": {**PARAMS, "micro_batch_size": MICRO_BATCH}}   # DeepSpeed: PARAMS alone
LIMITS = BatchLimits(max_batch=PARAMS["max_batch"], max_accumulation_steps=PARAMS["max_accumulation_steps"])


class Loop(Protocol):
    """What a backend's script gives the shared loop."""

    def accumulation(self) -> int:
        """Micro-batches per rank in the next step, as the training loop reads it (before the step)."""

    def backward(self, x: torch.Tensor, accumulation: int) -> None:
        """One micro-batch's forward and backward."""

    def step(self) -> None:
        """The optimizer step."""

    def metrics(self) -> dict[str, Any]:
        """The policy's numbers after the step (``metrics()`` of the backend's controller)."""

    def engine_accumulation(self) -> int:
        """The engine's own accumulation setting after the step (Horovod's backward_passes_per_step, DeepSpeed's
        gradient_accumulation_steps, DDP's driver.accumulation_steps)."""

    def state(self) -> Any:
        """A checkpoint of model, optimizer and policy, the backend's way."""

    def load(self, state: Any) -> None:
        """Restore a checkpoint taken by :meth:`state` (into a fresh loop)."""

    def final_loss(self) -> float:
        """The model's loss at x = 0 (½‖w‖²)."""


class DriverLoop:
    """A :class:`Loop` for a driver that steps the optimizer itself (DDP's and FSDP2's ``attach``): all but
    ``__init__`` (which sets ``model``, ``net`` (the model's own module), ``optimizer``, ``driver``) and
    ``backward``."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    driver: Any

    def accumulation(self) -> int:
        return self.driver.accumulation_steps

    def step(self) -> None:
        self.driver.step()
        self.optimizer.zero_grad()

    def metrics(self) -> dict[str, Any]:
        return self.driver.metrics()

    def engine_accumulation(self) -> int:
        return self.driver.accumulation_steps

    def state(self) -> dict[str, Any]:
        return copy.deepcopy({"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "scaling": self.driver.state_dict()})

    def load(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.driver.load_state_dict(state["scaling"])

    def final_loss(self) -> float:
        return self.net(torch.zeros(1, 20)).item()


def micro_batch(seen: int, rank: int, micro: int) -> torch.Tensor:
    """The inputs of micro-batch ``micro`` of ``rank`` in the step that starts after ``seen`` samples: a pure
    function of its position in the sample stream, so a resumed run reads what the uninterrupted one read."""
    position = seen + (micro * WORLD + rank) * MICRO_BATCH
    return torch.randn(MICRO_BATCH, 20, generator=torch.Generator().manual_seed(position))


def train_steps(loop: Loop, rank: int, count: int, seen: int = 0) -> tuple[list[dict[str, Any]], int]:
    """``count`` steps of the loop every backend runs: read the accumulation A, run A micro-batches, step; returns
    each step's record and the samples seen after them."""
    records = []
    for _ in range(count):
        accumulation = loop.accumulation()
        for micro in range(accumulation):
            loop.backward(micro_batch(seen, rank, micro), accumulation)
        loop.step()
        seen += WORLD * accumulation * MICRO_BATCH
        metrics = loop.metrics()
        records.append({"accumulation": accumulation, "engine_accumulation": loop.engine_accumulation(),
                        **{key: metrics[key] for key in ("lr", "gain", "scale", "progress", "batch_noise_scale",
                                                         "batch_size", "accumulation_steps")}})
    return records, seen


def run_with_resume(new_loop: Callable[[], Loop], rank: int) -> dict[str, Any]:
    """``STEPS`` steps of a fresh loop with a checkpoint after ``RESUME_AT``, then the rest again from that
    checkpoint in another fresh loop: ``{"uninterrupted": [...], "resumed": [...], "final_loss": ...}``."""
    loop = new_loop()
    first, seen = train_steps(loop, rank, RESUME_AT)
    state = loop.state()
    rest, _ = train_steps(loop, rank, STEPS - RESUME_AT, seen)
    resumed = new_loop()
    resumed.load(state)
    again, _ = train_steps(resumed, rank, STEPS - RESUME_AT, seen)
    return {"uninterrupted": first + rest, "resumed": again, "final_loss": loop.final_loss()}


def check_adaptive_run(ranks: list[dict[str, Any]]) -> None:
    """Both ranks' ``{"uninterrupted": [...], "resumed": [...]}``: identical; the batch grew, only at decision steps,
    to k·B_simple of that step within the limits, and the engine's own setting followed; S = batch / B0 every step,
    τ advancing by the gain and lr = base lr × gain; the resumed steps equal the uninterrupted ones."""
    first, second = ranks
    assert first == second
    run = first["uninterrupted"]
    assert len(run) == STEPS
    low, high = LIMITS.accumulation_range(WORLD, MICRO_BATCH)
    accumulations = [r["accumulation"] for r in run]
    assert accumulations[0] == 1 and len(set(accumulations)) >= 3 and max(accumulations) > accumulations[0]
    assert all(low <= a <= high for a in accumulations)
    progress = 0.0
    for step, (record, following) in enumerate(zip(run, run[1:] + [None]), start=1):
        assert record["accumulation_steps"] == record["accumulation"]
        assert record["batch_size"] == WORLD * record["accumulation"] * MICRO_BATCH
        assert record["scale"] == WORLD * record["accumulation"]
        assert record["lr"] == BASE_LR * record["gain"] and 1 <= record["gain"] <= record["scale"]
        progress += record["gain"]
        assert record["progress"] == progress
        if following is None:
            break
        assert record["engine_accumulation"] == following["accumulation"]
        if step % PARAMS["change_interval"]:
            assert following["accumulation"] == record["accumulation"], f"the batch changed after step {step}"
        else:
            expected = noise_scale_accumulation(record["batch_noise_scale"], PARAMS["noise_scale_factor"],
                                                WORLD * MICRO_BATCH, low, high)
            assert following["accumulation"] == expected, (step, record["batch_noise_scale"])
    assert run[RESUME_AT]["accumulation"] > accumulations[0]    # the checkpoint holds a grown batch
    assert first["resumed"] == run[RESUME_AT:]
    assert math.isfinite(first["final_loss"])
