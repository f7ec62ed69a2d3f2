"""scaling_plugins: batch-size-aware learning-rate policies for PyTorch DDP, DeepSpeed and Horovod.

    import scaling_plugins
    policy = scaling_plugins.AdaScale()                       # or any name in scaling_plugins.POLICIES
    driver = scaling_plugins.backends.ddp.attach(ddp_model, optimizer, policy)
"""
import logging

from . import schedules
from .ema import ModelEMA, scale_ema_momentum
from .policies import (LEGW, POLICIES, AdaScale, AdaScaleAdam, AdaptiveBatch, AutoWU, LinearScaling, Policy,
                       SqrtScaling, StepObservation, build_policy, register)
from .stats import GradientSample, GradientStatistics
from .user_warnings import ScalingWarning

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["AdaScale", "AdaScaleAdam", "AdaptiveBatch", "AutoWU", "GradientSample", "GradientStatistics", "LEGW",
           "LinearScaling", "ModelEMA", "POLICIES", "Policy", "ScalingWarning", "SqrtScaling", "StepObservation",
           "build_policy", "register", "scale_ema_momentum", "schedules"]
__version__ = "0.1.0"
