"""DeepSpeed backend: every scaling_plugins policy is a DeepSpeed ``"scheduler"`` config entry.

    import scaling_plugins.backends.deepspeed        # registers every policy name with DeepSpeed
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=params, config="ds.json")
    for batch in loader:                              # the usual loop, under the `deepspeed` launcher
        engine.backward(engine(batch)); engine.step()

with, in the config (every parameter optional, though DeepSpeed itself needs the ``"params"`` key: ``{}`` means
every default; names as DeepSpeed's own schedulers use them)::

    "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
    "scheduler": {"type": "AdaScale", "params": {"schedule": {"type": "WarmupCosineLR",
                  "params": {"total_num_steps": 10000, "warmup_num_steps": 500}}, "total_num_steps": 10000}}

``"type"`` is any name in ``scaling_plugins.POLICIES`` (AdaScale, AdaScaleAdam, AutoWU, LEGW, LinearScaling,
SqrtScaling, and any policy registered later: names are looked up when DeepSpeed asks for them), ``"params"`` are
that policy's constructor keywords plus DeepSpeed's ``last_batch_iteration`` (only -1: a run resumes from
``engine.load_checkpoint``, which restores the policy's whole state). HF's flat schedule keys
(``warmup_min_lr``, ...) and "auto" are read as ``deepspeed_params`` documents, so HF's ds_config templates work
with only their ``"type"`` changed. Schedules inside are multipliers of the optimizer's lr
(``scaling_plugins.schedules``; DeepSpeed's WarmupLR/WarmupDecayLR/WarmupCosineLR are there by name). No
optimizer wrapper is needed: the config's own optimizer is used as is. In code, use :func:`initialize`
(``deepspeed.initialize`` with ``policy=``).

How it works. DeepSpeed steps its scheduler after ``optimizer.step()``, too late for this step's learning rate,
so the scheduler object only writes telemetry; the policy runs in a step pre-hook on DeepSpeed's basic
optimizer, once per optimizer step (ZeRO calls the basic optimizer once per parameter group), fed by numbers
that rode DeepSpeed's own reductions (``deepspeed_harvest``). Each group's lr becomes
``policy.learning_rate(group["initial_lr"])`` (the configured lr, kept under torch's key). A step DeepSpeed skips
for fp16/bf16 overflow never reaches the basic optimizer, so the policy does not advance, on any rank, and the
skipped step's local norms are dropped. DeepSpeed builds the scheduler inside ``deepspeed.initialize`` with
only the optimizer; the scheduler finds its engine on the call stack. Policies that use the training loss
(AutoWU) read it in ``engine.backward(loss)``; it rides the same reduction as the norms, so this step's
learning rate sees this step's mean loss over ranks. ``engine.step(lr_kwargs={"loss": loss})``, the way
DeepSpeed hands a scheduler its arguments, is accepted too: it arrives after the optimizer step, too late to
feed the policy, so it is checked against the loss last given to ``engine.backward`` on this rank, and a
different value logs a warning (the policy keeps using the all-reduced ``engine.backward`` loss).

Gradient clipping. The statistics use unclipped gradients (DeepSpeed's norm before clipping; ZeRO-0 measures
right after the reduction, before clipping). The update is then clipped by DeepSpeed with the gain already in
the learning rate, so with ``gradient_clipping`` active the effective step is min(1, c/‖ḡ‖)·lr·ḡ: clipping
caps the update's size, AdaScale sets its rate; a clip that binds every step hides part of the gain.

Telemetry. When the config enables a DeepSpeed monitor (csv, TensorBoard, W&B, Comet), every applied step
writes ``scaling_plugins/<field>`` events (lr, gain, sigma_sq, mu_sq, noise_scale, progress, skipped_update,
loss) beside DeepSpeed's own, against the same sample count.

Batch-size control (``"type": "AdaptiveBatch"``): the policy's choice is applied right after the ``engine.step()``
that ended the optimizer step, with ``engine.set_train_batch_size``; a loop that calls ``engine.backward`` and
``engine.step`` per micro-batch needs no change (it can read ``engine.gradient_accumulation_steps()``).
``micro_batch`` is the config's ``train_micro_batch_size_per_gpu``. A checkpoint brings the batch back.

Not supported (refused at ``deepspeed.initialize``): pipeline parallelism, MoE layers, model parallelism,
sparse gradients (``nn.Embedding(sparse=True)``), AdaptiveBatch with ZeRO's ``offload_optimizer``;
``extra_backward()`` (two-pass optimizers such as SAM) is refused.
fp16 paths follow DeepSpeed's loss scale but cannot run on CPU, so they are untested here.
"""
from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import deepspeed_compat as compat  # first: checks that DeepSpeed is here, in a supported version

