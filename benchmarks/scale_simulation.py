"""A simulation to thousands of workers, in one process: the statistics, the carried numbers, the attach-time
agreement check, and a projection of the added time per step.

    .venv/bin/python -m benchmarks.scale_simulation [--quick] [--steps 2000] [--population 1438]

1. Statistics (``benchmarks.scale_statistics``): S ∈ {64, 256, 1024, 4096} one-sample workers on the noisy
   quadratic (exact σ², μ²) and on the digits CNN at fixed weights (a population of training images with exact
   moments), fed to ``GradientStatistics`` for several θ and the default θ = max(1 − S/1000, 0): the bias and
   spread of σ², μ² and the gain over the second half of the steps.
2. Carried numbers (``benchmarks.scale_carriers``): the local sums of W = 4096 ranks averaged in ring and tree
   order, in fp32 (against a stated bound) and as fp16/bf16 ``WidePayload`` integers (exact or not), and the
   smallest world size at which the integer encoding stops being exact.
3. The attach-time agreement check at W = 4096: the all-gathered rows' memory and the time of ``disagreements``.
4. A projection (not a measurement) of the time added per step at 1,024 GPUs.

Prints markdown; benchmarks/RESULTS.md quotes it.
"""
from __future__ import annotations

import argparse
import statistics as stats
import time
from dataclasses import dataclass
from typing import Optional

import torch

from benchmarks.scale_carriers import (SCALINGS, first_inexact_world, fp32_errors, local_sums, wide_results)
from benchmarks.scale_statistics import (GradientSource, QuadraticSource, StatisticsRow, digits_source,
                                         statistics_rows)
from scaling_plugins.backends.shared.driver import AGREED_SETTINGS, disagreements, setting_fingerprint
from scaling_plugins.backends.shared.wide_payload import WIDTH, WidePayload

SCALES = (64, 256, 1024, 4096)
THETAS: tuple[Optional[float], ...] = (None, 0.0, 0.9, 0.95, 0.99, 0.999)
QUADRATIC_NOISE_SCALES = (100.0, 1000.0)
DIGITS_TRAINED_STEPS = (0, 300, 1500)
WIDE_DTYPES = (torch.float16, torch.bfloat16)
SWEEP_LIMIT = 1 << 20
CARRIER_OTHER_WORLD = 3000   # not a power of two
PROJECTED_WORLD = 1024
# One fused read of every gradient on this box's CPU (benchmarks/RESULTS.md, "The floor"): milliseconds.
MEASURED_READ_MS = {"many-tensor model, 3.2M fp32 gradients": (1.0, 1.1), "MLP, 10.5M fp32 gradients": (1.7, 1.8)}
ASSUMED_BUS_GBYTES_PER_S = (12.5, 50.0)   # a ring's per-GPU bus bandwidth: 100 and 400 Gbit/s per GPU


# -- 1. statistics --------------------------------------------------------------------------------------------
def sources(population: int) -> list[GradientSource]:
    """The quadratic at each of ``QUADRATIC_NOISE_SCALES`` and digits at each of ``DIGITS_TRAINED_STEPS``."""
    return ([QuadraticSource(b) for b in QUADRATIC_NOISE_SCALES]
            + [digits_source(trained, population) for trained in DIGITS_TRAINED_STEPS])


def pivot_table(rows: list[StatisticsRow], quantity: str) -> str:
    """One markdown line per (source, S), one column per θ: bias / spread of ``quantity`` ("sigma_sq", "mu_sq"
    or "gain"); the standard error of the biases where θ = 0 is among them; for the gain also the exact gain and
    the share of the steps whose gain sat at S with the default θ."""
    thetas = list(dict.fromkeys("default" if row.default_theta else f"{row.theta:g}" for row in rows))
    gain, unsmoothed = quantity == "gain", "0" in thetas
    lines = ["| source | S | " + ("exact gain | " if gain else "") + " | ".join(f"θ = {t}" for t in thetas)
             + (" | ± bias (θ = 0 standard error)" if unsmoothed else "")
             + (" | default θ: steps at gain S |" if gain else " |"),
             "|---|---:|" + "---:|" * (len(thetas) + 2 * gain + unsmoothed)]
    cells: dict[tuple[str, int], dict[str, StatisticsRow]] = {}
    for row in rows:
        cells.setdefault((row.source, row.scale), {})["default" if row.default_theta else f"{row.theta:g}"] = row
    for (source, scale), by_theta in cells.items():
        default = by_theta["default"]
        values = [getattr(by_theta[t], quantity) for t in thetas]
        line = f"| {source} | {scale} ({'θ ' + format(default.theta, 'g')}) | "
        line += f"{default.exact_gain:.4g} | " if gain else ""
        line += " | ".join(f"{v.bias:+.1%} / {v.spread:.1%}" for v in values)
        line += f" | {getattr(by_theta['0'], quantity).standard_error:.1%}" if unsmoothed else ""
        lines.append(line + (f" | {default.at_scale:.1%} |" if gain else " |"))
    return "\n".join(lines)


