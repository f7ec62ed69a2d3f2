"""PyTorch DistributedDataParallel backend (no `from __future__ import annotations`: DDP checks the hook's annotations).

    ctl = scaling_plugins.backends.ddp.attach(ddp_model, optimizer, "AdaScale", accumulation_steps=2)
    for micro-step in range(accumulation_steps):   # all but the last under ddp_model.no_sync()
        loss = loss_fn(ddp_model(x), y) / accumulation_steps
        loss.backward()
    ctl.step()                                      # this step's learning rate from the fresh gain, then optimizer.step()
    optimizer.zero_grad()

How the numbers move, with no extra collective:
- A tensor hook per parameter adds each micro-batch's own ⟨g, g⟩ into one float64 scalar (``LocalNormMeter``).
- A DDP communication hook replaces DDP's default "divide by world size, all-reduce" with the same thing,
  except that the last bucket carries that scalar as one extra element. DDP launches buckets in order, so
  when the last bucket is launched every parameter's hook of this backward has run.
- The reduced buckets give T = ‖ḡ‖² (one dot product per bucket, summed in bucket order so every rank adds
  the same numbers in the same order and gets the same gain bit for bit).
- ``step()`` reads L and T with one host sync, feeds the policy, sets each param group's learning rate to
  ``policy.learning_rate(initial lr of that group)`` and steps the optimizer.

Loss convention: by default each micro-batch's loss is divided by ``accumulation_steps`` (PyTorch's
accumulation recipe, and what DeepSpeed does internally), so the accumulated gradient is the mean over all
n = world × accumulation_steps micro-batches. With ``loss_reduction="sum"`` the micro-batch losses are
summed (not divided); the accumulated gradient is then accumulation_steps × the mean, and the statistics
divide that out. The gain is the same under both.

Mixed precision with a loss scaler (``torch.amp.GradScaler``): ``attach(..., grad_scaler=scaler)``, then per
step ``scaler.scale(loss).backward()`` for each micro-batch, ``ctl.step()``, ``optimizer.zero_grad()``.
``ctl.step()`` unscales, and on a finite step applies the policy's learning rate and steps and updates
through the scaler; an overflow step (inf/NaN in any rank's gradients, hence in every rank's reduced ones)
changes no parameter and moves the policy on no rank. The statistics are in unscaled units
(``scaling_plugins.backends.grad_scaler``). Do not call ``scaler.step``/``scaler.update`` yourself.

Policies that use the training loss (``needs_loss``) take it as ``ctl.step(loss)``; it is averaged over ranks
with one 1-element all-reduce per step (the only collective this backend adds, and only for those policies).
"""

from typing import Optional

import torch
import torch.distributed as dist

from ..policies.registry import PolicySpec
from .driver import PolicyDriver, torch_all_gather_rows, torch_all_reduce_mean
from .grad_scaler import check_grad_scaler, unscale_and_find_overflow
from .local_norms import BackwardCounter, LocalNormMeter


class DDPDriver(PolicyDriver):
    """Drives one policy for one DDP model and its optimizer. Build it with :func:`attach`."""

    backward_hint = "call loss.backward() (outside no_sync() on the last micro-step) before ctl.step()"
    loss_hint = "call ctl.step(loss)"

    def __init__(self, ddp_model: torch.nn.parallel.DistributedDataParallel, optimizer: torch.optim.Optimizer,
                 policy: PolicySpec = "AdaScale", accumulation_steps: int = 1, loss_reduction: str = "mean",
                 grad_scaler: Optional[torch.amp.GradScaler] = None) -> None:
        if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(f"attach() needs a DistributedDataParallel model, got {type(ddp_model).__name__}")
        if grad_scaler is not None:
            check_grad_scaler(grad_scaler)
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0
        self._loss_scale = 1.0
        super().__init__(optimizer, policy, dist.get_world_size(ddp_model.process_group), accumulation_steps,
                         loss_reduction)
        self.model = ddp_model
        self.process_group = ddp_model.process_group
        self.agree_across_ranks()
        self._hook: Optional[_HookState] = None
        if self.policy.needs_gradient_norms:
            self._counter: BackwardCounter = LocalNormMeter(ddp_model.module.parameters())
            self._hook = _HookState(self._counter, self.process_group, self.world_size)
            ddp_model.register_comm_hook(self._hook, _allreduce_with_local_norm)
        else:
            self._counter = BackwardCounter(ddp_model.module.parameters())

    def step(self, loss: Optional[torch.Tensor | float] = None) -> None:
        """Feed this step's statistics (and loss) to the policy, set the learning rate, step the optimizer
        (through the grad scaler when there is one: an overflow step is skipped and the policy stays)."""
        if self.grad_scaler is None:
            self.advance(loss)
            self.optimizer.step()
            return
        self._loss_scale = float(self.grad_scaler.get_scale())   # the scale this step's backward ran under
        if unscale_and_find_overflow(self.grad_scaler, self.optimizer):
            self.discard()
            self.skipped_steps += 1
        else:
            self.advance(loss)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def reduced_norms(self) -> Optional[tuple[float, float]]:
        reduced = self._hook.take()
        if reduced is None or self._loss_scale == 1.0:
            return reduced
        square = self._loss_scale ** 2   # harvested from s·g: back to true units
        return reduced[0] / square, reduced[1] / square

    def backward_passes(self) -> int:
        passes = self._counter.take_passes()
        if passes and self._hook is not None and self._hook.reduced_local is None:
            raise RuntimeError(f"{passes} backward pass(es) ran but DDP reduced no gradients in this step: either "
                               "every micro-step ran under no_sync() (run the last one outside it), or a parameter "
                               "DDP expects a gradient for got none on this rank (requires_grad changed after the "
                               "DistributedDataParallel wrap, or parameters unused without "
                               "find_unused_parameters=True; every rank must train the same parameters)")
        return passes

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        return torch_all_gather_rows(row, self.process_group)

    def all_reduce_mean(self, value: torch.Tensor) -> float:
        return torch_all_reduce_mean(value, self.process_group)


