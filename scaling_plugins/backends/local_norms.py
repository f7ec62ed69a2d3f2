"""Each micro-batch's own local squared gradient norm, summed over micro-batches, without a host sync; and the
number of backward passes that reached the parameters.

A tensor hook on every trainable parameter sees that parameter's gradient of the current backward pass
before it is accumulated into ``.grad`` (so before accumulation, before any reduction and before an engine
overwrites it in place). ``BackwardCounter`` counts a pass when the first hook of a backward fires (an
end-of-backward callback of torch's autograd engine closes it); ``LocalNormMeter`` also adds ⟨g, g⟩ to one
float64 device scalar. The dot product is taken in the gradient's own dtype (one read of the gradient, as fast
as ``torch.dot``) and accumulated in float64.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def queue_end_of_backward(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the current backward pass has finished (after every accumulator hook); call it
    from inside the backward (a tensor hook). Uses torch autograd's engine callback queue."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


class BackwardCounter:
    """How many backward passes reached these parameters; ``take_passes()`` reads and resets."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        params = [p for p in parameters if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters to measure")
        self._device = params[0].device
        self._passes = 0
        self._in_pass = False
        for param in params:
            param.register_hook(self._on_gradient)

    def _on_gradient(self, grad: torch.Tensor) -> None:
        if not self._in_pass:
            self._in_pass = True
            queue_end_of_backward(self._end_pass)
        self._add(grad)

    def _add(self, grad: torch.Tensor) -> None:
        """What each gradient adds besides being counted (nothing here)."""

    def _end_pass(self) -> None:
        self._in_pass = False
        self._passes += 1

    def take_passes(self) -> int:
        passes, self._passes = self._passes, 0
        return passes


class LocalNormMeter(BackwardCounter):
    """Σ over backward passes and parameters of ‖g‖², as a float64 scalar tensor; ``take()`` reads and resets."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        super().__init__(parameters)
        self._total = torch.zeros((), dtype=torch.float64, device=self._device)

    def _add(self, grad: torch.Tensor) -> None:
        flat = grad.reshape(-1)
        self._total += torch.dot(flat, flat).to(torch.float64)

    def take(self) -> torch.Tensor:
        """The sum so far (a new tensor), then reset to 0 for the next optimizer step."""
        value = self._total.clone()
        self._total.zero_()
        return value


def squared_norm_sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ_t ⟨t, t⟩ as one float64 scalar tensor (per-tensor dot in the tensor's dtype, sum in float64)."""
    total = None
    for tensor in tensors:
        flat = tensor.reshape(-1)
        value = torch.dot(flat, flat).to(torch.float64)
        total = value if total is None else total + value
    if total is None:
        raise ValueError("no gradients to measure")
    return total
