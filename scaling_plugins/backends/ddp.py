"""PyTorch DistributedDataParallel backend (no `from __future__ import annotations`: DDP checks the hook's annotations).

    ctl = scaling_plugins.backends.ddp.attach(ddp_model, optimizer, "AdaScale", accumulation_steps=2)
    for micro-step in range(accumulation_steps):   # all but the last under ddp_model.no_sync()
        loss = loss_fn(ddp_model(x), y) / accumulation_steps
        loss.backward()
    ctl.step()                                      # this step's learning rate from the fresh gain, then optimizer.step()
    optimizer.zero_grad()

With a batch-size controller (policy ``AdaptiveBatch``) read ``ctl.accumulation_steps`` at the start of each step
and run that many micro-batches (each loss divided by it); ``ctl.step()`` sets it for the next step.

How the numbers move, with no extra collective (``ddp_hooks`` has the details):
- Each rank's local Σ‖g‖² (a float64 scalar), with ops that grow with DDP's buckets, not with the parameters
  (``fused_norms.BucketNormMeter``): a tensor hook per parameter records each backward pass's own gradient (a
  Python append, no tensor op). In a pass whose gradients become ``.grad`` (after ``zero_grad()``; no
  accumulation) each bucket is read once, in the communication hook, right after DDP has copied the gradients into
  it; the gradients of any other pass (the micro-batches of an accumulation) are read per chunk, a few fused ops
  each. Only the parameters DDP reduces are measured (not those in ``_ddp_params_and_buffers_to_ignore``).
- A DDP communication hook (``ddp_hooks.norm_carrying_wrapper``) averages each bucket as DDP's default hook does,
  with the backend's averaging all-reduce (``ReduceOp.AVG``; divide-then-sum where a backend has none), or with
  the ``comm_hook`` given to :func:`attach` (e.g. ``fp16_compress_hook``), and carries that scalar in the last
  bucket, in the bucket's own memory. T = ‖ḡ‖² comes from the reduced buckets, one fused read per bucket in its
  reduction's completion callback, summed in bucket order so every rank gets the same gain bit for bit.
- ``step()`` reads L and T with one host sync, feeds the policy, sets each param group's learning rate to
  ``policy.learning_rate(initial lr of that group)`` and steps the optimizer.

Accumulation: under ``no_sync()`` for all but the last micro-batch (PyTorch's recipe), or without it (DDP then
reduces every micro-batch; the local sums of every reduction add up and T is read from the last one). Only
backward passes that accumulate into ``.grad`` count: ``torch.autograd.grad`` with respect to the parameters (a
gradient penalty) is neither counted nor measured, and a pass run under ``with ctl.extra_backward():`` (SAM's
first backward, which only finds the perturbation) is left out explicitly; the step's last reduction must be of
the step's own gradients.

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

from typing import Any, Optional

import torch
import torch.distributed as dist

from ..policies.registry import PolicySpec
from .driver import PolicyDriver, check_dense_gradients, torch_all_gather_rows, torch_all_reduce_mean
from .ddp_hooks import CommHook, LocalNormCarrier, check_inner_hook, norm_carrying_wrapper
from .fused_norms import BackwardCounter, BucketNormMeter
from .grad_scaler import check_grad_scaler, unscale_and_find_overflow


class DDPDriver(PolicyDriver):
    """Drives one policy for one DDP model and its optimizer. Build it with :func:`attach`."""

    backward_hint = "call loss.backward() (outside no_sync() on the last micro-step) before ctl.step()"
    loss_hint = "call ctl.step(loss)"

    def __init__(self, ddp_model: torch.nn.parallel.DistributedDataParallel, optimizer: torch.optim.Optimizer,
                 policy: PolicySpec = "AdaScale", accumulation_steps: int = 1, loss_reduction: str = "mean",
                 grad_scaler: Optional[torch.amp.GradScaler] = None, comm_hook: Optional[CommHook] = None,
                 comm_hook_state: Any = None) -> None:
        if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(f"attach() needs a DistributedDataParallel model, got {type(ddp_model).__name__}")
        check_supported_model(ddp_model)
        check_inner_hook(comm_hook, comm_hook_state)
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
        params = reduced_parameters(ddp_model)
        self._carrier: Optional[LocalNormCarrier] = None
        self._reduced: Optional[tuple[float, float]] = None
        if self.policy.needs_gradient_norms:
            self._counter: BackwardCounter = BucketNormMeter(params)
            self._carrier = LocalNormCarrier(self._counter, self.process_group, comm_hook_state,
                                             wide=comm_hook is not None,
                                             flush_each_bucket=ddp_model.gradient_as_bucket_view)
            register_comm_hook(ddp_model, self._carrier, norm_carrying_wrapper(comm_hook))
        else:
            self._counter = BackwardCounter(params)
            if comm_hook is not None:
                register_comm_hook(ddp_model, comm_hook_state, comm_hook)

    def step(self, loss: Optional[torch.Tensor | float] = None) -> None:
        """Feed this step's statistics (and loss) to the policy, set the learning rate, step the optimizer
        (through the grad scaler when there is one: an overflow step is skipped and the policy stays); then a
        batch-size controller's choice becomes ``accumulation_steps`` for the next step."""
        # the reductions' numbers, read in their completion callbacks, before the scaler's unscale changes .grad
        self._reduced = self._carrier.take() if self._carrier is not None else None
        if self.grad_scaler is None:
            self.advance(loss)
            self.optimizer.step()
        else:
            self._scaled_step(loss)
        self.follow_batch_request()

    def _scaled_step(self, loss: Optional[torch.Tensor | float]) -> None:
        self._loss_scale = float(self.grad_scaler.get_scale())   # the scale this step's backward ran under
        if unscale_and_find_overflow(self.grad_scaler, self.optimizer):
            self.discard()
            self.skipped_steps += 1
        else:
            self.advance(loss)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def backward_counter(self) -> BackwardCounter:
        return self._counter

    def reduced_norms(self) -> Optional[tuple[float, float]]:
        reduced, self._reduced = self._reduced, None
        if reduced is None or self._loss_scale == 1.0:
            return reduced
        square = self._loss_scale ** 2   # harvested from s·g: back to true units
        return reduced[0] / square, reduced[1] / square

    def backward_passes(self) -> int:
        passes = self._counter.take_passes()
        if passes and self._carrier is not None and self._reduced is None:
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


