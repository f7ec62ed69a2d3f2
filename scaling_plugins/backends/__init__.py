"""Engine backends: harvest gradient norms from the engine's own reductions and apply the policy's learning rate.

No math lives here; see ``scaling_plugins.stats`` and ``scaling_plugins.policies``.
Optional engines are imported lazily by their own module (``backends.deepspeed``, ``backends.horovod``).
"""
