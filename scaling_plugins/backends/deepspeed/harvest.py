"""DeepSpeed's harvest: how one optimizer step's numbers reach the policy without an extra collective.

Each rank's share of L = Σ_i ‖g_i‖² and of the loss (:class:`LocalNumbers`, accumulated over the micro-batches
of a step) rides a reduction DeepSpeed already makes, and T = ‖ḡ‖² comes from what that reduction produced
(:class:`ReducedNumbers`). The carrier depends on the optimizer:

- :class:`FlatBufferCarrier` (ZeRO-0, BF16_Optimizer): the numbers are appended to the list of gradients of
  DeepSpeed's flat all-reduce (as a ``WidePayload`` block where it communicates in fp16/bf16); T is read from
  each reduced flat buffer before DeepSpeed copies it back.
- :class:`NormReductionCarrier` (ZeRO-1/2/3): the first 1-element all-reduce of DeepSpeed's squared gradient
  norm is widened to [squared norm, numbers], one collective as before; T is DeepSpeed's unclipped global norm².

Units: a hook sees g_i·s/gas (loss scale s, gas accumulation steps); the numbers are divided by s², and
T = ‖reduced‖²/(c·W·s)² with c what DeepSpeed multiplies the sum over ranks by. docs/deepspeed.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from . import compat
from ..shared.fused_norms import EXACT_NUMEL, LOW_PRECISION, ChunkedNormMeter, squared_norm_sum
from ..shared.wide_payload import WidePayload

log = logging.getLogger(__name__)


class StepMeter(ChunkedNormMeter):
    """``ChunkedNormMeter`` for DeepSpeed: starts afresh when the engine moves to a new optimizer step (a step
    DeepSpeed skipped for fp16 overflow never consumed its sum). fp16/bf16 gradients are accumulated in fp32/fp64
    without a copy of the gradient (``fused_norms``). Gradients recorded by reference do not count towards a
    chunk (``chunk_by_reference=False``): they are read together at the end of the backward. ``immediate=True``
    (an optimizer that takes ``.grad`` away during the backward) reads each gradient in its own hook."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], current_step: Callable[[], int],
                 immediate: bool = False) -> None:
        self._current_step = current_step
        self._window = current_step()
        super().__init__(parameters, immediate=immediate, chunk_by_reference=False)

    def _before_gradient(self) -> None:
        self._restart_if_new_step()

    def take(self) -> torch.Tensor:
        self._restart_if_new_step()
        return super().take()

    def _restart_if_new_step(self) -> None:
        step = self._current_step()
        if step != self._window:
            self.reset()
            self._window = step


@dataclass
class ReducedNumbers:
    """One step's reduced numbers: ``payload`` summed over ranks (float64: [L] and/or [loss sum]) and T."""

    payload: torch.Tensor
    mean_sq_norm: Optional[torch.Tensor]


