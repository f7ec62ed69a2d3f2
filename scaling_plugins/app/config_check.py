"""Validate policy entries without training: every problem with its key path, the bad value and what is allowed.

Two kinds of file are understood:
- a DeepSpeed config, read as DeepSpeed reads it (Hjson, a key given twice refused: ``inputs.parse_config``): its
  ``"scheduler"`` entry is checked when it names a scaling_plugins policy (a DeepSpeed or torch scheduler name is
  left to DeepSpeed); "auto" where only the Hugging Face Trainer and Accelerate fill it (batch sizes, gradient
  clipping, the optimizer's params) is a warning naming the keys, since plain ``deepspeed.initialize`` refuses it
  but the same file is right for the Trainer;
- a standalone policy config: ``{"type": NAME, "params": {...}}``, the same entry other backends accept (JSON).

Each parameter is checked on its own (so one bad key does not hide another), then all together (for rules
that tie keys, e.g. ``min_lr < max_lr``), with the same code that builds the policy at run time
(``scaling_plugins.policies`` and ``scaling_plugins.config``).

A valid entry is then configured the way ``attach`` / ``deepspeed.initialize`` configure it, because some
checks need the run's shape (LEGW's warmup grows with k = workers × accumulation and must stay shorter than
``total_num_steps``). With a :class:`Shape` whose ``workers`` is given, that one shape is checked and a failure
is a problem. Without it every shape of 1..``PROBED_WORKERS`` workers is tried and the ones that would fail
at attach are reported as a warning (the file may be meant for a small run), with the failing range.
The accumulation is ``Shape.accumulation``, else a DeepSpeed config's ``gradient_accumulation_steps``, else 1.
"""
from __future__ import annotations

import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from ..scheduler_params import TRAINER_FILLED_KEYS, is_auto, resolve_scheduler_params
from ..config import allowed_keys
from ..policies import POLICIES
from ..policies.base import Policy
from ..user_warnings import ScalingWarning
from .inputs import InputError, parse_config

ENTRY_KEYS = ("params", "type")
PROBED_WORKERS = 1024   # shapes tried when the run's shape is not given: 1..PROBED_WORKERS workers


