"""Horovod backend: a drop-in ``hvd.DistributedOptimizer`` whose learning rate follows a policy.

    import horovod.torch as hvd
    import scaling_plugins.backends.horovod as sph

    hvd.init()
    opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=model.named_parameters(), policy="AdaScale",
                                   backward_passes_per_step=2)     # every hvd.DistributedOptimizer argument
    for x, y in micro_batches:                                      # backward_passes_per_step of them
        (loss_fn(model(x), y) / 2).backward()
    opt.step()                     # this step's learning rate from the fresh gain, then the update
    opt.zero_grad()
    opt.gain, opt.lr, opt.progress, opt.scale, opt.metrics(), opt.state_dict()

With a batch-size controller (policy ``AdaptiveBatch``) run ``opt.accumulation_steps`` (= Horovod's
``opt.backward_passes_per_step``) passes in each step: ``opt.step()`` sets both for the next step, through
``set_backward_passes_per_step``.

Launch with ``horovodrun -np N``, ``horovodrun --gloo -np N`` or ``mpirun -np N``. The returned object *is*
Horovod's optimizer (same class, same methods, ``synchronize``/``skip_synchronize`` included) with the policy
at ``opt.scaling``; its ``state_dict()`` carries the policy state under ``"scaling_plugins"``.

How the numbers move (AdaScale, Johnson et al., ICML 2020: L = Σ_i ‖g_i‖², T = ‖ḡ‖², n = workers × passes),
with no collective beyond one scalar in Horovod's own fusion buffer:

- L: a tensor hook per parameter records each backward pass's own gradient (a Python append, no tensor op) and
  ``ChunkedNormMeter`` reads Σ‖g‖² of a whole chunk with a few fused ops (``torch._foreach_norm``) when the
  chunk reaches ``fused_norms.CHUNK_NUMEL`` elements and at the end of each pass, into one float64 scalar: the
  cost grows with gradient bytes / chunk size, not with the number of parameters. Tensor hooks run before the
  gradient is accumulated into ``.grad``, hence before Horovod's hook on the gradient accumulator, which starts
  the in-place all-reduce of ``.grad``. Where ``.grad`` *is* this pass's gradient (no accumulation, or the first
  pass after ``zero_grad()``), that all-reduce waits (a ``_Pending`` handle) until the chunk holding it has been
  read, then starts in Horovod's order; with ``Compression.fp16`` (Horovod needs the compression context at
  once) the chunk is read right away instead. With ``groups=``, each group's gradients are read (one fused read)
  just before the group's all-reduce.
- The scalar travels as a fp32 one-element tensor with the gradients' op and pre/post-scale factors, under one
  name fixed per optimizer (``NORM_NAME.<first parameter's name>``: the same on every rank, kept by Horovod's
  response cache, never clashing between optimizers), grouped with the gradient of a *carrier*: the first
  trainable parameter (in a sequential model the last gradient of backward). The carrier's all-reduce starts at
  the end of the step's last backward pass, when the norm is complete. A group is negotiated and executed as
  one, so the scalar shares the carrier's fusion buffer: no collective of its own (``HOROVOD_TIMELINE`` shows it;
  tests/test_horovod.py checks it).
- Data-dependent graphs (a parameter with a gradient on some ranks and not on others, as plain Horovod allows):
  Horovod's ``synchronize()`` all-reduces zeros for a parameter without gradient under the parameter's own name,
  so every rank still issues the same collectives. The carrier follows the same rule: if it got no gradient on
  this rank, ``synchronize()`` starts the same group with zeros for it. So there is still no extra collective,
  and the names agree on every rank (tests/test_horovod.py: a branch that one rank skips on one step).
- Fallback, when the norm cannot share the carrier's buffer (``Compression.fp16`` or a non-fp32 carrier — a
  fusion buffer holds one dtype and the scalar stays fp32 — or ``groups=`` where no group completed in backward):
  the scalar is enqueued on its own, under the same fixed name, at the end of the last backward pass. Beside fp32
  gradients it usually still fuses, but nothing guarantees it; beside fp16 ones it is a 4-byte response of its
  own. With ``groups=`` the group completing last carries the norm; like plain Horovod's grouped path, that needs
  every rank to produce the same gradients.
- T: after ``synchronize()``, ``fused_norms.squared_norm_sum`` over the reduced gradients (a few fused ops) on
  the device; ``step()`` reads L and T with one host sync.
- ``gradient_predivide_factor`` is applied to the scalar exactly as to the gradients.
  ``op=hvd.Adasum`` is refused: Adasum combines gradients adaptively instead of averaging them, so the mean
  gradient whose statistics the policies read does not exist.

Policies that use the training loss take it as ``opt.step(loss=loss)``; it is averaged over ranks with one
1-element all-reduce (the only collective this backend adds, and only for those policies).
Loss convention for ``backward_passes_per_step`` = A > 1: each pass's loss divided by A (``loss_reduction=
"mean"``, Horovod's own examples) or summed (``"sum"``); the gain is right under both.
Horovod Elastic: see ``scaling_plugins.backends.horovod_elastic`` (used automatically).
"""
from __future__ import annotations

