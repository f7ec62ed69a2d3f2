"""PyTorch DDP backend: :func:`attach` drives an optimizer's learning rate by a policy, with the statistics
carried in DDP's own gradient buckets. docs/ddp.md.
"""
from .driver import DDPDriver, attach

__all__ = ["DDPDriver", "attach"]
