"""Bad input to the DDP backend on real gloo ranks: each case gets a clear error or a documented, logged fallback,
never a silent wrong learning rate or a hang. Every row asserts each rank's message, not only the exception.

``RANK_CASES``: every case in one 2-rank job, each rank meeting the case's bad input (settings that differ
between the ranks included); each rank's message. Then the cases that need a job of their own: requires_grad
turned off on one rank only, and a resume on another world size.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins.backends.ddp import attach
from tests.distributed import run_ranks

# -- DDP, both ranks meeting the same bad input ------------------------------------------------------------------
def _model_and_optimizer(lr: float = 0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    return model, DDP(model), torch.optim.SGD(model.parameters(), lr=lr)


def _backward(ddp: DDP) -> None:
    ddp(torch.ones(1, 2)).sum().backward()


def accumulation_differs(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, "AdaScale", accumulation_steps=2 if rank == 0 else 4)


def policy_differs(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, "AdaScale" if rank == 0 else "LinearScaling")


def params_differ(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, {"type": "AdaScale", "params": {"total_num_steps": 100 + rank}})


def fewer_backward_passes(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    driver = attach(ddp, opt, "AdaScale", accumulation_steps=4)
    for _ in range(5):
        _backward(ddp)
        driver.step()
        opt.zero_grad()


def step_before_backward(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, "LinearScaling").step()


def loss_vector(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    driver = attach(ddp, opt, {"type": "AutoWU", "params": {"total_num_steps": 10}})
    _backward(ddp)
    driver.step(torch.ones(4))


def attach_twice(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, "LinearScaling")
    attach(ddp, opt, "LinearScaling")


def zero_lr(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer(lr=0.0)
    driver = attach(ddp, opt, "LinearScaling")
    _backward(ddp)
    driver.step()


def sparse_embedding(rank: int) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 2, sparse=True), torch.nn.Linear(2, 1))
    attach(DDP(model), torch.optim.SGD(model.parameters(), lr=0.1), "AdaScale")


def ddp_mixed_precision(rank: int) -> None:
    from torch.nn.parallel.distributed import _MixedPrecision

    model = torch.nn.Linear(2, 1)
    ddp = DDP(model, mixed_precision=_MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16))
    attach(ddp, torch.optim.SGD(model.parameters(), lr=0.1), "AdaScale")


def hook_registered_first(rank: int) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    _, ddp, opt = _model_and_optimizer()
    ddp.register_comm_hook(None, fp16_compress_hook)
    attach(ddp, opt, "AdaScale")


def powersgd(rank: int) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    _, ddp, opt = _model_and_optimizer()
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1)
    attach(ddp, opt, "AdaScale", comm_hook=powerSGD_hook.powerSGD_hook, comm_hook_state=state)


RANK_CASES = [  # (id, case, {rank: fragment of the error or of the logged warning})
    ("accumulation 2 on one rank, 4 on the other", accumulation_differs,
     {0: "accumulation_steps (ranks grouped by equal value: [[0], [1]]; this rank has 2)",
      1: "accumulation_steps (ranks grouped by equal value: [[0], [1]]; this rank has 4)"}),
    ("a different policy on each rank", policy_differs,
     {0: "the ranks disagree on their policy settings: policy (ranks grouped by equal value: [[0], [1]]; "
         "this rank has 'AdaScale')", 1: "this rank has 'LinearScaling'"}),
    ("different params on each rank", params_differ, {0: "params (ranks grouped by equal value: [[0], [1]]"}),
    ("one backward pass per step, 4 declared", fewer_backward_passes,
     {0: "RuntimeError: 1 backward pass(es) in this step, but accumulation_steps is 4", 1: "3 steps in a row"}),
    ("one backward pass per step, 4 declared: the warning first", fewer_backward_passes,
     {0: "WARNING 1 backward pass(es) in this step, but accumulation_steps is 4: the policy's scale and "
         "statistics assume 4 (run that many micro-batches per step, or pass the accumulation you run); an "
         "error if it happens 3 steps in a row"}),
    ("step() before any backward (LinearScaling)", step_before_backward,
     {0: "RuntimeError: no backward pass since the last step: call loss.backward()"}),
    ("a loss vector passed to driver.step", loss_vector,
     {0: "ValueError: the loss given to the step must be one number (the batch's mean loss), got a tensor of "
         "shape (4,)"}),
    ("attach twice", attach_twice, {0: "ValueError: this optimizer already follows policy 'LinearScaling'"}),
    ("lr = 0", zero_lr, {0: "WARNING a param group has lr 0: policy 'LinearScaling' multiplies it, so that "
                            "group does not train"}),
    ("a sparse embedding", sparse_embedding,
     {0: "ValueError: module(s) ['0'] make sparse gradients (sparse=True), which DDP's communication hooks cannot "
         "carry the statistics in: build them with sparse=False"}),
    ("DDP's own mixed_precision", ddp_mixed_precision,
     {0: "ValueError: DistributedDataParallel(mixed_precision=...) registers DDP's own communication hook"}),
    ("a communication hook registered before attach", hook_registered_first,
     {0: "ValueError: this DDP model already has a communication hook and DDP allows one: pass yours to "
         "attach(..., comm_hook=hook, comm_hook_state=state)"}),
    ("PowerSGD", powersgd, {0: "ValueError: PowerSGD cannot carry AdaScale's statistics: its reduced gradient is a "
                               "low-rank approximation"}),
]


def run_case(rank: int, world: int, case) -> str:
    """The case's exception as ``"Type: message"`` (or "no error") after its logged warnings, one per line."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(f"{record.levelname} {record.getMessage()}")
    logging.getLogger("scaling_plugins").addHandler(handler)
    try:
        case(rank)
        outcome = "no error"
    except Exception as err:  # noqa: BLE001 - the test asserts on the type and message
        outcome = f"{type(err).__name__}: {err}"
    return "\n".join([*records, outcome])


