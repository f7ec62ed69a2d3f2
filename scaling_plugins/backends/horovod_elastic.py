"""Horovod Elastic: the policy's state is saved, restored and synced together with the optimizer.

    state = hvd.elastic.TorchState(model=model, optimizer=opt, epoch=0)   # opt from sph.DistributedOptimizer

    @hvd.elastic.run
    def train(state):
        ...; opt.step(); state.commit()

``TorchState`` holds an optimizer through a handler chosen from Horovod's handler registry; this module puts
one handler in front of Horovod's optimizer handler for optimizers made by
``scaling_plugins.backends.horovod.DistributedOptimizer`` (registered automatically when one is made; the
registry itself is reached through ``horovod_compat``):

- save / restore: the optimizer's ``state_dict()`` carries the policy state under ``"scaling_plugins"``, so
  the copy Horovod keeps at ``commit()`` and reloads after a failure carries τ, the estimates and the step;
- sync (after a reset, before training resumes): Horovod's broadcast of the optimizer state from rank 0, then
  a broadcast of the policy state from rank 0, so a worker that joins takes the survivors' policy; then the
  policy follows the new world size and the ranks check that they agree on the policy settings (the check
  other backends make at attach: under Elastic a worker that joins later builds its optimizer while the
  others are already training, so a collective at construction would wait for ever; every worker syncs).

When the world size changes, the next ``step()`` reconfigures the policy with the new size: the scale
follows (S = workers × backward_passes_per_step unless set), σ² and μ² (in scale-1 units) and τ carry over,
and the gain of that step is computed at the new scale.
"""
from __future__ import annotations

import torch

from .horovod_compat import horovod_torch, register_elastic_handler


def broadcast_scaling_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Make every rank's policy state equal to ``root_rank``'s (e.g. after rank 0 loaded a checkpoint)."""
    hvd = horovod_torch()
    driver = optimizer.scaling
    state = hvd.broadcast_object(driver.state_dict(), root_rank=root_rank, process_set=driver.process_set)
    driver.load_state_dict(state)


def sync_scaling_state(optimizer: torch.optim.Optimizer) -> None:
    """After an elastic reset: rank 0's policy state everywhere, the scale at the new world size, and one
    all-gather checking that every rank runs the same policy settings."""
    broadcast_scaling_state(optimizer)
    driver = optimizer.scaling
    driver.resize(driver.process_set.size())
    driver.agree_across_ranks()


def register_state_handler(marker: type) -> None:
    """Save, restore and sync the policy with optimizers of type ``marker`` in ``hvd.elastic.TorchState``;
    after Horovod's broadcast of the optimizer state, :func:`sync_scaling_state` (idempotent)."""
    register_elastic_handler(marker, sync_scaling_state)
