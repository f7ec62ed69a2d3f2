"""Test helpers: run a function on N gloo ranks in fresh processes, and the body of a script run under torchrun.
Commands and launchers: tools/launchers.py."""
from __future__ import annotations

import gc
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

from tools.launchers import free_port


def _rank_main(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        gc.collect()  # a DDP model held in a cycle (comm-hook state) must go before its process group
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(fn: Callable[..., Any], world: int = 2, *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned processes in one gloo group; their results by rank.

    ``fn`` must be a module-level function (it is pickled into the child processes).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(world, free_port(), out_dir, fn, args), nprocs=world, join=True)
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results


def torchrun_main(train: Callable[[int, int], Any]) -> None:
    """The body of a script run under torchrun: join the gloo group, ``train(rank, world)``, write its result to
    ``sys.argv[1]/rank<k>.json``, leave together. ``train`` must let its models go before it returns (with torch
    2.13 and gloo, destroying the group while a DDP model is alive can abort the interpreter at exit)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = train(rank, dist.get_world_size())
    gc.collect()
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def rank_results(out: Path, world: int = 2) -> list[Any]:
    """What each rank of a launched test script wrote: ``out/rank<k>.json``, by rank."""
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]
