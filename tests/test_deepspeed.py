"""DeepSpeed backend through the real `deepspeed` launcher: 2 CPU ranks, gloo, ZeRO stages 0 and 2.

One launch per stage runs tests/deepspeed_scripts/golden.py, which batches every check's raw numbers into a
JSON file per rank; the assertions are here. A few registration checks run in this process.
"""
from __future__ import annotations

import json
import math

import pytest

from scaling_plugins import POLICIES
from scaling_plugins.policies.adascale import AdaScale
from tests.distributed import rank_results
from tools.launchers import deepspeed

pytest.importorskip("deepspeed")

GOLDEN_GAINS = {"orthogonal": 4 / 3, "identical": 1.0, "opposite": 2.0}
# σ̂², μ̂² of the first step (S = n = 2): per-sample ‖g‖² and ‖ḡ‖² of Linear(2, 2) + bias under output.sum()
# give L = 8, T = 3 (orthogonal); L = 24, T = 12 (identical: σ̂² clamps to 1e-9 of S·(L/n)/(n − 1) = 24);
# L = 8, T = 0 (opposite).
GOLDEN_MOMENTS = {"orthogonal": [2.0, 2.0], "identical": [2.4e-8, 12.0 - 1.2e-8], "opposite": [8.0, 0.0]}
BASE_LR = 0.1


@pytest.fixture(scope="module", params=[0, 2], ids=["zero0", "zero2"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict]]:
    stage = request.param
    out = tmp_path_factory.mktemp(f"zero{stage}")
    deepspeed("tests/deepspeed_scripts/golden.py", ["--out", str(out), "--stage", str(stage)])
    return stage, rank_results(out)


@pytest.mark.slow
def test_every_number_agrees_across_ranks(run):
    _, (rank0, rank1) = run
    assert rank0 == rank1


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(GOLDEN_GAINS))
def test_golden_first_step_gain_and_applied_lr(run, case):
    result = run[1][0]["golden"][case]
    expected = GOLDEN_GAINS[case]
    assert result["scale"] == 2
    assert result["gain"] == pytest.approx(expected, rel=1e-6)
    assert result["moments"] == pytest.approx(GOLDEN_MOMENTS[case], rel=1e-6, abs=1e-6)
    assert result["lr_used"] == [BASE_LR * result["gain"]]
    assert result["applied_lr"] == pytest.approx([BASE_LR * expected] * 2, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(GOLDEN_GAINS))
def test_golden_gain_when_the_flat_all_reduce_takes_several_buffers(run, case):
    """ZeRO-0 reads T from each reduced flat buffer (the payload rides only the last one): with the buffers cut to
    2 elements, the weight, the bias and the payload go in more than one, and the gain is still the golden one.
    ZeRO-2 reduces through its own buckets, never the flat all-reduce."""
    stage, (rank0, _) = run
    result = rank0["golden_small_buckets"][case]
    assert (len(result["buckets"]) >= 2) if stage == 0 else (result["buckets"] == []), result["buckets"]
    assert result["gain"] == pytest.approx(GOLDEN_GAINS[case], rel=1e-6)
    assert result["moments"] == pytest.approx(GOLDEN_MOMENTS[case], rel=1e-6, abs=1e-6)
    assert result["applied_lr"] == pytest.approx([BASE_LR * GOLDEN_GAINS[case]] * 2, rel=1e-6)


@pytest.mark.slow
def test_loss_scale_is_divided_out(run):
    """ZeRO-0 under torch_autocast fp16 (DeepSpeed's torch GradScaler, growing its scale mid-run) and ZeRO-2 with
    a loss scale of 1024: every step's σ², μ² are in true units (not × scale²) and the gain is the golden one."""
    stage, (rank0, _) = run
    steps = rank0["loss_scaled"]
    assert [step["loss_scale"] for step in steps] == ([65536.0, 65536.0, 131072.0, 131072.0] if stage == 0
                                                      else [1024.0] * 4)
    for step in steps:       # the same data every step: the smoothed moments stay the first step's
        weight = step["weight"]
        assert step["gain"] == pytest.approx(4 / 3, rel=1e-6)
        assert step["moments"] == pytest.approx([m * weight ** 2 for m in GOLDEN_MOMENTS["orthogonal"]], rel=1e-6)
        assert step["applied_lr"] == pytest.approx([BASE_LR * 4 / 3 * weight] * 2, rel=1e-3)


