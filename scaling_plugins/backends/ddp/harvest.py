"""DDP's harvest: the communication hook that carries each rank's local Σ‖g_i‖² in the last gradient bucket,
alone or around another hook (fp16/bf16 compression), and reads T = ‖ḡ‖² from the reduced buckets.

    ddp_model.register_comm_hook(carrier, norm_carrying_wrapper(inner_hook))   # what ``ddp.attach`` does

The hook's state is a :class:`BucketCarrier`. The last bucket is reduced as a *payload*: its gradients followed
by the local sum, in the bucket's own grown storage (``with_room_after``), one element in fp32/fp64 or a
``WidePayload`` block per rank where the reduction may run in fp16/bf16. Buckets are averaged with the
backend's ``ReduceOp.AVG`` (or the inner hook, which must return the element-wise average); each reduction's
completion callback reads its bucket's squared norm. PowerSGD is refused: what it returns is not ḡ.
docs/ddp.md has the whole path (AdaScale: Johnson et al., ICML 2020).

(No ``from __future__ import annotations``: DDP checks the hook's annotations.)
"""
import functools
import logging
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

from ..shared.fused_norms import LOW_PRECISION, BucketNormMeter, squared_norm_sum
from ..shared.wide_payload import WidePayload

log = logging.getLogger(__name__)

CommHook = Callable[[Any, dist.GradBucket], torch.futures.Future]
POWERSGD_HOOKS = (powersgd.powerSGD_hook, powersgd.batched_powerSGD_hook)


def check_inner_hook(hook: Optional[CommHook], state: Any) -> None:
    """``ValueError`` for a hook whose result is not the averaged gradient (PowerSGD)."""
    if hook in POWERSGD_HOOKS or isinstance(state, powersgd.PowerSGDState):
        raise ValueError("PowerSGD cannot carry AdaScale's statistics: its reduced gradient is a low-rank "
                         "approximation, so ‖ḡ‖² cannot be read from it without reducing the uncompressed gradients "
                         "(an extra collective of the full size). Use comm_hook=fp16_compress_hook or "
                         "bf16_compress_hook to save bandwidth, or a rule policy (LinearScaling, SqrtScaling, "
                         "LEGW), which needs no gradient statistics")
    if hook is not None and not callable(hook):
        raise ValueError(f"comm_hook must be a DDP communication hook (state, bucket) -> Future, got {hook!r}")


