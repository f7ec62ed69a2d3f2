"""Everything the DeepSpeed backend touches beyond DeepSpeed's public API, in one place, for the versions checked here.

DeepSpeed 0.19.8 is the version this is verified against; the 0.19 series is accepted. Importing this module
with any other version raises ``ImportError`` naming the supported ones, instead of an ``AttributeError``
deep inside ``deepspeed.initialize`` or a step. What lives here:

- scheduler registration: DeepSpeed resolves ``"scheduler": {"type": NAME}`` with ``getattr`` on
  ``deepspeed.runtime.lr_schedules`` (a module ``__getattr__`` answers policy names), and builds the scheduler
  inside ``deepspeed.initialize`` with only the optimizer (the engine is found on the call stack);
- checks of what ``deepspeed.initialize`` is given, run before DeepSpeed reads it: the config dict at the start of
  every ``DeepSpeedConfig`` (which reads the batch sizes), the engine's arguments right before it builds the
  optimizer and the scheduler (``_configure_optimizer``, then ``_configure_lr_scheduler``); and reading a config
  argument as DeepSpeed reads it (a dict, a file read with Hjson and duplicate keys refused, or base64);
- features the backend refuses (pipeline engines, MoE layers, model parallelism);
- the engine's and the ZeRO optimizers' private members the harvest rides on: the list of gradients of the
  flat all-reduce, the gradient-norm computation and its 1-element all-reduce, the loss scale, whether
  gradients are averaged, the basic optimizer;
- rebinding an engine or optimizer method on one instance (``engine.backward``, ``allreduce_gradients``);
- changing the accumulation between steps (``engine.set_train_batch_size`` and the micro-step counter);
- the timeout of the groups DeepSpeed creates (``TorchBackend.new_group``), and reading a group's timeout (torch's
  private ``ProcessGroup._get_backend(...).options._timeout``, verified on torch 2.13).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import sys
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

import torch

try:
    import deepspeed
    from deepspeed import comm as ds_comm
    from deepspeed.runtime import lr_schedules
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("scaling_plugins.backends.deepspeed needs DeepSpeed: "
                      "pip install 'scaling_plugins[deepspeed]'") from err

from ...call_stack import calling_instance  # noqa: E402
from ..shared.versions import require_supported_version  # noqa: E402

SUPPORTED_VERSIONS = ("0.19.",)     # version prefixes
VERIFIED = "0.19.8"


def check_version(version: str) -> None:
    """``ImportError`` for a DeepSpeed version this module was not verified on (``require_supported_version``)."""
    require_supported_version("deepspeed", version, SUPPORTED_VERSIONS, VERIFIED)


check_version(deepspeed.__version__)

from deepspeed.comm.torch import TorchBackend  # noqa: E402  (after the version check)
from deepspeed.runtime.config import DeepSpeedConfig  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from deepspeed.runtime.pipe.engine import PipelineEngine  # noqa: E402
from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config  # noqa: E402
from deepspeed.runtime.utils import combine_grad_norm_groups  # noqa: E402
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer  # noqa: E402

SUM = ds_comm.ReduceOp.SUM


# -- scheduler registration -----------------------------------------------------------------------------------
def deepspeed_scheduler_names() -> list[str]:
    """DeepSpeed's own scheduler type names."""
    return list(lr_schedules.VALID_LR_SCHEDULES)


def install_scheduler_lookup(lookup: Callable[[str, Callable[[str], Any]], Any]) -> None:
    """Make ``getattr(lr_schedules, NAME)`` answer ``lookup(NAME, fallback)`` for names the module lacks;
    ``fallback`` is the module's previous ``__getattr__`` (or the usual ``AttributeError``). Idempotent."""
    previous = lr_schedules.__dict__.get("__getattr__")
    if getattr(previous, "scaling_plugins_lookup", False):
        return

    def fallback(name: str) -> Any:
        if previous is not None:
            return previous(name)
        raise AttributeError(f"module {lr_schedules.__name__!r} has no attribute {name!r}")

    def module_getattr(name: str) -> Any:
        return lookup(name, fallback)

    module_getattr.scaling_plugins_lookup = True
    lr_schedules.__getattr__ = module_getattr


