"""The FSDP2 backend (``fully_shard``) on real gloo process groups (spawned CPU ranks): golden gains, equality with
the DDP backend step by step, accumulation both ways, every policy, HSDP, mixed precision, CPU offload, clipping,
checkpoints through torch.distributed.checkpoint (also resumed on another number of ranks), bad input. What each
rank runs: tests/fsdp_scripts/cases.py."""
import pytest

from tests.adaptive_cases import SPEC as ADAPTIVE_BATCH, check_adaptive_run
from tests.distributed import run_ranks
from tests.fsdp_scripts import cases
from tests.policy_cases import AUTOWU, RULES, check_resumed_at_new_scale


def test_golden_first_step_gains():
    results = run_ranks(cases.golden_gains, 2)
    assert results[0] == results[1]
    for case, (_, gain) in cases.GOLDEN.items():
        got = results[0][case]
        assert got["gain"] == pytest.approx(gain, rel=1e-6), case
        assert got["lr"] == pytest.approx(0.1 * gain, rel=1e-6)
        assert got["applied_lr"] == pytest.approx(0.1 * gain, rel=1e-5)   # what the optimizer really used
        assert got["scale"] == 2


@pytest.mark.parametrize("nested, reshard_after_forward, accumulation, loss_reduction", [
    (True, True, 1, "mean"), (True, False, 2, "mean"), (False, False, 2, "sum")])
def test_gain_and_lr_equal_the_ddp_backend_step_by_step(nested, reshard_after_forward, accumulation,
                                                         loss_reduction):
    results = run_ranks(cases.ddp_and_fsdp, 2, nested, reshard_after_forward, accumulation, loss_reduction)
    assert results[0]["fsdp"] == results[1]["fsdp"]         # every rank the same numbers, bit for bit
    ddp, fsdp = results[0]["ddp"], results[0]["fsdp"]
    assert fsdp["gains"] == pytest.approx(ddp["gains"], rel=1e-6)
    assert fsdp["lrs"] == pytest.approx(ddp["lrs"], rel=1e-6)
    assert len(set(fsdp["gains"])) == len(fsdp["gains"]) and 1 < min(fsdp["gains"])   # gains that move
    assert fsdp["metrics"]["progress"] == pytest.approx(ddp["metrics"]["progress"], rel=1e-6)


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_accumulation_without_gradient_sync_estimates_from_each_ranks_accumulated_gradient(loss_reduction):
    results = run_ranks(cases.accumulated_statistics, 2, loss_reduction)
    assert results[0] == results[1]
    got = results[0]
    assert got["mu_sq"] > 0 and got["sigma_sq"] > 0
    assert (got["sigma_sq"], got["mu_sq"]) == pytest.approx(got["expected"], rel=1e-6)
    assert 1 < got["gain"] < 6


def test_four_orthogonal_micro_batches_give_gain_equal_to_scale_with_or_without_gradient_sync():
    results = run_ranks(cases.one_hot_accumulation, 2)
    assert results[0] == results[1]
    assert len(results[0]) == 4
    for case, got in results[0].items():
        assert got["scale"] == 4, case
        assert got["gain"] == pytest.approx(4.0, rel=1e-6), case


def test_every_policy_runs():
    specs = {**RULES, "AutoWU": AUTOWU, "AdaptiveBatch": ADAPTIVE_BATCH, "AdaScale": "AdaScale"}
    results = run_ranks(cases.every_policy, 2, specs)
    assert results[0] == results[1]
    from scaling_plugins.policies import POLICIES
    assert sorted(results[0]) == sorted(POLICIES)
    for name, got in results[0].items():
        assert len(set(got["lrs"])) > 1, name                 # the policy moves the learning rate
        assert all(lr >= 0 for lr in got["lrs"]), name
    assert results[0]["AdaScale"]["metrics"]["gain"] > 1


def test_hsdp_two_replicas_of_two_shards_equal_ddp_on_four_ranks():
    results = run_ranks(cases.hsdp_and_ddp, 4)
    assert all(r["fsdp"] == results[0]["fsdp"] for r in results)
    ddp, fsdp = results[0]["ddp"], results[0]["fsdp"]
    assert fsdp["metrics"]["scale"] == 4
    assert fsdp["gains"] == pytest.approx(ddp["gains"], rel=1e-6)
    assert fsdp["lrs"] == pytest.approx(ddp["lrs"], rel=1e-6)


@pytest.mark.parametrize("param_dtype, reduce_dtype, world, predivide",
                         [("bfloat16", "float32", 2, 1.0), ("float16", "float16", 4, 2.0)])
