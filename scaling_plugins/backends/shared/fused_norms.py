"""Squared gradient norms read with a fixed number of fused ops per chunk of gradients, not per parameter.

``squared_norm_sum(tensors)`` = Σ_t ⟨t, t⟩ as one float64 scalar, from a few ``torch._foreach_norm`` calls
whatever the number of tensors: tensors of at most ``EXACT_NUMEL`` elements in float64; larger fp32/fp64 ones in
their own dtype, except on CPU above ``rows_above`` elements, read in rows of ``ROW_NUMEL`` whose squares are
summed in float64 (torch's CPU norm kernel adds a whole tensor in fp32 lanes, so its error grows with the
length); fp16/bf16 ones in views of ``PIECE_NUMEL`` accumulated in fp32, never a full fp32 copy. Squares are
summed in float64: Σ_t ‖t‖² = ‖(‖t₁‖, …, ‖t_k‖)‖². Measured errors and costs: benchmarks/RESULTS.md.

``ChunkedNormMeter`` measures each backward pass's own local Σ‖g‖² (AdaScale's L, Johnson et al., ICML 2020):
its tensor hook only records each gradient, and a chunk is measured when it reaches ``CHUNK_NUMEL`` elements or
the pass ends, so a pass costs ⌈elements / CHUNK_NUMEL⌉ fused reads and holds at most one chunk of gradients.
``BucketNormMeter`` (DDP) reads a pass whose gradients became ``.grad`` from the engine's buckets instead.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch.utils.hooks import RemovableHandle

EXACT_NUMEL = 1 << 14     # tensors up to this size: norms in float64
PIECE_NUMEL = 1 << 16     # fp16/bf16 tensors are read in views of at most this many elements
ROW_NUMEL = 1 << 10       # on CPU a larger fp32/fp64 tensor is reduced in rows of this many elements
CHUNK_NUMEL = 1 << 19     # a chunk is measured once it holds this many gradient elements (2 MB of fp32)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def queue_end_of_backward(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the current backward pass has finished (after every accumulator hook); call it from
    inside the backward (a tensor hook). Uses torch autograd's engine callback queue."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def squared_norm_sum(tensors: Iterable[torch.Tensor], device: Optional[torch.device] = None,
                     rows_above: int = CHUNK_NUMEL) -> torch.Tensor:
    """Σ_t ⟨t, t⟩ over ``tensors`` as a float64 scalar tensor (0 for none), with a fixed number of fused ops; a
    sparse COO tensor counts with its coalesced values. ``rows_above``: a contiguous fp32/fp64 CPU tensor of more
    elements is read in rows; an engine's flat buffer, one op whatever its length, passes ``EXACT_NUMEL``."""
    exact, wide, narrow, rows = [], [], [], []
    for tensor in tensors:
        if tensor.layout != torch.strided:   # a sparse gradient: its coalesced values (a repeated index summed)
            tensor = tensor.coalesce().values()
        if tensor.numel() <= EXACT_NUMEL:
            exact.append(tensor)
        elif tensor.dtype in LOW_PRECISION:
            narrow.extend(tensor.reshape(-1).split(PIECE_NUMEL))
        elif tensor.numel() > rows_above and tensor.device.type == "cpu" and tensor.is_contiguous():
            rows.append(_row_norms(tensor.view(-1), exact))
        else:
            wide.append(tensor)
    norms: list[torch.Tensor] = []
    if exact:
        norms.extend(torch._foreach_norm(exact, 2, dtype=torch.float64))
    if wide:
        norms.extend(torch._foreach_norm(wide, 2))
    if narrow:
        norms.extend(torch._foreach_norm(narrow, 2, dtype=torch.float32))
    if not norms:      # a row-read tensor always adds its (perhaps empty) tail to ``exact``
        return torch.zeros((), dtype=torch.float64, device=device)
    stacked = torch.cat([torch.stack(norms), *rows]).to(torch.float64)
    return torch.dot(stacked, stacked)


def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """⟨t, t⟩ of one tensor with the fewest ops (a gradient read in its own hook): one ``torch.dot`` in its own
    dtype for an fp32/fp64 tensor of at most ``CHUNK_NUMEL`` elements (its CPU error stays below 3e-7 of the
    square there), else ``squared_norm_sum`` (fp16/bf16, sparse, and larger tensors, read in rows on CPU)."""
    if tensor.dtype in LOW_PRECISION or tensor.layout != torch.strided or tensor.numel() > CHUNK_NUMEL:
        return squared_norm_sum([tensor])
    flat = tensor.reshape(-1)
    return torch.dot(flat, flat)


def _row_norms(flat: torch.Tensor, exact: list[torch.Tensor]) -> torch.Tensor:
    """The norms of ``flat``'s whole rows of ``ROW_NUMEL`` elements (one op); the elements after the last whole
    row (perhaps none: the ops are then the same whatever the length) join ``exact``."""
    whole = flat.numel() - flat.numel() % ROW_NUMEL
    exact.append(flat[whole:])
    return torch.linalg.vector_norm(flat[:whole].view(-1, ROW_NUMEL), dim=1)


