"""DeepSpeed's driver: every policy is a DeepSpeed ``"scheduler"`` type, and :class:`DeepSpeedDriver` is the
object DeepSpeed holds as its lr scheduler.

    import scaling_plugins.backends.deepspeed        # registers every policy name with DeepSpeed
    # ds.json: "scheduler": {"type": "AdaScale", "params": {}}
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=params, config="ds.json")

DeepSpeed steps its scheduler after the optimizer step, too late for this step's learning rate, so the policy
runs in a step pre-hook on DeepSpeed's basic optimizer, once per optimizer step, fed by the numbers the carrier
of ``harvest`` brought back on DeepSpeed's own reductions; ``step()`` only counts and writes telemetry. The
micro-batch size is the config's ``train_micro_batch_size_per_gpu``. Config keys, "auto", the loss, clipping,
telemetry, batch-size control and what is refused: docs/deepspeed.md.
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

from . import compat  # first: checks that DeepSpeed is here, in a supported version

import deepspeed  # noqa: E402  (after compat's version check)
from ...policies import POLICIES, build_policy, policy_class
from ...policies.registry import PolicySpec
from ...telemetry import monitor_events, record_from
from .harvest import LocalNumbers, ReducedNumbers, build_carrier
from ...scheduler_params import BATCH_KEYS, is_auto, resolve_scheduler_params
from ...state_check import check_fields, integer
from ...user_warnings import warn_user
from ..shared.driver import (PolicyDriver, check_dense_gradients, check_driver_state, torch_all_gather_rows,
                             torch_all_reduce_mean)

log = logging.getLogger(__name__)


class DeepSpeedDriver(PolicyDriver):
    """The object DeepSpeed holds as its LR scheduler; drives one policy for one engine.

    DeepSpeed builds it from the config (``"scheduler": {"type": <policy name>}``) or from :func:`initialize`.
    ``step()`` (called by DeepSpeed after each applied optimizer step) only counts and writes telemetry.
    What users read (from :class:`PolicyDriver`): ``gain``, ``lr``, ``progress``, ``scale``, ``done``,
    ``metrics()``, ``policy``; and ``extra_collectives_per_step``.
    """

    backward_hint = "train with engine.backward(loss) and engine.step()"
    accumulation_name = "gradient_accumulation_steps"

    def __init__(self, optimizer: Any, policy: PolicySpec = "AdaScale", last_batch_iteration: int = -1) -> None:
        if last_batch_iteration != -1:
            raise ValueError(f"last_batch_iteration={last_batch_iteration!r}: only -1 is allowed; resume with "
                             "engine.load_checkpoint, which restores the policy's state")
        self.engine = compat.engine_under_construction()
        unsupported = compat.unsupported_feature(self.engine)
        if unsupported is not None:
            raise ValueError(unsupported)
        check_dense_gradients(self.engine.module, "which DeepSpeed reduces apart from the buffers the statistics "
                                                  "ride")
        super().__init__(self.engine.optimizer, policy, int(self.engine.dp_world_size),
                         int(self.engine.gradient_accumulation_steps()), device=self.engine.device,
                         micro_batch_size=int(self.engine.train_micro_batch_size_per_gpu()))
        if self.policy.controls_batch and compat.offloads_optimizer(self.engine):
            raise ValueError(f"policy {self.policy.name!r} changes gradient_accumulation_steps during training, but "
                             "ZeRO's offload_optimizer fixes its accumulation path at deepspeed.initialize: turn "
                             "offload_optimizer off, or use AdaScale at a fixed batch")
        self.agree_across_ranks()
        self.last_batch_iteration = -1
        self.last_loss: Optional[float] = None
        self._backward_loss: Optional[torch.Tensor] = None
        self._warned_step_loss = False
        self._reduced: Optional[ReducedNumbers] = None
        self._values: Optional[list[float]] = None
        self._stepped_at: Optional[int] = None
        self._backward_window = (self.engine.global_steps, 0)   # (optimizer step, engine.backward calls in it)
        self.carrier = None
        if self.policy.needs_gradient_norms or self.policy.needs_loss:
            self.local = LocalNumbers(self.engine, self.policy.needs_gradient_norms, self.policy.needs_loss)
            self.carrier = build_carrier(self.engine, self.local, self._receive)
        compat.call_before(self.engine, "backward", self._on_backward)
        compat.basic_optimizer(self.engine).register_step_pre_hook(self._before_optimizer_step)
        if self.policy.controls_batch:   # after the whole engine.step(): its sample count is the step's own batch
            compat.call_after(self.engine, "step", self.follow_batch_request)

    # -- per step -------------------------------------------------------------------------------------------
    def _receive(self, reduced: ReducedNumbers) -> None:
        self._reduced = reduced

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Once per optimizer step: feed the policy; every call: set the lr of the groups about to step."""
        if self._stepped_at == self.engine.global_steps:
            self.apply_learning_rate()  # ZeRO-1/2 step the basic optimizer once per param group
            return
        self._stepped_at = self.engine.global_steps
        self.resize(self.world_size, int(self.engine.gradient_accumulation_steps()))  # set_train_batch_size
        self._values = self._take_reduced()
        self.advance()

    def _take_reduced(self) -> Optional[list[float]]:
        """The step's reduced payload (and T), read with the one host sync of the step; None without a carrier."""
        if self.carrier is None:
            return None
        reduced, self._reduced = self._reduced, None
        if reduced is None:
            return None
        parts = [reduced.payload.reshape(-1)]
        if reduced.mean_sq_norm is not None:
            parts.append(reduced.mean_sq_norm.reshape(1).to(reduced.payload.device))
        return torch.cat(parts).tolist()

    def reduced_norms(self) -> Optional[tuple[float, float]]:
        """(Σ_ranks payload / W, T): the payload is each micro-batch's ‖g/gas‖² summed over micro-batches."""
        if self._values is None:
            return None
        return self._values[0] / self.world_size, self._values[-1]

    def reduced_loss(self, loss: Optional[torch.Tensor | float]) -> float:
        """The mean over ranks and micro-batches of the losses given to ``engine.backward``; it rode the same
        reduction as the norms."""
        if self._values is None:
            raise RuntimeError(f"no training loss reached policy {self.policy.name!r} this step: "
                               f"{self.backward_hint}")
        self.last_loss = self._values[self.local.size - 1] / (self.world_size * self.accumulation_steps)
        return self.last_loss

    def _on_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Each ``engine.backward(loss)``: counted for this optimizer step; the loss read where the policy uses it."""
        step, calls = self._backward_window
        self._backward_window = (self.engine.global_steps, calls + 1 if step == self.engine.global_steps else 1)
        if self.policy.needs_loss:
            self.local.add_loss(loss)
            self._backward_loss = loss.detach()

    def extra_backward(self) -> Any:
        """Refused: DeepSpeed reduces the gradients of every ``engine.backward`` into the step's, so a pass outside
        the step's statistics (SAM's first backward) has no place in its loop."""
        raise ValueError("extra_backward() is not supported under DeepSpeed: every engine.backward(loss) joins the "
                         "step's gradient reduction. Two-pass optimizers (SAM) are supported under DDP and Horovod")

    def backward_passes(self) -> int:
        """``engine.backward`` calls since the engine moved to this optimizer step (an fp16-overflow step that
        DeepSpeed skipped does not count into the next)."""
        step, calls = self._backward_window
        return calls if step == self.engine.global_steps else 0

    def set_accumulation_steps(self, accumulation_steps: int) -> None:
        """Through ``engine.set_train_batch_size`` (``compat.set_accumulation_steps``), at the boundary
        just passed; the policy follows at once."""
        compat.set_accumulation_steps(self.engine, accumulation_steps)
        self.resize(self.world_size, accumulation_steps)

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        return torch_all_gather_rows(row, self.engine.data_parallel_group)

    def all_reduce_mean(self, value: torch.Tensor) -> float:
        return torch_all_reduce_mean(value, self.engine.data_parallel_group)

    def _check_step_loss(self, loss: Any) -> None:
        """``engine.step(lr_kwargs={"loss": loss})``: must be the loss last given to ``engine.backward``."""
        if not self.policy.needs_loss:
            if not self._warned_step_loss:
                warn_user(f"policy {self.policy.name!r} does not use the training loss; the loss passed to "
                          "engine.step(lr_kwargs=...) is not used")
                self._warned_step_loss = True
            return
        given = torch.as_tensor(loss, dtype=torch.float64, device=self.device).detach().reshape(())
        seen = None if self._backward_loss is None else self._backward_loss.reshape(()).to(torch.float64)
        if (seen is None or not torch.equal(given, seen)) and not self._warned_step_loss:
            warn_user(f"the loss passed to engine.step(lr_kwargs=...) ({given.item()}) is not the one last given "
                      f"to engine.backward ({None if seen is None else seen.item()}); policy {self.policy.name!r} "
                      "uses the all-reduced engine.backward loss")
            self._warned_step_loss = True

    # -- DeepSpeed's scheduler interface -------------------------------------------------------------------
    def step(self, *args: Any, **kwargs: Any) -> None:
        """DeepSpeed calls this after every applied step. Never raises ``TypeError`` (DeepSpeed would retry
        with the batch size as the iteration); ``last_batch_iteration`` only labels the step."""
        unexpected = sorted(set(kwargs) - {"last_batch_iteration", "loss"})
        if args or unexpected:
            raise ValueError(f"{type(self).__name__}.step() takes only last_batch_iteration= and loss=, got args "
                             f"{args!r} and keys {unexpected}")
        if "loss" in kwargs:
            self._check_step_loss(kwargs["loss"])
        try:
            last = kwargs.get("last_batch_iteration")
            self.last_batch_iteration = self.last_batch_iteration + 1 if last is None else int(last)
            self._write_monitor()
        except TypeError as err:
            raise RuntimeError(f"scaling_plugins scheduler step failed: {err}") from err

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    get_last_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s (``engine.load_checkpoint`` calls it); the whole state is checked before
        anything changes (``check_driver_state``, then ``last_batch_iteration``)."""
        state = dict(state) if isinstance(state, Mapping) else state
        check_driver_state(state, self.optimizer, self.policy)
        check_fields(state, {"last_batch_iteration": integer(-1)}, "driver state")
        super().load_state_dict(state)
        self.last_batch_iteration = int(state["last_batch_iteration"])

    @property
    def extra_collectives_per_step(self) -> int:
        """Collectives this backend adds per step: 0 where a DeepSpeed reduction carries the statistics."""
        return getattr(self.carrier, "extra_collectives", 0)

    def _write_monitor(self) -> None:
        monitor = getattr(self.engine, "monitor", None)
        if monitor is None or not monitor.enabled:
            return
        samples = self.engine.global_samples + self.engine.train_batch_size()  # DeepSpeed counts it after us
        monitor.write_events(monitor_events(record_from(self, samples=samples, loss=self.last_loss)))