@pytest.mark.slow
def test_four_one_hot_micro_batches_give_gain_four(run):
    result = run[1][0]["one_hot"]
    assert result["scale"] == 4
    assert result["gain"] == pytest.approx(4.0, rel=1e-6)


@pytest.mark.slow
def test_collectives_per_step_equal_bare_deepspeed(run):
    stage, (rank0, _) = run
    counts = rank0["collectives"]["counts"]
    assert counts["adascale"] == counts["bare"]
    assert all(step.get("gloo:all_reduce", 0) >= 1 for step in counts["bare"])
    assert rank0["collectives"]["schedulers"]["adascale"]["extra_collectives"] == 0
    if stage in (1, 2):  # compute_grad_norm=false: the documented fallback adds exactly one all-reduce
        for bare, ours in zip(counts["bare_no_norm"], counts["adascale_no_norm"]):
            assert ours == {**bare, "gloo:all_reduce": bare["gloo:all_reduce"] + 1}
        fallback = rank0["collectives"]["schedulers"]["adascale_no_norm"]
        assert fallback["extra_collectives"] == 1
        assert fallback["gain"] == rank0["collectives"]["schedulers"]["adascale"]["gain"]


@pytest.mark.slow
def test_checkpoint_resume_reproduces_the_lr_trajectory(run):
    ckpt = run[1][0]["checkpoint"]
    straight, resumed = ckpt["straight"], ckpt["resumed"]
    assert len({lr for (lr,) in straight["lrs"]}) == 6          # the schedule moves every step
    assert ckpt["loaded_state"] == ckpt["state_at_3"]
    assert resumed["lrs"] == straight["lrs"][3:]
    assert resumed["final_state"] == straight["final_state"]
    assert ckpt["global_steps"] == 6


@pytest.mark.slow
def test_policy_steps_once_per_global_step_with_several_param_groups(run):
    stage, (rank0, _) = run
    result = rank0["param_groups"]
    assert result["policy_steps"] == 3
    calls_per_step = 2 if stage in (1, 2) else 1            # ZeRO-1/2 step the basic optimizer per group
    assert [step for step, _ in result["calls"]] == [s for s in range(3) for _ in range(calls_per_step)]
    seen = {}
    for step, groups in result["calls"]:
        for initial_lr, lr in groups:
            assert lr == pytest.approx(initial_lr * result["gains"][step], rel=1e-12)
            seen.setdefault(step, set()).add(initial_lr)
    assert all(initial_lrs == {0.1, 0.02} for initial_lrs in seen.values())


@pytest.mark.slow
def test_overflow_step_is_skipped_by_the_policy_on_every_rank(run):
    overflow = run[1][0]["overflow"]
    assert overflow["skipped_steps"] == [1, 0]
    assert overflow["with_skip"]["steps"] == 3
    assert overflow["with_skip"] == overflow["without"]


@pytest.mark.slow
def test_every_registered_policy_runs_by_its_config_name(run):
    policies = run[1][0]["policies"]
    assert sorted(policies) == sorted(POLICIES)
    for name, result in policies.items():
        assert len(result["lrs"]) == 4 and all(math.isfinite(lr) and lr > 0 for (lr,) in result["lrs"]), name
        if POLICIES[name].needs_loss:  # the loss read in engine.backward, averaged over ranks and micro-batches
            assert result["policy_losses"] == pytest.approx(result["true_mean_loss"], rel=1e-6), name


