"""A fast slice of the simulation to thousands of workers (benchmarks.scale_simulation): the estimator against
closed-form moments, the carried numbers at 4,096 ranks, the agreement check's groups."""
import math

import pytest
import torch

from benchmarks.scale_carriers import (SCALINGS, first_inexact_world, fp32_errors, local_sums, tree_sum,
                                       ring_sum, wide_results)
from benchmarks.scale_simulation import fingerprint_rows, pivot_table
from benchmarks.scale_statistics import (PopulationSource, QuadraticSource, per_sample_gradients, reduced_numbers,
                                         statistics_rows)
from scaling_plugins.app.workloads.quadratic import QuadraticModel
from scaling_plugins.backends.shared.driver import AGREED_SETTINGS, describe_rank_groups, disagreements

WORLD = 4096


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the benchmark runs: fp16 element-wise ops on a shared 2-core box slow down
    several-fold with two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_per_sample_gradients_of_the_quadratic_are_w_minus_x():
    model = QuadraticModel(4, start=0.5)
    inputs = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    grads = per_sample_gradients(model, lambda output, target: output.mean(), inputs, torch.zeros(300))
    torch.testing.assert_close(grads, 0.5 - inputs)


def test_population_numbers_from_the_gram_matrix_equal_the_drawn_gradients_summed():
    """cᵀdiag(K)/S and cᵀKc/S² are the engines' (1/S)·Σ‖g_r‖² and ‖(1/S)·Σg_r‖² of the S drawn gradients, and
    the population's σ², μ² are its mean squared deviation and squared mean."""
    grads = torch.randn(50, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.3
    source = PopulationSource("random", grads)
    draws = torch.randint(50, (64,), generator=torch.Generator().manual_seed(2))
    local, mean_sq = source.reduced(64, torch.Generator().manual_seed(2))
    assert (local, mean_sq) == pytest.approx(reduced_numbers(grads[draws]), rel=1e-12)
    truth = source.truth()
    assert truth.mu_sq == pytest.approx(float(grads.mean(dim=0).pow(2).sum()), rel=1e-12)
    assert truth.sigma_sq == pytest.approx(float((grads - grads.mean(dim=0)).pow(2).sum(dim=1).mean()), rel=1e-12)


def test_closed_form_moments_recovered_at_64_workers():
    """Noisy quadratic with B_simple = 10 (μ² above σ²/S, so μ̂² is never clamped), S = 64, θ = 0.99, 400 steps:
    the smoothed σ² within 2% and μ² within 10% of d·ν and ‖w‖², the gain within 3% of its closed form."""
    row, = statistics_rows(QuadraticSource(10.0), 64, (0.99,), steps=400)
    assert abs(row.sigma_sq.bias) < 0.02
    assert abs(row.mu_sq.bias) < 0.10
    assert abs(row.gain.bias) < 0.03


def test_unsmoothed_gain_at_1024_workers_spreads_far_more_than_a_10_step_average():
    """θ = 0 (the paper's default from S = 1,000 on) at S = 1,024, on the quadratic with B_simple = 1,000: the
    per-step gain spreads over more than 15% of its exact value, at least 3× the spread with θ = 0.9; the
    report's gain table shows both."""
    rows = statistics_rows(QuadraticSource(1000.0), 1024, (None, 0.0, 0.9), steps=200)
    _, unsmoothed, smoothed = rows
    assert unsmoothed.gain.spread > 0.15
    assert unsmoothed.gain.spread > 3 * smoothed.gain.spread
    table = pivot_table(rows, "gain")
    for row in (unsmoothed, smoothed):
        assert f"{row.gain.bias:+.1%} / {row.gain.spread:.1%}" in table


def test_ring_and_tree_orders_add_every_term():
    terms = torch.arange(1.0, 8.0).unsqueeze(1)
    assert float(ring_sum(terms, 5)) == float(tree_sum(terms)) == 28.0


@pytest.mark.parametrize("world", [WORLD, 3000])
def test_fp32_sums_over_thousands_of_ranks_stay_within_the_stated_bound(world):
    errors = fp32_errors(local_sums(world, 32, seed=3), seed=3)
    assert len(errors) == 2 * len(SCALINGS)
    for row in errors:
        assert 0 < row.worst <= row.bound, row


def test_wide_payload_ring_and_tree_sums_are_exact_at_4096_ranks():
    """fp16 and bf16, every order and scaling: the decoded Σ is bit-identical to the one decoded from the exact
    integer sum, within the encoding's 2⁻²⁷ truncation (plus float64 rounding) of the exact Σ, and no element
    leaves [−63, 63]."""
    results = wide_results(local_sums(WORLD, 1, seed=4), (torch.float16, torch.bfloat16), seed=4)
    assert len(results) == 2 * 2 * len(SCALINGS)
    for row in results:
        assert row.exact, row
        assert row.worst <= 2.0 ** -27 + math.log2(WORLD) * 2.0 ** -52, row
        assert row.largest_element <= 63


def test_fp16_integer_encoding_is_exact_through_4096_ranks_and_fails_only_far_above():
    """Every scaling is exact for every W ≤ 4,096. Premultiplying by fl16(1/W), as NCCL's AVG does, fails once
    1/W is an fp16 subnormal too coarse for 63·fl16(1/W)·W to round back to 63: between 2¹⁷ and 2²⁵/126."""
    for scaling in SCALINGS:
        assert first_inexact_world(torch.float16, scaling, WORLD) is None
        assert first_inexact_world(torch.bfloat16, scaling, WORLD) is None
    first = first_inexact_world(torch.float16, "premultiply", 1 << 19)
    assert first is not None and (1 << 17) < first < 2 ** 25 / 126


def test_agreement_rows_at_4096_ranks_name_the_one_rank_that_differs():
    rows = fingerprint_rows(WORLD, differing=1)
    assert rows.dtype == torch.int64 and rows.shape == (WORLD, len(AGREED_SETTINGS))
    found = disagreements(rows)
    assert sorted(found) == sorted(AGREED_SETTINGS)
    for groups in found.values():
        assert groups == [list(range(WORLD - 1)), [WORLD - 1]]
        assert describe_rank_groups(groups) == f"[[0-{WORLD - 2}], [{WORLD - 1}]]"   # the message stays short
    assert disagreements(fingerprint_rows(WORLD, differing=0)) == {}


def test_rank_groups_are_named_as_ranges_and_at_most_eight_groups():
    assert describe_rank_groups([[0, 2], [1]]) == "[[0, 2], [1]]"
    assert describe_rank_groups([[0, 1, 2, 5, 6], [3, 4]]) == "[[0-2, 5-6], [3-4]]"
    every_rank_alone = describe_rank_groups([[rank] for rank in range(WORLD)])
    assert every_rank_alone.endswith(f"[7], and {WORLD - 8} more groups]") and len(every_rank_alone) < 80
