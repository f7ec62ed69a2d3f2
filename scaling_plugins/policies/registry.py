"""Policies by name: the one table that the DDP, DeepSpeed and Horovod backends all read."""
from __future__ import annotations

from typing import Mapping, Union

from ..config import build_from_params
from .base import Policy

POLICIES: dict[str, type[Policy]] = {}

PolicySpec = Union[Policy, str, Mapping]


def register(policy_class: type[Policy]) -> type[Policy]:
    """Class decorator: make ``policy_class`` reachable as ``policy_class.name`` in every backend."""
    POLICIES[policy_class.name] = policy_class
    return policy_class


def policy_class(name: str) -> type[Policy]:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; valid policies: {sorted(POLICIES)}") from None


def build_policy(spec: PolicySpec) -> Policy:
    """A policy from an instance, a name, or ``{"type": name, "params": {...}}``; parameters validated."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ValueError(f"policy must be a Policy, a name or a mapping with 'type', got {spec!r}")
    extra = set(spec) - {"type", "params"}
    if extra:
        raise ValueError(f"policy entry has unknown keys {sorted(extra)}; allowed: ['params', 'type']")
    return build_from_params(policy_class(spec["type"]), spec.get("params") or {})
