"""AdaptiveBatch in each backend under its real launcher, 2 CPU ranks (tests/adaptive_cases.py has the loop and
the checks): DDP under torchrun (the loop reads ``ctl.accumulation_steps``), Horovod under ``horovodrun --gloo``
(``opt.backward_passes_per_step``), DeepSpeed under the ``deepspeed`` launcher at ZeRO-0 and ZeRO-2
(``engine.set_train_batch_size``). Every rank makes the same decisions, the batch grows to k·B_simple at decision
steps within the limits, AdaScale's scale follows it while τ carries on, and a resume from a checkpoint reproduces
the rest of the batch and learning-rate trajectory exactly. The three backends also agree with each other."""
from __future__ import annotations

import pytest

from tests.adaptive_cases import check_adaptive_run
from tests.distributed import rank_results
from tools.launchers import REPO, deepspeed, horovodrun, torchrun


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("adaptive_ddp")
    torchrun("tests/ddp_scripts/adaptive.py", [str(out)], timeout=300)
    return rank_results(out)


@pytest.mark.slow
def test_ddp_under_torchrun(ddp):
    check_adaptive_run(ddp)


@pytest.mark.slow
def test_horovod_under_horovodrun(ddp, tmp_path):
    pytest.importorskip("horovod.torch", reason="Horovod is not installed: run `make horovod`")
    horovodrun(REPO / "tests" / "horovod_scripts" / "adaptive.py", [str(tmp_path)], timeout=300)
    ranks = rank_results(tmp_path)
    check_adaptive_run(ranks)
    assert ranks[0]["uninterrupted"] == ddp[0]["uninterrupted"]    # the same numbers as DDP, bit for bit


@pytest.mark.slow
def test_deepspeed_under_the_deepspeed_launcher(ddp, tmp_path):
    pytest.importorskip("deepspeed")
    deepspeed("tests/deepspeed_scripts/adaptive.py", ["--out", str(tmp_path)])
    ranks = rank_results(tmp_path)
    for stage in ("zero0", "zero2"):
        check_adaptive_run([rank[stage] for rank in ranks])
    for mine, theirs in zip(ranks[0]["zero0"]["uninterrupted"], ddp[0]["uninterrupted"]):   # DDP's numbers
        assert mine == pytest.approx(theirs, rel=1e-9)
