"""How the DeepSpeed backend reads the gradients, through the real `deepspeed` launcher (2 CPU ranks): bf16 ZeRO-0
(BF16_Optimizer, bf16 flat all-reduce) keeps range and precision (gradient norms above 65,504 and below 1e-4),
and the ops added per step do not grow with the number of parameter tensors."""
from __future__ import annotations

import pytest

from tests.distributed import rank_results
from tools.launchers import deepspeed

pytest.importorskip("deepspeed")


@pytest.mark.slow
def test_bf16_flat_reduction_keeps_the_golden_gain_at_any_gradient_scale(tmp_path):
    deepspeed("tests/deepspeed_scripts/bf16_range.py", ["--out", str(tmp_path)])
    ranks = rank_results(tmp_path)
    assert ranks[0] == ranks[1]
    optimizers = {"zero0": "FP16_UnfusedOptimizer", "zero1_fp32_accumulation": "BF16_Optimizer",
                  "zero1_fp32_accumulation_immediate": "BF16_Optimizer"}
    assert set(ranks[0]) == set(optimizers)
    for variant, results in ranks[0].items():
        assert {run["optimizer"] for run in results.values()} == {optimizers[variant]}
        assert {run["communication"] for run in results.values()} == {"torch.bfloat16"}
        if variant.endswith("_immediate"):     # DeepSpeed freed the bf16 gradients during the backward
            assert results["300000.0"]["local_grad_norm"] is None
        else:
            assert results["300000.0"]["local_grad_norm"] > 65504 and results["3e-06"]["local_grad_norm"] < 1e-4
        check_golden(results)


def check_golden(results: dict) -> None:
    """Every gradient entry is ±e (e = the factor rounded to bf16 once), so L = Σ_ranks ‖g_r‖² = 8e² and
    T = ‖ḡ‖² = 3e² exactly; one bf16 element would carry L with 8 significant bits (error up to 2e-3)."""
    for factor, run in results.items():
        entry = run["entry"]
        assert run["local_sq_sum"] == pytest.approx(8 * entry ** 2, rel=1e-6), factor
        assert run["mean_sq_norm"] == pytest.approx(3 * entry ** 2, rel=1e-6), factor
        if float(factor) >= 1:       # below, σ̂² meets the absolute floor 1e-6 and pins the gain
            assert run["gain"] == pytest.approx(4 / 3, rel=1e-6), factor
            assert run["sigma_sq"] == pytest.approx(run["mu_sq"], rel=1e-6), factor


@pytest.mark.slow
def test_ops_added_per_step_do_not_grow_with_the_number_of_tensors(tmp_path):
    """ZeRO-0: torch.profiler's top-level aten ops per optimizer step, AdaScale minus a bare engine: the same with
    10× the tensors (same elements), with and without accumulation (a per-parameter read added 3 per tensor)."""
    deepspeed("tests/deepspeed_scripts/op_count.py", ["--out", str(tmp_path), "--stage", "0"])
    results = rank_results(tmp_path)[0]
    for gas in (1, 2):
        few, many = results[f"16x{gas}"], results[f"160x{gas}"]
        assert many["bare"] > few["bare"] + 100            # DeepSpeed's own work grows with the tensors
        assert 0 < many["added"] <= few["added"], results
        assert 1.0 < few["gain"] <= 2.0 * gas and 1.0 < many["gain"] <= 2.0 * gas
