"""LEGW, linear-epoch gradual warmup (You, Hseu, Ying, Demmel, Keutzer & Hsieh, "Large-Batch Training for
LSTM and Beyond", SC'19).

A schedule tuned at batch B0 — a peak learning rate reached by a linear warmup over W0 base-scale steps,
then any decay (polynomial, exponential, multi-step, cosine, evaluated on progress τ in base-scale steps,
i.e. in epochs) — runs at batch k·B0 with

    peak lr × √k,      warmup epochs × k   (W = k·W0 base-scale steps, so W0 optimizer steps at every k).

Each doubling of the batch multiplies the peak by √2 and the warmup epochs by 2. ``warmup_num_steps`` is
W0, the warmup as tuned at B0; the warmup starts from 0 by default (``warmup_start_factor`` × the unscaled
rate). Mechanics shared with the other rules: ``scaling_rule``.
"""
from __future__ import annotations

from .registry import register
from .scaling_rule import ScalingRule


@register
class LEGW(ScalingRule):
    """Peak lr × √k, warmup epochs × k over a base schedule; parameters as in :class:`ScalingRule`.

    You et al., "Large-Batch Training for LSTM and Beyond", SC'19.

    Example::

        policy = LEGW(warmup_num_steps=500, schedule={"type": "cosine", "total_num_steps": 5000})
    """

    name = "LEGW"
    exponent = 0.5
    default_warmup_start_factor = 0.0

    @staticmethod
    def warmup_growth(k: float) -> float:
        """W = k · W0 base-scale steps: the warmup's epochs grow with the batch, its iterations do not."""
        return k
