"""Helpers for the scripts the DeepSpeed tests launch with the real `deepspeed` launcher (2 CPU ranks, gloo)."""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as dist

from benchmarks.overhead import collectives  # noqa: F401  (the DDP benchmark's counter: gloo profiler events)


def setup() -> tuple[int, argparse.Namespace]:
    """Join the launcher's gloo group; returns (rank, args) with args.out (results folder) and args.stage."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    return dist.get_rank(), args


def config(stage: int, gas: int = 1, **extra: Any) -> dict:
    """A 2-rank SGD config; gradient_clipping 0 so parameter updates show the applied learning rate."""
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas, "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "steps_per_print": 10 ** 9, **extra}


class LrRecorder:
    """The lr of every param group as the basic optimizer steps, once per optimizer step (hooked after the
    policy's own pre-hook, so it sees what the optimizer really uses)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.lrs: list[list[float]] = []
        self._seen: set[int] = set()
        engine.basic_optimizer.register_step_pre_hook(self._record)

    def _record(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.engine.global_steps not in self._seen:
            self._seen.add(self.engine.global_steps)
            self.lrs.append([group["lr"] for group in optimizer.param_groups])


def error_of(fn: Callable[[], Any]) -> str:
    """``"<ExceptionType>: message"`` of what ``fn()`` raised, or "no error"."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test asserts on the type and message
        return f"{type(err).__name__}: {err}"
    return "no error"


def write_and_finish(out: str, rank: int, results: dict) -> None:
    """Write this rank's results, then tear down in order: the engines (held in reference cycles with their
    schedulers) are collected before the process group goes, else the interpreter's exit may abort in gloo."""
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
