"""Step-time overhead and collectives per step: FSDP2 + AdaScale against bare FSDP2 (the same model, no package),
with and without gradient clipping, on both benchmark models, side by side in one run.

    .venv/bin/python -m benchmarks.overhead_fsdp [--steps 30] [--warmup 5] [--batch 64] [--repeats 3]

Each launch spawns two ranks (gloo, one thread each) that build, for each model of benchmarks/many_tensors.py
(``mlp``: 8 tensors, 10.5M parameters; ``many``: 194 tensors, 3.2M parameters), one FSDP2 copy per variant:
``fully_shard`` on every top-level child with parameters, then the root, over the 2 ranks, and momentum SGD.

- ``bare``: FSDP2's own reduce-scatter, ``optimizer.step()``;
- ``ours``: ``scaling_plugins.backends.fsdp.attach(..., "AdaScale")``, ``driver.step()``;
- ``bare+clip``: ``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)``, then ``optimizer.step()``;
- ``ours+clip``: ``driver.clip_grad_norm_(1.0)``, then ``driver.step()`` (the clipping's all-reduce carries the
  statistics).

A step is forward, backward, the variant's step and ``zero_grad``. Steps rotate between the variants of a model,
the order shifting every round, with a barrier before each timed step. Reported per launch and model: the median
wall, CPU (``cpu``: the training thread's) and process CPU (``process``: every thread of the rank) step time of
each variant and its ratio to its bare counterpart (``ours``/``bare``, ``ours+clip``/``bare+clip``); collectives
per step from the torch profiler's ``gloo:*`` events. The summary is the median over launches of the ratios.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

from benchmarks.many_tensors import MODELS, model_and_widths
from benchmarks.overhead import CLOCKS, median_ratios, print_summary, time_variants, timing_parser
from scaling_plugins.backends.fsdp import attach
from tools.launchers import free_port

VARIANTS = ("bare", "ours", "bare+clip", "ours+clip")
PAIRS = (("ours", "bare"), ("ours+clip", "bare+clip"))   # (variant, the bare run it is compared with)
MAX_NORM = 1.0
WORLD = 2


def sharded(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with ``fully_shard`` on each top-level child that has parameters, then on the root."""
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    return fully_shard(model)


def variant(name: str, model_name: str) -> tuple[torch.nn.Module, Callable[[], None]]:
    """A fresh FSDP2 copy of the model for one variant: (the model, what it does after the backward)."""
    model = sharded(model_and_widths(model_name)[0])
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    if name == "bare":
        return model, sgd.step
    if name == "bare+clip":
        def clip_then_step() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            sgd.step()

        return model, clip_then_step
    driver = attach(model, sgd, "AdaScale")
    if name == "ours":
        return model, driver.step

    def driver_clip_then_step() -> None:
        driver.clip_grad_norm_(MAX_NORM)
        driver.step()

    return model, driver_clip_then_step


def measure(rank: int, model_name: str, args) -> dict:
    """Every variant's step times and collectives per step on this rank, for one model."""
    _, width_in, width_out = model_and_widths(model_name)
    variants = {name: variant(name, model_name) for name in VARIANTS}
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, width_in, generator=gen)
    y = torch.randn(args.batch, width_out, generator=gen)

    def step(name: str) -> None:
        model, after_backward = variants[name]
        torch.nn.functional.mse_loss(model(x), y).backward()
        after_backward()
        model.zero_grad(set_to_none=True)

    counts, times = time_variants(step, VARIANTS, args.warmup, args.steps)
    bare = variants["bare"][0]
    return {"params": sum(p.numel() for p in bare.parameters()), "tensors": sum(1 for _ in bare.parameters()),
            "times": times, "collectives": counts}


def rank_main(rank: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result = {model_name: measure(rank, model_name, args) for model_name in MODELS}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(args) -> dict:
    """One launch of the two ranks: {model: its measurements on rank 0}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(rank_main, args=(free_port(), args, out), nprocs=WORLD, join=True)
        return json.loads(Path(out).read_text())


def added_collectives(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """Per compared variant, the collectives per step it makes beyond its bare counterpart."""
    return {name: sum(counts[name].values()) - sum(counts[bare].values()) for name, bare in PAIRS}


def main() -> None:
    parser = timing_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="launches; the median ratio over them is reported")
    args = parser.parse_args()
    ratios: dict[str, dict[tuple[str, str], list[float]]] = {model_name: {} for model_name in MODELS}
    for repeat in range(args.repeats):
        for model_name, result in launch(args).items():
            for name, bare in PAIRS:
                fragments = median_ratios({"bare": result["times"][bare], name: result["times"][name]}, CLOCKS,
                                          ratios[model_name])
                print(f"launch {repeat + 1} {model_name} ({result['params']:,} params in {result['tensors']} "
                      f"tensors) {name} vs {bare} | " + " | ".join(fragments), flush=True)
            print(f"launch {repeat + 1} {model_name} collectives per step {result['collectives']} added "
                  f"{added_collectives(result['collectives'])}", flush=True)
    for model_name in MODELS:
        print(f"== {model_name}:")
        print_summary(ratios[model_name], "bare FSDP2 (+clip: with torch's clip_grad_norm_)")

if __name__ == "__main__":
    main()