class _NoValue:
    """The value of a problem that belongs to the file (unreadable, not JSON), not to a key."""

    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE = _NoValue()


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (a dotted key path, or a line of the file), the bad value, and what is allowed."""

    path: str
    value: Any
    message: str

    def __str__(self) -> str:
        head = self.path if self.value is NO_VALUE else f"{self.path} = {json.dumps(self.value, default=repr)}"
        return f"{head}: {self.message}" if head else self.message


def _required(cls: type[Policy]) -> list[str]:
    parameters = inspect.signature(cls).parameters.values()
    return [p.name for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _construct(cls: type[Policy], params: Mapping[str, Any]) -> Exception | None:
    """None when ``cls(**params)`` builds; else its error (an ``ImportError``: a missing optional dependency,
    such as AutoWU's scikit-learn)."""
    try:
        cls(**params)
    except (ValueError, TypeError, ImportError) as err:
        return err
    return None


def _value_error(error: Exception | None) -> str | None:
    """The message of an error that blames the values; None for success or a missing dependency."""
    return None if error is None or isinstance(error, ImportError) else str(error)


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
    baseline = _value_error(_construct(cls, base))   # a policy may need a key it does not mark as required
    for key, value in params.items():                  # (AutoWU's budget)
        if key in allowed and key not in base:
            error = _value_error(_construct(cls, {**base, key: value}))
            if error and error != baseline:
                problems.append(Problem(f"{path}.{key}", value, error))
    if not problems:
        error = _construct(cls, params)
        if error:
            problems.append(Problem(path, dict(params), str(error)))
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
    if deepspeed and entry.get("params") is None:
        problems.append(Problem(f"{path}.params", None, "required by DeepSpeed, which builds the scheduler with "
                                "**params: use {} for every default"))
    params = entry.get("params") or {}
    if deepspeed and isinstance(params, Mapping) and params.get("last_batch_iteration", -1) != -1:
        problems.append(Problem(f"{path}.params.last_batch_iteration", params["last_batch_iteration"],
                                "only -1 is allowed: resume with engine.load_checkpoint, which restores the "
                                "policy's state"))
    try:
        params = _policy_params(entry, deepspeed)
    except ValueError as err:
        return problems + [Problem(f"{path}.params", dict(entry["params"]), str(err))]
    return problems + check_params(POLICIES[name], params, f"{path}.params")


def _policy_params(entry: Mapping[str, Any], deepspeed: bool) -> Any:
    """The keywords the policy is built from: the entry's params, less DeepSpeed's own last_batch_iteration; in a
    DeepSpeed config with HF's flat schedule keys and "auto" read as the DeepSpeed backend reads them
    (``scaling_plugins.scheduler_params``; ``ValueError`` where it refuses them)."""
    params = entry.get("params") or {}
    if deepspeed and isinstance(params, Mapping):
        params = {key: value for key, value in params.items() if key != "last_batch_iteration"}
        with warnings.catch_warnings():   # "auto" in scheduler.params is for the Trainer to fill, not a mistake here
            warnings.simplefilter("ignore", ScalingWarning)
            return resolve_scheduler_params(entry["type"], params)
    return params


@dataclass(frozen=True)
class Shape:
    """The run's shape as far as it is known: workers (ranks), accumulation steps and samples per micro-batch (a
    DeepSpeed config's ``train_micro_batch_size_per_gpu``, which a batch-size controller takes); None = not given."""

    workers: Optional[int] = None
    accumulation: Optional[int] = None
    micro_batch_size: Optional[int] = None


def _attach_error(policy: Policy, workers: int, accumulation: int) -> Optional[str]:
    """None when ``policy.configure(workers, accumulation)`` (what attach calls) succeeds; else its message."""
    try:
        policy.configure(workers, accumulation)
    except ValueError as err:
        return str(err)
    return None


def _spans(numbers: Iterable[int]) -> str:
    """``1, 3-5, 9``: sorted integers as runs of consecutive ones."""
    spans: list[list[int]] = []
    for number in sorted(numbers):
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def check_shapes(cls: type[Policy], params: Mapping[str, Any], path: str,
                 shape: Shape) -> tuple[list[Problem], list[str]]:
    """(problems, notes) of configuring a valid policy at the run's shape (module docstring). Warnings the
    policy gives at attach become notes, once each."""
    accumulation = shape.accumulation or 1
    tried = [shape.workers] if shape.workers is not None else range(1, PROBED_WORKERS + 1)
    policy = cls(**params)
    if shape.micro_batch_size is not None:
        try:
            policy.set_micro_batch_size(shape.micro_batch_size)   # as the DeepSpeed backend does
        except ValueError as err:
            return [Problem(path, dict(params), str(err))], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        failures = {workers: error for workers in tried
                    if (error := _attach_error(policy, workers, accumulation)) is not None}
    notes = [f"warning at attach: {message}" for message in dict.fromkeys(str(w.message) for w in caught)]
    if not failures:
        return [], notes
    first = min(failures)
    at = f"{first} worker(s) × {accumulation} accumulation step(s)"
    if shape.workers is not None:
        return [Problem(path, dict(params), f"fails at attach with {at}: {failures[first]}")], notes
    return [], notes + [f"warning: {path} fails at attach with {_spans(failures)} worker(s) (of 1-{PROBED_WORKERS} "
                        f"tried) × {accumulation} accumulation step(s); at {at}: {failures[first]}. Give --workers "
                        f"(and --accumulation) to check the run's own shape"]


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


def _checked_entry(entry: Any, path: str, deepspeed: bool, shape: Shape) -> tuple[list[Problem], list[str]]:
    """(problems, notes) of one policy entry: its keys and values, then, when they are valid, its shapes."""
    problems = check_entry(entry, path, deepspeed=deepspeed)
    if problems:
        return problems, []
    return check_shapes(POLICIES[entry["type"]], _policy_params(entry, deepspeed), f"{path}.params", shape)


def _deepspeed_count(document: Mapping[str, Any], key: str) -> Optional[int]:
    """A DeepSpeed config's ``key`` (``gradient_accumulation_steps``, ``train_micro_batch_size_per_gpu``) when it
    is a plain integer >= 1 (DeepSpeed checks the rest, e.g. "auto")."""
    value = document.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _hf_only_auto(document: Mapping[str, Any]) -> list[str]:
    """A warning naming the DeepSpeed config's keys that are "auto" where only the Hugging Face Trainer and
    Accelerate fill it (scaling_plugins.backends.deepspeed refuses them at deepspeed.initialize); [] when none."""
    keys = [key for key in TRAINER_FILLED_KEYS if is_auto(document.get(key))]
    optimizer = document.get("optimizer")
    params = optimizer.get("params") if isinstance(optimizer, Mapping) else None
    if isinstance(params, Mapping):
        keys += [f"optimizer.params.{key}" for key, value in params.items() if is_auto(value)]
    if not keys:
        return []
    return [f"warning: {', '.join(keys)} = \"auto\": only the Hugging Face Trainer and Accelerate fill \"auto\" "
            "there; plain deepspeed.initialize refuses it. Give numbers unless the file is for the Trainer or "
            "Accelerate (a policy's scheduler.params may keep \"auto\")"]


def check_document(document: Any, shape: Shape = Shape()) -> tuple[list[Problem], list[str]]:
    """(problems, notes) for a parsed config: a DeepSpeed config or a standalone policy entry, checked at
    ``shape`` (module docstring)."""
    if isinstance(document, Mapping) and "scheduler" in document:
        scheduler = document["scheduler"]
        name = scheduler.get("type") if isinstance(scheduler, Mapping) else None
        if name not in POLICIES and _engine_scheduler(name):
            return [], [f"scheduler.type = {name!r} is DeepSpeed's or torch's own scheduler, not a scaling_plugins "
                        f"policy; nothing to check here"] + _hf_only_auto(document)
        shape = Shape(shape.workers, shape.accumulation or _deepspeed_count(document, "gradient_accumulation_steps"),
                      _deepspeed_count(document, "train_micro_batch_size_per_gpu"))
        problems, notes = _checked_entry(scheduler, "scheduler", True, shape)
        notes = [f"DeepSpeed config: checked its scheduler entry {name!r}"] + notes + _hf_only_auto(document)
        return problems, notes
    if isinstance(document, Mapping) and "type" in document:
        problems, notes = _checked_entry(document, "policy", False, shape)
        return problems, [f"standalone policy config {document.get('type')!r}"] + notes
    return [Problem("(top level)", None, 'expected a DeepSpeed config with a "scheduler" entry or a policy entry '
                    '{"type": NAME, "params": {...}}')], []


def check_file(path: Union[str, Path], shape: Shape = Shape()) -> tuple[list[Problem], list[str]]:
    """(problems, notes) for a config file read as its reader reads it (``inputs.parse_config``: a DeepSpeed config
    as Hjson, duplicate keys refused); an unreadable, non-UTF-8 or malformed file is one problem, at its line."""
    try:
        parsed = parse_config(path)
    except InputError as err:
        return [Problem(err.position, NO_VALUE, err.message)], []
    problems, notes = check_document(parsed.document, shape)
    if parsed.hjson:
        notes = ["read as DeepSpeed reads it (Hjson: comments, trailing commas); the Hugging Face Trainer and "
                 "Accelerate read a ds_config file with json.load, which refuses it"] + notes
    return problems, notes
