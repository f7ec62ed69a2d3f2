"""Bad input to the DDP backend on real gloo ranks: each case gets a clear error or a documented, logged fallback,
never a silent wrong learning rate or a hang. Every row asserts each rank's message, not only the exception.

``RANK_CASES``: every case in one 2-rank job, each rank meeting the case's bad input (settings that differ
between the ranks included, and states that ``load_state_dict`` refuses, which must leave the driver as it was);
each rank's message. Then the cases that need a job of their own: requires_grad
turned off on one rank only, and a resume on another world size.
"""
from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins import AdaScale
from scaling_plugins.backends.ddp import attach
from tests.distributed import run_ranks
from tests.policy_cases import check_resumed_at_new_scale
from tools.launchers import REPO, VENV_BIN, free_port, run_command

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


def _stepped_driver(policy="AdaScale"):
    """A driver after one step, its state then (``saved``), and one step more (so that it differs from ``saved``)."""
    _, ddp, opt = _model_and_optimizer()
    driver = attach(ddp, opt, policy)
    _backward(ddp)
    driver.step()
    saved = driver.state_dict()
    _backward(ddp)
    driver.step()
    return driver, opt, saved


def _refused_load(driver, state) -> None:
    """``driver.load_state_dict(state)``, which must fail leaving the driver exactly as it was (an
    ``AssertionError`` replaces the error otherwise)."""
    before = (driver.state_dict(), [dict(group, params=None) for group in driver.optimizer.param_groups],
              driver.accumulation_steps)
    try:
        driver.load_state_dict(state)
    finally:
        after = (driver.state_dict(), [dict(group, params=None) for group in driver.optimizer.param_groups],
                 driver.accumulation_steps)
        if after != before:
            raise AssertionError(f"a refused load changed the driver: {before} became {after}")


def policy_state_to_driver(rank: int) -> None:
    driver, _, _ = _stepped_driver()
    _refused_load(driver, driver.policy.state_dict())


def optimizer_state_to_driver(rank: int) -> None:
    driver, opt, _ = _stepped_driver()
    _refused_load(driver, opt.state_dict())


def damaged_statistics_to_driver(rank: int) -> None:
    driver, _, saved = _stepped_driver()
    del saved["policy"]["statistics"]["scale"]
    _refused_load(driver, saved)


def nan_progress_to_driver(rank: int) -> None:
    driver, _, saved = _stepped_driver("LinearScaling")
    saved["policy"]["progress"] = float("nan")
    _refused_load(driver, saved)


def nan_base_lr_to_driver(rank: int) -> None:
    driver, _, saved = _stepped_driver()
    saved["base_lrs"] = [float("nan")]
    _refused_load(driver, saved)


def policy_instance_twice(rank: int) -> None:
    policy = AdaScale()
    _, ddp, opt = _model_and_optimizer()
    first = attach(ddp, opt, policy)
    _, other_ddp, other_opt = _model_and_optimizer()
    attach(other_ddp, other_opt, policy)
    del first