import abc
import contextlib
import inspect
import math
from typing import Any, Callable, Optional

import torch

from ..policies import build_policy
from ..policies.registry import PolicySpec
from . import horovod_compat as compat
from .driver import PolicyDriver, check_loss_reduction
from .horovod_compat import horovod_torch
from .horovod_elastic import register_state_handler
from .fused_norms import ChunkedNormMeter, squared_norm_sum

NORM_NAME = "scaling_plugins.local_sq_norm"
LOSS_NAME = "scaling_plugins.mean_loss"
STATE_KEY = "scaling_plugins"
READ_THROUGH = ("gain", "lr", "progress", "scale", "done", "extra_backward",
                "accumulation_steps")   # opt.<name> reads opt.scaling.<name>


class ScaledOptimizer(abc.ABC):
    """Marker type: ``isinstance(opt, ScaledOptimizer)`` is true for optimizers made by :func:`DistributedOptimizer`."""


class _Pending:
    """A Horovod handle that is not there yet: Horovod's ``synchronize()`` calls it for the reduced gradient.

    Used for gradients whose all-reduce waits for the meter (their local norm is read first) and for the carrier
    of the norm, which is enqueued at the end of backward (or in ``synchronize()``)."""

    __slots__ = ("handle", "grouped")

    def __init__(self) -> None:
        self.handle: Any = None
        self.grouped = False

    def __call__(self) -> torch.Tensor:
        if self.handle is None:
            raise RuntimeError("scaling_plugins: a gradient all-reduce was never started (a backward pass that did "
                               "not finish?)")
        output = horovod_torch().synchronize(self.handle)
        return output[0] if self.grouped else output