class _HookState:
    """What the communication hook keeps between buckets and steps. It holds no reference to the DDP model,
    so model → reducer → hook state is no reference cycle and the model is freed as usual."""

    def __init__(self, meter: LocalNormMeter, process_group: dist.ProcessGroup, world_size: int) -> None:
        self.meter = meter
        self.process_group = process_group
        self.world_size = world_size
        self.reduced_sq: dict[int, torch.Tensor] = {}
        self.reduced_local: Optional[torch.Tensor] = None
        self._payload: Optional[torch.Tensor] = None

    def last_bucket_payload(self, buffer: torch.Tensor) -> torch.Tensor:
        """A persistent buffer of the last bucket's size + 1 (reallocated only when DDP rebuilds its buckets),
        so carrying the scalar costs no allocation and no extra pass over the gradients."""
        payload = self._payload
        if payload is None or payload.numel() != buffer.numel() + 1 or payload.dtype != buffer.dtype:
            payload = self._payload = buffer.new_empty(buffer.numel() + 1)
        return payload

    def take(self) -> Optional[tuple[float, float]]:
        """(mean over ranks of Σ‖g_i‖², ‖reduced gradient‖²) of the step, with one host sync, or None when
        nothing was reduced; then reset. Bucket norms are summed in bucket order, so every rank adds the same
        numbers in the same order."""
        if self.reduced_local is None:
            return None
        reduced_sq = torch.stack([self.reduced_sq[i] for i in sorted(self.reduced_sq)]).sum()
        local_mean, mean_sq = torch.stack([self.reduced_local, reduced_sq]).tolist()
        self.reduced_local = None
        self.reduced_sq.clear()
        return local_mean, mean_sq


def _allreduce_with_local_norm(state: _HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default averaging all-reduce; the last bucket also carries this rank's Σ‖g_i‖²."""
    buffer = bucket.buffer()
    last = bucket.is_last()
    if last:
        payload = state.last_bucket_payload(buffer)
        torch.div(buffer, state.world_size, out=payload[:-1])   # the division DDP does anyway, into the payload
        payload[-1] = state.meter.take().to(buffer.dtype) / state.world_size
    else:
        payload = buffer.div_(state.world_size)
    work = dist.all_reduce(payload, group=state.process_group, async_op=True)
    index = bucket.index()

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        grads = reduced[:-1] if last else reduced
        state.reduced_sq[index] = torch.dot(grads, grads).to(torch.float64)
        if last:
            state.reduced_local = reduced[-1].to(torch.float64)
        return grads

    return work.get_future().then(unpack)


def attach(ddp_model: torch.nn.parallel.DistributedDataParallel, optimizer: torch.optim.Optimizer,
           policy: PolicySpec = "AdaScale", accumulation_steps: int = 1,
           loss_reduction: str = "mean", grad_scaler: Optional[torch.amp.GradScaler] = None) -> DDPDriver:
    """Drive ``optimizer``'s learning rate by ``policy`` (a name, ``{"type", "params"}`` or a Policy); with
    ``grad_scaler`` the steps go through that ``torch.amp.GradScaler`` (module docstring).

    Call before the first backward pass (it registers DDP's communication hook, which DDP allows once).
    """
    return DDPDriver(ddp_model, optimizer, policy, accumulation_steps, loss_reduction, grad_scaler)
