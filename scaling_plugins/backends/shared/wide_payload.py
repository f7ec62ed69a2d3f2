"""A few float64 numbers carried exactly through a fp16/bf16 all-reduce that sums and rescales them.

DeepSpeed's flat gradient all-reduce (ZeRO-0) communicates in ``communication_data_type``, bf16 by default for
bf16 runs: a payload element there keeps 8 significant bits, and fp16 overflows above 65,504. Instead of one
element per number, each rank writes its numbers as small integers into a block of its own, zeros elsewhere:

    v = sign · Σ_{k=1..K} d_k · 16^(−k) · 2^e,   |d_k| ≤ 15,   e = 64·e_hi + e_lo  (frexp exponent),

so a number takes D = K + 2 elements [e_hi, e_lo, d_1 … d_K] (K = 7: 28 significant bits, better than fp32; any
float64 exponent). The reduction adds zeros to every element but one (exact) and multiplies by c = 1/W (or by
the pre/post-divide factors): one or two roundings of an integer of magnitude ≤ 63 in a format with ≥ 8
significant bits, an error below 63·2⁻⁷ < 0.5, so round(y / c) gives each integer back exactly. A non-finite
number is written into all its elements and decodes non-finite. Cost: W·P·D elements in the flat buffer (P
numbers, W ranks), a fixed number of small device ops to encode and decode, no collective.
"""
from __future__ import annotations

import torch

DIGITS = 7              # base-16 digits of the mantissa
EXPONENT_BASE = 64      # the frexp exponent as 64·e_hi + e_lo, both small integers
WIDTH = DIGITS + 2      # elements per number


class WidePayload:
    """Encodes this rank's ``size`` float64 numbers into its block of a ``world``-rank carrier, and decodes the
    reduced carrier into Σ_ranks of each number."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.size, self.rank, self.world = size, rank, world

    @property
    def numel(self) -> int:
        return self.world * self.size * WIDTH

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """float64 carrier (W·P·D elements, zeros outside this rank's block) for ``values`` (P numbers)."""
        values = values.reshape(self.size).to(torch.float64)
        mantissa, exponent = torch.frexp(values)                     # |mantissa| in [0.5, 1) (0 for 0)
        powers = torch.pow(16.0, torch.arange(1, DIGITS + 1, dtype=torch.float64, device=values.device))
        prefixes = torch.trunc(mantissa.unsqueeze(1) * powers)       # exact: |prefix| < 16^7 = 2^28
        digits = prefixes - 16.0 * torch.nn.functional.pad(prefixes[:, :-1], (1, 0))
        exponent = exponent.to(torch.float64)
        e_hi = torch.floor(exponent / EXPONENT_BASE)
        block = torch.cat([e_hi.unsqueeze(1), (exponent - EXPONENT_BASE * e_hi).unsqueeze(1), digits], dim=1)
        block = torch.where(torch.isfinite(values).unsqueeze(1), block, values.unsqueeze(1).expand_as(block))
        carrier = torch.zeros(self.world, self.size, WIDTH, dtype=torch.float64, device=values.device)
        carrier[self.rank] = block
        return carrier.reshape(-1)

    def decode(self, reduced: torch.Tensor, multiplier: float) -> torch.Tensor:
        """Σ over ranks of each number (float64, P values) from the reduced carrier; ``multiplier`` is c, what the
        reduction multiplied the sum by."""
        ints = torch.round(reduced.to(torch.float64).reshape(self.world, self.size, WIDTH) / multiplier)
        exponent = EXPONENT_BASE * ints[..., 0] + ints[..., 1]
        powers = torch.pow(16.0, -torch.arange(1, DIGITS + 1, dtype=torch.float64, device=reduced.device))
        mantissa = (ints[..., 2:] * powers).sum(dim=-1)
        return torch.ldexp(mantissa, exponent).sum(dim=0)
