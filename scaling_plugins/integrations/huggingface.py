"""The Hugging Face Trainer and Accelerate, which build the DeepSpeed engine from a ds_config themselves.

    from scaling_plugins.integrations.huggingface import ScalingCallback, scaling_driver   # registers the policies
    args = TrainingArguments(..., deepspeed="ds_config.json", max_steps=BUDGET)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ScalingCallback()])
    trainer.train()
    scaling_driver(trainer).gain                 # the policy's driver, behind Accelerate's wrapper

Importing this module imports ``scaling_plugins.backends.deepspeed``, so the ds_config's ``"scheduler"`` type may
name any policy. :class:`ScalingCallback` refuses a budget counted at the wrong batch at ``on_train_begin``, stops
the Trainer when the policy is done, and adds the step's ``scaling_plugins/<field>`` numbers to every training
log. The budget, stopping, logs, Accelerate without the Trainer: docs/huggingface.md.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("scaling_plugins.integrations.huggingface needs transformers and accelerate: "
                      "pip install 'scaling_plugins[hf]'") from err

from ..backends import deepspeed as _registers_the_policies  # noqa: F401  (DeepSpeed resolves policy names)
from ..backends.shared.driver import PolicyDriver
from ..call_stack import calling_instance
from ..policies import POLICIES
from ..policies.progress import BaseScaleProgress
from ..telemetry import monitor_events, record_from
from ..user_warnings import warn_user

log = logging.getLogger(__name__)

PREFIX = "scaling_plugins"
WRAPPER_ATTRIBUTES = ("lr_scheduler", "scheduler")   # Trainer/engine → Accelerate's wrapper → the scheduler
MAX_WRAPPERS = 4
STEPS = "steps"


def scaling_driver(source: Any) -> PolicyDriver:
    """The scaling_plugins scheduler behind ``source``: a Trainer (its ``lr_scheduler``), Accelerate's scheduler
    wrapper (its ``scheduler``), a DeepSpeed engine (its ``lr_scheduler``) or the scheduler itself.
    ``ValueError`` naming what was found when there is none."""
    found = []
    current = source
    for _ in range(MAX_WRAPPERS):
        if isinstance(current, PolicyDriver):
            return current
        found.append(type(current).__name__)
        current = next((getattr(current, name) for name in WRAPPER_ATTRIBUTES
                        if getattr(current, name, None) is not None), None)
        if current is None:
            break
    raise ValueError(f"no scaling_plugins scheduler behind {' → '.join(found)}: the ds_config's \"scheduler\" "
                     f"type must be a scaling_plugins policy (one of {sorted(POLICIES)}), and the engine built "
                     "(trainer.train(), accelerator.prepare(...)) before asking")


def step_fields(driver: PolicyDriver) -> dict[str, float]:
    """The step's numeric telemetry fields as ``scaling_plugins/<field>`` (``telemetry.STEP_FIELDS``)."""
    return {label: value for label, value, _ in monitor_events(record_from(driver), prefix=PREFIX)}


def check_budget_unit(driver: PolicyDriver, args: TrainingArguments, state: TrainerState) -> None:
    """``ValueError`` when a budget in base-scale steps came from ``num_train_epochs`` (a count of steps at this
    run's batch) rather than from ``max_steps`` (module docstring, "The budget")."""
    policy = driver.policy
    if not isinstance(policy, BaseScaleProgress) or policy.total_num_steps is None or args.max_steps > 0:
        return
    raise ValueError(
        f"scheduler.params.total_num_steps = {policy.total_num_steps:g} is {policy.name}'s budget in base-scale "
        f"steps, but the Trainer filled it from num_train_epochs = {args.num_train_epochs:g} ({state.max_steps} "
        f"optimizer steps at this run's batch, {driver.scale:g} × the base batch). Set max_steps to the budget "
        f"in steps of the base batch (the same epochs take {state.max_steps * driver.scale:g}); the policy stops "
        "training when it is done")


def check_fixed_batch(driver: PolicyDriver) -> None:
    """``ValueError`` for a batch-size controller (AdaptiveBatch): the Trainer runs its own
    ``gradient_accumulation_steps`` per step and would not follow a batch the policy changes."""
    if driver.policy.controls_batch:
        raise ValueError(f"policy {driver.policy.name!r} changes the batch (gradient_accumulation_steps) during "
                         "training, but the Trainer keeps its own TrainingArguments.gradient_accumulation_steps: use "
                         "AdaScale here, or AdaptiveBatch in a loop of your own (plain DeepSpeed, DDP, Horovod)")


class ScalingCallback(TrainerCallback):
    """Stops the Trainer when the policy is done and adds the policy's numbers to the Trainer's logs (module
    docstring). Pass it in ``Trainer(callbacks=[ScalingCallback()])``; ``driver`` is the policy's scheduler
    once training has begun."""

    def __init__(self) -> None:
        self.driver: Optional[PolicyDriver] = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       lr_scheduler: Any = None, **kwargs: Any) -> None:
        self.driver = scaling_driver(lr_scheduler)
        check_fixed_batch(self.driver)
        check_budget_unit(self.driver, args, state)
        self._run_before_reporters()

    def _run_before_reporters(self) -> None:
        handler = calling_instance(CallbackHandler)   # the handler dispatching on_train_begin to this callback
        if handler is None:
            warn_user("ScalingCallback: the Trainer's CallbackHandler is not on the call stack; the scaling "
                      "fields reach only the callbacks after this one")
            return
        callbacks = handler.callbacks
        # Moved earlier, call_event's loop still visits each callback once; moved later, it calls this again,
        # which finds it in place.
        callbacks.remove(self)
        flow = next((i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), -1)
        callbacks.insert(flow + 1, self)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.driver is None or not self.driver.done:
            return
        if not control.should_training_stop:
            log.info("policy %r is done at step %d (progress %.6g ≥ budget %s): stopping the Trainer",
                     self.driver.policy.name, state.global_step, self.driver.progress,
                     getattr(self.driver.policy, "total_num_steps", None))
        control.should_training_stop = True
        control.should_log = control.should_log or args.logging_strategy == STEPS
        control.should_save = control.should_save or args.save_strategy == STEPS
        control.should_evaluate = control.should_evaluate or (args.eval_strategy == STEPS
                                                              and args.eval_delay <= state.global_step)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        if self.driver is None or logs is None or "learning_rate" not in logs:
            return
        fields = step_fields(self.driver)
        logs.update(fields)
        entry = state.log_history[-1] if state.log_history else {}
        if entry.get("step") == state.global_step and "learning_rate" in entry:
            entry.update(fields)
