"""Start a run's ranks without a launcher: one process per worker on this machine, on CPU.

``run_local`` is what ``scaling-plugins demo`` uses so that ``make demo`` needs no torchrun/deepspeed/mpirun.
DDP and DeepSpeed ranks are spawned here with ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/
``LOCAL_RANK`` (what torchrun and the deepspeed launcher set) and join a gloo group; Horovod ranks are started
by Horovod's own Python launcher (``horovod.runner.run``, gloo controller, localhost). Each rank then calls
``scaling_plugins.app.training.train``.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Union

import torch
import torch.multiprocessing as mp

from .engines import require_backend, start, stop
from .training import RUN_FILE, RunSpec, train


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_rank(spec: RunSpec, run_dir: str, progress_bar: bool, threads: int) -> None:
    """One rank's whole life: join the job, train, leave together."""
    torch.set_num_threads(threads)
    where = start(spec.backend)
    train(spec, run_dir, where.rank, where.world_size, progress_bar=progress_bar)
    stop(spec.backend)


def _spawned_rank(rank: int, spec: RunSpec, run_dir: str, port: int, progress_bar: bool, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(spec.workers))
    _run_rank(spec, run_dir, progress_bar, threads)


def run_local(spec: RunSpec, run_dir: Union[str, Path], progress_bar: bool = True) -> dict[str, Any]:
    """Run ``spec`` on ``spec.workers`` local processes; returns the summary rank 0 wrote to ``run.json``."""
    require_backend(spec.backend)
    threads = max(1, (os.cpu_count() or 1) // spec.workers)
    if spec.backend == "horovod":
        from horovod.runner import run as horovod_run

        horovod_run(_run_rank, args=(spec, str(run_dir), progress_bar, threads), num_proc=spec.workers,
                    hosts=f"localhost:{spec.workers}", use_gloo=True)
    else:
        mp.start_processes(_spawned_rank, args=(spec, str(run_dir), free_port(), progress_bar, threads),
                           nprocs=spec.workers, join=True, start_method="spawn")
    return json.loads((Path(run_dir) / RUN_FILE).read_text())["summary"]
