"""Bad input to the Horovod and DeepSpeed backends under their real launchers (2 CPU ranks each): each case gets a
clear error, never a silent wrong learning rate or a hang. Every row asserts the message, not only the exception.

``ENGINE_CASES``: one launch per engine runs every case of its script (tests/horovod_scripts/bad_input.py,
tests/deepspeed_scripts/bad_input.py), each rank writing each case's outcome.
"""
from __future__ import annotations

import pytest

from tests.distributed import rank_results
from tools.launchers import MPI_ENV, REPO, deepspeed, horovodrun

ENGINE_CASES = [  # (id, launcher, case, {rank: fragment})
    ("Horovod: a different policy on each rank", "horovod", "policy_differs",
     {0: "the ranks disagree on their policy settings: policy (ranks grouped by equal value: [[0], [1]]"}),
    ("Horovod: gradient_predivide_factor=0", "horovod", "predivide_zero",
     {0: "ValueError: gradient_predivide_factor must be a finite number > 0, got 0"}),
    ("Horovod: one backward pass per step, 2 declared", "horovod", "fewer_passes",
     {0: "RuntimeError: 1 backward pass(es) in this step, but backward_passes_per_step is 2"}),
    ("DeepSpeed: a boundary after every micro-batch with gas 2 (Accelerate without accumulate)", "deepspeed",
     "boundary_every_micro_batch", {0: "RuntimeError: 1 backward pass(es) in this step, but "
                                       "gradient_accumulation_steps is 2"}),
    ("DeepSpeed: different scheduler params on each rank", "deepspeed", "params_differ",
     {0: "the ranks disagree on their policy settings: params (ranks grouped by equal value: [[0], [1]]"}),
    ("DeepSpeed: a sparse embedding", "deepspeed", "sparse_embedding",
     {0: "ValueError: module(s) ['0'] make sparse gradients (sparse=True), which DeepSpeed reduces apart from the "
         "buffers the statistics ride: build them with sparse=False"}),
    ("DeepSpeed: extra_backward (SAM)", "deepspeed", "extra_backward",
     {0: "ValueError: extra_backward() is not supported under DeepSpeed"}),
]
ENV = {**MPI_ENV, "DS_ACCELERATOR": "cpu"}
LAUNCH = {  # each engine's script of cases under its launcher, 2 ranks
    "horovod": lambda out: horovodrun(REPO / "tests" / "horovod_scripts" / "bad_input.py", [str(out)], timeout=300,
                                      env=ENV),
    "deepspeed": lambda out: deepspeed(REPO / "tests" / "deepspeed_scripts" / "bad_input.py", ["--out", str(out)],
                                       timeout=300, env=ENV),
}


@pytest.fixture(scope="module", params=sorted(LAUNCH))
def engine_outcomes(request, tmp_path_factory) -> tuple[str, list[dict]]:
    if request.param == "horovod":
        pytest.importorskip("horovod.torch", reason="Horovod is not installed: run `make horovod`")
    out = tmp_path_factory.mktemp(request.param)
    LAUNCH[request.param](out)
    return request.param, rank_results(out)


@pytest.mark.slow
def test_engine_bad_input(engine_outcomes):
    engine, ranks = engine_outcomes
    rows = [row for row in ENGINE_CASES if row[1] == engine]
    assert rows
    for _, _, case, expected in rows:
        for rank, fragment in expected.items():
            assert fragment in ranks[rank][case], (case, ranks[rank][case])
