"""Horovod backend, for real: two CPU ranks launched by `horovodrun --gloo`, `horovodrun` (MPI) and `mpirun`.

One launch per launcher runs every check in tests/horovod_scripts/checks.py; these tests read its per-rank
JSON and rank 0's HOROVOD_TIMELINE.
"""
from __future__ import annotations

import json
import re
from functools import partial

import pytest

pytest.importorskip("horovod.torch", reason="Horovod is not installed: run `make horovod`")

from tests.distributed import rank_results  # noqa: E402
from tools.horovod_timeline import fusion_batches, norm_placement, tensor_role  # noqa: E402
from tools.launchers import MPI_ENV, REPO, VENV_BIN, horovodrun, mpirun, run_command  # noqa: E402

pytestmark = pytest.mark.slow

SCRIPTS = REPO / "tests" / "horovod_scripts"
LAUNCHERS = {
    "horovodrun --gloo": partial(horovodrun, gloo=True),
    "horovodrun (MPI)": partial(horovodrun, gloo=False),
    "mpirun": mpirun,
}
# Scaled-optimizer cases and their optimizer steps; in each the norm must share a gradient's fusion buffer.
FUSED_CASES = {"orth": 1, "same": 1, "opp": 1, "orthsum": 1, "orthpre": 1, "orthgroups": 1,
               "onehot_mean_None_False": 1, "onehot_mean_1_False": 1, "onehot_sum_None_False": 1,
               "onehot_sum_1_False": 1, "onehot_mean_None_True": 1, "resume_a": 12, "resume_b": 6, "agree": 8,
               "elastic_state": 7, "append": 4, "grouped": 4, "predivide": 4}


@pytest.fixture(scope="module", params=list(LAUNCHERS))
def horovod_run(request, tmp_path_factory) -> dict:
    """Every check in checks.py under one launcher: each rank's results and rank 0's all-reduce responses."""
    out = tmp_path_factory.mktemp(re.sub(r"\W+", "_", request.param))
    timeline = out / "timeline.json"
    LAUNCHERS[request.param](SCRIPTS / "checks.py", [str(out)], timeout=300,
                             env={**MPI_ENV, "HOROVOD_TIMELINE": str(timeline)})
    return {"launcher": request.param, "ranks": rank_results(out), "batches": fusion_batches(timeline)}


def test_horovod_check_build_lists_pytorch_mpi_gloo():
    out = run_command([str(VENV_BIN / "horovodrun"), "--check-build"], timeout=120).stdout
    for line in ("[X] PyTorch", "[X] MPI", "[X] Gloo"):
        assert line in out, out


