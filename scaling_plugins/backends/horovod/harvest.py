"""Horovod's harvest: this rank's Σ‖g_i‖² rides Horovod's own fusion buffer, and T = ‖ḡ‖² is read from the
reduced gradients.

:class:`FusionBufferCarrier` measures each backward pass's gradients (``ChunkedNormMeter``), holds back the
all-reduces whose gradients it has not read yet, and enqueues the local sum as a fp32 one-element all-reduce
grouped with the gradient of a *partner* parameter (the first trainable one: in a sequential model the last
gradient of backward) at the end of the step's last pass, so the sum shares the partner's fusion buffer and adds
no collective. Where it cannot share it (compression, a non-fp32 partner, ``groups=``) the sum is enqueued on its
own under the same fixed name. docs/horovod.md has the whole path; AdaScale: Johnson et al., ICML 2020.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..shared.fused_norms import ChunkedNormMeter, squared_norm_sum
from . import compat
from .compat import horovod_torch

NORM_NAME = "scaling_plugins.local_sq_norm"


class _Pending:
    """A Horovod handle that is not there yet: Horovod's ``synchronize()`` calls it for the reduced gradient.

    Used for gradients whose all-reduce waits for the meter (their local norm is read first) and for the partner
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


class FusionBufferCarrier:
    """Carries this rank's local Σ‖g‖² on the all-reduces of one Horovod ``DistributedOptimizer`` and reads T.

    op, scale_factors: the gradients' reduction op and (prescale, postscale) factors, applied to the sum alike;
    expected_passes: the backward passes of a whole step (``backward_passes_per_step``), read when a pass ends.
    Per step: :meth:`allreduce_gradient` / :meth:`grouped_allreduce` replace Horovod's enqueue of each gradient,
    :meth:`before_synchronize` / :meth:`after_synchronize` wrap Horovod's ``synchronize()``, :meth:`take` gives the
    step's (reduced local sum, T) as device scalars and :meth:`take_passes` the backward passes it saw.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, op: Any, scale_factors: tuple[float, float],
                 process_set: Any, expected_passes: Callable[[], int]) -> None:
        self.hvd = horovod_torch()
        self.optimizer = optimizer
        self.op = op
        self.scale_factors = scale_factors
        self.process_set = process_set
        self.expected_passes = expected_passes
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self._partner_param = params[0]            # the same parameter on every rank
        self._norm_name = f"{NORM_NAME}.{compat.parameter_name(optimizer, params[0])}"
        self._grouped = compat.gradient_group_count(optimizer) > 0
        self.meter = ChunkedNormMeter(params, on_flush=self._start_deferred, on_pass_end=self._end_of_backward)
        self.reset()

    def reset(self) -> None:
        """Forget a half-done step (a reload, an elastic reset): no pass seen, nothing in flight."""
        self._passes = 0
        self._passes_seen: Optional[int] = None   # passes of the step whose gradients were just synchronized
        self._enqueued = 0              # Horovod groups enqueued by hooks in this backward (groups= only)
        self._norm: Optional[tuple[torch.Tensor, Any]] = None   # (buffer, handle; None when in a group)
        self._partner: Optional[_Pending] = None                # the partner parameter's handle, once asked for
        self._deferred: list[tuple[torch.Tensor, _Pending]] = []
        self._reduced: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.meter.reset()
        self.meter.take_passes()

    # -- during backward ------------------------------------------------------------------------------------
    def _end_of_backward(self) -> None:
        """After every accumulator hook and the meter's last read of this backward: start the norm's all-reduce
        once the step's last pass is done (with the partner; or the norm alone where it cannot ride)."""
        self._enqueued = 0
        self._passes += self.meter.take_passes()
        if self._passes >= self.expected_passes() and self._norm is None:
            self._enqueue_norm()

    def _take_norm_buffer(self) -> torch.Tensor:
        return self.meter.take().to(torch.float32).reshape(1)

    def _partner_fuses(self) -> bool:
        """Whether the norm can share the partner gradient's fusion buffer (same dtype, no compression)."""
        param = self._partner_param
        return (not compat.compresses(self.optimizer) and param.dtype == torch.float32
                and (param.grad is None or param.grad.layout == torch.strided))

    def _enqueue_norm(self) -> None:
        """This rank's Σ‖g‖² as a fp32 all-reduce with the gradients' op and factors, under a name fixed per
        optimizer (the same on every rank): grouped with the partner parameter's gradient where it fuses, else on
        its own."""
        buffer = self._take_norm_buffer()
        prescale, postscale = self.scale_factors
        if self._grouped or not self._partner_fuses():
            handle = self.hvd.allreduce_async_(buffer, name=self._norm_name, op=self.op, prescale_factor=prescale,
                                               postscale_factor=postscale, process_set=self.process_set)
            self._norm = (buffer, handle)
            return
        param = self._partner_param
        if param.grad is None:          # no gradient on this rank this step: zeros, as Horovod reduces them
            param.grad = torch.zeros_like(param)
        handle = self.hvd.grouped_allreduce_async_(
            [param.grad, buffer], name=self._norm_name, op=self.op, prescale_factor=prescale,
            postscale_factor=postscale, process_set=self.process_set)
        self._norm = (buffer, None)
        if self._partner is None:
            self._partner = _Pending()
        self._partner.handle, self._partner.grouped = handle, True

    def _start_deferred(self) -> None:
        """After the meter read them: start the all-reduces that waited for it (Horovod's own, in hook order)."""
        deferred, self._deferred = self._deferred, []
        for param, pending in deferred:
            pending.handle, _ = self.optimizer._horovod_allreduce_grad_async(param)

    def allreduce_gradient(self, optimizer: Any, p: torch.Tensor) -> tuple[Any, Any]:
        """Horovod's all-reduce of one gradient, once its local norm is read; the partner parameter's waits for
        the end of backward and takes the norm into its group."""
        if self._grouped:
            return optimizer._horovod_allreduce_grad_async(p)
        if p is self._partner_param and self._partner_fuses():
            if self._partner is None:
                self._partner = _Pending()
            if self._norm is None and not self.meter.in_pass:   # asked from synchronize(): start it now
                self._enqueue_norm()
            return self._partner, None
        if self.meter.holds(p):
            if compat.compresses(optimizer):             # Horovod needs the compression context now
                self.meter.flush()
                return optimizer._horovod_allreduce_grad_async(p)
            pending = _Pending()
            self._deferred.append((p, pending))
            return pending, None
        return optimizer._horovod_allreduce_grad_async(p)

    def grouped_allreduce(self, optimizer: Any, params: tuple) -> tuple[Any, tuple]:
        """Horovod's all-reduce of one gradient group (``groups=``), after one read of the group's local norms;
        the group completing last takes the norm."""
        if any(self.meter.holds(p) for p in params):
            self.meter.flush()
        self._enqueued += 1
        last = self._enqueued == compat.gradient_group_count(optimizer) and self.meter.in_pass
        if (not last or self._norm is not None or compat.compresses(optimizer)
                or not all(p.grad.dtype == torch.float32 and p.grad.layout == torch.strided for p in params)):
            return optimizer._horovod_grouped_allreduce_grad_async(params)
        buffer = self._take_norm_buffer()
        handle = self.hvd.grouped_allreduce_async_(       # Horovod's grouped path applies no scale factors
            [*(p.grad for p in params), buffer], name=f"{NORM_NAME}.{compat.parameter_name(optimizer, params[0])}",
            op=self.op, process_set=self.process_set)
        self._norm = (buffer, None)
        return handle, (None,) * len(params)

    # -- around synchronize() -------------------------------------------------------------------------------
    def before_synchronize(self) -> None:
        """Start what backward did not (fewer passes than announced, no Horovod hooks, a partner left waiting)."""
        self.meter.flush()
        if self._norm is None and (self._passes > 0 or self._partner is not None):
            self._enqueue_norm()

    def after_synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        """Wait for the norm; T from the reduced gradients, as a device scalar (no host sync here)."""
        if self._norm is None:
            return
        buffer, handle = self._norm
        if handle is not None:
            self.hvd.synchronize(handle)
        elif self._partner is not None and self._partner.handle is not None and not self._partner_consumed():
            self._partner()             # no Horovod hooks (one process): nobody else waits for the partner
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.requires_grad and p.grad is not None]
        self._reduced = (buffer[0].to(torch.float64), squared_norm_sum(grads))
        self._norm, self._partner = None, None
        self._passes_seen, self._passes = self._passes, 0

    def _partner_consumed(self) -> bool:
        return compat.has_gradient_hooks(self.optimizer)

    # -- at the step ----------------------------------------------------------------------------------------
    def take(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(the reduced local sum, T) of the step just synchronized, as float64 device scalars, or None when no
        gradients were synchronized since the last call."""
        reduced, self._reduced = self._reduced, None
        return reduced

    def take_passes(self) -> int:
        """Backward passes of the step just synchronized (or, before ``synchronize()``, of the running step)."""
        passes, self._passes_seen = self._passes_seen, None
        return self._passes if passes is None else passes
