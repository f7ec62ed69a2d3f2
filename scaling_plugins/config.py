"""One validated schema for every policy: the JSON a DeepSpeed config carries is the kwargs other backends take.

A policy's constructor is its schema: the allowed keys are its keyword parameters, and its own checks reject
bad values with a ``ValueError`` that names the key, the value and what is allowed. This module turns a
params mapping into a constructed policy and turns every failure into such a message.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def allowed_keys(target: type) -> list[str]:
    """The keyword parameters of ``target``'s constructor."""
    parameters = inspect.signature(target).parameters.values()
    return sorted(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def build_from_params(target: type[T], params: Mapping[str, Any], where: str = "params") -> T:
    """``target(**params)`` after checking every key; unknown keys raise ``ValueError`` listing the allowed ones."""
    if not isinstance(params, Mapping):
        raise ValueError(f"{where} must be a mapping, got {params!r}")
    allowed = allowed_keys(target)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown} for {getattr(target, 'name', target.__name__)}; allowed: {allowed}")
    try:
        return target(**params)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
