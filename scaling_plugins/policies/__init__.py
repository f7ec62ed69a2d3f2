"""Learning-rate policies. Importing this package registers every built-in policy by name."""
from .adascale import AdaScale
from .base import Policy, StepObservation
from .registry import POLICIES, build_policy, policy_class, register

__all__ = ["AdaScale", "Policy", "StepObservation", "POLICIES", "build_policy", "policy_class", "register"]