def moments_table(all_sources: list[GradientSource]) -> str:
    lines = ["| source | σ² | μ² | B_simple = σ²/μ² (samples) |", "|---|---:|---:|---:|"]
    for source in all_sources:
        truth = source.truth()
        lines.append(f"| {source.name} | {truth.sigma_sq:.5g} | {truth.mu_sq:.5g} | {truth.noise_scale:.4g} |")
    return "\n".join(lines)


# -- 2. carried numbers ---------------------------------------------------------------------------------------
def carrier_tables(world: int, trials: int, numbers: int, seed: int = 0) -> str:
    """fp32 errors against their bound, the wide carriers' exactness, at ``world`` ranks (a power of two scales
    exactly by 1/W; another W shows the scaling's rounding)."""
    lines = [f"fp32, W = {world}, {trials} sets of log-normal local sums:", "",
             "| order | scaling | worst relative error | bound |", "|---|---|---:|---:|"]
    for row in fp32_errors(local_sums(world, trials, seed), seed):
        lines.append(f"| {row.order} | {row.scaling} | {row.worst:.3g} | {row.bound:.3g} |")
    lines += ["", f"WidePayload, W = {world}, P = {numbers} numbers per rank ({world * numbers * WIDTH:,} elements "
              "per carrier):", "",
              "| dtype | order | scaling | decoded bit-identical to the exact integer sum | worst relative error "
              "vs exact Σ | largest integer |", "|---|---|---|---|---:|---:|"]
    for row in wide_results(local_sums(world, numbers, seed + 1), WIDE_DTYPES, seed):
        lines.append(f"| {str(row.dtype).removeprefix('torch.')} | {row.order} | {row.scaling} | {row.exact} | "
                     f"{row.worst:.3g} | {row.largest_element:g} |")
    return "\n".join(lines)


def sweep_table(limit: int) -> str:
    lines = [f"Smallest W in [2, {limit:,}] at which some integer of the encoding does not come back:", "",
             "| dtype | " + " | ".join(SCALINGS) + " |", "|---|" + "---:|" * len(SCALINGS)]
    for dtype in WIDE_DTYPES:
        found = [first_inexact_world(dtype, scaling, limit) for scaling in SCALINGS]
        lines.append(f"| {str(dtype).removeprefix('torch.')} | "
                     + " | ".join("none" if w is None else f"{w:,}" for w in found) + " |")
    return "\n".join(lines)


# -- 3. agreement check ---------------------------------------------------------------------------------------
def fingerprint_rows(world: int, differing: int) -> torch.Tensor:
    """W × len(AGREED_SETTINGS) int64 fingerprints as the all-gather returns them; the last ``differing`` ranks
    have another value of every setting."""
    settings = {"policy": "AdaScale", "params": {"smoothing": None}, "scale": float(world),
                "accumulation_steps": 1, "loss_reduction": "mean"}
    row = torch.tensor([setting_fingerprint(settings[key]) for key in AGREED_SETTINGS], dtype=torch.int64)
    rows = row.repeat(world, 1)
    if differing:
        rows[world - differing:] += torch.arange(1, differing + 1).unsqueeze(1)
    return rows


@dataclass(frozen=True)
class AgreementCost:
    """The gathered rows' bytes; the median seconds of ``disagreements``; the characters of the ranks' groups it
    returns (what the error message lists)."""

    case: str
    rows_bytes: int
    seconds: float
    groups_chars: int


def agreement_cost(world: int, differing: int, repeats: int) -> AgreementCost:
    rows = fingerprint_rows(world, differing)
    times, found = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        found = disagreements(rows)
        times.append(time.perf_counter() - start)
    case = {0: "all agree", 1: "one rank differs", world: "every rank differs"}.get(differing, f"{differing} differ")
    return AgreementCost(case, rows.element_size() * rows.numel(), stats.median(times),
                         sum(len(str(groups)) for groups in found.values()))


