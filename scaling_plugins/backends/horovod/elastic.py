"""Horovod Elastic: the policy's state is saved, restored and synced together with the optimizer.

    state = hvd.elastic.TorchState(model=model, optimizer=opt, epoch=0)   # opt from sph.DistributedOptimizer

A handler put in front of Horovod's optimizer handler (registered when a ``DistributedOptimizer`` is made) keeps
the policy state in the copy Horovod commits and, after a reset, broadcasts rank 0's policy state, follows the
new world size and checks that every rank runs the same policy settings. docs/horovod.md.
"""
from __future__ import annotations

import torch

from .compat import horovod_torch, register_elastic_handler


def broadcast_scaling_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Make every rank's policy state equal to ``root_rank``'s (e.g. after rank 0 loaded a checkpoint), over the
    optimizer's process set; nothing on a rank outside it (the policy is not driven there)."""
    hvd = horovod_torch()
    driver = optimizer.scaling
    if not driver.active:
        return
    state = hvd.broadcast_object(driver.state_dict(), root_rank=root_rank, process_set=driver.process_set)
    driver.load_state_dict(state)


def sync_scaling_state(optimizer: torch.optim.Optimizer) -> None:
    """After an elastic reset: rank 0's policy state everywhere, the scale at the new world size, and one
    all-gather checking that every rank runs the same policy settings (nothing outside the process set)."""
    driver = optimizer.scaling
    if not driver.active:
        return
    broadcast_scaling_state(optimizer)
    driver.resize(driver.process_set.size())
    driver.agree_across_ranks()


def register_state_handler(marker: type) -> None:
    """Save, restore and sync the policy with optimizers of type ``marker`` in ``hvd.elastic.TorchState``;
    after Horovod's broadcast of the optimizer state, :func:`sync_scaling_state` (idempotent)."""
    register_elastic_handler(marker, sync_scaling_state)