class HorovodDriver(PolicyDriver):
    """Harvests L and T from one Horovod ``DistributedOptimizer`` and drives its policy (``opt.scaling``)."""

    backward_hint = "call loss.backward() before opt.step()"
    loss_hint = "call opt.step(loss=loss)"
    accumulation_name = "backward_passes_per_step"

    def __init__(self, optimizer: torch.optim.Optimizer, policy: PolicySpec, backward_passes_per_step: int,
                 gradient_predivide_factor: float, process_set: Any, loss_reduction: str) -> None:
        self.hvd = horovod_torch()
        super().__init__(optimizer, policy, process_set.size(), backward_passes_per_step, loss_reduction)
        self.process_set = process_set
        if not compat.in_elastic_job():   # elastic workers start at different times: every sync checks instead
            self.agree_across_ranks()
        self.op = compat.reduction_op(optimizer)
        average = self.op == self.hvd.Average
        self._scale_factors = (1.0 / gradient_predivide_factor, gradient_predivide_factor) if average else (1.0, 1.0)
        self._optimizer = optimizer
        self._meter: Optional[ChunkedNormMeter] = None
        self._deferred: list[tuple[torch.Tensor, _Pending]] = []
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self._carrier_param = params[0]            # the same parameter on every rank
        self._norm_name = f"{NORM_NAME}.{compat.parameter_name(optimizer, params[0])}"
        self._grouped = compat.gradient_group_count(optimizer) > 0
        self._discard_pending()
        if self.policy.needs_gradient_norms:
            self._meter = ChunkedNormMeter(params, on_flush=self._start_deferred, on_pass_end=self._end_of_backward)

    # -- harvesting -----------------------------------------------------------------------------------------
    def _discard_pending(self) -> None:
        """Forget a half-done step (a reload, an elastic reset): no pass seen, nothing in flight."""
        self._passes = 0
        self._passes_seen: Optional[int] = None   # passes of the step whose gradients were just synchronized
        self._enqueued = 0              # Horovod groups enqueued by hooks in this backward (groups= only)
        self._norm: Optional[tuple[torch.Tensor, Any]] = None   # (buffer, handle; None when in a group)
        self._carrier: Optional[_Pending] = None                # the carrier parameter's handle, once asked for
        self._deferred = []
        self._reduced: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        if self._meter is not None:
            self._meter.reset()
            self._meter.take_passes()

    def _end_of_backward(self) -> None:
        """After every accumulator hook and the meter's last read of this backward: start the norm's all-reduce
        once the step's last pass is done (the carrier; or the norm alone where it cannot ride)."""
        self._enqueued = 0
        self._passes += self._meter.take_passes()
        if self._passes >= self.accumulation_steps and self._norm is None:
            self._enqueue_norm()

    def _take_norm_buffer(self) -> torch.Tensor:
        return self._meter.take().to(torch.float32).reshape(1)

    def _carrier_fuses(self) -> bool:
        """Whether the norm can share the carrier gradient's fusion buffer (same dtype, no compression)."""
        param = self._carrier_param
        return (not compat.compresses(self._optimizer) and param.dtype == torch.float32
                and (param.grad is None or param.grad.layout == torch.strided))

    def _enqueue_norm(self) -> None:
        """This rank's Σ‖g‖² as a fp32 all-reduce with the gradients' op and factors, under a name fixed per
        optimizer (the same on every rank): grouped with the carrier parameter's gradient where it fuses, else on
        its own."""
        buffer = self._take_norm_buffer()
        prescale, postscale = self._scale_factors
        if self._grouped or not self._carrier_fuses():
            handle = self.hvd.allreduce_async_(buffer, name=self._norm_name, op=self.op, prescale_factor=prescale,
                                               postscale_factor=postscale, process_set=self.process_set)
            self._norm = (buffer, handle)
            return
        param = self._carrier_param
        if param.grad is None:          # no gradient on this rank this step: zeros, as Horovod reduces them
            param.grad = torch.zeros_like(param)
        handle = self.hvd.grouped_allreduce_async_(
            [param.grad, buffer], name=self._norm_name, op=self.op, prescale_factor=prescale,
            postscale_factor=postscale, process_set=self.process_set)
        self._norm = (buffer, None)
        if self._carrier is None:
            self._carrier = _Pending()
        self._carrier.handle, self._carrier.grouped = handle, True

    def _start_deferred(self) -> None:
        """After the meter read them: start the all-reduces that waited for it (Horovod's own, in hook order)."""
        deferred, self._deferred = self._deferred, []
        for param, pending in deferred:
            pending.handle, _ = self._optimizer._horovod_allreduce_grad_async(param)

    def allreduce_gradient(self, optimizer: Any, p: torch.Tensor) -> tuple[Any, Any]:
        """Horovod's all-reduce of one gradient, once its local norm is read; the carrier parameter's waits for
        the end of backward and takes the norm into its group."""
        if self._meter is None or self._grouped:
            return optimizer._horovod_allreduce_grad_async(p)
        if p is self._carrier_param and self._carrier_fuses():
            if self._carrier is None:
                self._carrier = _Pending()
            if self._norm is None and not self._meter.in_pass:   # asked from synchronize(): start it now
                self._enqueue_norm()
            return self._carrier, None
        if self._meter.holds(p):
            if compat.compresses(optimizer):             # Horovod needs the compression context now
                self._meter.flush()
                return optimizer._horovod_allreduce_grad_async(p)
            pending = _Pending()
            self._deferred.append((p, pending))
            return pending, None
        return optimizer._horovod_allreduce_grad_async(p)

    def grouped_allreduce(self, optimizer: Any, params: tuple) -> tuple[Any, tuple]:
        """Horovod's all-reduce of one gradient group (``groups=``), after one read of the group's local norms;
        the group completing last takes the norm."""
        if self._meter is None:
            return optimizer._horovod_grouped_allreduce_grad_async(params)
        if any(self._meter.holds(p) for p in params):
            self._meter.flush()
        self._enqueued += 1
        last = self._enqueued == compat.gradient_group_count(optimizer) and self._meter.in_pass
        if (not last or self._norm is not None or compat.compresses(optimizer)
                or not all(p.grad.dtype == torch.float32 and p.grad.layout == torch.strided for p in params)):
            return optimizer._horovod_grouped_allreduce_grad_async(params)
        buffer = self._take_norm_buffer()
        handle = self.hvd.grouped_allreduce_async_(       # Horovod's grouped path applies no scale factors
            [*(p.grad for p in params), buffer], name=f"{NORM_NAME}.{compat.parameter_name(optimizer, params[0])}",
            op=self.op, process_set=self.process_set)
        self._norm = (buffer, None)
        return handle, (None,) * len(params)

    def before_synchronize(self) -> None:
        """Start what backward did not (fewer passes than announced, no Horovod hooks, a carrier left waiting)."""
        if self._meter is None:
            return
        self._meter.flush()
        if self._norm is None and (self._passes > 0 or self._carrier is not None):
            self._enqueue_norm()

    def after_synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        """Wait for the norm; T from the reduced gradients, as a device scalar (no host sync here)."""
        if self._norm is None:
            return
        buffer, handle = self._norm
        if handle is not None:
            self.hvd.synchronize(handle)
        elif self._carrier is not None and self._carrier.handle is not None and not self._carrier_consumed():
            self._carrier()             # no Horovod hooks (one process): nobody else waits for the carrier
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.requires_grad and p.grad is not None]
        self._reduced = (buffer[0].to(torch.float64), squared_norm_sum(grads))
        self._norm, self._carrier = None, None
        self._passes_seen, self._passes = self._passes, 0

    def _carrier_consumed(self) -> bool:
        return compat.has_gradient_hooks(self._optimizer)

    # -- per step -------------------------------------------------------------------------------------------
    def observe_step(self, loss: Optional[torch.Tensor | float]) -> None:
        """Follow the world size, feed the policy this step's statistics (and loss), set the learning rates."""
        self.resize(self.process_set.size())
        self.advance(loss)

    def reduced_norms(self) -> Optional[tuple[float, float]]:
        if self._reduced is None:
            return None
        reduced_local, reduced_sq = torch.stack(self._reduced).tolist()     # the one host sync per step
        self._reduced = None
        if self.op == self.hvd.Sum:           # Sum: Σ over ranks, not the mean
            world = self.world_size
            reduced_local /= world
            reduced_sq /= world * world
        return reduced_local, reduced_sq

    def backward_counter(self) -> Optional[ChunkedNormMeter]:
        return self._meter

    def backward_passes(self) -> Optional[int]:
        """Passes counted by the end-of-backward callback (policies that measure norms; None otherwise)."""
        if self._meter is None:
            return None
        passes, self._passes_seen = self._passes_seen, None
        return self._passes if passes is None else passes

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        return self.hvd.allgather(row.reshape(1, -1), name="scaling_plugins.settings", process_set=self.process_set)

    def all_reduce_mean(self, value: torch.Tensor) -> float:
        value = value.detach().to(torch.float64).reshape(1)
        return self.hvd.allreduce(value, op=self.hvd.Average, name=LOSS_NAME, process_set=self.process_set).item()

    def set_accumulation_steps(self, accumulation_steps: int) -> None:
        """Through ``opt.set_backward_passes_per_step`` (Horovod's, then the policy follows)."""
        self._optimizer.set_backward_passes_per_step(accumulation_steps)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._discard_pending()


