"""Engine backends: harvest gradient norms from the engine's own reductions and apply the policy's learning rate.

``driver.PolicyDriver`` holds the per-step logic all three share (the loss all-reduce, the gradient sample,
validation, learning rates from each group's ``initial_lr``); ``ddp``, ``deepspeed`` and ``horovod`` each
subclass it with only what is specific to their engine: where the numbers ride and when the step happens.
Every touch of an engine's internals sits in ``deepspeed_compat`` or ``horovod_compat``, which check the
engine's version. No math lives here; see ``scaling_plugins.stats`` and ``scaling_plugins.policies``.
Optional engines are imported lazily by their own module (``backends.deepspeed``, ``backends.horovod``).
"""