def test_single_process_without_launcher():
    """Horovod's size-1 path registers no gradient hooks; the norm is enqueued at the end of backward."""
    out = run_command([str(VENV_BIN / "python"), str(SCRIPTS / "single.py")], timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["size"] == 1 and result["scale"] == 2.0
    assert result["gain"] == pytest.approx(2.0, rel=1e-12)


def test_golden_two_rank_gains(horovod_run):
    for rank in horovod_run["ranks"]:
        assert rank["size"] == 2
        golden = rank["golden"]
        assert golden["orthogonal"]["gain"] == pytest.approx(4 / 3, rel=1e-12)
        for variant in ("unused", "sum", "predivide", "fp16", "groups"):     # other paths, same numbers
            assert golden[f"orthogonal_{variant}"]["gain"] == pytest.approx(4 / 3, rel=1e-12), variant
        assert golden["identical"]["gain"] == pytest.approx(1.0, abs=1e-6)
        assert golden["opposite"]["gain"] == pytest.approx(2.0, rel=1e-12)
        for case in golden.values():
            assert case["scale"] == 2.0
            assert case["lr"] == pytest.approx(0.1 * case["gain"], rel=1e-12)
            assert case["applied_lr"] and all(a == pytest.approx(case["lr"], rel=1e-6) for a in case["applied_lr"])


def test_backward_passes_one_hot_gain_equals_scale(horovod_run):
    for rank in horovod_run["ranks"]:
        assert set(rank["one_hot"]) == {"mean_groupsNone", "mean_groups1", "sum_groupsNone", "sum_groups1",
                                        "mean_set_later"}
        for case in rank["one_hot"].values():
            assert case["scale"] == 4.0
            assert case["gain"] == pytest.approx(4.0, rel=1e-12)


def test_ranks_agree_bit_for_bit(horovod_run):
    first, second = horovod_run["ranks"]
    assert len(first["agreement"]["record"]) == 8
    for key in ("agreement", "golden", "one_hot", "resume"):
        assert first[key] == second[key], key


def test_resume_reproduces_learning_rates_exactly(horovod_run):
    resume = horovod_run["ranks"][0]["resume"]
    assert len(set(resume["straight"])) > 1          # the learning rate moves, so equality means something
    assert resume["resumed"] == resume["straight"][6:]
    assert resume["progress_resumed"] == resume["progress"]
    assert resume["params_equal"]


def test_elastic_state_saves_restores_and_syncs_the_policy(horovod_run):
    first, second = (rank["elastic_state"] for rank in horovod_run["ranks"])
    for rank in (first, second):
        assert rank["ahead"][1] == rank["saved"][1] + 2 and rank["ahead"][0] > rank["saved"][0]
        assert rank["restored"] == rank["saved"]
    assert first["synced"] == first["ahead"] and second["synced"] == first["ahead"]   # rank 1 took rank 0's


def test_every_registered_policy_runs(horovod_run):
    import scaling_plugins

    policies = horovod_run["ranks"][0]["policies"]
    assert set(policies) == set(scaling_plugins.POLICIES) | {"AdaScale object"}
    for key, result in policies.items():
        assert result["policy"] == key.split()[0]
        assert all(0 < lr < float("inf") for lr in result["lrs"]), (key, result)
    assert policies["AdaScale object"]["scale"] == 8.0 and policies["AdaScale"]["scale"] == 2.0
    assert horovod_run["ranks"][0]["policies"] == horovod_run["ranks"][1]["policies"]


def test_bad_arguments_are_refused(horovod_run):
    messages = horovod_run["ranks"][0]["refusals"]
    assert "op=hvd.Adasum is not supported" in messages["adasum"] and "hvd.Average" in messages["adasum"]
    assert "loss_reduction" in messages["loss_reduction"] and "'median'" in messages["loss_reduction"]
    assert "'NoSuchPolicy'" in messages["policy"] and "AdaScale" in messages["policy"]
    assert messages["unknown_arg"].startswith("TypeError") and "no_such_argument" in messages["unknown_arg"]


def test_norm_shares_the_gradients_fusion_buffer(horovod_run):
    """Per step the norm is reduced once, inside a response that also carries that optimizer's gradients
    (so no collective of its own); under Compression.fp16 it is its own fp32 response; bare Horovod has none."""
    fused, alone = norm_placement(horovod_run["batches"])
    assert {case: fused.get(case) for case in FUSED_CASES} == FUSED_CASES, (fused, alone)
    assert alone.get("fp16") == 4 and alone.get("orthfp16") == 1, alone
    assert set(alone) <= {"fp16", "orthfp16", "unused"}, alone
    assert fused.get("unused", 0) + alone.get("unused", 0) == 1    # the fallback path: one norm, fused or not
    assert not any(case == "bare" for batch in horovod_run["batches"] for role, case in map(tensor_role, batch)
                   if role == "norm")


# -- a data-dependent graph: a parameter with a gradient on one rank and not on the other ---------------------
# Horovod aborts a stalled job after this many seconds, so a deadlock fails the test instead of hanging it.
STALL_ENV = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "5", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "30"}