def asked_by_scheduler_config() -> bool:
    """Whether the running module ``__getattr__`` was called by DeepSpeed's scheduler lookup from the config
    (rather than by ``hasattr`` elsewhere): frames are this function, the lookup, the module ``__getattr__``,
    then DeepSpeed's caller."""
    caller = sys._getframe(3)
    return caller.f_code.co_name == "_scheduler_from_config"


def engine_under_construction() -> DeepSpeedEngine:
    """The DeepSpeedEngine whose ``deepspeed.initialize`` is building a scheduler now (found on the call stack)."""
    engine = calling_instance(DeepSpeedEngine)
    if engine is not None:
        return engine
    raise RuntimeError("a scaling_plugins scheduler is built by deepspeed.initialize (a \"scheduler\" config entry "
                       "or scaling_plugins.backends.deepspeed.initialize(..., policy=...)), not directly")


# -- what deepspeed.initialize is given -----------------------------------------------------------------------
def read_config(config: Any) -> dict:
    """A ``config`` argument read as ``deepspeed.initialize`` reads it (DeepSpeed's ``load_ds_config``): a dict as
    it is; a path to an existing file read with Hjson (comments, trailing commas), a duplicate key refused with
    ``ValueError``; else base64 of such a text."""
    return load_ds_config(config)


