"""Learning-rate policies. Importing this package registers every built-in policy by name."""
from .adascale import AdaScale
from .adascale_adam import AdaScaleAdam
from .adaptive_batch import AdaptiveBatch
from .autowu import AutoWU
from .legw import LEGW
from .linear_scaling import LinearScaling
from .sqrt_scaling import SqrtScaling
from .base import Policy, StepObservation
from .registry import POLICIES, build_policy, policy_class, register

__all__ = ["AdaScale", "AdaScaleAdam", "AdaptiveBatch", "AutoWU", "LEGW", "LinearScaling", "SqrtScaling", "Policy",
           "StepObservation", "POLICIES", "build_policy", "policy_class", "register"]
