"""Linear scaling with gradual warmup (Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in
1 Hour", 2017).

At batch k·B0: lr = base_lr · k · schedule(τ), after a linear warmup from the base rate (lr = base_lr) to
k·base_lr over ``warmup_num_steps`` base-scale steps (Goyal et al.: 5 epochs, i.e. 5·N/B0 base-scale steps
for N training samples, whatever k is). Mechanics shared with the other rules: ``scaling_rule``.
"""
from __future__ import annotations

from .registry import register
from .scaling_rule import ScalingRule


@register
class LinearScaling(ScalingRule):
    """lr × k with gradual warmup from the base rate; parameters as in :class:`ScalingRule`.

    Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017.

    Example::

        policy = LinearScaling(warmup_num_steps=500, total_num_steps=5000)
    """

    name = "LinearScaling"
    exponent = 1.0
    default_warmup_start_factor = 1.0
