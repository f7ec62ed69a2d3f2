"""AdaptiveBatch in each backend under its real launcher, 2 CPU ranks (tests/adaptive_cases.py has the loop and
the checks): DDP under torchrun (the loop reads ``ctl.accumulation_steps``), Horovod under ``horovodrun --gloo``
(``opt.backward_passes_per_step``), DeepSpeed under the ``deepspeed`` launcher at ZeRO-0 and ZeRO-2
(``engine.set_train_batch_size``). Every rank makes the same decisions, the batch grows to k·B_simple at decision
steps within the limits, AdaScale's scale follows it while τ carries on, and a resume from a checkpoint reproduces
the rest of the batch and learning-rate trajectory exactly. The three backends also agree with each other."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.adaptive_cases import check_adaptive_run
from tests.distributed import REPO, VENV_BIN, free_port, run_command


def ranks_in(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("adaptive_ddp")
    run_command([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                 "tests/scripts/adaptive_ddp.py", str(out)], timeout=300)
    return ranks_in(out)


@pytest.mark.slow
def test_ddp_under_torchrun(ddp):
    check_adaptive_run(ddp)


@pytest.mark.slow
def test_horovod_under_horovodrun(ddp, tmp_path):
    pytest.importorskip("horovod.torch", reason="Horovod is not installed: run `make horovod`")
    run_command(["horovodrun", "--gloo", "-np", "2", str(VENV_BIN / "python"),
                 str(REPO / "tests" / "horovod_scripts" / "adaptive.py"), str(tmp_path)], timeout=300)
    ranks = ranks_in(tmp_path)
    check_adaptive_run(ranks)
    assert ranks[0]["uninterrupted"] == ddp[0]["uninterrupted"]    # the same numbers as DDP, bit for bit


@pytest.mark.slow
def test_deepspeed_under_the_deepspeed_launcher(ddp, tmp_path):
    pytest.importorskip("deepspeed")
    from tests.test_deepspeed import launch

    ranks = launch("adaptive.py", tmp_path)
    for stage in ("zero0", "zero2"):
        check_adaptive_run([rank[stage] for rank in ranks])
    for mine, theirs in zip(ranks[0]["zero0"]["uninterrupted"], ddp[0]["uninterrupted"]):   # DDP's numbers
        assert mine == pytest.approx(theirs, rel=1e-9)