import deepspeed  # noqa: E402  (after compat's version check)
from ..policies import POLICIES, build_policy, policy_class
from ..policies.registry import PolicySpec
from ..telemetry import monitor_events, record_from
from .deepspeed_harvest import Harvest, Payload, build_rider
from .deepspeed_params import resolve_scheduler_params
from .driver import PolicyDriver, check_dense_gradients, torch_all_gather_rows, torch_all_reduce_mean

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
                         micro_batch=int(self.engine.train_micro_batch_size_per_gpu()))
        if self.policy.controls_batch and compat.offloads_optimizer(self.engine):
            raise ValueError(f"policy {self.policy.name!r} changes gradient_accumulation_steps during training, but "
                             "ZeRO's offload_optimizer fixes its accumulation path at deepspeed.initialize: turn "
                             "offload_optimizer off, or use AdaScale at a fixed batch")
        self.agree_across_ranks()
        self.last_batch_iteration = -1
        self.last_loss: Optional[float] = None
        self._backward_loss: Optional[torch.Tensor] = None
        self._warned_step_loss = False
        self._harvest: Optional[Harvest] = None
        self._values: Optional[list[float]] = None
        self._stepped_at: Optional[int] = None
        self._backward_window = (self.engine.global_steps, 0)   # (optimizer step, engine.backward calls in it)
        self.rider = None
        if self.policy.needs_gradient_norms or self.policy.needs_loss:
            self.payload = Payload(self.engine, self.policy.needs_gradient_norms, self.policy.needs_loss)
            self.rider = build_rider(self.engine, self.payload, self._receive)
        compat.call_before(self.engine, "backward", self._on_backward)
        compat.basic_optimizer(self.engine).register_step_pre_hook(self._before_optimizer_step)
        if self.policy.controls_batch:   # after the whole engine.step(): its sample count is the step's own batch
            compat.call_after(self.engine, "step", self.follow_batch_request)

    # -- per step -------------------------------------------------------------------------------------------
    def _receive(self, harvest: Harvest) -> None:
        self._harvest = harvest

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Once per optimizer step: feed the policy; every call: set the lr of the groups about to step."""
        if self._stepped_at == self.engine.global_steps:
            self.apply_learning_rate()  # ZeRO-1/2 step the basic optimizer once per param group
            return
        self._stepped_at = self.engine.global_steps
        self.resize(self.world_size, int(self.engine.gradient_accumulation_steps()))  # set_train_batch_size
        self._values = self._take_harvest()
        self.advance()

    def _take_harvest(self) -> Optional[list[float]]:
        """The step's reduced payload (and T), read with the one host sync of the step; None without a rider."""
        if self.rider is None:
            return None
        harvest, self._harvest = self._harvest, None
        if harvest is None:
            return None
        parts = [harvest.payload.reshape(-1)]
        if harvest.mean_sq_norm is not None:
            parts.append(harvest.mean_sq_norm.reshape(1).to(harvest.payload.device))
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
        self.last_loss = self._values[self.payload.size - 1] / (self.world_size * self.accumulation_steps)
        return self.last_loss

    def _on_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Each ``engine.backward(loss)``: counted for this optimizer step; the loss read where the policy uses it."""
        step, calls = self._backward_window
        self._backward_window = (self.engine.global_steps, calls + 1 if step == self.engine.global_steps else 1)
        if self.policy.needs_loss:
            self.payload.add_loss(loss)
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
        """Through ``engine.set_train_batch_size`` (``deepspeed_compat.set_accumulation_steps``), at the boundary
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
                log.warning("policy %r does not use the training loss; the loss passed to engine.step(lr_kwargs=...) "
                            "is not used", self.policy.name)
                self._warned_step_loss = True
            return
        given = torch.as_tensor(loss, dtype=torch.float64, device=self.device).detach().reshape(())
        seen = None if self._backward_loss is None else self._backward_loss.reshape(()).to(torch.float64)
        if (seen is None or not torch.equal(given, seen)) and not self._warned_step_loss:
            log.warning("the loss passed to engine.step(lr_kwargs=...) (%s) is not the one last given to "
                        "engine.backward (%s); policy %r uses the all-reduced engine.backward loss",
                        given.item(), None if seen is None else seen.item(), self.policy.name)
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
        super().load_state_dict(dict(state))
        self.last_batch_iteration = int(state["last_batch_iteration"])

    @property
    def extra_collectives_per_step(self) -> int:
        """Collectives this backend adds per step: 0 where a DeepSpeed reduction carries the statistics."""
        return getattr(self.rider, "extra_collectives", 0)

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


# -- the code path --------------------------------------------------------------------------------------------
def initialize(*args: Any, policy: Optional[PolicySpec] = None, **kwargs: Any) -> tuple:
    """``deepspeed.initialize(*args, **kwargs)`` with ``policy`` (a name, ``{"type", "params"}`` or a Policy) as
    the LR scheduler, for users who prefer code to a ``"scheduler"`` config entry. Returns DeepSpeed's tuple."""
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
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return config
    return json.loads(Path(config).read_text())
