"""What the training-loop tests (DDP and Horovod) use to recompute a step's gain offline, written out
independently of the library: their own view of each pass's local gradients, SAM's perturbation, and AdaScale's
estimator without smoothing."""
from __future__ import annotations

import torch


def raw_gain(local_sq_sum: float, mean_sq: float, n: int, scale: float) -> float:
    """One step's gain without smoothing (Johnson et al., ICML 2020), from L = Σ_i ‖g_i‖² over the n micro-batch
    gradients and T = ‖ḡ‖²:  σ² = S·(L/n − T)/(n − 1),  μ² = T − σ²/S,  gain = (σ² + μ²)/(σ²/S + μ²)."""
    sigma_sq = scale * (local_sq_sum / n - mean_sq) / (n - 1)
    mu_sq = mean_sq - sigma_sq / scale
    return (sigma_sq + mu_sq) / (sigma_sq / scale + mu_sq)


class Capture:
    """Σ‖g‖² of the gradients the parameters' tensor hooks see while ``on`` (a sparse one densified), before any
    engine reduces them: the test's own view of this rank's local gradients."""

    def __init__(self, params) -> None:
        self.on, self.sq_sum = False, 0.0
        for param in params:
            param.register_hook(self._seen)

    def _seen(self, grad: torch.Tensor) -> None:
        if self.on:
            dense = grad.to_dense() if grad.is_sparse else grad
            self.sq_sum += float(dense.double().pow(2).sum())

    def take(self) -> float:
        value, self.sq_sum = self.sq_sum, 0.0
        return value


def applied_sq_norm(params) -> float:
    """‖.grad‖² summed over ``params``: the reduced gradient the optimizer applied."""
    return sum(float(p.grad.to_dense().double().pow(2).sum()) for p in params)


def sam_perturbation(params, rho: float = 0.05) -> list[torch.Tensor]:
    """SAM's ascent step ε = ρ·g/‖g‖ from the gradients in ``.grad`` (Foret et al. 2021)."""
    with torch.no_grad():
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        return [rho * p.grad / norm for p in params]


def shift(params, deltas, sign: float) -> None:
    """params += sign · deltas, in place."""
    with torch.no_grad():
        for param, delta in zip(params, deltas):
            param.add_(delta, alpha=sign)
