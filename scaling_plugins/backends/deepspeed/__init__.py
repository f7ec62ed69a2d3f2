"""DeepSpeed backend: importing it makes every policy a DeepSpeed ``"scheduler"`` type; :func:`initialize` is
``deepspeed.initialize`` with ``policy=``; every process group DeepSpeed makes from then on takes the default
group's timeout (``compat.groups_take_the_default_timeout``). DeepSpeed must be installed, in a supported version
(``compat``). docs/deepspeed.md.
"""
from .driver import DeepSpeedDriver, initialize, scheduler_class

__all__ = ["DeepSpeedDriver", "initialize", "scheduler_class"]
