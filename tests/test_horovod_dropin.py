"""The drop-in promise, kept: ``sph.DistributedOptimizer`` under a unit-factor policy trains bit for bit as
``hvd.DistributedOptimizer`` in every set-up (process sets included, under Gloo and MPI), and a plain Horovod or
torch optimizer state loads into it. Two launches of tests/horovod_scripts/dropin.py (2 ranks).
"""
from __future__ import annotations

import pytest

pytest.importorskip("horovod.torch", reason="Horovod is not installed: run `make horovod`")

from tests.distributed import rank_results  # noqa: E402
from tools.launchers import MPI_ENV, REPO, horovodrun  # noqa: E402

pytestmark = pytest.mark.slow

SCRIPT = REPO / "tests" / "horovod_scripts" / "dropin.py"
# Horovod aborts a stalled job after this many seconds, so a deadlock fails the test instead of hanging it.
STALL_ENV = {"HOROVOD_STALL_CHECK_TIME_SECONDS": "5", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "30"}
PROCESS_SETS = {"process_set_rank0", "process_set_even_odd"}
SETUPS = {"default", "backward_passes_2", "groups_2", "groups_list", "fp16", "op_sum", "predivide_2",
          "sync_clip_skip", "inplace_zero", "branch_skipped", "sparse", "sparse_as_dense"} | PROCESS_SETS


@pytest.fixture(scope="module")
def gloo_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dropin_gloo")
    horovodrun(SCRIPT, [str(out), "all"], gloo=True, timeout=300, env=STALL_ENV)
    return rank_results(out)


@pytest.fixture(scope="module")
def mpi_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dropin_mpi")
    horovodrun(SCRIPT, [str(out), "process_sets"], gloo=False, timeout=300, env={**MPI_ENV, **STALL_ENV})
    return rank_results(out)


def check_identical(ranks: list[dict], names: set[str]) -> None:
    for rank in ranks:
        assert set(rank["setups"]) == names
        for name, result in rank["setups"].items():
            assert result["identical"], (rank["rank"], name)
            assert result["digest_ours"] == result["digest_hvd"], (rank["rank"], name)
            assert result["gain"] == 1.0 and result["lr"] == 0.05, (rank["rank"], name)


def test_every_setup_is_bit_identical_to_horovod_gloo(gloo_ranks):
    check_identical(gloo_ranks, SETUPS)
    first, second = gloo_ranks
    for name in SETUPS - PROCESS_SETS:     # one reduced gradient: both ranks hold the same weights
        assert first["setups"][name]["digest_hvd"] == second["setups"][name]["digest_hvd"], name
    for name in PROCESS_SETS:              # rank 1 steps on its own gradient (outside [0], or in [1] alone)
        assert first["setups"][name]["digest_hvd"] != second["setups"][name]["digest_hvd"], name


def test_the_harvest_runs_under_the_unit_policy(gloo_ranks):
    """AdaScale with scale 1 still measures: σ², μ² estimated on the 2-rank set-ups, 3 policy steps everywhere
    the policy is driven."""
    for rank in gloo_ranks:
        for name, result in rank["setups"].items():
            if name in PROCESS_SETS:
                continue
            assert result["steps"] == 3 and result["world_size"] == 2, name
            assert result["sigma_sq"] is not None and result["mu_sq"] > 0, name


def test_process_sets_inside_and_outside(gloo_ranks):
    """Inside a set the policy runs at the set's size; outside it is not driven (Horovod's local step)."""
    first, second = gloo_ranks
    assert first["setups"]["process_set_rank0"]["active"] and first["setups"]["process_set_rank0"]["world_size"] == 1
    assert second["setups"]["process_set_rank0"]["active"] is False
    assert second["setups"]["process_set_rank0"]["metrics"] == ["accumulation_steps", "lr"]
    for rank in gloo_ranks:
        even_odd = rank["setups"]["process_set_even_odd"]
        assert even_odd["active"] and even_odd["world_size"] == 1 and even_odd["steps"] == 3


def test_outside_rank_keeps_the_users_learning_rate(gloo_ranks):
    """LinearScaling ×4 on process set [0]: ×4 on rank 0; rank 1 keeps lr 0.05 (also at construction and after
    reloading its state), takes step(loss=...), says once that the policy is not driven there."""
    inside, outside = (rank["outside"] for rank in gloo_ranks)
    assert inside["active"] and inside["lr_at_construction"] == pytest.approx(0.2) and inside["steps"] == 2
    assert inside["infos"] == []
    assert outside["active"] is False
    assert outside["lr_at_construction"] == outside["lr"] == outside["reloaded_lr"] == 0.05
    assert outside["metrics"] == {"lr": 0.05, "accumulation_steps": 1}
    assert outside["has_entry"] and outside["steps"] == 0
    assert len(outside["infos"]) == 1 and "not driven" in outside["infos"][0]


@pytest.mark.parametrize("plain", ["horovod", "torch"])
def test_plain_state_loads_with_a_fresh_policy_and_one_warning(gloo_ranks, plain):
    """A plain hvd.DistributedOptimizer's (or torch.optim.SGD's) state_dict() loads into ours: momentum buffers
    equal, the policy fresh, one warning naming opt.scaling.load_state_dict; the next step equals the plain job's."""
    for rank in gloo_ranks:
        result = rank["switch_over"][plain]
        assert result["buffers_equal"] and result["identical"], (rank["rank"], result)
        assert result["fresh"] == {"steps": 0, "progress": 0.0, "gain": 1.0, "lr": 0.05}
        assert len(result["warnings"]) == 1, result["warnings"]
        assert "no 'scaling_plugins' entry" in result["warnings"][0]
        assert "opt.scaling.load_state_dict(policy_state)" in result["warnings"][0]
        assert result["has_entry"]          # saved again, it carries the policy


def test_process_sets_are_bit_identical_to_horovod_mpi(mpi_ranks):
    check_identical(mpi_ranks, PROCESS_SETS)
    first, second = mpi_ranks
    assert first["setups"]["process_set_rank0"]["active"] and not second["setups"]["process_set_rank0"]["active"]
    assert second["outside"]["active"] is False and second["outside"]["lr"] == 0.05
