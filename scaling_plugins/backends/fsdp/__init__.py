"""PyTorch FSDP2 backend (``torch.distributed.fsdp.fully_shard``): :func:`attach` drives an optimizer's learning
rate by a policy, with each rank's local gradient norm read from FSDP's reduce-scatter. docs/fsdp.md.
"""
from .driver import FSDPDriver, attach

__all__ = ["FSDPDriver", "attach"]
