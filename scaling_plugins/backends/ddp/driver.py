"""PyTorch DDP's driver: :func:`attach` makes a :class:`DDPDriver` that sets the learning rate of a DDP model's
optimizer from a policy, fed by the carrier of ``harvest`` (no extra collective).

    driver = scaling_plugins.backends.ddp.attach(ddp_model, optimizer, "AdaScale", accumulation_steps=2)
    for micro_step in range(2):       # all but the last under ddp_model.no_sync()
        (loss_fn(ddp_model(x), y) / 2).backward()
    driver.step()                     # sets this step's lr from the fresh gain and steps the optimizer itself
    optimizer.zero_grad()

Loss conventions, accumulation, mixed precision (``grad_scaler=``), communication hooks (``comm_hook=``) and
two-pass optimizers (``driver.extra_backward()``): docs/ddp.md.
(No ``from __future__ import annotations``: DDP checks the hook's annotations.)
"""

from typing import Any, Optional

import torch
import torch.distributed as dist

from ...policies.registry import PolicySpec
from ..shared.driver import PolicyDriver, check_dense_gradients, torch_all_gather_rows, torch_all_reduce_mean
from .harvest import CommHook, BucketCarrier, check_inner_hook, norm_carrying_wrapper
from ..shared.fused_norms import BackwardCounter, BucketNormMeter
from ..shared.grad_scaler import check_grad_scaler, unscale_and_find_overflow


class DDPDriver(PolicyDriver):
    """Drives one policy for one DDP model and its optimizer. Build it with :func:`attach`."""

    backward_hint = "call loss.backward() (outside no_sync() on the last micro-step) before driver.step()"
    loss_hint = "call driver.step(loss)"

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
        super().__init__(optimizer, policy, dist.get_world_size(ddp_model.process_group), accumulation_steps,
                         loss_reduction)
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0
        self._loss_scale = 1.0
        self.model = ddp_model
        self.process_group = ddp_model.process_group
        self.agree_across_ranks()
        self.refuse_other_optimizer_steps()
        params = reduced_parameters(ddp_model)
        self.carrier: Optional[BucketCarrier] = None
        self._reduced: Optional[tuple[float, float]] = None
        if self.policy.needs_gradient_norms:
            self._counter: BackwardCounter = BucketNormMeter(params)
            self.carrier = BucketCarrier(self._counter, self.process_group, comm_hook_state,
                                             wide=comm_hook is not None,
                                             flush_each_bucket=ddp_model.gradient_as_bucket_view)
            register_comm_hook(ddp_model, self.carrier, norm_carrying_wrapper(comm_hook))
        else:
            self._counter = BackwardCounter(params)
            if comm_hook is not None:
                register_comm_hook(ddp_model, comm_hook_state, comm_hook)

    def step(self, loss: Optional[torch.Tensor | float] = None) -> None:
        """Feed this step's statistics (and loss) to the policy, set the learning rate, step the optimizer
        (through the grad scaler when there is one: an overflow step is skipped and the policy stays); then a
        batch-size controller's choice becomes ``accumulation_steps`` for the next step."""
        # the reductions' numbers, read in their completion callbacks, before the scaler's unscale changes .grad
        self._reduced = self.carrier.take() if self.carrier is not None else None
        with self.stepping_optimizer():
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
        if passes and self.carrier is not None and self._reduced is None:
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
    """Drive ``optimizer``'s learning rates by ``policy``, with the statistics carried in DDP's gradient buckets.

    Call before the first backward pass: it registers DDP's communication hook, which DDP allows once.

    Args:
        ddp_model: the ``DistributedDataParallel`` model whose gradients ``optimizer`` steps.
        optimizer: the optimizer; each param group's lr is its base learning rate.
        policy: a registered name (``scaling_plugins.POLICIES``), ``{"type": name, "params": {...}}`` or a Policy.
        accumulation_steps: micro-batches per optimizer step on each rank.
        loss_reduction: "mean" (each micro-batch loss divided by ``accumulation_steps``) or "sum".
        grad_scaler: an enabled ``torch.amp.GradScaler``; ``driver.step()`` then unscales, skips overflow steps
            and updates the scaler (do not call ``scaler.step`` yourself).
        comm_hook, comm_hook_state: a DDP communication hook that returns the averaged bucket (e.g.
            ``fp16_compress_hook``) and its state; the statistics are carried around it.

    Returns:
        the :class:`DDPDriver`: ``step(loss=None)``, ``done``, ``gain``, ``lr``, ``metrics()``, ``state_dict()``.

    Example::

        ddp_model = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp_model.parameters(), lr=0.1)
        driver = attach(ddp_model, optimizer, "AdaScale")
        loss_fn(ddp_model(x), y).backward()
        driver.step()
        optimizer.zero_grad()
    """
    return DDPDriver(ddp_model, optimizer, policy, accumulation_steps, loss_reduction, grad_scaler, comm_hook,
                     comm_hook_state)
