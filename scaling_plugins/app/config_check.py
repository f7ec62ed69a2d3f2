"""Validate policy entries without training: every problem with its key path, the bad value and what is allowed.

Two kinds of file are understood:
- a DeepSpeed config: its ``"scheduler"`` entry is checked when it names a scaling_plugins policy
  (a DeepSpeed or torch scheduler name is left to DeepSpeed);
- a standalone policy config: ``{"type": NAME, "params": {...}}``, the same entry other backends accept.

Each parameter is checked on its own (so one bad key does not hide another), then all together (for rules
that tie keys, e.g. ``min_lr < max_lr``), with the same code that builds the policy at run time
(``scaling_plugins.policies`` and ``scaling_plugins.config``).
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

from ..config import allowed_keys
from ..policies import POLICIES
from ..policies.base import Policy

ENTRY_KEYS = ("params", "type")


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (a dotted key path), the bad value, and what is allowed."""

    path: str
    value: Any
    message: str

    def __str__(self) -> str:
        return f"{self.path} = {json.dumps(self.value, default=repr)}: {self.message}"


def _required(cls: type[Policy]) -> list[str]:
    parameters = inspect.signature(cls).parameters.values()
    return [p.name for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _construct(cls: type[Policy], params: Mapping[str, Any]) -> str | None:
    """None when ``cls(**params)`` builds; else its error message."""
    try:
        cls(**params)
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def check_params(cls: type[Policy], params: Any, path: str) -> list[Problem]:
    """Problems of a policy's ``params`` mapping: unknown keys, missing required ones, bad values."""
    if not isinstance(params, Mapping):
        return [Problem(path, params, "must be a mapping of parameter name to value")]
    allowed = allowed_keys(cls)
    problems = [Problem(f"{path}.{key}", value, f"unknown parameter of {cls.name}; allowed: {allowed}")
                for key, value in params.items() if key not in allowed]
    missing = [key for key in _required(cls) if key not in params]
    problems += [Problem(f"{path}.{key}", None, f"required by {cls.name}") for key in missing]
    if missing:
        return problems
    base = {key: params[key] for key in _required(cls)}
    baseline = _construct(cls, base)   # a policy may need a key it does not mark as required (AutoWU's budget)
    for key, value in params.items():
        if key in allowed and key not in base:
            error = _construct(cls, {**base, key: value})
            if error and error != baseline:
                problems.append(Problem(f"{path}.{key}", value, error))
    if not problems:
        error = _construct(cls, params)
        if error:
            problems.append(Problem(path, dict(params), error))
    return problems


def check_entry(entry: Any, path: str, deepspeed: bool = False) -> list[Problem]:
    """Problems of one ``{"type": NAME, "params": {...}}`` policy entry at ``path``. In a DeepSpeed config the
    params may also hold DeepSpeed's ``last_batch_iteration``, which must be -1 (a run resumes from
    ``engine.load_checkpoint``, which restores the policy's whole state)."""
    if not isinstance(entry, Mapping):
        return [Problem(path, entry, 'must be a mapping {"type": NAME, "params": {...}}')]
    problems = [Problem(f"{path}.{key}", value, f"unknown key; allowed: {list(ENTRY_KEYS)}")
                for key, value in entry.items() if key not in ENTRY_KEYS]
    name = entry.get("type")
    if name not in POLICIES:
        return problems + [Problem(f"{path}.type", name, f"not a policy; valid policies: {sorted(POLICIES)}")]
    params = entry.get("params") or {}
    if deepspeed and isinstance(params, Mapping) and "last_batch_iteration" in params:
        params = dict(params)
        last = params.pop("last_batch_iteration")
        if last != -1:
            problems.append(Problem(f"{path}.params.last_batch_iteration", last,
                                    "only -1 is allowed: resume with engine.load_checkpoint, which restores the "
                                    "policy's state"))
    return problems + check_params(POLICIES[name], params, f"{path}.params")


def _engine_scheduler(name: Any) -> bool:
    """Whether ``name`` is a scheduler DeepSpeed resolves itself (its own list, then torch's)."""
    import torch.optim.lr_scheduler as torch_schedulers

    if isinstance(name, str) and hasattr(torch_schedulers, name):
        return True
    try:
        from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES
    except ImportError:
        return False
    return name in VALID_LR_SCHEDULES


def check_document(document: Any) -> tuple[list[Problem], list[str]]:
    """(problems, notes) for a parsed config: a DeepSpeed config or a standalone policy entry."""
    if isinstance(document, Mapping) and "scheduler" in document:
        scheduler = document["scheduler"]
        name = scheduler.get("type") if isinstance(scheduler, Mapping) else None
        if name not in POLICIES and _engine_scheduler(name):
            return [], [f"scheduler.type = {name!r} is DeepSpeed's or torch's own scheduler, not a scaling_plugins "
                        f"policy; nothing to check here"]
        return (check_entry(scheduler, "scheduler", deepspeed=True),
                [f"DeepSpeed config: checked its scheduler entry {name!r}"])
    if isinstance(document, Mapping) and "type" in document:
        return check_entry(document, "policy"), [f"standalone policy config {document.get('type')!r}"]
    return [Problem("(top level)", None, 'expected a DeepSpeed config with a "scheduler" entry or a policy entry '
                    '{"type": NAME, "params": {...}}')], []


def check_file(path: Union[str, Path]) -> tuple[list[Problem], list[str]]:
    """(problems, notes) for a JSON file; an unreadable or malformed file is one problem."""
    try:
        document = json.loads(Path(path).read_text())
    except OSError as err:
        return [Problem(str(path), None, f"cannot read: {err.strerror}")], []
    except json.JSONDecodeError as err:
        return [Problem(f"{path}:{err.lineno}:{err.colno}", None, f"not valid JSON: {err.msg}")], []
    return check_document(document)
