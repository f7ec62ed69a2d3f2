"""Square-root scaling (Krizhevsky, "One weird trick for parallelizing convolutional neural networks", 2014;
Hoffer et al., "Train longer, generalize better", 2017): at batch k·B0, lr = base_lr · √k · schedule(τ),
keeping the variance of the update per sample fixed. An optional linear warmup from the base rate over
``warmup_num_steps`` base-scale steps, as for linear scaling. Mechanics shared with the other rules:
``scaling_rule``.
"""
from __future__ import annotations

from .registry import register
from .scaling_rule import ScalingRule


@register
class SqrtScaling(ScalingRule):
    """lr × √k, optional gradual warmup from the base rate; parameters as in :class:`ScalingRule`.

    Krizhevsky, "One weird trick for parallelizing convolutional neural networks", 2014.

    Example::

        policy = SqrtScaling(total_num_steps=5000)
    """

    name = "SqrtScaling"
    exponent = 0.5
    default_warmup_start_factor = 1.0