def test_mixed_precision_reads_the_low_precision_gradients(param_dtype, reduce_dtype, world, predivide):
    """bf16 parameters with fp32 reduction; fp16 parameters with fp16 reduction on 4 ranks, where FSDP divides the
    packed gradients by 2 before the reduce-scatter (the read multiplies the factor back)."""
    results = run_ranks(cases.mixed_precision, world, param_dtype, reduce_dtype)
    assert all(r == results[0] for r in results)
    got = results[0]
    assert got["predivide"] == predivide
    assert got["sigma_sq"] > 0 and got["mu_sq"] > 0
    assert (got["sigma_sq"], got["mu_sq"]) == pytest.approx(got["expected"], rel=1e-5)


def test_clip_grad_norm_equals_torchs_and_shares_the_statistics_all_reduce():
    results = run_ranks(cases.clipping, 2)
    assert results[0] == results[1]
    got = results[0]
    assert got["norm"] == pytest.approx(got["expected_norm"], rel=1e-6)
    assert got["norm"] > 0.01                                  # the gradients were really clipped
    assert got["max_grad_diff"] <= 1e-6 * got["max_grad"]
    assert got["all_reduces"] == (0, 1)
    assert got["gain"] > 1


def test_cpu_offload_gives_the_gains_of_the_run_on_the_device():
    results = run_ranks(cases.offloaded_and_not, 2)
    assert results[0] == results[1]
    plain, offloaded = results[0]["plain"], results[0]["offloaded"]
    assert len(set(plain["gains"])) == len(plain["gains"]) and 1 < min(plain["gains"])   # gains that move
    assert offloaded["gains"] == pytest.approx(plain["gains"], rel=1e-12)
    assert offloaded["lrs"] == pytest.approx(plain["lrs"], rel=1e-12)


def test_resume_on_another_world_size_follows_the_new_scale(tmp_path):
    saved = run_ranks(cases.checkpoint_across_world_sizes, 2, str(tmp_path), False)[0]
    results = run_ranks(cases.checkpoint_across_world_sizes, 4, str(tmp_path), True)
    assert all(r == results[0] for r in results)
    for policy in cases.RESHARDED_POLICIES:
        before, after = saved[policy], results[0][policy]
        assert before["scale"] == 2
        check_resumed_at_new_scale(policy, before, after, 4)
        assert after["resumed"]["params"] == before["params"]                     # DCP resharded 2 → 4 shards
        assert after["progress"] > before["progress"]


def test_checkpoint_through_torch_distributed_checkpoint_resumes_bit_for_bit(tmp_path):
    results = run_ranks(cases.checkpoint_resume, 2, str(tmp_path))
    for got in results:
        assert got["second"] == got["first"]
        assert got["same_params"]
    assert results[0]["first"] == results[1]["first"]


def test_bad_input_gets_clear_errors():
    results = run_ranks(cases.bad_input, 2)
    assert results[0] == results[1]
    got = results[0]
    expected = {
        "fsdp1": ("FullyShardedDataParallel (FSDP1)", "fully_shard"),
        "plain": ("got Linear", "not an FSDPModule", "fully_shard(model)"),
        "own_reduce_scatter": ("'blocks.1'", "already has a custom reduce-scatter", "remove yours"),
        "ignored_parameter": ("['head.weight']", "outside every FSDP unit", "Call fully_shard"),
        "divide_factor": ("set_gradient_divide_factor", "leave the factor unset"),
        "shard_of_one_rank": ("shards over 1 rank", "at least 2 ranks"),
        "uneven_reductions": ("2 times in a step of 3 micro-batches", "set_requires_gradient_sync(False)"),
        "step_without_backward": ("no gradients were reduced", "loss.backward()"),
        "optimizer_step_after_the_drivers": ("optimizer.step() was called outside driver.step()",
                                             "driver.step() replaces it"),
    }
    for case, parts in expected.items():
        for part in parts:
            assert part in got[case], (case, got[case])
    assert got["rule_policy_on_shard_of_one_rank"] == ""      # a rule policy reads no gradient norms


def test_adaptive_batch_grows_the_accumulation_and_resumes_exactly():
    check_adaptive_run(run_ranks(cases.adaptive_batch, 2))


def test_the_demo_runs_its_one_rank_reference_under_ddp_and_the_scaled_runs_under_fsdp():
    from scaling_plugins.app.demo import plan

    specs = plan("quadratic", "fsdp", ["AdaScale", "LinearScaling"], workers=2, scale=4, budget=8, seed=0)
    assert [(spec.name, spec.backend, spec.workers) for spec in specs] == [
        ("reference-S1", "ddp", 1), ("adascale-S4", "fsdp", 2), ("linearscaling-S4", "fsdp", 2)]