# -- registration: DeepSpeed resolves "scheduler": {"type": NAME} with getattr(lr_schedules, NAME) ----------
_SCHEDULER_CLASSES: dict[str, type[DeepSpeedDriver]] = {}


def scheduler_class(name: str) -> type[DeepSpeedDriver]:
    """The DeepSpeed scheduler class for policy ``name``: ``cls(optimizer, **params)`` builds it from a config."""
    policy_class(name)  # unknown names raise ValueError listing the valid ones
    if name not in _SCHEDULER_CLASSES:
        def __init__(self: DeepSpeedDriver, optimizer: Any, last_batch_iteration: int = -1, **params: Any) -> None:
            group = optimizer.param_groups[0]
            params = resolve_scheduler_params(name, params, group.get("initial_lr", group["lr"]))
            DeepSpeedDriver.__init__(self, optimizer, {"type": name, "params": params}, last_batch_iteration)

        _SCHEDULER_CLASSES[name] = type(f"{name}Scheduler", (DeepSpeedDriver,), {
            "__init__": __init__, "__module__": __name__,
            "__doc__": f"DeepSpeed scheduler running the {name} policy; params are its keywords."})
    return _SCHEDULER_CLASSES[name]


def _lookup(name: str, fallback: Callable[[str], Any]) -> type:
    """``getattr(deepspeed.runtime.lr_schedules, name)`` for names that module lacks: policy names resolve to
    scheduler classes; an unknown ``"scheduler"`` type in a config gets a message listing the valid ones."""
    if name in POLICIES:
        return scheduler_class(name)
    if (not name.startswith("_") and not hasattr(torch.optim.lr_scheduler, name)
            and compat.asked_by_scheduler_config()):
        valid = compat.deepspeed_scheduler_names()
        close = difflib.get_close_matches(name, list(POLICIES) + valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"\"scheduler\": {{\"type\": {name!r}}} is unknown{hint}; valid: the scaling_plugins "
                         f"policies {sorted(POLICIES)}, DeepSpeed's {valid} or a torch.optim.lr_scheduler class")
    return fallback(name)