@pytest.mark.slow
def test_code_path_initialize_with_policy(run):
    result = run[1][0]["code_path"]
    assert result["gain"] == pytest.approx(4 / 3, rel=1e-6)


@pytest.mark.slow
def test_errors_at_initialize(run):
    errors = run[1][0]["errors"]
    assert errors["typo"].startswith("ValueError") and "did you mean 'AdaScale'" in errors["typo"]
    for key in ("typo", "unknown"):
        assert all(name in errors[key] for name in POLICIES), errors[key]
    assert errors["bad_value"].startswith("ValueError") and "smoothing" in errors["bad_value"] \
        and "2.0" in errors["bad_value"] and "[0, 1)" in errors["bad_value"]
    assert "warmup_steps" in errors["unknown_key"] and "allowed" in errors["unknown_key"]
    assert "'Cosine'" in errors["bad_schedule"] and "WarmupCosineLR" in errors["bad_schedule"]
    assert errors["last_batch_iteration"].startswith("ValueError") and "=5" in errors["last_batch_iteration"]
    assert errors["step_with_batch_size"].startswith("ValueError")        # never TypeError: DeepSpeed would retry
    assert errors["step_with_kwargs"].startswith("ValueError") and "increment" in errors["step_with_kwargs"]
    assert errors["policy_and_scheduler"].startswith("ValueError")
    assert errors["torch_scheduler_still_works"] == "no error"


# -- in this process: registration --------------------------------------------------------------------------
def test_import_registers_every_policy_including_later_ones():
    from deepspeed.runtime import lr_schedules

    import scaling_plugins.backends.deepspeed as backend

    assert all(getattr(lr_schedules, name).__name__ == f"{name}Scheduler" for name in POLICIES)

    class LateRule(AdaScale):
        name = "LateRuleForTest"

    POLICIES[LateRule.name] = LateRule
    try:
        assert issubclass(getattr(lr_schedules, "LateRuleForTest"), backend.DeepSpeedDriver)
    finally:
        del POLICIES[LateRule.name]
    assert not hasattr(lr_schedules, "LateRuleForTest")
    assert not hasattr(lr_schedules, "NoSuchSchedulerAnywhere")      # outside DeepSpeed's lookup: plain False


def test_scheduler_outside_deepspeed_initialize_is_refused():
    import torch

    from scaling_plugins.backends.deepspeed import DeepSpeedDriver

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(RuntimeError, match="deepspeed.initialize"):
        DeepSpeedDriver(optimizer, "AdaScale")


@pytest.mark.slow
def test_checkpoint_loaded_on_another_world_size_follows_the_new_scale(tmp_path):
    """engine.save_checkpoint at 2 ranks × gas 2 (S = 4), engine.load_checkpoint at 1 rank × gas 2 (S = 2)."""
    for ranks, mode in ((2, "save"), (1, "load")):
        deepspeed("tests/deepspeed_scripts/resize.py", ["--out", str(tmp_path), "--mode", mode], num_gpus=ranks)
    saved, loaded = (json.loads((tmp_path / f"{mode}.json").read_text()) for mode in ("save", "load"))
    assert saved["scale"] == 4.0 and loaded["scale"] == 2.0
    for key in ("progress", "sigma_sq", "mu_sq"):                  # τ and the base-batch estimates carry over
        assert loaded[key] == saved[key]


@pytest.mark.slow
def test_set_train_batch_size_is_followed(tmp_path):
    """gas 2 → 4 mid-run: the scale and the statistics follow (equal to a fresh gas-4 run on the same batches)."""
    deepspeed("tests/deepspeed_scripts/resize.py", ["--out", str(tmp_path), "--mode", "ramp"])
    result = json.loads((tmp_path / "ramp.json").read_text())
    assert result["steps"] == 4 and result["ramped"]["scale"] == result["fresh"]["scale"] == 8.0
    for key in ("sigma_sq", "mu_sq", "gain"):
        assert result["ramped"][key] == pytest.approx(result["fresh"][key], rel=1e-9)