def check_config_before_deepspeed(check: Callable[[Mapping], None]) -> None:
    """Run ``check(config)`` at the start of every ``DeepSpeedConfig(config, ...)`` given a dict, before DeepSpeed
    reads it (its batch sizes are read and compared there). ``deepspeed.initialize`` always gives a dict: it reads a
    path or base64 first. Idempotent."""
    original = DeepSpeedConfig.__init__
    if getattr(original, "scaling_plugins_check", False):
        return

    @functools.wraps(original)
    def __init__(self: DeepSpeedConfig, config: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(config, Mapping):
            check(config)
        original(self, config, *args, **kwargs)

    __init__.scaling_plugins_check = True
    DeepSpeedConfig.__init__ = __init__


def check_engine_before_optimizer(check: Callable[[DeepSpeedEngine, bool, Any], None]) -> None:
    """Run ``check(engine, optimizer_from_config, client_lr_scheduler)`` inside ``DeepSpeedEngine.__init__`` right
    before it builds the optimizer (``_configure_optimizer``), which it follows with the lr scheduler
    (``_configure_lr_scheduler``: a client ``lr_scheduler=`` given to ``deepspeed.initialize`` wins over the
    config's ``"scheduler"``, which is then never looked up). ``optimizer_from_config``: no ``optimizer=`` was
    given, so the config's ``"optimizer"`` entry is built. Idempotent."""
    original = DeepSpeedEngine._configure_optimizer
    if getattr(original, "scaling_plugins_check", False):
        return

    @functools.wraps(original)
    def _configure_optimizer(self: DeepSpeedEngine, client_optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        check(self, client_optimizer is None, self.client_lr_scheduler)
        return original(self, client_optimizer, *args, **kwargs)

    _configure_optimizer.scaling_plugins_check = True
    DeepSpeedEngine._configure_optimizer = _configure_optimizer


def unsupported_feature(engine: DeepSpeedEngine) -> Optional[str]:
    """Why the backend cannot measure this engine's gradients, or None when it can."""
    if isinstance(engine, PipelineEngine):
        return "scaling_plugins does not support DeepSpeed pipeline parallelism"
    if engine.has_moe_layers:
        return "scaling_plugins does not support MoE layers (expert gradients reduce over other groups)"
    if engine.mpu is not None:
        return "scaling_plugins does not support model parallelism (mpu): local norms would be partial"
    return None


def offloads_optimizer(engine: DeepSpeedEngine) -> bool:
    """Whether ZeRO runs the optimizer offloaded (CPU or NVMe), which fixes its accumulation path at initialize."""
    return bool(engine.zero_use_cpu_optimizer())


# -- the timeout of the groups DeepSpeed creates --------------------------------------------------------------
def group_timeout(group: Any = None) -> datetime.timedelta:
    """How long a collective on ``group`` (default: the default group) waits for a peer before it raises: the
    timeout torch keeps in the group's backend options."""
    group = group if group is not None else torch.distributed.distributed_c10d._get_default_group()
    return group._get_backend(group._device_types[0]).options._timeout


def groups_take_the_default_timeout() -> None:
    """Make every group DeepSpeed creates from now on take the default group's timeout.

    DeepSpeed makes its groups (the data-parallel and sequence-data-parallel clones of the world, expert, ZeRO
    and pipeline groups) with ``deepspeed.comm.new_group(ranks)``, which its ``TorchBackend`` hands to
    ``torch.distributed.new_group(ranks)`` without a timeout; torch then gives the group the backend's default
    (30 minutes for gloo), not the timeout the default group was made with (``init_process_group(timeout=...)``
    or ``deepspeed.init_distributed(timeout=...)``). ``deepspeed.comm.new_group`` takes no timeout of its own, so
    the default group's is the only one a caller can have meant. Idempotent."""
    original = TorchBackend.new_group
    if getattr(original, "scaling_plugins_timeout", False):
        return

    @functools.wraps(original)
    def new_group(self: TorchBackend, ranks: Any) -> Any:
        return torch.distributed.new_group(ranks, timeout=group_timeout())

    new_group.scaling_plugins_timeout = True
    TorchBackend.new_group = new_group


# -- the engine's members -------------------------------------------------------------------------------------
def set_accumulation_steps(engine: DeepSpeedEngine, steps: int) -> None:
    """Run ``steps`` micro-batches per optimizer step from now on, at an accumulation boundary:
    ``engine.set_train_batch_size(micro-batch × data-parallel ranks × steps)``, then the micro-step counter moved
    up to a multiple of ``steps``. DeepSpeed marks a boundary where (micro_steps + 1) % gas == 0 and reads the
    counter nowhere else, so without the move the first step after a change would take fewer micro-batches."""
    engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * engine.dp_world_size * steps)
    engine.micro_steps = -(-engine.micro_steps // steps) * steps


def basic_optimizer(engine: DeepSpeedEngine) -> Any:
    """The torch optimizer DeepSpeed steps (inside any ZeRO or fp16 wrapper)."""
    return engine.basic_optimizer


def gradient_multiplier(engine: DeepSpeedEngine) -> float:
    """c, what DeepSpeed's gradient reduction multiplies the sum over ranks by: 1/W when it averages, else 1."""
    return 1.0 / engine.dp_world_size if engine.gradient_average else 1.0


def communication_dtype(engine: DeepSpeedEngine) -> Any:
    """The dtype DeepSpeed's flat gradient all-reduce communicates in (``communication_data_type``; for bf16
    runs bf16 by default, for fp16 runs fp16)."""
    return engine.communication_data_type


def data_parallel_rank(engine: DeepSpeedEngine) -> int:
    """This rank's index in the engine's data-parallel group."""
    return ds_comm.get_rank(group=engine.data_parallel_group)


def loss_scale(engine: DeepSpeedEngine) -> float:
    """The loss scale the current backward passes used: the torch GradScaler of ZeRO-0 under ``torch_autocast``
    fp16 (read before its update), fp16's (dynamic or static) scale, else 1."""
    scaler = engine.torch_autocast_z0_gradscaler
    if scaler is not None:
        return float(scaler.get_scale())
    return float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)


def call_before(owner: Any, name: str, hook: Callable[..., None]) -> None:
    """Rebind ``owner.name`` (one instance) so that ``hook(*args, **kwargs)`` runs before each call."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        hook(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def call_after(owner: Any, name: str, hook: Callable[[], None]) -> None:
    """Rebind ``owner.name`` (one instance) so that ``hook()`` runs after each call returns."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        hook()
        return result

    setattr(owner, name, wrapper)


# -- ZeRO stage 0 (and BF16_Optimizer): the flat gradient all-reduce ------------------------------------------
def frees_gradients_during_backward(optimizer: Any) -> bool:
    """Whether the optimizer takes each parameter's ``.grad`` away during the backward, right after autograd
    accumulated it (BF16_Optimizer with ``bf16.immediate_grad_update``: added into its fp32 buffer, then set to
    None), so a gradient can only be read in its own hook."""
    return bool(getattr(optimizer, "immediate_grad_update", False))


def supply_gradients_for_reduction(engine: DeepSpeedEngine, supply: Callable[[Callable[[], tuple]], tuple]) -> None:
    """DeepSpeed's flat all-reduce asks the optimizer for ``get_grads_for_reduction()`` when it has one; make
    that ``supply(collect)``, where ``collect()`` gives the (grads, expert grads) DeepSpeed would reduce."""
    optimizer = engine.optimizer
    collect = getattr(optimizer, "get_grads_for_reduction", None) or engine._get_gradients_for_reduction
    optimizer.get_grads_for_reduction = lambda: supply(collect)


def on_bucket_reduced(engine: DeepSpeedEngine, hook: Callable[[Any, list], None]) -> None:
    """Call ``hook(flat, bucket)`` with each reduced flat buffer of the flat all-reduce and the gradients it holds,
    as ``allreduce_bucket`` returns it, before DeepSpeed copies it back into them."""
    original = engine.allreduce_bucket

    @functools.wraps(original)
    def allreduce_bucket(bucket: list, *args: Any, **kwargs: Any) -> Any:
        flat = original(bucket, *args, **kwargs)
        hook(flat, bucket)
        return flat

    engine.allreduce_bucket = allreduce_bucket


def on_gradients_reduced(engine: DeepSpeedEngine, hook: Callable[[], None]) -> None:
    """Call ``hook()`` right after each flat gradient all-reduce (before any clipping)."""
    call_after(engine, "allreduce_gradients", hook)


# -- ZeRO stages 1-3: the gradient-norm reduction -------------------------------------------------------------
def is_zero_optimizer(optimizer: Any) -> bool:
    """Whether the engine's optimizer is a ZeRO (stage 1, 2 or 3) optimizer."""
    return isinstance(optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3))