compat.install_scheduler_lookup(_lookup)


# -- what deepspeed.initialize is given: checked before DeepSpeed reads it ------------------------------------
def _unfilled_auto(keys: list[str]) -> ValueError:
    """The error for "auto" that only the Hugging Face Trainer and Accelerate fill, left in ``keys``."""
    return ValueError(f"{', '.join(keys)} = \"auto\" in the DeepSpeed config: only the Hugging Face Trainer and "
                      "Accelerate fill \"auto\" there, and plain deepspeed.initialize cannot read it (DeepSpeed "
                      "would stop with a TypeError naming no key). Give numbers there (a policy's scheduler.params "
                      "may keep \"auto\")")


def _check_config(config: Mapping) -> None:
    """At every ``DeepSpeedConfig``, before DeepSpeed compares the batch sizes: "auto" left in them."""
    autos = [key for key in BATCH_KEYS if is_auto(config.get(key))]
    if autos:
        raise _unfilled_auto(autos)


def _scheduler_label(scheduler: Any) -> str:
    """A function's or class's name (DeepSpeed calls it with the optimizer), else the scheduler object's class."""
    return getattr(scheduler, "__name__", None) or type(scheduler).__name__


def _check_engine(engine: Any, optimizer_from_config: bool, client_scheduler: Any) -> None:
    """In ``DeepSpeedEngine.__init__`` before it builds the optimizer, then the scheduler: a policy in the config
    beside an ``lr_scheduler=`` (DeepSpeed would run the latter and never look the policy up), and "auto" left
    where DeepSpeed reads a number."""
    name = engine.scheduler_name()
    if client_scheduler and name in POLICIES:   # truthiness: DeepSpeed's own test for a client scheduler
        label = _scheduler_label(client_scheduler)
        raise ValueError(f"deepspeed.initialize got lr_scheduler={label} and the config's \"scheduler\": "
                         f"{{\"type\": \"{name}\"}}, a scaling_plugins policy: DeepSpeed would run {label} and drop "
                         f"{name} without a word. Keep one: remove lr_scheduler= to run {name}, or the config's "
                         f"\"scheduler\" entry to run {label}")
    autos = ["gradient_clipping"] if is_auto(engine.gradient_clipping()) else []
    if optimizer_from_config:
        autos += [f"optimizer.params.{key}" for key, value in (engine.optimizer_params() or {}).items()
                  if is_auto(value)]
    if autos:
        raise _unfilled_auto(autos)


