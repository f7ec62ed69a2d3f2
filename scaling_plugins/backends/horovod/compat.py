"""Everything the Horovod backend touches beyond Horovod's public API, in one place, for the versions checked here.

Horovod 0.28.1 (its last release) is the version this is verified against; the 0.28 series is accepted.
``horovod_torch()`` refuses any other version with a message naming the supported ones, instead of an
``AttributeError`` deep inside a step. What lives here:

- the private attributes of ``hvd.DistributedOptimizer``'s class that the backend reads (parameter names,
  compression, gradient groups, whether ``step()`` synchronizes), the recognition of an optimizer Horovod already
  wrapped, and the extension of that class in place
  (Horovod's methods call ``super(self.__class__, self)``, so the class cannot be subclassed);
- Horovod Elastic's ``TorchState`` handler registry.
"""
from __future__ import annotations

import functools
import operator
import os
from types import ModuleType
from typing import Any, Callable, Iterable

import torch

from ..shared.versions import require_supported_version

SUPPORTED_VERSIONS = ("0.28.",)      # version prefixes
VERIFIED = "0.28.1"                  # the last Horovod release (June 2023)
HOROVOD_PREFIX = "_horovod_"         # Horovod's own member ``name`` stays reachable as ``_horovod_<name>``


@functools.lru_cache(maxsize=None)
def horovod_torch() -> ModuleType:
    """``horovod.torch``, imported on first use: a message says how to install it, or which versions work."""
    try:
        import horovod
        import horovod.torch as hvd
    except ImportError as err:
        raise ImportError(
            "the Horovod backend needs horovod 0.28.1 built with PyTorch: run `make horovod` (builds it once from "
            "source with the C++17 fix, caches the wheel, installs it into .venv), then `pip install .[horovod]` "
            f"finds it installed ({err})") from err
    require_supported_version("horovod", horovod.__version__, SUPPORTED_VERSIONS, VERIFIED)
    return hvd


# -- the optimizer Horovod builds -----------------------------------------------------------------------------
def is_horovod_optimizer(optimizer: Any) -> bool:
    """Whether ``optimizer`` was made by ``hvd.DistributedOptimizer`` (any op, Adasum included; ours too): its
    class, or one it derives from, is a copy of Horovod's optimizer class, which Horovod builds per optimizer
    from the same ``__init__``."""
    horovod_torch()
    from horovod.torch import optimizer as horovod_optimizer

    inits = {vars(cls)["__init__"] for cls in (horovod_optimizer._DistributedOptimizer,
                                                horovod_optimizer._DistributedAdasumOptimizer)}
    return any(vars(cls).get("__init__") in inits for cls in type(optimizer).__mro__)


def parameter_name(optimizer: Any, param: torch.Tensor) -> str:
    """The name Horovod gives ``param``'s all-reduce."""
    return optimizer._parameter_names[param]


def compresses(optimizer: Any) -> bool:
    """Whether the optimizer compresses gradients before reducing them (e.g. ``Compression.fp16``)."""
    return optimizer._compression is not horovod_torch().Compression.none


def gradient_group_count(optimizer: Any) -> int:
    """How many gradient groups (``groups=``) the optimizer reduces per step."""
    return len(optimizer._group_counts)


def has_gradient_hooks(optimizer: Any) -> bool:
    """Whether Horovod registered its gradient hooks (it does not for one process without Elastic): then its
    ``synchronize()`` asks for every trainable parameter's all-reduce."""
    return bool(optimizer._requires_update)


def reduction_op(optimizer: Any) -> Any:
    """The reduction op (``hvd.Average`` or ``hvd.Sum``) the optimizer reduces gradients with."""
    return optimizer.op


def synchronizes_in_step(optimizer: Any) -> bool:
    """Whether Horovod's ``step()`` would call ``synchronize()`` itself now."""
    return optimizer._should_synchronize and not optimizer._synchronized


def extend_optimizer_class(optimizer: Any, members: type, read_through: Iterable[str], marker: type) -> None:
    """Put ``members``' methods on the class Horovod made for this one optimizer, keeping each replaced one
    reachable as ``_horovod_<name>``; make ``opt.<name>`` read ``opt.scaling.<name>`` for ``read_through``;
    register the class with the ``marker`` ABC."""
    cls = type(optimizer)
    if "_allreduce_grad_async" not in vars(cls):
        raise RuntimeError(f"unexpected Horovod optimizer class {cls!r}: this backend supports horovod "
                           f"{', '.join(v + 'x' for v in SUPPORTED_VERSIONS)}")
    for name, member in vars(members).items():
        if name.startswith("__"):
            continue
        if hasattr(cls, name):
            setattr(cls, HOROVOD_PREFIX + name.lstrip("_"), getattr(cls, name))
        setattr(cls, name, member)
    for name in read_through:
        setattr(cls, name, property(operator.attrgetter(f"scaling.{name}"), doc=f"``opt.scaling.{name}``"))
    marker.register(cls)


# -- Horovod Elastic ------------------------------------------------------------------------------------------
def in_elastic_job() -> bool:
    """Whether this worker runs under Horovod Elastic (horovodrun sets HOROVOD_ELASTIC=1 for its workers)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def register_elastic_handler(marker: type, after_sync: Callable[[Any], None]) -> None:
    """Put a handler for optimizers of type ``marker`` first in Horovod's ``TorchState`` handler registry
    (idempotent): Horovod's optimizer handler, with ``after_sync(optimizer)`` after its ``sync()``."""
    horovod_torch()
    from horovod.torch.elastic import state as elastic_state

    handler = _elastic_handler_class(after_sync)
    registry = elastic_state.get_handler_registry()
    if not any(registered is handler for _, registered in registry):
        elastic_state.set_handler_registry([(marker, handler), *registry])


@functools.lru_cache(maxsize=None)
def _elastic_handler_class(after_sync: Callable[[Any], None]) -> type:
    from horovod.torch.elastic.state import OptimizerStateHandler

    class ScaledOptimizerStateHandler(OptimizerStateHandler):
        """Horovod's optimizer handler, plus the policy state in ``sync``."""

        def sync(self) -> None:
            super().sync()
            after_sync(self.value)

    return ScaledOptimizerStateHandler