Pending = Union[int, torch.Tensor]   # a parameter's index (its .grad holds this pass's gradient) or the gradient


class BackwardCounter:
    """Counts the backward passes that produce the step's gradients of these parameters: the passes that
    accumulate into ``.grad``.

    A tensor hook on each parameter sees each pass's own gradient (before autograd adds it into ``.grad``). The
    first one of a pass puts a one-shot post-accumulate-grad hook on its parameter, which marks the pass as one that
    reached ``.grad`` (``backward()`` accumulates every gradient whose hook it runs), so the Python calls per
    parameter and pass are one. ``torch.autograd.grad`` with respect to the parameters (a gradient penalty) fires
    the tensor hooks but accumulates nothing, so it is not counted; a
    pass run under :meth:`paused` (e.g. SAM's first backward, whose gradient only finds the perturbation) is not
    seen at all. Subclasses measure what the counted passes saw (:class:`ChunkedNormMeter`).
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        params = [p for p in parameters if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters to measure")
        self._params = [weakref.ref(p) for p in params]   # weak: the hooks on the parameters refer to the meter
        self._device = params[0].device
        self._in_pass = False
        self._accumulated = False
        self._paused = False
        self._passes = 0
        self._accumulation_probe: Optional[RemovableHandle] = None
        for index, param in enumerate(params):
            param.register_hook(functools.partial(self._on_gradient, index))

    # -- inside backward --------------------------------------------------------------------------------------
    def _on_gradient(self, index: int, grad: torch.Tensor) -> None:
        if self._paused:
            return
        if not self._in_pass:
            self._in_pass = True
            self._accumulation_probe = self._params[index]().register_post_accumulate_grad_hook(self._on_accumulated)
            queue_end_of_backward(self._end_pass)
        self._record(index, grad)

    def _on_accumulated(self, param: torch.Tensor) -> None:
        self._accumulated = True

    def _record(self, index: int, grad: torch.Tensor) -> None:
        """What each gradient of a pass adds besides being seen (nothing here)."""

    def _end_pass(self) -> None:
        self._accumulation_probe.remove()
        counted, self._in_pass, self._accumulated = self._accumulated, False, False
        if counted:
            self._passes += 1
        self._close_pass(counted)

    def _close_pass(self, counted: bool) -> None:
        """What happens to a pass's records when it ends (``counted``: it accumulated into ``.grad``)."""

    # -- outside backward ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Backward passes run inside are neither counted nor measured."""
        if self._in_pass:
            raise RuntimeError("a backward pass is running: pause before calling backward, not inside it")
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @property
    def in_pass(self) -> bool:
        """Whether a backward pass is running that this counter has seen a gradient of."""
        return self._in_pass

    def take_passes(self) -> int:
        passes, self._passes = self._passes, 0
        return passes


