"""A DeepSpeed ``"scheduler"`` entry's params as the Hugging Face Trainer, Accelerate or plain DeepSpeed hand them.

Two things can reach a policy's scheduler that its constructor does not take; :func:`resolve_scheduler_params`
turns both into the policy's own keywords (``scaling_plugins.config`` then checks them as usual):

- HF's flat schedule keys (``warmup_min_lr``, ``warmup_max_lr``, ``warmup_num_steps``, ``warmup_type`` beside
  ``total_num_steps``, where the Trainer and Accelerate fill "auto"): for AdaScale and AdaScaleAdam they are the
  base schedule's parameters (DeepSpeed's ``WarmupDecayLR`` when there is a budget, else ``WarmupLR``, or the
  ``schedule`` named); policies with keys of their own take them as they are and refuse the rest by name;
- "auto" nobody filled (plain DeepSpeed): the value the Trainer fills with its default ``TrainingArguments``, with
  one warning listing the values used; "auto" for any other key, or in a nested entry, is a ``ValueError``.

Needs no engine (the app's ``check-config`` uses it too). The rules in full: docs/huggingface.md.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Optional

from .config import allowed_keys
from .policies import policy_class
from .schedules import SCHEDULES
from .user_warnings import warn_user

log = logging.getLogger(__name__)

AUTO = "auto"
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
TRAINER_FILLED_KEYS = (*BATCH_KEYS, "gradient_clipping")   # and optimizer.params.*: "auto" there only the Hugging
#                                                            Face Trainer and Accelerate fill; DeepSpeed cannot read it
BUDGET = "total_num_steps"
SCHEDULE_KEYS = ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type")
OPTIMIZER_LR = object()   # stands for the optimizer's lr in PLAIN_DEEPSPEED_AUTO
PLAIN_DEEPSPEED_AUTO: dict[str, Any] = {"warmup_min_lr": 0.0, "warmup_max_lr": OPTIMIZER_LR,
                                        "warmup_num_steps": 1, BUDGET: None}


def is_auto(value: Any) -> bool:
    """Whether a config value is the string "auto"."""
    return isinstance(value, str) and value == AUTO


def resolve_scheduler_params(policy: str, params: Mapping[str, Any],
                             optimizer_lr: Optional[float] = None) -> dict[str, Any]:
    """The keywords policy ``policy`` is built from, given a ``"scheduler"`` entry's ``params`` (module
    docstring): "auto" resolved as plain DeepSpeed reads it, HF's flat schedule keys moved into the schedule.
    ``optimizer_lr`` is what ``warmup_max_lr: "auto"`` becomes (None: the key is dropped, and the schedules,
    which are multipliers of the optimizer's lr, read that as the optimizer's lr)."""
    takes = allowed_keys(policy_class(policy))
    resolved = _resolve_auto(params, optimizer_lr)
    if "schedule" in takes and "warmup_num_steps" not in takes:
        resolved = _flat_keys_into_schedule(policy, resolved)
    return resolved


def _resolve_auto(params: Mapping[str, Any], optimizer_lr: Optional[float]) -> dict[str, Any]:
    """``params`` with every top-level "auto" replaced by ``PLAIN_DEEPSPEED_AUTO`` (None: the key dropped);
    ``ValueError`` for "auto" under another key or nested deeper."""
    resolved, used = {}, {}
    for key, value in params.items():
        if value != AUTO:
            _refuse_nested_auto(value, f"scheduler.params.{key}")
            resolved[key] = value
            continue
        if key not in PLAIN_DEEPSPEED_AUTO:
            raise ValueError(f"scheduler.params.{key} = 'auto': only {sorted(PLAIN_DEEPSPEED_AUTO)} may be \"auto\" "
                             "(the keys the Hugging Face Trainer and Accelerate fill); give a value")
        value = PLAIN_DEEPSPEED_AUTO[key]
        used[key] = value = optimizer_lr if value is OPTIMIZER_LR else value
        if value is not None:
            resolved[key] = value
    if used:
        described = ", ".join(f"{key}={_describe(key, value)}" for key, value in used.items())
        warn_user("scheduler.params: \"auto\" that neither the Hugging Face Trainer nor Accelerate filled (plain "
                  f"DeepSpeed) is read as the Trainer's defaults: {described}")
    return resolved


def _describe(key: str, value: Any) -> str:
    if key == BUDGET:
        return "none (no budget: the policy is never done)"
    return "the optimizer's lr" if value is None else repr(value)


def _refuse_nested_auto(value: Any, path: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if item == AUTO:
                raise ValueError(f"{path}.{key} = 'auto': \"auto\" is allowed only directly in scheduler.params "
                                 f"(for {sorted(PLAIN_DEEPSPEED_AUTO)}); Accelerate refuses it in a nested entry. "
                                 f"Give a value, or move the key up into scheduler.params")
            _refuse_nested_auto(item, f"{path}.{key}")


def _flat_keys_into_schedule(policy: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with HF's flat schedule keys moved into ``params["schedule"]`` (module docstring)."""
    flat = {key: params.pop(key) for key in SCHEDULE_KEYS if key in params}
    if not flat:
        return params
    schedule = params.get("schedule")
    if schedule is None:
        schedule = "WarmupDecayLR" if params.get(BUDGET) is not None else "WarmupLR"
        log.info("scheduler.params: %s with no schedule: the base schedule is %s", sorted(flat), schedule)
    if isinstance(schedule, str):
        schedule = {"type": schedule}
    if not isinstance(schedule, Mapping):
        raise ValueError(f"scheduler.params has {sorted(flat)}, parameters of a base schedule, but schedule is "
                         f"{schedule!r}, which takes none: name a schedule (e.g. \"WarmupLR\") or drop them")
    name = schedule.get("type")
    if name not in SCHEDULES:
        raise ValueError(f"scheduler.params.schedule.type = {name!r} is not a known schedule; valid: "
                         f"{sorted(SCHEDULES)}")
    own = {**{k: v for k, v in schedule.items() if k not in ("type", "params")}, **(schedule.get("params") or {})}
    schedule_takes = allowed_keys(SCHEDULES[name])
    if params.get(BUDGET) is not None and BUDGET in schedule_takes and BUDGET not in own:
        flat[BUDGET] = params[BUDGET]
    for key, value in flat.items():
        if key not in schedule_takes:
            raise ValueError(f"scheduler.params.{key} = {value!r}: neither {policy} nor its schedule {name!r} takes "
                             f"it; {name} takes {schedule_takes}")
        if key in own and own[key] != value:
            raise ValueError(f"scheduler.params.{key} = {value!r} and scheduler.params.schedule's {key} = "
                             f"{own[key]!r} differ: give it once")
    params["schedule"] = {"type": name, "params": {**own, **flat}}
    return params
