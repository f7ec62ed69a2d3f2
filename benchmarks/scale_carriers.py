"""The numbers the engines carry through their all-reduce, summed over W simulated ranks in the order a ring and
a tree all-reduce add them.

What is carried: each rank's local sum L_r = Σ‖g_i‖² (and, under DeepSpeed, its loss), as one fp32 element
beside fp32 gradients, or as a ``WidePayload`` block of small integers where the reduction runs in fp16/bf16.
The reduction multiplies the sum by c = 1/W in one of three ways:

- ``premultiply``: every term is multiplied by c rounded to the data type, then summed (NCCL's AVG for
  floating types, a PreMulSum by 1/W);
- ``divide first``: every term is divided by W (computed in fp32, rounded to the data type), then summed (DDP's
  division before a summing all-reduce on a backend without AVG);
- ``sum then scale``: the terms are summed, then multiplied by c (gloo's AVG, DeepSpeed's post-scaling).

Orders: a ring adds one rank's term at a time around the ring, starting at some rank (each element's chunk
starts elsewhere); a tree adds pairs level by level (a balanced binary tree, depth ⌈log₂W⌉).

fp32 error bound for positive terms (u = 2⁻²⁴, γ_k = k·u/(1 − k·u), Higham, "Accuracy and Stability of Numerical
Algorithms", §4.2): the cast to fp32, the scaling and the additions give relative error ≤ γ_{W+1} in a ring
(W − 1 additions on a term's path) and ≤ γ_{⌈log₂W⌉+2} in a tree.

Wide payload: every element of the carrier is non-zero on exactly one rank, so every addition adds 0 and is
exact in any order; only the scaling rounds. An integer k (|k| ≤ 63) comes back as round(y·W) with y the reduced
element; the carrier is exact at W when that equals k for every k and every way of scaling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from scaling_plugins.backends.shared.wide_payload import EXPONENT_BASE, WIDTH, WidePayload

SCALINGS = ("premultiply", "divide first", "sum then scale")
ORDERS = ("ring", "tree")
LARGEST_INTEGER = EXPONENT_BASE - 1   # the encoding's integers lie in [−63, 63]
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def ring_sum(terms: torch.Tensor, start: int) -> torch.Tensor:
    """Σ of ``terms`` (one row per rank) in their data type, added one rank at a time from rank ``start`` round
    the ring: ((x_s + x_{s+1}) + x_{s+2}) + … + x_{s−1}."""
    world = len(terms)
    total = terms[start].clone()
    for step in range(1, world):
        total += terms[(start + step) % world]
    return total


def tree_sum(terms: torch.Tensor) -> torch.Tensor:
    """Σ of ``terms`` (one row per rank) in their data type, added in pairs level by level; an odd rank out
    moves up a level unchanged."""
    while len(terms) > 1:
        paired = terms[0:len(terms) - 1:2] + terms[1::2]
        terms = torch.cat([paired, terms[-1:]]) if len(terms) % 2 else paired
    return terms[0]


def reduce_terms(terms: torch.Tensor, order: str, scaling: str, start: int = 0) -> torch.Tensor:
    """The averaged reduction of ``terms`` (W rows, in the communication data type): Σ/W in ``order`` with the
    1/W applied as ``scaling`` says."""
    world = len(terms)
    add: Callable[[torch.Tensor], torch.Tensor] = (lambda t: ring_sum(t, start)) if order == "ring" else tree_sum
    if scaling == "premultiply":
        return add(terms * torch.tensor(1.0 / world, dtype=terms.dtype))
    if scaling == "divide first":
        return add(terms / world)
    return add(terms) * (1.0 / world)


def fp32_bound(world: int, order: str) -> float:
    """γ_k with k = W + 1 (ring) or ⌈log₂W⌉ + 2 (tree): the relative error bound of an fp32 average of W positive
    float64 terms (cast, scaling and additions)."""
    k = world + 1 if order == "ring" else math.ceil(math.log2(world)) + 2
    return k * FP32_UNIT_ROUNDOFF / (1 - k * FP32_UNIT_ROUNDOFF)


def local_sums(world: int, trials: int, seed: int) -> torch.Tensor:
    """W × trials positive float64 numbers like the local sums ranks carry: log-normal, spanning ~4 decades."""
    generator = torch.Generator().manual_seed(seed)
    return torch.exp(2.0 * torch.randn(world, trials, generator=generator, dtype=torch.float64))


@dataclass(frozen=True)
class Fp32Error:
    """The largest relative error of W·(reduced fp32 average) against the exact Σ over the trials, and its bound."""

    order: str
    scaling: str
    worst: float
    bound: float


def fp32_errors(values: torch.Tensor, seed: int) -> list[Fp32Error]:
    """For each order and scaling: the fp32 reduction of ``values`` (W × trials, float64) against math.fsum, a
    random ring start per call."""
    world = len(values)
    exact = torch.tensor([math.fsum(column) for column in values.T.tolist()], dtype=torch.float64)
    start = int(torch.randint(world, (1,), generator=torch.Generator().manual_seed(seed)))
    terms = values.to(torch.float32)
    rows = []
    for order in ORDERS:
        for scaling in SCALINGS:
            total = reduce_terms(terms, order, scaling, start).to(torch.float64) * world
            worst = float(((total - exact) / exact).abs().max())
            rows.append(Fp32Error(order, scaling, worst, fp32_bound(world, order)))
    return rows


def wide_carriers(values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``WidePayload`` carrier for ``values`` (W × P): W rows of W·P·D elements in ``dtype``, and
    their exact sum (float64: every element is non-zero in one row at most)."""
    world, size = values.shape
    carriers = torch.empty(world, world * size * WIDTH, dtype=dtype)
    exact = torch.zeros(world * size * WIDTH, dtype=torch.float64)
    for rank in range(world):
        encoded = WidePayload(size, rank, world).encode(values[rank])
        carriers[rank] = encoded
        exact += encoded
    return carriers, exact