class ChunkedNormMeter(BackwardCounter):
    """Σ over the counted backward passes (:class:`BackwardCounter`) and the parameters of each pass's own ‖g‖², as
    a float64 device scalar.

    The tensor hook runs before autograd accumulates the gradient into ``.grad``. When ``.grad`` is None autograd
    will make this gradient the ``.grad`` (no copy), so the meter records the parameter and reads ``.grad`` when it
    measures; otherwise autograd adds the gradient into ``.grad`` in place and the meter keeps the gradient itself
    (until its chunk is measured). A parameter recorded by reference must not be reduced in place before it is
    measured: ``holds(p)`` tells, ``flush()`` measures now. Every pass ends with a flush, so nothing recorded
    outlives its backward pass. A gradient of at least ``CHUNK_NUMEL`` elements would be a chunk of its own, so
    it is measured in its hook, while it is still in the cache (one op either way; read later, after the engine
    has copied it into its buckets, it costs a second trip through memory). ``immediate=True`` measures each
    gradient in its hook instead (one ``squared_norm`` per parameter), for engines that move ``.grad`` during
    backward (ZeRO-1/2/3's gradient buckets). A sparse gradient (``nn.Embedding(sparse=True)``) is measured in its
    hook: ‖g‖² of its coalesced values.

    What a pass measured joins the step's sum once the pass has accumulated into ``.grad``; a pass that did not
    (``torch.autograd.grad``) is dropped when it ends.

    on_flush: called after each measurement (e.g. to start reductions that waited for it);
    on_pass_end: called at the end of each backward pass, after its last measurement;
    chunk_by_reference: whether gradients recorded by reference count towards a chunk. They hold no memory of
    their own (``.grad`` keeps them anyway), so an engine that reduces only after the backward (DeepSpeed ZeRO-0)
    passes False and they are read together at the pass's end (or with the next chunk of gradients held by
    value), in one measurement instead of one per chunk; an engine that starts reductions during the backward
    once their chunk is read (Horovod, ``on_flush``) keeps the default.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], immediate: bool = False,
                 on_flush: Optional[Callable[[], None]] = None,
                 on_pass_end: Optional[Callable[[], None]] = None, chunk_by_reference: bool = True) -> None:
        super().__init__(parameters)
        self._index = {id(ref()): i for i, ref in enumerate(self._params)}
        self._total = torch.zeros((), dtype=torch.float64, device=self._device)
        self._pass_total = torch.zeros((), dtype=torch.float64, device=self._device)
        self._immediate = immediate
        self._chunk_by_reference = chunk_by_reference
        self._on_flush = on_flush
        self._on_pass_end = on_pass_end
        self._pending: list[Pending] = []
        self._by_reference: set[int] = set()
        self._pending_numel = 0

    # -- inside backward --------------------------------------------------------------------------------------
    def _record(self, index: int, grad: torch.Tensor) -> None:
        self._before_gradient()
        numel = grad.numel()
        if self._immediate or numel >= CHUNK_NUMEL or grad.layout != torch.strided:
            self._pass_total += squared_norm(grad)     # a chunk of its own anyway: read it while it is hot
            return
        if self._pending and self._pending_numel + numel > CHUNK_NUMEL:
            self.flush()        # before recording this one: its .grad is not set until this hook returns
        if self._params[index]().grad is None:
            self._pending.append(index)
            self._by_reference.add(index)
            if self._chunk_by_reference:
                self._pending_numel += numel
        else:
            self._pending.append(grad)
            self._pending_numel += numel

    def _before_gradient(self) -> None:
        """What subclasses do first in every hook (nothing here)."""

    def _close_pass(self, counted: bool) -> None:
        self.flush()
        if counted:
            self._commit_pass()
        self._pass_total.zero_()
        if self._on_pass_end is not None:
            self._on_pass_end()

    # -- reading ------------------------------------------------------------------------------------------------
    def holds(self, param: torch.Tensor) -> bool:
        """Whether ``param.grad`` is recorded by reference and not measured yet (do not reduce it in place yet)."""
        return self._index.get(id(param)) in self._by_reference

    def flush(self) -> None:
        """Measure every recorded gradient now (one ``squared_norm_sum``), then call ``on_flush``. A gradient
        recorded by reference in a pass that accumulated nothing has no ``.grad`` and is skipped."""
        if self._pending:
            tensors = [self._params[item]().grad if isinstance(item, int) else item for item in self._pending]
            self._pass_total += squared_norm_sum([t for t in tensors if t is not None], self._device)
            self._pending, self._pending_numel = [], 0
            self._by_reference.clear()
        if self._on_flush is not None:
            self._on_flush()

    def take(self) -> torch.Tensor:
        """The sum so far (a new tensor), then reset to 0 for the next optimizer step. Inside a pass that has
        accumulated (a reduction hook that runs during backward) that pass's gradients so far count too."""
        self.flush()
        if self._accumulated:
            self._commit_pass()
        value = self._total.clone()
        self._total.zero_()
        return value

    def _commit_pass(self) -> None:
        """What the running pass measured so far joins the step's sum."""
        self._total += self._pass_total
        self._pass_total.zero_()

    def reset(self) -> None:
        """Drop everything recorded or summed (a step that will not be used)."""
        self._pending, self._pending_numel = [], 0
        self._by_reference.clear()
        self._total.zero_()
        self._pass_total.zero_()



class BucketNormMeter(ChunkedNormMeter):
    """:class:`ChunkedNormMeter` for an engine that copies gradients into contiguous buckets before reducing them
    (DDP): a gradient recorded by reference (its parameter had no ``.grad``, so ``.grad`` becomes exactly this
    pass's gradient) is not read in its hook. When the engine's bucket of such parameters is complete,
    :meth:`claim` measures them all with one read of the bucket — the ops per step grow with the buckets, not the
    parameters, and the read comes right after the engine's copy, while the bucket is in the cache. A parameter
    whose bucket is not claimed (accumulation, a pass under ``no_sync()``, an unused parameter in the bucket) is
    read at the next flush, as :class:`ChunkedNormMeter` reads it."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        super().__init__(parameters)
        self._unread: dict[int, None] = {}    # recorded by reference in the running pass, not measured yet

    def _record(self, index: int, grad: torch.Tensor) -> None:
        if grad.layout == torch.strided and self._params[index]().grad is None:
            self._unread[index] = None
        else:
            super()._record(index, grad)

    def claim(self, params: Iterable[torch.Tensor], bucket: torch.Tensor) -> bool:
        """Measure ``params`` as ``bucket`` (their gradients, copied into one buffer) when each of them was recorded
        by reference in the running pass and not measured yet; False (nothing done) otherwise."""
        indices = [self._index.get(id(param)) for param in params]
        if not self._in_pass or not all(index in self._unread for index in indices):
            return False
        for index in indices:
            del self._unread[index]
        self._pass_total += squared_norm_sum([bucket])
        return True

    def flush(self) -> None:
        self._pending.extend(self._unread)
        self._by_reference.update(self._unread)
        self._unread.clear()
        super().flush()

    def reset(self) -> None:
        self._unread.clear()
        super().reset()
