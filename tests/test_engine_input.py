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
    ("Horovod: hvd.DistributedOptimizer(sgd) passed to sph.DistributedOptimizer", "horovod", "wrapped_by_horovod",
     {rank: "TypeError: the optimizer passed is already wrapped by hvd.DistributedOptimizer (class SGD): pass the "
            "plain torch optimizer" for rank in (0, 1)}),
    ("Horovod: AdaScale on Adam (warned about on stderr)", "horovod", "adascale_on_adam", {0: "no error"}),
    ("Horovod: opt.step() twice after one backward pass", "horovod", "stepped_twice",
     {rank: "RuntimeError: no backward pass since the last step: call loss.backward() before opt.step()"
      for rank in (0, 1)}),
    ("Horovod: sph.DistributedOptimizer wrapped again", "horovod", "wrapped_twice",
     {rank: "TypeError: the optimizer passed is already a scaling_plugins DistributedOptimizer (class SGD, policy "
            "'AdaScale'): pass the plain torch optimizer, once" for rank in (0, 1)}),
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
    ("DeepSpeed: lr_scheduler= beside a policy in the config", "deepspeed", "client_scheduler_and_policy",
     {rank: "ValueError: deepspeed.initialize got lr_scheduler=step_lr and the config's \"scheduler\": {\"type\": "
            "\"AdaScale\"}, a scaling_plugins policy: DeepSpeed would run step_lr and drop AdaScale without a word. "
            "Keep one: remove lr_scheduler= to run AdaScale, or the config's \"scheduler\" entry to run step_lr"
      for rank in (0, 1)}),
    ("DeepSpeed: AdaScale on Adam (warned about on stderr)", "deepspeed", "adascale_on_adam", {0: "no error"}),
    ("DeepSpeed: \"auto\" in scheduler.params (warned about on stderr)", "deepspeed", "scheduler_auto",
     {0: "no error"}),
    ("DeepSpeed: \"auto\" batch sizes under plain deepspeed.initialize", "deepspeed", "auto_batch_size",
     {rank: "ValueError: train_micro_batch_size_per_gpu, gradient_accumulation_steps = \"auto\" in the DeepSpeed "
            "config: only the Hugging Face Trainer and Accelerate fill \"auto\" there, and plain "
            "deepspeed.initialize cannot read it" for rank in (0, 1)}),
    ("DeepSpeed: \"auto\" batch size with initialize(policy=...)", "deepspeed",
     "auto_batch_size_with_policy_argument",
     {0: "ValueError: train_batch_size = \"auto\" in the DeepSpeed config: only the Hugging Face Trainer and "
         "Accelerate fill \"auto\" there"}),
    ("DeepSpeed: \"auto\" optimizer lr under plain deepspeed.initialize", "deepspeed", "auto_optimizer_lr",
     {rank: "ValueError: optimizer.params.lr = \"auto\" in the DeepSpeed config: only the Hugging Face Trainer and "
            "Accelerate fill \"auto\" there, and plain deepspeed.initialize cannot read it (DeepSpeed would stop "
            "with a TypeError naming no key). Give numbers there" for rank in (0, 1)}),
]
SHOWN = {  # what each engine's script shows on stderr with no logging set up: the warnings meant for the user
    "horovod": ["ScalingWarning: policy 'AdaScale' multiplies the learning rate by its gain, the rule derived for SGD, "
                "but the optimizer is Adam: for Adam-type optimizers (Adam, AdamW, LAMB) use 'AdaScaleAdam'"],
    "deepspeed": ["ScalingWarning: policy 'AdaScale' multiplies the learning rate by its gain, the rule derived for "
                  "SGD, but the optimizer is AdamW",
                  "ScalingWarning: scheduler.params: \"auto\" that neither the Hugging Face Trainer nor Accelerate "
                  "filled (plain DeepSpeed) is read as the Trainer's defaults: warmup_num_steps=1"],
}
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
    launched = LAUNCH[request.param](out)
    return request.param, rank_results(out), launched.stdout + launched.stderr


@pytest.mark.slow
def test_engine_bad_input(engine_outcomes):
    engine, ranks, _ = engine_outcomes
    rows = [row for row in ENGINE_CASES if row[1] == engine]
    assert rows
    for _, _, case, expected in rows:
        for rank, fragment in expected.items():
            assert fragment in ranks[rank][case], (case, ranks[rank][case])


@pytest.mark.slow
def test_engine_warnings_show_with_no_logging_set_up(engine_outcomes):
    engine, _, output = engine_outcomes
    for fragment in SHOWN[engine]:
        assert fragment in output, output[-4000:]
