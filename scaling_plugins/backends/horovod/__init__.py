"""Horovod backend: :func:`DistributedOptimizer`, a drop-in ``hvd.DistributedOptimizer`` whose learning rate
follows a policy; Horovod Elastic is handled automatically. Horovod is imported on first use. docs/horovod.md.
"""
from .elastic import broadcast_scaling_state
from .optimizer import DistributedOptimizer, ScaledOptimizer

__all__ = ["DistributedOptimizer", "ScaledOptimizer", "broadcast_scaling_state"]
