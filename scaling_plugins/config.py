"""One validated schema for every policy: the JSON a DeepSpeed config carries is the kwargs other backends take.

A policy's constructor is its schema: the allowed keys are its keyword parameters, the allowed types are their
annotations, and its own checks reject bad values with a ``ValueError`` that names the key, the value and what
is allowed. This module checks the keys and the types — every number finite, an integer where the annotation
says ``int``, a string where it says ``str``, nested lists and mappings by their element types — and turns a
params mapping into a constructed policy, turning every failure into such a message. Policies run the type
check whenever they are constructed (``Policy.__new__``), schedules whenever they are built from config, so the
API, the DeepSpeed entry and ``scaling-plugins check-config`` give the same message.
"""
from __future__ import annotations

import collections.abc
import inspect
import math
import numbers
import typing
from typing import Any, Callable, Mapping, TypeVar, Union

T = TypeVar("T")


def allowed_keys(target: Callable) -> list[str]:
    """The keyword parameters of ``target``'s constructor (or of the function ``target``)."""
    parameters = inspect.signature(target).parameters.values()
    return sorted(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _type_hints(target: Callable) -> dict[str, Any]:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except (NameError, TypeError):   # an annotation that does not resolve: nothing to check it against
        return {}


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is of the annotated type; numbers must also be finite."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin is Union:
        return any(_matches(value, member) for member in typing.get_args(annotation))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    if origin in (collections.abc.Sequence, list, tuple):
        (element,) = typing.get_args(annotation)[:1] or (Any,)
        return (isinstance(value, (list, tuple))
                and all(_matches(item, element) for item in value))
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return callable(value)
    if origin is collections.abc.Mapping or annotation is collections.abc.Mapping or annotation is Mapping:
        return isinstance(value, collections.abc.Mapping)
    return True   # a type this schema does not describe: left to the constructor's own checks


def _describe(annotation: Any) -> str:
    """What an annotation allows, in words ("a finite number", "a list of finite numbers", ...)."""
    origin = typing.get_origin(annotation)
    if origin is Union:
        members = [m for m in typing.get_args(annotation) if m is not type(None)]
        return " or ".join(_describe(m) for m in members) or "null"
    if origin in (collections.abc.Sequence, list, tuple):
        (element,) = typing.get_args(annotation)[:1] or (Any,)
        return f"a list of {_describe(element).removeprefix('a ').removeprefix('an ')}s"
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return "a callable"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             type(None): "null", Any: "anything"}
    if annotation in names:
        return names[annotation]
    if origin is collections.abc.Mapping or annotation in (collections.abc.Mapping, Mapping):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def check_types(target: Callable, arguments: Mapping[str, Any]) -> None:
    """``ValueError`` naming the first argument whose value does not match ``target``'s annotation for it,
    e.g. ``scale = 'inf' (str): must be a finite number``."""
    hints = _type_hints(target)
    for key, value in arguments.items():
        annotation = hints.get(key)
        if annotation is not None and not _matches(value, annotation):
            raise ValueError(f"{key} = {value!r} ({type(value).__name__}): must be {_describe(annotation)}")


def bound_arguments(target: Callable, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``target(*args, **kwargs)``'s arguments by name, defaults included, after :func:`check_types`;
    ``TypeError`` (as Python raises it) when they do not bind."""
    bound = inspect.signature(target).bind(*args, **kwargs)
    check_types(target, bound.arguments)
    bound.apply_defaults()
    return dict(bound.arguments)


def build_from_params(target: Callable[..., T], params: Mapping[str, Any], where: str = "params") -> T:
    """``target(**params)`` after checking every key and type; unknown keys raise ``ValueError`` listing the
    allowed ones, and every ``ValueError`` is prefixed with ``where`` (the key path of ``params``)."""
    if not isinstance(params, Mapping):
        raise ValueError(f"{where} must be a mapping, got {params!r}")
    allowed = allowed_keys(target)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown} for {getattr(target, 'name', target.__name__)}; allowed: {allowed}")
    try:
        check_types(target, params)
        return target(**params)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
