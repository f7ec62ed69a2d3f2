"""Horovod Elastic: the policy's state is saved, restored and synced together with the optimizer.

    state = hvd.elastic.TorchState(model=model, optimizer=opt, epoch=0)   # opt from sph.DistributedOptimizer

    @hvd.elastic.run
    def train(state):
        ...; opt.step(); state.commit()

``TorchState`` holds an optimizer through a handler chosen from Horovod's handler registry; this module puts
one handler in front of Horovod's optimizer handler for optimizers made by
``scaling_plugins.backends.horovod.DistributedOptimizer`` (registered automatically when one is made):

- save / restore: the optimizer's ``state_dict()`` carries the policy state under ``"scaling_plugins"``, so
  the copy Horovod keeps at ``commit()`` and reloads after a failure carries τ, the estimates and the step;
- sync (after a reset, before training resumes): Horovod's broadcast of the optimizer state from rank 0, then
  a broadcast of the policy state from rank 0, so a worker that joins takes the survivors' policy.

When the world size changes, the next ``step()`` reconfigures the policy with the new size: the scale
follows (S = workers × backward_passes_per_step unless set), σ² and μ² (in scale-1 units) and τ carry over,
and the gain of that step is computed at the new scale.
"""
from __future__ import annotations

import functools

import torch

from .horovod import ScaledOptimizer, horovod_torch


def broadcast_scaling_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Make every rank's policy state equal to ``root_rank``'s (e.g. after rank 0 loaded a checkpoint)."""
    hvd = horovod_torch()
    scaling = optimizer.scaling
    state = hvd.broadcast_object(scaling.state_dict(), root_rank=root_rank, process_set=scaling.process_set)
    scaling.load_state_dict(state)


@functools.lru_cache(maxsize=None)
def _handler_class() -> type:
    from horovod.torch.elastic.state import OptimizerStateHandler

    class ScaledOptimizerStateHandler(OptimizerStateHandler):
        """Horovod's optimizer handler, plus the policy state in ``sync``."""

        def sync(self) -> None:
            super().sync()
            broadcast_scaling_state(self.value, root_rank=0)

    return ScaledOptimizerStateHandler


def register_state_handler() -> None:
    """Put the handler for scaled optimizers first in Horovod's TorchState handler registry (idempotent)."""
    horovod_torch()
    from horovod.torch.elastic import state as elastic_state

    registry = elastic_state.get_handler_registry()
    if not any(handler is _handler_class() for _, handler in registry):
        elastic_state.set_handler_registry([(ScaledOptimizer, _handler_class()), *registry])
