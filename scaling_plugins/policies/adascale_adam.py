"""AdaScale for Adam-family optimizers (Adam, AdamW, LAMB): an experimental rule, chosen by name.

AdaScale (Johnson et al., ICML 2020) was derived and validated for SGD only. Adam's update is normalised by
√v, so a batch k times larger calls for lr × √k rather than × k: the square-root scaling rule of Malladi,
Lyu, Panigrahi & Arora, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms" (NeurIPS 2022),
and the √k scaling You et al. used for LAMB ("Large Batch Optimization for Deep Learning", ICLR 2020).
AdaScale's gain r is the effective batch multiple of a step, so this rule puts r where k was:

    lr_t = base_lr · √r_t · schedule(τ_t),      τ_{t+1} = τ_t + r_t

with r_t estimated exactly as for AdaScale SGD, from the plain (not preconditioned) gradients: that is what
every backend already harvests with no extra pass, and it needs none of the optimizer's state. β1, β2 and
ε stay as configured (Malladi et al. also rescale them; that is not applied here). ``AdaScale`` (the SGD rule)
stays the default; this one is used only when asked for by name, and warns when attached.
"""
from __future__ import annotations

import math
from typing import Optional

from ..user_warnings import warn_user
from .adascale import AdaScale
from .registry import register

SGD_ONLY_WARNING = ("AdaScaleAdam is experimental: the AdaScale paper validated SGD only; this applies "
                    "lr × √gain (the square-root rule for adaptive optimizers) with the SGD gain estimator")


@register
class AdaScaleAdam(AdaScale):
    """AdaScale's gain under the square-root rule, for Adam/AdamW/LAMB; parameters as :class:`AdaScale`.

    lr = base lr · √r · schedule(τ), τ += r (the square-root rule for adaptive optimizers: Malladi et al., "On the
    SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022).

    Example::

        driver = attach(ddp_model, torch.optim.AdamW(model.parameters(), lr=1e-3), "AdaScaleAdam")
    """

    name = "AdaScaleAdam"

    def configure(self, world_size: int, accumulation_steps: int) -> None:
        warn_user(SGD_ONLY_WARNING)
        super().configure(world_size, accumulation_steps)

    def optimizer_advice(self, optimizer_class: type) -> Optional[str]:
        """None: the square-root rule is the one for adaptive optimizers (and it warns as experimental anyway)."""
        return None

    def learning_rate(self, base_lr: float) -> float:
        """base_lr · √r · schedule(τ): AdaScale's base_lr · r · schedule(τ) divided by √r."""
        return super().learning_rate(base_lr) / math.sqrt(self.gain)
