"""Rank and world size from whatever started this process, and the gloo/NCCL process group from them.

Launchers describe a rank in different variables:

    torchrun, deepspeed launcher     RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    mpirun (Open MPI)                OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK
    mpiexec (MPICH, Intel MPI)       PMI_RANK, PMI_SIZE
    srun (SLURM, one task per rank)  SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
    horovodrun                       HOROVOD_RANK, HOROVOD_SIZE, HOROVOD_LOCAL_RANK (gloo mode; MPI mode sets OMPI_*)

Nothing set means one process (rank 0 of 1). The rendezvous for torch.distributed is MASTER_ADDR:MASTER_PORT
(default 127.0.0.1:29500); the launch/ wrappers set both from the batch system's node list.
"""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Optional

# (rank, world size, local rank) variable names, in the order they are tried
CONVENTIONS = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


@dataclass(frozen=True)
class Placement:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    source: str  # the variable the rank came from, or "single process"


def placement(environ: Optional[Mapping[str, str]] = None) -> Placement:
    """This process's rank, world size and local rank from the first launcher convention that is set."""
    env = os.environ if environ is None else environ
    for rank_key, size_key, local_key in CONVENTIONS:
        if rank_key in env and size_key in env:
            rank, world = int(env[rank_key]), int(env[size_key])
            if not 0 <= rank < world:
                raise ValueError(f"{rank_key}={rank} is outside [0, {size_key}={world})")
            return Placement(rank, world, int(env.get(local_key, rank)), rank_key)
    return Placement(0, 1, 0, "single process")


STALE_STORE_WARNING = (
    "torchrun --max-restarts > 0 shares its agent's TCPStore with the workers (torch's default), and that store "
    "keeps the previous round's keys: a restarted round can read a dead rank's address and fail with 'Connection "
    "refused' on every restart (pytorch/pytorch#135712). Launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
    "(launch/torchrun.sh does) so that every round gets a fresh store.")


def restarts_share_a_stale_store(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this worker was started by a torchrun that may restart it (``--max-restarts`` > 0) while sharing
    its agent's TCPStore with the workers: that store lives across restart rounds with the old round's keys."""
    env = os.environ if environ is None else environ
    return env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0


def init_process_group(backend: str = "gloo", timeout: Optional[float] = None) -> Placement:
    """Join (or create) the default torch.distributed group for this process's placement; returns it.

    Exports RANK/WORLD_SIZE/LOCAL_RANK and a default MASTER_ADDR/MASTER_PORT so that engines which read the
    environment themselves (DeepSpeed) see the same job. ``timeout`` (seconds; torch's default, 30 minutes,
    when None) bounds every collective: a rank whose peer is lost (a host down, a link cut) raises after that
    long instead of waiting for ever. Under a restartable torchrun that shares its store across rounds, rank 0
    prints :data:`STALE_STORE_WARNING` (the fix is an environment variable for torchrun, out of this process's
    reach).
    """
    import datetime

    import torch.distributed as dist

    where = placement()
    if where.rank == 0 and restarts_share_a_stale_store():
        print(f"scaling-plugins: warning: {STALE_STORE_WARNING}", file=sys.stderr, flush=True)
    os.environ.update(RANK=str(where.rank), WORLD_SIZE=str(where.world_size), LOCAL_RANK=str(where.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        limit = None if timeout is None else datetime.timedelta(seconds=timeout)
        dist.init_process_group(backend, rank=where.rank, world_size=where.world_size, timeout=limit)
    return where


def shutdown_process_group() -> None:
    """Leave the default group together with the other ranks.

    Models and engines that are no longer referenced are collected first: a DDP reducer (kept alive by the
    reference cycle through its communication hook) destroyed at interpreter exit, after the group, aborts the
    process ("terminate called without an active exception") in about one exit in four with gloo. Then a
    barrier, so that no rank tears gloo down while a peer is still finishing.
    """
    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