class LocalNumbers:
    """This rank's share of the step's numbers, accumulated over the micro-batches of one optimizer step."""

    def __init__(self, engine: Any, needs_norms: bool, needs_loss: bool) -> None:
        self.engine = engine
        params = [p for p in engine.module.parameters() if p.requires_grad]
        optimizer = engine.optimizer
        immediate = compat.is_zero_optimizer(optimizer) or compat.frees_gradients_during_backward(optimizer)
        self.meter = StepMeter(params, lambda: engine.global_steps, immediate) if needs_norms else None
        self.needs_loss = needs_loss
        self._loss_window: Optional[int] = None
        self._loss_sum: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        return int(self.meter is not None) + int(self.needs_loss)

    def add_loss(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's (unscaled) loss; called by the engine.backward wrapper."""
        value = loss.detach().reshape(()).to(torch.float64)
        if self._loss_window != self.engine.global_steps or self._loss_sum is None:
            self._loss_window, self._loss_sum = self.engine.global_steps, value
        else:
            self._loss_sum = self._loss_sum + value

    def take(self, loss_scale: float) -> torch.Tensor:
        """[Σ_i ‖g_i/gas‖² without the loss scale][, Σ losses] of this rank, float64; resets for the next step."""
        parts = []
        if self.meter is not None:
            parts.append(self.meter.take() / loss_scale ** 2)
        if self.needs_loss:
            if self._loss_sum is None or self._loss_window != self.engine.global_steps:
                raise RuntimeError("this policy needs the training loss: call engine.backward(loss) for every "
                                   "micro-batch (the loss is read there)")
            parts.append(self._loss_sum)
            self._loss_sum = None
        device = parts[0].device
        return torch.stack([p.to(device) for p in parts])


class Carrier:
    """Carries this rank's ``LocalNumbers`` on one of the engine's reductions and ``deliver``s each step's
    ``ReducedNumbers``.

    grad_multiplier: c, what DeepSpeed's gradient reduction multiplies the sum over ranks by (1/W or 1).
    """

    extra_collectives = 0

    def __init__(self, engine: Any, local: LocalNumbers, deliver: Callable[[ReducedNumbers], None],
                 grad_multiplier: float) -> None:
        self.engine = engine
        self.local = local
        self.deliver = deliver
        self.grad_multiplier = grad_multiplier


class FlatBufferCarrier(Carrier):
    """ZeRO-0 (and BF16_Optimizer): the payload rides DeepSpeed's flat gradient all-reduce."""

    def __init__(self, engine: Any, local: LocalNumbers, deliver: Callable[[ReducedNumbers], None],
                 grad_multiplier: float) -> None:
        super().__init__(engine, local, deliver, grad_multiplier)
        self._payload: Optional[torch.Tensor] = None
        self._wide: Optional[WidePayload] = None
        self._unread: dict[int, torch.Tensor] = {}      # id → reduced gradient not read from a flat buffer yet
        self._reduced_sq: list[torch.Tensor] = []       # ‖reduced flat buffer‖² of each of them, this reduction
        self._loss_scale = 1.0
        compat.supply_gradients_for_reduction(engine, self._grads_with_payload)
        compat.on_bucket_reduced(engine, self._read_reduced_bucket)
        compat.on_gradients_reduced(engine, self._after_reduction)

    def _grads_with_payload(self, collect: Callable[[], tuple]) -> tuple[list[torch.Tensor], dict]:
        grads, expert_grads = collect()
        grads = list(grads)
        if not grads:
            raise RuntimeError("DeepSpeed gave no gradients to reduce; nothing to measure")
        self._loss_scale = compat.loss_scale(self.engine)
        if self.local.meter is not None:
            self._unread = {id(grad): grad for grad in grads}
        values = self.local.take(self._loss_scale).to(grads[-1].device)
        carried = compat.communication_dtype(self.engine)
        if carried in LOW_PRECISION or grads[-1].dtype in LOW_PRECISION:
            self._wide = WidePayload(self.local.size, compat.data_parallel_rank(self.engine),
                                     self.engine.dp_world_size)
            self._payload = self._wide.encode(values).to(grads[-1].dtype)
        else:
            self._wide = None
            self._payload = values.to(grads[-1].dtype)
        return grads + [self._payload], expert_grads

    def _read_reduced_bucket(self, flat: torch.Tensor, bucket: list) -> None:
        """‖g‖² of the gradients in one reduced flat buffer, while it is fresh (the payload's elements left out)."""
        if not self._unread or id(bucket[0]) not in self._unread:
            return      # not this step's gradients (expert gradients), or no norm wanted
        for grad in bucket:
            self._unread.pop(id(grad), None)
        numel = flat.numel() - (self._payload.numel() if bucket[-1] is self._payload else 0)
        self._reduced_sq.append(squared_norm_sum([flat[:numel]], rows_above=EXACT_NUMEL))

    def _after_reduction(self) -> None:
        if self._payload is None:
            return
        if self._wide is not None:
            payload = self._wide.decode(self._payload, self.grad_multiplier)
        else:
            payload = self._payload.to(torch.float64) / self.grad_multiplier
        mean_sq = None
        if self.local.meter is not None:
            reduced_sq = torch.stack([*self._reduced_sq, squared_norm_sum(self._unread.values())]).sum()
            world = self.engine.dp_world_size
            mean_sq = reduced_sq / (self.grad_multiplier * world * self._loss_scale) ** 2
        self._payload, self._unread, self._reduced_sq = None, {}, []
        self.deliver(ReducedNumbers(payload, mean_sq))


class NormReductionCarrier(Carrier):
    """ZeRO-1/2/3: the payload rides the 1-element all-reduce of DeepSpeed's squared gradient norm."""

    def __init__(self, engine: Any, local: LocalNumbers, deliver: Callable[[ReducedNumbers], None],
                 grad_multiplier: float) -> None:
        super().__init__(engine, local, deliver, grad_multiplier)
        optimizer = engine.optimizer
        compat.wrap_norm_computation(optimizer, self._norm_with_payload)
        if not compat.norm_is_computed(optimizer):
            self.extra_collectives = compat.compute_norm_before_step(optimizer)
            log.warning("scaling_plugins: zero_optimization.compute_grad_norm=false leaves no gradient-norm "
                        "reduction to ride; computing DeepSpeed's gradient norm once per step (%d extra 1-element "
                        "all-reduce(s) per step)", self.extra_collectives)

    def _norm_with_payload(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loss_scale = compat.loss_scale(self.engine)
        local = self.local.take(loss_scale)
        reduced: list[torch.Tensor] = []

        def widen_first_norm(real_all_reduce: Callable[..., Any], tensor: torch.Tensor, op: Any, group: Any,
                             async_op: bool, **more: Any) -> Any:
            if reduced or async_op or tensor.numel() != 1 or op != compat.SUM:
                return real_all_reduce(tensor, op=op, group=group, async_op=async_op, **more)
            packed = torch.cat([tensor.detach().reshape(1).to(torch.float64), local.to(tensor.device)])
            work = real_all_reduce(packed, op=op, group=group, async_op=False, **more)
            tensor.copy_(packed[:1].reshape(tensor.shape))
            reduced.append(packed[1:])
            return work

        with compat.all_reduce_intercepted(widen_first_norm):
            norm = original(*args, **kwargs)
        if not reduced:
            raise RuntimeError("DeepSpeed's gradient-norm computation did no 1-element all-reduce to carry the "
                               "statistics; this DeepSpeed version is not supported by scaling_plugins")
        total = torch.as_tensor(compat.total_norm(self.engine.optimizer, norm), dtype=torch.float64)
        valid = torch.isfinite(total) & (total >= 0)
        scale = self.grad_multiplier * self.engine.dp_world_size * loss_scale
        mean_sq = torch.where(valid, (total / scale) ** 2, torch.full_like(total, float("inf")))
        self.deliver(ReducedNumbers(reduced[0], mean_sq if self.local.meter is not None else None))
        return norm


def build_carrier(engine: Any, local: LocalNumbers, deliver: Callable[[ReducedNumbers], None]) -> Carrier:
    """The carrier for this engine's optimizer: the ZeRO norm reduction for stages 1–3, else the flat all-reduce."""
    grad_multiplier = compat.gradient_multiplier(engine)
    if compat.is_zero_optimizer(engine.optimizer):
        return NormReductionCarrier(engine, local, deliver, grad_multiplier)
    return FlatBufferCarrier(engine, local, deliver, grad_multiplier)