class BucketCarrier:
    """The hook's state: the meter it takes the local sum from, what the reductions of the current step produced,
    and the inner hook's own state. Holds no reference to the DDP model (model → reducer → hook state is no cycle).

    Each reduction's completion callback reads its bucket's squared norm (:meth:`unpack`); :meth:`take`, at the
    optimizer step, adds them up with the carried sums in one host sync.
    """

    def __init__(self, meter: BucketNormMeter, process_group: dist.ProcessGroup, inner_state: Any = None,
                 wide: bool = False, flush_each_bucket: bool = False) -> None:
        self.meter = meter
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.inner_state = inner_state
        self.wide = wide
        self.flush_each_bucket = flush_each_bucket
        self.reduced_sq: dict[int, torch.Tensor] = {}  # each bucket's ‖reduced gradients‖² (the last reduction's)
        self._carried: list[torch.Tensor] = []         # the reduced local sums of each reduction of the step
        # this step's last bucket: (payload, its gradients, its local sum)
        self._payload: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._wide = WidePayload(1, self.rank, self.world_size)
        self._backend_averages = True                  # until the backend refuses ReduceOp.AVG (``average``)

    def carried_numel(self, dtype: torch.dtype) -> int:
        """Elements the local sum takes in the payload."""
        return self._wide.numel if self.wide or dtype in LOW_PRECISION else 1

    def payload(self, buffer: torch.Tensor) -> torch.Tensor:
        """The last bucket's gradients followed by this rank's local sum, in the bucket's own memory
        (``with_room_after``)."""
        numel = buffer.numel()
        payload = with_room_after(buffer, self.carried_numel(buffer.dtype))
        carried_view = payload[numel:]
        self._payload = payload, payload[:numel], carried_view
        if self._carried and self._carried[-1].data_ptr() == carried_view.data_ptr():
            self._carried[-1] = self._carried[-1].clone()     # an earlier reduction of this step: keep its sums
        local = self.meter.take()
        carried_view.copy_(local if carried_view.numel() == 1 else self._wide.encode(local))
        return payload

    def average(self, tensor: torch.Tensor) -> torch.futures.Future:
        """DDP's default reduction, the mean over ranks, in place: one all-reduce with the backend's own averaging
        (``ReduceOp.AVG``: NCCL folds the 1/W into the reduction, gloo divides on its communication thread), or,
        where the backend has none, a division by the world size then a summing all-reduce, as torch's
        ``allreduce_hook`` does. A backend that refuses AVG does so before communicating, on every rank alike;
        that is logged once and every later bucket divides."""
        if self._backend_averages:
            try:
                return dist.all_reduce(tensor, op=dist.ReduceOp.AVG, group=self.process_group,
                                       async_op=True).get_future()
            except (RuntimeError, ValueError) as error:
                if "AVG" not in str(error):
                    raise
                self._backend_averages = False
                log.info("scaling_plugins: the %s backend has no averaging all-reduce (%s); DDP buckets are divided "
                         "by the world size before a summing all-reduce", dist.get_backend(self.process_group), error)
        tensor.div_(self.world_size)
        return dist.all_reduce(tensor, group=self.process_group, async_op=True).get_future()

    def unpack(self, index: int, last: bool, future: torch.futures.Future) -> torch.Tensor:
        """The reduced bucket's gradients (what DDP copies into ``.grad``), with their squared norm kept for
        :meth:`take`. Runs as the reduction's completion callback (on the communication thread where the backend
        completes there, as gloo does), while the reduced bucket is fresh in the cache."""
        value = future.value()
        reduced = value[0] if isinstance(value, list) else value
        if last:
            payload, reduced_gradients, carried = self._payload
            if reduced.data_ptr() != payload.data_ptr():   # an inner hook that returned a new tensor
                payload.copy_(reduced)
            reduced = reduced_gradients
            self._carried.append(carried)
        self.reduced_sq[index] = squared_norm_sum([reduced])
        return reduced

    def take(self) -> Optional[tuple[float, float]]:
        """(mean over ranks of Σ‖g_i‖², ‖reduced gradient‖²) of the step with one host sync, or None when nothing
        was reduced; then reset. The buckets' squared norms are summed in bucket order, so every rank gets the same
        number."""
        if not self._carried:
            return None
        mean_sq = torch.stack([self.reduced_sq[i] for i in sorted(self.reduced_sq)]).sum()
        local = torch.stack([self._local_mean(carried) for carried in self._carried]).sum()
        local_mean, mean_sq = torch.stack([local, mean_sq]).tolist()
        self._carried.clear()
        self.reduced_sq.clear()
        return local_mean, mean_sq

    def _local_mean(self, carried: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of the local sums one reduction carried."""
        if carried.numel() == 1:
            return carried.to(torch.float64).reshape(())
        return self._wide.decode(carried, 1.0 / self.world_size).reshape(()) / self.world_size   # decodes Σ


def with_room_after(buffer: torch.Tensor, extra: int) -> torch.Tensor:
    """A 1-D tensor over ``buffer``'s memory and the ``extra`` elements after it. ``buffer`` must end its storage
    (a DDP bucket: the reducer allocates each as a storage of its own), which is grown to hold them when it is
    short. Growing a storage moves it, once, to a larger allocation; every tensor on it (DDP's views of the bucket,
    ``.grad`` under ``gradient_as_bucket_view``) follows, with its values."""
    storage = buffer.untyped_storage()
    numel = buffer.numel() + extra
    needed = (buffer.storage_offset() + numel) * buffer.element_size()
    if storage.nbytes() < needed:
        storage.resize_(needed)
    return buffer.new_empty(0).set_(storage, buffer.storage_offset(), (numel,))


class _PayloadBucket:
    """The last bucket as an inner hook sees it: ``buffer()`` is the payload (gradients + local sum); everything
    else is the real bucket's."""

    def __init__(self, bucket: dist.GradBucket, payload: torch.Tensor) -> None:
        self._bucket = bucket
        self._payload = payload

    def buffer(self) -> torch.Tensor:
        return self._payload

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bucket, name)


def norm_carrying_wrapper(hook: Optional[CommHook] = None) -> CommHook:
    """A DDP communication hook that reduces each bucket with ``hook`` (when None, the averaging all-reduce of
    :meth:`BucketCarrier.average`) and carries this rank's local Σ‖g_i‖² in the last bucket (module
    docstring). Its state is a :class:`BucketCarrier`, whose ``inner_state`` is what ``hook`` gets as its own
    state."""

    def carry_local_norm(state: BucketCarrier, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer, last = bucket.buffer(), bucket.is_last()
        if not state.meter.claim(bucket.parameters(), buffer) and state.flush_each_bucket:
            state.meter.flush()    # before the bucket, which is .grad, is reduced in place
        index = bucket.index()
        if last:
            bucket = _PayloadBucket(bucket, state.payload(buffer))
        future = state.average(bucket.buffer()) if hook is None else hook(state.inner_state, bucket)
        return future.then(functools.partial(state.unpack, index, last))

    return carry_local_norm