@dataclass(frozen=True)
class WideResult:
    """One reduction of the wide carriers: whether the decoded sums equal those of the exact integer sum bit for
    bit, their largest relative error against the exact Σ, and the largest |integer| it carried, |reduced|·W (no
    overflow while it stays ≤ 63)."""

    dtype: torch.dtype
    order: str
    scaling: str
    exact: bool
    worst: float
    largest_element: float


def wide_results(values: torch.Tensor, dtypes: tuple[torch.dtype, ...], seed: int) -> list[WideResult]:
    """Each dtype, order and scaling: the decoded Σ over ranks of ``values`` (W × P, float64)."""
    world, size = values.shape
    decoder = WidePayload(size, 0, world)
    exact_sum = torch.tensor([math.fsum(column) for column in values.T.tolist()], dtype=torch.float64)
    start = int(torch.randint(world, (1,), generator=torch.Generator().manual_seed(seed)))
    results = []
    for dtype in dtypes:
        carriers, integers = wide_carriers(values, dtype)
        reference = decoder.decode(integers, 1.0)
        for order in ORDERS:
            for scaling in SCALINGS:
                reduced = reduce_terms(carriers, order, scaling, start)
                decoded = decoder.decode(reduced, 1.0 / world)
                worst = float(((decoded - exact_sum) / exact_sum).abs().max())
                results.append(WideResult(dtype, order, scaling, torch.equal(decoded, reference), worst,
                                          float(reduced.abs().max() * world)))
        del carriers   # W²·P·9 elements (0.6 GB at W = 4,096, P = 2): freed before the next dtype's
    return results


def scaled_integers(worlds: torch.Tensor, dtype: torch.dtype, scaling: str) -> torch.Tensor:
    """len(worlds) × 127 reduced elements y for every integer k ∈ [−63, 63] of one rank, the other ranks adding 0:
    y = fl(k·fl(1/W)), fl(k/W) or fl(k·(1/W)) in ``dtype`` as ``scaling`` says (fp32 arithmetic, rounded)."""
    ints = torch.arange(-LARGEST_INTEGER, LARGEST_INTEGER + 1, dtype=torch.float32)
    factor = (1.0 / worlds.to(torch.float64)).unsqueeze(1)
    if scaling == "premultiply":
        factor = factor.to(dtype).to(torch.float32)
        return (ints * factor).to(dtype)
    if scaling == "divide first":
        return (ints / worlds.to(torch.float32).unsqueeze(1)).to(dtype)
    return (ints.to(dtype).to(torch.float32) * factor.to(torch.float32)).to(dtype)


def first_inexact_world(dtype: torch.dtype, scaling: str, limit: int, chunk: int = 1 << 15) -> int | None:
    """The smallest W in [2, limit] at which some integer does not come back as round(y·W) (None: none)."""
    ints = torch.arange(-LARGEST_INTEGER, LARGEST_INTEGER + 1, dtype=torch.float64)
    for begin in range(2, limit + 1, chunk):
        worlds = torch.arange(begin, min(begin + chunk, limit + 1))
        decoded = torch.round(scaled_integers(worlds, dtype, scaling).to(torch.float64)
                              / (1.0 / worlds.to(torch.float64)).unsqueeze(1))
        wrong = (decoded != ints).any(dim=1).nonzero()
        if len(wrong):
            return int(worlds[wrong[0, 0]])
    return None