compat.check_config_before_deepspeed(_check_config)
compat.check_engine_before_optimizer(_check_engine)
compat.groups_take_the_default_timeout()   # the timeout the user gave reaches DeepSpeed's own groups


# -- the code path --------------------------------------------------------------------------------------------
def initialize(*args: Any, policy: Optional[PolicySpec] = None, **kwargs: Any) -> tuple:
    """``deepspeed.initialize(*args, **kwargs)`` with a policy as the lr scheduler, for code instead of a
    ``"scheduler"`` config entry.

    Args:
        *args, **kwargs: ``deepspeed.initialize``'s own (no ``lr_scheduler``, and no ``"scheduler"`` entry in the
            config, when ``policy`` is given).
        policy: a registered name (``scaling_plugins.POLICIES``), ``{"type": name, "params": {...}}`` or a Policy;
            None leaves ``deepspeed.initialize`` as it is.

    Returns:
        DeepSpeed's tuple (engine, optimizer, dataloader, lr_scheduler); the lr_scheduler is the
        :class:`DeepSpeedDriver`.

    Example::

        engine, _, _, driver = initialize(model=model, model_parameters=model.parameters(), config="ds.json",
                                          policy="AdaScale")
        engine.backward(loss_fn(engine(x), y))
        engine.step()
    """
    if policy is None:
        return deepspeed.initialize(*args, **kwargs)
    if kwargs.get("lr_scheduler") is not None:
        raise ValueError("pass policy= or lr_scheduler=, not both")
    if "scheduler" in _config_dict(kwargs.get("config")):
        raise ValueError("policy= was given and the config has a \"scheduler\" entry too; keep one of them")
    built = build_policy(policy)
    kwargs["lr_scheduler"] = lambda optimizer: DeepSpeedDriver(optimizer, built)
    return deepspeed.initialize(*args, **kwargs)


def _config_dict(config: Any) -> Mapping:
    """The config as DeepSpeed reads it (a dict, an Hjson file, duplicate keys refused, or base64)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return config
    return compat.read_config(config)
