"""Start a run's ranks without a launcher: one spawned process per worker on this machine, gloo on CPU.

``run_local`` is what ``scaling-plugins demo`` uses so that ``make demo`` needs no torchrun/deepspeed/mpirun.
Each rank gets ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (what torchrun and the
deepspeed launcher set), joins a gloo process group and calls ``scaling_plugins.training.train``.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .engines import require_backend
from .launch_env import shutdown_process_group
from .training import RUN_FILE, RunSpec, train

LOCAL_BACKENDS = ("ddp", "deepspeed")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, spec: RunSpec, run_dir: str, port: int, progress_bar: bool, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(spec.workers))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=spec.workers)
    train(spec, run_dir, rank, spec.workers, progress_bar=progress_bar)
    shutdown_process_group()


def run_local(spec: RunSpec, run_dir: Union[str, Path], progress_bar: bool = True) -> dict[str, Any]:
    """Run ``spec`` on ``spec.workers`` local processes; returns the summary rank 0 wrote to ``run.json``."""
    require_backend(spec.backend)
    if spec.backend not in LOCAL_BACKENDS:
        raise ValueError(f"backend {spec.backend!r} cannot be spawned locally here; start it with its launcher "
                         f"(launch/horovodrun.sh launch/examples/train.py --backend {spec.backend} ...)")
    threads = max(1, (os.cpu_count() or 1) // spec.workers)
    mp.start_processes(_rank_main, args=(spec, str(run_dir), free_port(), progress_bar, threads),
                       nprocs=spec.workers, join=True, start_method="spawn")
    return json.loads((Path(run_dir) / RUN_FILE).read_text())["summary"]