def wrap_norm_computation(optimizer: Any, wrapper: Callable[..., Any]) -> None:
    """Route the optimizer's gradient-norm computation (``_get_norm_groups`` in stage 3, ``scaled_global_norm``
    in stages 1/2) through ``wrapper(original, *args, **kwargs)``."""
    name = "_get_norm_groups" if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3) else "scaled_global_norm"
    setattr(optimizer, name, functools.partial(wrapper, getattr(optimizer, name)))


def total_norm(optimizer: Any, returned: Any) -> Any:
    """The global gradient norm from what the wrapped norm computation returned."""
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return combine_grad_norm_groups(returned)
    return returned


def norm_is_computed(optimizer: Any) -> bool:
    """False when ``zero_optimization.compute_grad_norm = false`` leaves stage 1/2 without a norm reduction."""
    return isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3) or optimizer.compute_grad_norm


def compute_norm_before_step(optimizer: Any) -> int:
    """Make the optimizer compute its gradient norm before each step; returns the 1-element all-reduces that
    adds per step (one per parameter group)."""
    call_before(optimizer, "step", lambda *args, **kwargs: optimizer.scaled_global_norm())
    return len(optimizer.bit16_groups)


@contextlib.contextmanager
def all_reduce_intercepted(intercept: Callable[..., Any]) -> Iterator[None]:
    """Within the block, every ``deepspeed.comm.all_reduce(tensor, op, group, async_op, ...)`` becomes
    ``intercept(real_all_reduce, tensor, op=op, group=group, async_op=async_op, ...)``."""
    real = ds_comm.all_reduce

    def all_reduce(tensor: Any, op: Any = SUM, group: Any = None, async_op: bool = False, **more: Any) -> Any:
        return intercept(real, tensor, op=op, group=group, async_op=async_op, **more)

    ds_comm.all_reduce = all_reduce
    try:
        yield
    finally:
        ds_comm.all_reduce = real