class _ScaledMembers:
    """What :func:`DistributedOptimizer` adds to the class Horovod built for one optimizer."""

    def synchronize(self) -> None:
        """Horovod's ``synchronize()``, with the norm all-reduce (enqueued here if backward did not) and T."""
        self.scaling.before_synchronize()
        self._horovod_synchronize()
        self.scaling.after_synchronize(self)

    def step(self, closure: Optional[Callable[[], float]] = None, loss: Optional[torch.Tensor | float] = None) -> Any:
        """Synchronize, feed the policy, set this step's learning rates, then Horovod's step (the update)."""
        synchronize_here = compat.synchronizes_in_step(self)
        if synchronize_here:
            self.synchronize()
        self.scaling.observe_step(loss)
        with self.skip_synchronize() if synchronize_here else contextlib.nullcontext():
            result = self._horovod_step(closure)
        self.scaling.follow_batch_request()
        return result

    def _allreduce_grad_async(self, p: torch.Tensor) -> tuple[Any, Any]:
        return self.scaling.allreduce_gradient(self, p)

    def _grouped_allreduce_grad_async(self, params: tuple) -> tuple[Any, tuple]:
        return self.scaling.grouped_allreduce(self, params)

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Horovod's ``set_backward_passes_per_step``; the policy's n (and default scale) follows."""
        self._horovod_set_backward_passes_per_step(passes)
        self.scaling.resize(self.scaling.world_size, passes)

    def metrics(self) -> dict[str, Any]:
        """The step's telemetry numbers: step, learning rate and the policy's own (gain, progress, σ², ...)."""
        return self.scaling.metrics()


def _save_scaling_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    state[STATE_KEY] = optimizer.scaling.state_dict()
    return state


def _load_scaling_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    if STATE_KEY not in state:
        raise ValueError(f"optimizer state has no {STATE_KEY!r} entry (not saved from a scaling_plugins "
                         "optimizer); load it into the wrapped optimizer before DistributedOptimizer(...)")
    state = dict(state)
    optimizer.scaling.load_state_dict(state.pop(STATE_KEY))
    return state


def _extend(optimizer: torch.optim.Optimizer, driver: HorovodDriver) -> None:
    """Add the policy to the optimizer Horovod made: its class gets ``_ScaledMembers``, the optimizer its driver
    (``opt.scaling``) and the state hooks that carry the policy state in ``state_dict()``."""
    compat.extend_optimizer_class(optimizer, _ScaledMembers, READ_THROUGH, ScaledOptimizer)
    optimizer.scaling = driver
    optimizer.register_state_dict_post_hook(_save_scaling_state)
    optimizer.register_load_state_dict_pre_hook(_load_scaling_state)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, *args: Any, policy: PolicySpec = "AdaScale",
                         loss_reduction: str = "mean", **kwargs: Any):
    """``hvd.DistributedOptimizer(optimizer, *args, **kwargs)`` whose learning rate follows ``policy``.

    Takes every argument of ``hvd.DistributedOptimizer`` (same names, same defaults) plus:
        policy: a registered name (``scaling_plugins.POLICIES``), ``{"type": name, "params": {...}}`` or a Policy.
        loss_reduction: "mean" (each pass's loss divided by backward_passes_per_step) or "sum".
    The policy's scale defaults to workers × backward_passes_per_step.
    """
    hvd = horovod_torch()
    signature = inspect.signature(hvd.DistributedOptimizer)
    try:
        bound = signature.bind(optimizer, *args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{err}; allowed: hvd.DistributedOptimizer's arguments {list(signature.parameters)} "
                        "and policy, loss_reduction") from None
    bound.apply_defaults()
    hvd_args = bound.arguments
    if hvd_args["op"] not in (hvd.Average, hvd.Sum):
        op_name = next((name for name in ("Adasum", "Min", "Max", "Product") if getattr(hvd, name) == hvd_args["op"]),
                       hvd_args["op"])
        raise ValueError(f"op=hvd.{op_name} is not supported (allowed: hvd.Average, hvd.Sum): the policies set the "
                         "learning rate of the averaged gradient, and Adasum (or min/max/product) does not average, "
                         "so AdaScale's gain has no meaning there")
    check_loss_reduction(loss_reduction)
    predivide = hvd_args["gradient_predivide_factor"]
    if not (isinstance(predivide, (int, float)) and math.isfinite(predivide) and predivide > 0):
        raise ValueError(f"gradient_predivide_factor must be a finite number > 0, got {predivide!r}")
    process_set = hvd_args["process_set"]
    if not process_set.included():
        raise ValueError("this rank is not in process_set: a policy needs the reduced gradients of its own set")
    policy = build_policy(policy)              # bad policy input fails before Horovod registers hooks
    distributed = hvd.DistributedOptimizer(**hvd_args)
    driver = HorovodDriver(distributed, policy, hvd_args["backward_passes_per_step"],
                           hvd_args["gradient_predivide_factor"], process_set, loss_reduction)
    _extend(distributed, driver)
    register_state_handler(ScaledOptimizer)
    return distributed