def agreement_table(world: int, repeats: int) -> str:
    lines = [f"W = {world}, {len(AGREED_SETTINGS)} settings:", "",
             "| case | gathered rows | `disagreements`, median | groups listed in the error |", "|---|---:|---:|---:|"]
    for differing in (0, 1, world):
        cost = agreement_cost(world, differing, repeats)
        lines.append(f"| {cost.case} | {cost.rows_bytes:,} B | {cost.seconds * 1e3:.1f} ms | "
                     f"{cost.groups_chars:,} chars |")
    return "\n".join(lines)


# -- 4. projection --------------------------------------------------------------------------------------------
def wide_payload_seconds(world: int, numbers: int, repeats: int) -> float:
    """Median seconds of one ``WidePayload`` encode and decode of ``numbers`` values at ``world`` ranks (CPU)."""
    payload = WidePayload(numbers, world - 1, world)
    values = torch.rand(numbers, dtype=torch.float64)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        payload.decode(payload.encode(values) * (1.0 / world), 1.0 / world)
        times.append(time.perf_counter() - start)
    return stats.median(times)


def ring_seconds(extra_bytes: float, world: int, bus_bytes_per_s: float) -> float:
    """A ring all-reduce moves 2(W − 1)/W of its bytes through each rank's link: the time of ``extra_bytes``."""
    return 2 * (world - 1) / world * extra_bytes / bus_bytes_per_s


def projection_table(world: int, repeats: int) -> str:
    lines = [f"PROJECTION at W = {world} (not measured on any GPU; assumptions in the text):", "",
             "| part | per step |", "|---|---:|"]
    for model, (low, high) in MEASURED_READ_MS.items():
        lines.append(f"| two reads (L before, T after the reduction), {model}, this CPU | {2 * low:.1f}–{2 * high:.1f} ms |")
    for numbers in (1, 2):
        extra = world * numbers * WIDTH * 2
        links = ", ".join(f"{ring_seconds(extra, world, bw * 1e9) * 1e6:.1f} µs at {bw:g} GB/s"
                          for bw in ASSUMED_BUS_GBYTES_PER_S)
        lines.append(f"| WidePayload bytes, P = {numbers} ({extra:,} B of fp16/bf16 in the ring) | {links} |")
        lines.append(f"| WidePayload encode + decode, P = {numbers}, this CPU | "
                     f"{wide_payload_seconds(world, numbers, repeats) * 1e3:.2f} ms |")
    lines.append(f"| fp32 carrier: 4 B in the ring | {ring_seconds(4, world, ASSUMED_BUS_GBYTES_PER_S[0] * 1e9) * 1e9:.1f} ns |")
    return "\n".join(lines)


# -- report ---------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 steps, 256 digits images, sweep to 2^17")
    parser.add_argument("--steps", type=int, default=2000, help="simulated optimizer steps per (source, S)")
    parser.add_argument("--population", type=int, default=1438, help="digits training images in the population")
    parser.add_argument("--world", type=int, default=4096, help="ranks of the carrier and agreement simulations")
    args = parser.parse_args(argv)
    steps, population, limit = (200, 256, 1 << 17) if args.quick else (args.steps, args.population, SWEEP_LIMIT)
    torch.set_num_threads(1)
    started = time.perf_counter()
    all_sources = sources(population)
    print("## 1. Statistics\n\nExact moments (scale-1 units, one sample):\n")
    print(moments_table(all_sources))
    print(f"\n{steps} steps per (source, S); bias and spread over the last {steps - steps // 2}:\n")
    rows = [row for source in all_sources for scale in SCALES for row in statistics_rows(source, scale, THETAS, steps)]
    for quantity, title in (("gain", "the gain"), ("mu_sq", "μ²"), ("sigma_sq", "σ²")):
        print(f"\nBias / spread of {title} (S with its default θ in brackets):\n")
        print(pivot_table(rows, quantity))
    print("\n## 2. Carried numbers\n")
    for world in (args.world, CARRIER_OTHER_WORLD):
        print(carrier_tables(world, trials=64, numbers=2))
        print()
    print(sweep_table(limit))
    print("\n## 3. Attach-time agreement\n")
    print(agreement_table(args.world, repeats=5))
    print("\n## 4. Projection\n")
    print(projection_table(PROJECTED_WORLD, repeats=20))
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
