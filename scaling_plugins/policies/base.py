"""The protocol every learning-rate policy follows, so one policy works in every backend.

Per optimizer step a backend does, in this order:

    policy.step(StepObservation(gradients=GradientSample(L, T, n) or None, loss=loss or None))
    for each param group: group["lr"] = policy.learning_rate(group's base lr)
    optimizer.step()

``step`` folds this step's numbers in, fixes this step's learning rate and advances progress. A step the
engine skips (fp16 overflow) is not shown to the policy at all, so the policy does not advance.
Backends call ``configure(world_size, accumulation_steps)`` once at attach time, and again when the world
size or the accumulation changes (Horovod Elastic, ``engine.set_train_batch_size``). A batch-size controller
(``controls_batch``, e.g. ``AdaptiveBatch``) names the accumulation it wants in ``requested_accumulation_steps``;
the backend applies it after the optimizer step and configures the policy to it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from ..config import bound_arguments
from ..state_check import Entry, check_fields, integer
from ..stats import GradientSample

STATE_FORMAT = 1   # the version of the state layout; bump when a policy's state_dict changes shape


@dataclass(frozen=True)
class StepObservation:
    """What a backend saw in one optimizer step: reduced gradient norms (when the policy asked for them)
    and the training loss (the all-reduced mean, when the caller passed one)."""

    gradients: Optional[GradientSample] = None
    loss: Optional[float] = None


class Policy(ABC):
    """A learning-rate policy: a multiplier or an absolute learning rate per optimizer step, with state."""

    name: ClassVar[str]
    needs_gradient_norms: ClassVar[bool] = False
    needs_loss: ClassVar[bool] = False
    controls_batch: ClassVar[bool] = False   # chooses the accumulation steps (``requested_accumulation_steps``)
    params: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> "Policy":
        """Every construction checks the arguments' types against the constructor's annotations (finite numbers,
        integers, strings, ...: ``scaling_plugins.config``) and keeps them, defaults included, as ``params``."""
        policy = super().__new__(cls)
        policy.params = bound_arguments(cls, args, kwargs)
        return policy

    def __init__(self) -> None:
        self.world_size = 1
        self.accumulation_steps = 1
        self.steps = 0

    def configure(self, world_size: int, accumulation_steps: int) -> None:
        """Learn the run's shape: n = world_size × accumulation_steps gradients per optimizer step."""
        if world_size < 1 or accumulation_steps < 1:
            raise ValueError(
                f"world_size and accumulation_steps must be >= 1, got {world_size!r}, {accumulation_steps!r}")
        self.world_size, self.accumulation_steps = int(world_size), int(accumulation_steps)

    def set_micro_batch_size(self, micro_batch_size: int) -> None:
        """The samples per micro-batch on each worker, where the engine knows it (DeepSpeed's
        ``train_micro_batch_size_per_gpu``, given before ``configure``); only a policy that counts samples uses
        it."""

    @property
    def requested_accumulation_steps(self) -> Optional[int]:
        """The accumulation steps a batch-size controller (``controls_batch``) wants from the next optimizer step
        on, which the backend applies at that step boundary; None for a policy that leaves the batch to the user."""
        return None

    @abstractmethod
    def step(self, observation: StepObservation) -> None:
        """Fold in one optimizer step and fix its learning rate; advances progress."""

    @abstractmethod
    def learning_rate(self, base_lr: float) -> float:
        """The learning rate of the current step for a param group whose configured rate is ``base_lr``.

        Most policies scale ``base_lr`` (a multiplier per step, so param groups keep their ratios). ``AutoWU``
        gives its own absolute rates (``warmup_min_lr``/``warmup_max_lr``, as DeepSpeed's WarmupLR) to the first
        param group and keeps the other groups' ratios to it."""

    def optimizer_advice(self, optimizer_class: type) -> Optional[str]:
        """What to tell the user when this policy's rule does not suit an optimizer of ``optimizer_class``, or None
        when it does (the default: the rule does not depend on the optimizer). Drivers show it once, at attach."""
        return None

    @property
    def progress(self) -> float:
        """Progress in base-scale steps (scale-invariant for AdaScale); plain step count otherwise."""
        return float(self.steps)

    @property
    def gain(self) -> float:
        return 1.0

    @property
    def done(self) -> bool:
        return False

    def metrics(self) -> dict[str, Any]:
        """Numbers for the step's telemetry record."""
        return {"gain": self.gain, "progress": self.progress}

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.name, "format": STATE_FORMAT, "steps": self.steps, "world_size": self.world_size,
                "accumulation_steps": self.accumulation_steps}

    def state_layout(self) -> dict[str, Entry]:
        """What each entry of ``state_dict()`` must be (``scaling_plugins.state_check``), nested entries included;
        a policy that saves more adds its entries to its base's."""
        return {"steps": integer(0), "world_size": integer(1), "accumulation_steps": integer(1)}

    def check_state(self, state: Any) -> None:
        """``ValueError`` unless this policy can load ``state`` whole: another policy's or another format's state,
        a driver's state, a missing entry, a value of the wrong type or a number that is not finite (the message
        names the entry, e.g. ``policy state: progress = nan: must be a finite number >= 0``). Changes nothing."""
        if not isinstance(state, dict) or "format" not in state or "policy" not in state:
            got = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            hint = ""
            if isinstance(state, dict) and "base_lrs" in state:
                hint = (": this is a driver's state (driver.state_dict(), with 'policy' and 'base_lrs'); pass it to "
                        "driver.load_state_dict(), or its 'policy' entry here")
            raise ValueError(f"not a scaling_plugins policy state (no 'policy' name and 'format' version); "
                             f"got keys {got}{hint}")
        if state["policy"] != self.name:
            raise ValueError(f"this state was saved by policy {state['policy']!r}, not {self.name!r}: load it into "
                             f"a {state['policy']} policy, or start {self.name} afresh")
        if state["format"] != STATE_FORMAT:
            raise ValueError(f"policy state format {state['format']!r} is not supported (this version reads "
                             f"format {STATE_FORMAT})")
        check_fields(state, self.state_layout(), "policy state")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by ``state_dict`` of the same policy. The whole state is checked first
        (:meth:`check_state`): a refused one leaves the policy as it was. The saved run's shape comes back with it;
        a backend then calls ``configure`` with the current shape when it differs (a resume on another number of
        workers). A subclass's ``load_state_dict`` calls this one before it changes anything itself."""
        self.check_state(state)
        self.steps = int(state["steps"])
        self.world_size = int(state["world_size"])
        self.accumulation_steps = int(state["accumulation_steps"])
