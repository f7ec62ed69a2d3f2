"""Three first-step AdaScale gains whose values are known, through any backend: the check a multi-host job
makes that every rank's gradient statistics reached every other rank (``launch/examples/train.py --golden``).

Linear(2, 2) with bias, loss = output.sum(), one sample x per rank and no accumulation, so each rank's gradient
is g = (x, x, 1, 1) and, with S = n ranks (n even), the first step's gain r = (σ̂² + μ̂²)/(σ̂²/S + μ̂²) from
σ̂² = S·(L/n − T)/(n − 1), μ̂² = T − σ̂²/S (Johnson et al., AdaScale SGD, 2020) does not depend on n:

    orthogonal  x = e_(rank mod 2)        ‖g‖² = 4, T = 3   gain 4/3
    identical   x = (1, 1)                L/n = T           gain 1
    opposite    x = (±1, 0) alternating   ‖g‖² = 4, T = 2   gain 2
"""
from __future__ import annotations

import gc
from typing import Callable

import torch

from .engines import make_adapter

ADASCALE = {"type": "AdaScale", "params": {}}
CASES: dict[str, tuple[Callable[[int], list[float]], float]] = {
    "orthogonal": (lambda rank: [1.0, 0.0] if rank % 2 == 0 else [0.0, 1.0], 4.0 / 3.0),
    "identical": (lambda rank: [1.0, 1.0], 1.0),
    "opposite": (lambda rank: [1.0, 0.0] if rank % 2 == 0 else [-1.0, 0.0], 2.0),
}
EXPECTED = {case: gain for case, (_, gain) in CASES.items()}


class SumOfOutputs:
    """The little of a workload the engine adapters read: one sample per micro-batch, plain SGD, loss = Σ output."""

    micro_batch_size = 1
    momentum = 0.0

    @staticmethod
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output.sum()


def first_step_gain(backend: str, sample: list[float], replicas: int = 1) -> float:
    """The gain after one optimizer step of the golden model on ``sample`` (this rank's input); ``replicas`` as
    ``make_adapter``'s (FSDP2's HSDP)."""
    torch.manual_seed(0)
    adapter = make_adapter(backend, torch.nn.Linear(2, 2), SumOfOutputs(), lr=0.1, policy=ADASCALE, accumulation=1,
                           replicas=replicas)
    loss = adapter.forward_backward(torch.tensor([sample]), torch.zeros(1), last=True)
    adapter.step(loss.item())
    gain = float(adapter.metrics()["gain"])
    del adapter
    gc.collect()   # DeepSpeed's engine and scheduler hold each other: free it before the next one
    return gain


def golden_gains(backend: str, rank: int, world_size: int, replicas: int = 1) -> dict[str, float]:
    """{case: first-step gain} on this rank; the cases need an even number of ranks."""
    if world_size < 2 or world_size % 2:
        raise ValueError(f"the golden cases pair ranks up: they need an even world size >= 2, got {world_size}")
    return {case: first_step_gain(backend, inputs(rank), replicas) for case, (inputs, _) in CASES.items()}