def policy_name_twice(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    first = attach(ddp, opt, {"type": "AdaScale"})
    _, other_ddp, other_opt = _model_and_optimizer()
    second = attach(other_ddp, other_opt, {"type": "AdaScale"})
    assert first.policy is not second.policy


def optimizer_stepped_again(rank: int) -> None:
    model, ddp, opt = _model_and_optimizer()
    driver = attach(ddp, opt, "LinearScaling")
    _backward(ddp)
    driver.step()
    weight = model.weight.detach().clone()
    try:
        opt.step()
    finally:
        assert torch.equal(model.weight, weight), "the second step changed the weights"


def checkpoint_state_of_a_fresh_optimizer(rank: int) -> None:
    """torch.distributed.checkpoint creates a fresh optimizer's state with one step at lr 0: let through."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, ddp, opt = _model_and_optimizer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    attach(ddp, opt, "LinearScaling")
    weight = model.weight.detach().clone()
    _, optimizer_state = get_state_dict(ddp, opt)
    assert optimizer_state["state"] and torch.equal(model.weight, weight) and opt.param_groups[0]["lr"] == 0.2


def scaler_stepped_again(rank: int) -> None:
    model, ddp, opt = _model_and_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    driver = attach(ddp, opt, "LinearScaling", grad_scaler=scaler)
    scaler.scale(ddp(torch.ones(1, 2)).sum()).backward()
    driver.step()
    scaler.step(opt)


def step_lr_beside_the_policy(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    driver = attach(ddp, opt, "LinearScaling")
    torch_scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        _backward(ddp)
        driver.step()
        torch_scheduler.step()
        opt.zero_grad()
    assert opt.param_groups[0]["lr"] == 0.05 * 2, "the torch scheduler's last change stands until the next step"


def lr_set_by_hand(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    driver = attach(ddp, opt, "LinearScaling")
    _backward(ddp)
    driver.step()
    opt.param_groups[0]["lr"] = 1e-4
    _backward(ddp)
    driver.step()
    assert opt.param_groups[0]["lr"] == 0.2, "the policy sets the lr again"


def adascale_on_adam(rank: int) -> None:
    model = torch.nn.Linear(2, 1)
    attach(DDP(model), torch.optim.Adam(model.parameters(), lr=1e-3), "AdaScale")


def adascale_on_sgd_and_adam_rule(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, "AdaScale")
    model = torch.nn.Linear(2, 1)
    attach(DDP(model), torch.optim.AdamW(model.parameters(), lr=1e-3), "AdaScaleAdam")


def autowu_groups_keep_their_ratio(rank: int) -> None:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.01}, {"params": [model.bias], "lr": 0.1}])
    ddp = DDP(model)
    driver = attach(ddp, opt, {"type": "AutoWU", "params": {"total_num_steps": 10, "warmup_min_lr": 0.001,
                                                           "warmup_max_lr": 0.1}})
    for _ in range(2):
        _backward(ddp)
        driver.step(torch.tensor(1.0))
    weight_lr, bias_lr = (group["lr"] for group in opt.param_groups)
    assert weight_lr == driver.policy.warmup_lr(1) and abs(bias_lr / weight_lr - 10) < 1e-12, (weight_lr, bias_lr)


STATE_HINT = "pass the dict from driver.state_dict() (it has 'policy' and 'base_lrs')"


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
     {0: "ScalingWarning: 1 backward pass(es) in this step, but accumulation_steps is 4: the policy's scale and "
         "statistics assume 4 (run that many micro-batches per step, or pass the accumulation you run); an "
         "error if it happens 3 steps in a row"}),
    ("step() before any backward (LinearScaling)", step_before_backward,
     {0: "RuntimeError: no backward pass since the last step: call loss.backward()"}),
    ("a loss vector passed to driver.step", loss_vector,
     {0: "ValueError: the loss given to the step must be one number (the batch's mean loss), got a tensor of "
         "shape (4,)"}),
    ("attach twice", attach_twice, {0: "ValueError: this optimizer already follows policy 'LinearScaling'"}),
    ("lr = 0", zero_lr, {0: "ScalingWarning: a param group has lr 0: policy 'LinearScaling' multiplies it, so that "
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
    ("the policy's own state given to the driver", policy_state_to_driver,
     {0: "ValueError: driver state: got a policy's own state (policy.state_dict(), keys ['accumulation_steps', "
         f"'factor', 'format', 'gain', 'policy', 'progress', 'statistics', 'steps', 'warned_single', 'world_size']): "
         f"{STATE_HINT}, not the policy's own state"}),
    ("optimizer.state_dict() given to the driver", optimizer_state_to_driver,
     {0: "ValueError: driver state: got an optimizer's state (optimizer.state_dict(), keys ['param_groups', "
         f"'state']): {STATE_HINT}, not optimizer.state_dict()"}),
    ("a driver state whose statistics lack scale", damaged_statistics_to_driver,
     {0: "ValueError: policy state: statistics has no 'scale' entry (it has ['last_update_skipped', 'mu_sq', "
         "'sigma_sq']; the state is damaged or was edited: load the dict state_dict() returned, unchanged)"}),
    ("a driver state with progress NaN", nan_progress_to_driver,
     {0: "ValueError: policy state: progress = nan: must be a finite number >= 0"}),
    ("a driver state with a NaN base lr", nan_base_lr_to_driver,
     {0: "ValueError: driver state: base_lrs[0] = nan: must be a finite number >= 0"}),
    ("one policy instance attached to two optimizers", policy_instance_twice,
     {0: "ValueError: this AdaScale policy instance already drives another optimizer: build one policy per "
         "optimizer (pass the name 'AdaScale' or a spec dict {'type': 'AdaScale', 'params': {...}}, which builds a "
         "fresh policy for each optimizer, or a new AdaScale(...) instance)"}),
    ("one policy spec attached to two optimizers", policy_name_twice, {0: "no error", 1: "no error"}),
    ("optimizer.step() after driver.step()", optimizer_stepped_again,
     {0: "RuntimeError: optimizer.step() was called outside driver.step(), which already steps this optimizer "
         "(through the grad scaler when attach was given one): a second step would apply the update twice, at twice "
         "the policy's learning rate. Remove the optimizer.step() (or scaler.step(optimizer)) call: driver.step() "
         "replaces it"}),
    ("torch.distributed.checkpoint's get_state_dict on a fresh optimizer", checkpoint_state_of_a_fresh_optimizer,
     {0: "no error", 1: "no error"}),
    ("scaler.step(optimizer) after driver.step() with the scaler attached", scaler_stepped_again,
     {0: "RuntimeError: optimizer.step() was called outside driver.step()"}),
    ("a torch StepLR beside the policy", step_lr_beside_the_policy,
     {0: "ScalingWarning: param group 0's lr was set to 0.1 outside policy 'LinearScaling', which had set 0.2: the "
         "policy sets every group's lr at each step, so that change is undone. Shape the learning rate with the "
         "policy's own schedule (params 'schedule', docs/policies.md) instead of a torch LR scheduler or a hand-set "
         "lr\nno error"}),
    ("an lr set by hand mid-run", lr_set_by_hand,
     {0: "ScalingWarning: param group 0's lr was set to 0.0001 outside policy 'LinearScaling', which had set 0.2"}),
    ("AdaScale on Adam", adascale_on_adam,
     {0: "ScalingWarning: policy 'AdaScale' multiplies the learning rate by its gain, the rule derived for SGD, but "
         "the optimizer is Adam: for Adam-type optimizers (Adam, AdamW, LAMB) use 'AdaScaleAdam', which multiplies "
         "it by √gain\nno error"}),
    ("AdaScale on SGD and AdaScaleAdam on AdamW: no advice", adascale_on_sgd_and_adam_rule,
     {0: "ScalingWarning: AdaScaleAdam is experimental: the AdaScale paper validated SGD only; this applies lr × "
         "√gain (the square-root rule for adaptive optimizers) with the SGD gain estimator\nno error"}),
    ("AutoWU with param groups at 0.01 and 0.1", autowu_groups_keep_their_ratio, {0: "no error", 1: "no error"}),
]


def run_case(rank: int, world: int, case) -> str:
    """The case's exception as ``"Type: message"`` (or "no error") after the warnings it showed (``"Category:
    message"``) and logged (``"LEVEL message"``), one per line."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(f"{record.levelname} {record.getMessage()}")
    logging.getLogger("scaling_plugins").addHandler(handler)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        try:
            case(rank)
            outcome = "no error"
        except Exception as err:  # noqa: BLE001 - the test asserts on the type and message
            outcome = f"{type(err).__name__}: {err}"
    logging.getLogger("scaling_plugins").removeHandler(handler)
    return "\n".join([*(f"{w.category.__name__}: {w.message}" for w in shown), *records, outcome])


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
    check_resumed_at_new_scale(policy, saved, resumed, 2)


# -- the warnings meant for the user reach a bare `python train.py` --------------------------------------------------
SHOWN = [  # (the line of tests/ddp_scripts/mistakes.py it names, the start of the warning), in order
    ('driver = attach(ddp, frozen', "a param group has lr 0: policy 'AdaScale' multiplies it, so that group does "
                                    "not train"),
    ("driver.step()", "AdaScale: one gradient per step (1 worker, no accumulation) has no measurable variance; using "
                      "gain 1"),
    ("driver.step()", "policy 'AdaScale' is done (budget total_num_steps=2 reached, progress 2) but training goes on: "
                      "stop the loop when .done is true"),
    ("driver.step()", "param group 0's lr was set to 0.0001 outside policy 'AdaScale', which had set 0.1"),
    ("driver.step()", "1 backward pass(es) in this step, but accumulation_steps is 2"),
    ('attach(DDP(model), torch.optim.Adam', "policy 'AdaScale' multiplies the learning rate by its gain, the rule "
                                           "derived for SGD, but the optimizer is Adam"),
]


def test_the_warnings_meant_for_the_user_show_with_no_logging_set_up():
    script = REPO / "tests" / "ddp_scripts" / "mistakes.py"
    lines = script.read_text().splitlines()
    stderr = run_command([str(VENV_BIN / "python"), str(script), str(free_port())], timeout=120).stderr
    shown = re.findall(r"mistakes\.py:(\d+): ScalingWarning: (.*)", stderr)
    assert len(shown) == len(SHOWN), stderr
    for (line, message), (code, start) in zip(shown, SHOWN):
        assert message.startswith(start) and lines[int(line) - 1].strip().startswith(code), (line, message)
