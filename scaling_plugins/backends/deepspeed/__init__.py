"""DeepSpeed backend: importing it makes every policy a DeepSpeed ``"scheduler"`` type; :func:`initialize` is
``deepspeed.initialize`` with ``policy=``. DeepSpeed must be installed, in a supported version (``compat``).
docs/deepspeed.md.
"""
from .driver import DeepSpeedDriver, initialize, scheduler_class

__all__ = ["DeepSpeedDriver", "initialize", "scheduler_class"]