@pytest.fixture(scope="module")
def rank_outcomes() -> dict:
    """Every RANK_CASES case on one 2-rank gloo job (each case meets its bad input on both ranks alike)."""
    cases = {case.__name__: case for _, case, _ in RANK_CASES}
    return dict(zip(cases, zip(*run_ranks(_run_all, 2, list(cases.values())))))


def _run_all(rank: int, world: int, cases: list) -> list[str]:
    return [run_case(rank, world, case) for case in cases]


@pytest.mark.parametrize("case, expected", [row[1:] for row in RANK_CASES], ids=[row[0] for row in RANK_CASES])
def test_ddp_bad_input_on_both_ranks(rank_outcomes, case, expected):
    outcomes = rank_outcomes[case.__name__]
    for rank, fragment in expected.items():
        assert fragment in outcomes[rank], outcomes[rank]


# -- DDP: one rank differs, and a resume on another world size -----------------------------------------------------
def frozen_on_one_rank(rank: int, world: int) -> str:
    model, ddp, opt = _model_and_optimizer()
    driver = attach(ddp, opt, "AdaScale")
    if rank == 1:
        model.weight.requires_grad_(False)
        _backward(ddp)      # DDP never launches the bucket that waits for the frozen weight
        return run_case(rank, world, lambda r: driver.step())
    return "rank 0 trains as usual"   # it would wait in the all-reduce that rank 1 never joins


def test_requires_grad_turned_off_on_one_rank_after_the_wrap_is_named():
    outcome = run_ranks(frozen_on_one_rank, 2)[1]
    assert "RuntimeError: 1 backward pass(es) ran but DDP reduced no gradients in this step" in outcome
    assert "requires_grad changed after the DistributedDataParallel wrap" in outcome


def checkpoint_at(rank: int, world: int, policy: str, state: dict | None) -> dict:
    """Two AdaScale/LinearScaling steps on ``world`` ranks (or a resume from ``state``): scale, gain, τ, σ², μ²."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    driver = attach(ddp, opt, policy)
    before = {}
    if state is not None:
        driver.load_state_dict(state)
        before = {"scale": driver.scale, "progress": driver.progress, "metrics": driver.metrics()}
    data = torch.Generator().manual_seed(rank)
    for _ in range(2):
        ddp(torch.randn(1, 2, generator=data)).sum().backward()
        driver.step()
        opt.zero_grad()
    return {"state": driver.state_dict(), "scale": driver.scale, "progress": driver.progress, "gain": driver.gain,
            "metrics": driver.metrics(), "resumed": before}


@pytest.mark.parametrize("policy", ["AdaScale", "LinearScaling"])
def test_resume_on_another_world_size_follows_the_new_scale(policy):
    saved = run_ranks(checkpoint_at, 4, policy, None)[0]
    assert saved["scale"] == 4
    resumed = run_ranks(checkpoint_at, 2, policy, saved["state"])[0]
    assert resumed["resumed"]["scale"] == 2 and resumed["scale"] == 2
    assert resumed["resumed"]["progress"] == saved["progress"]                  # τ carries on
    if policy == "AdaScale":
        for key in ("sigma_sq", "mu_sq"):                                        # base-batch units carry over
            assert resumed["resumed"]["metrics"][key] == saved["metrics"][key]
        assert 1 <= resumed["gain"] <= 2
    else:
        assert resumed["metrics"]["lr_factor"] == 2                              # k follows the new scale