def offline_gains(ranks: list[dict], passes: int) -> list[float]:
    """AdaScale's gain per step from the recorded local gradients alone: L = Σ_i ‖g_i‖² over every micro-batch
    of every rank, T = ‖ḡ‖² of their average (each micro-batch gradient taken with the loss / passes)."""
    import torch

    from scaling_plugins.backends.shared.driver import accumulation_sample
    from scaling_plugins.policies import build_policy
    from scaling_plugins.policies.base import StepObservation

    policy = build_policy("AdaScale")
    policy.configure(len(ranks), passes)
    gains = []
    for step in range(len(ranks[0]["steps"])):
        micro = torch.tensor([g for rank in ranks for g in rank["steps"][step]["local"]], dtype=torch.float64)
        local_sq_mean = float((micro * micro).sum()) / len(ranks)
        mean = micro.reshape(len(ranks), passes, -1).sum(dim=1).mean(dim=0)
        policy.step(StepObservation(accumulation_sample(local_sq_mean, float(mean @ mean), len(ranks), passes,
                                                        "mean"), None))
        gains.append(policy.gain)
    return gains


@pytest.mark.parametrize("passes", [1, 2])
def test_branch_skipped_on_one_rank_finishes_with_the_offline_gain(tmp_path, passes):
    """Rank 1 skips a branch on step 1 (its parameters get no gradient there): plain Horovod reduces zeros for
    them; the norm's carrier must be the same collective on every rank, or every rank waits forever."""
    horovodrun(SCRIPTS / "branch.py", [str(tmp_path), str(passes)], timeout=120, env=STALL_ENV)
    ranks = rank_results(tmp_path)
    assert [step["used_branch"] for step in ranks[1]["steps"]] == [True, False, True, True]
    first, second = ranks
    assert [s["gain_hex"] for s in first["steps"]] == [s["gain_hex"] for s in second["steps"]]
    for step in first["steps"]:                       # the reduced gradient is the average, zeros included
        import torch
        local = torch.tensor([rank["steps"][first["steps"].index(step)]["local"] for rank in ranks])
        assert torch.allclose(torch.tensor(step["reduced"]), local.sum(dim=1).mean(dim=0), rtol=1e-5, atol=1e-7)
    gains = [step["gain"] for step in first["steps"]]
    assert gains == pytest.approx(offline_gains(ranks, passes), rel=1e-5)
    assert all(1.0 <= gain <= 2.0 * passes for gain in gains)


def test_sparse_gradients_sam_and_a_gradient_penalty_give_the_offline_gain(tmp_path):
    """sparse_as_dense=True with nn.Embedding(sparse=True) (the local norm read from the coalesced values), SAM's
    first pass under opt.extra_backward(), and torch.autograd.grad for a gradient penalty (neither measured nor
    counted): every step's gain is the one recomputed from the step's own gradients, on both ranks."""
    from tests.loop_checks import raw_gain

    horovodrun(SCRIPTS / "training_loops.py", [str(tmp_path)], timeout=180, env=STALL_ENV)
    ranks = rank_results(tmp_path)
    for loop in ("sparse", "sam", "penalty"):
        for first, second in zip(ranks[0][loop], ranks[1][loop]):
            assert first["gain"] == second["gain"] and first["applied_sq"] == second["applied_sq"]
            offline = raw_gain(first["local_sq"] + second["local_sq"], first["applied_sq"], 2, 2)
            assert first["gain"] == pytest.approx(offline, rel=1e-5), loop
            assert 1.0 < first["gain"] < 2.0, loop


def test_ops_added_per_step_do_not_grow_with_the_number_of_tensors(tmp_path):
    """torch.profiler's top-level aten ops per step, ours minus plain Horovod's: the same with 10× the tensors
    (same elements), with and without accumulation (a per-parameter read added 3 ops per tensor and pass)."""
    horovodrun(SCRIPTS / "op_count.py", [str(tmp_path)], timeout=180, env=STALL_ENV)
    results = json.loads((tmp_path / "rank0.json").read_text())
    for passes in (1, 2):
        few, many = results[f"16x{passes}"], results[f"160x{passes}"]
        assert many["bare"] > few["bare"] + 100            # Horovod's own work grows with the tensors
        assert 0 < many["added"] <= few["added"], results
        assert 1.0 < few["gain"] <= 2.0 * passes and 1.0 < many["gain"] <= 2.0 * passes