def reduced_parameters(ddp_model: torch.nn.parallel.DistributedDataParallel) -> list[torch.nn.Parameter]:
    """The trainable parameters DDP's reducer reduces, by its own rule: each module's own parameter whose
    ``"{module name}.{parameter name}"`` is not in ``_ddp_params_and_buffers_to_ignore`` (so a parameter of the
    root module is ignored only as ``".name"``), each parameter once."""
    ignored = ddp_model.parameters_to_ignore
    params: dict[int, torch.nn.Parameter] = {}
    for module_name, module in ddp_model.module.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and f"{module_name}.{name}" not in ignored:
                params.setdefault(id(param), param)
    return list(params.values())


def check_supported_model(ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
    """``ValueError`` for DDP set-ups whose reduction the statistics cannot ride: sparse gradients and DDP's own
    (experimental) ``mixed_precision``, which takes DDP's only communication-hook slot."""
    check_dense_gradients(ddp_model.module, "which DDP's communication hooks cannot carry the statistics in",
                          " (dense gradients, reduced and measured like every other), or use Horovod with "
                          "sparse_as_dense=True")
    if getattr(ddp_model, "mixed_precision", None) is not None:
        raise ValueError("DistributedDataParallel(mixed_precision=...) registers DDP's own communication hook, and "
                         "DDP allows one: use torch.autocast with fp32 parameters (gradients reduced in fp32), or "
                         "bf16 parameters (model.bfloat16(); the statistics are read in fp32), or "
                         "attach(..., comm_hook=bf16_compress_hook) to communicate in bf16")


def register_comm_hook(ddp_model: torch.nn.parallel.DistributedDataParallel, state: Any, hook: CommHook) -> None:
    """``ddp_model.register_comm_hook``, with a clear error when the model already has one."""
    try:
        ddp_model.register_comm_hook(state, hook)
    except RuntimeError as err:
        if "only be called once" not in str(err):
            raise
        raise ValueError("this DDP model already has a communication hook and DDP allows one: pass yours to "
                         "attach(..., comm_hook=hook, comm_hook_state=state) instead of registering it") from None


def attach(ddp_model: torch.nn.parallel.DistributedDataParallel, optimizer: torch.optim.Optimizer,
           policy: PolicySpec = "AdaScale", accumulation_steps: int = 1, loss_reduction: str = "mean",
           grad_scaler: Optional[torch.amp.GradScaler] = None, comm_hook: Optional[CommHook] = None,
           comm_hook_state: Any = None) -> DDPDriver:
    """Drive ``optimizer``'s learning rate by ``policy`` (a name, ``{"type", "params"}`` or a Policy); with
    ``grad_scaler`` the steps go through that ``torch.amp.GradScaler`` (module docstring); with ``comm_hook``
    (e.g. ``default_hooks.fp16_compress_hook`` or ``bf16_compress_hook``, and its ``comm_hook_state``) DDP reduces
    through that hook, with the statistics carried around it (``ddp_hooks.norm_carrying_wrapper``).

    Call before the first backward pass (it registers DDP's communication hook, which DDP allows once).
    """
    return DDPDriver(ddp_model, optimizer, policy, accumulation_steps, loss_reduction, grad_scaler, comm_hook,
                     comm_hook_state)
