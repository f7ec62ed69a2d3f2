"""Bad input, one row per case (issue 16): each gets a clear error or a documented, logged fallback, never a silent
wrong learning rate, a hang or a traceback from deep inside. Every row asserts the message.

- SCHEMA: policy and schedule params, in the API (the same code builds the DeepSpeed entry and check-config);
- RANK_CASES: DDP on 2 real gloo ranks, where both ranks meet the same bad input; each rank's message;
- the cases that need their own job (one rank differs from the other, a resume on another world size), and
  Horovod's and DeepSpeed's under their real launchers.
"""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins import POLICIES, AdaScale, build_policy
from scaling_plugins.backends.ddp import attach
from tests.distributed import REPO, VENV_BIN, run_command, run_ranks

INF = float("inf")

SCHEMA = [  # (id, policy entry, fragment of the error message)
    ("scale Infinity", {"type": "AdaScale", "params": {"scale": INF}},
     "params: scale = inf (float): must be a finite number"),
    ("scale NaN", {"type": "LinearScaling", "params": {"scale": math.nan}},
     "params: scale = nan (float): must be a finite number"),
    ("AutoWU warmup_max_lr Infinity", {"type": "AutoWU", "params": {"total_num_steps": 10, "warmup_max_lr": INF}},
     "params: warmup_max_lr = inf (float): must be a finite number"),
    ("scale as a string", {"type": "AdaScale", "params": {"scale": "8"}},
     "params: scale = '8' (str): must be a finite number"),
    ("smoothing as a string", {"type": "AdaScale", "params": {"smoothing": "0.9"}},
     "params: smoothing = '0.9' (str): must be a finite number"),
    ("total_num_steps as a string", {"type": "LEGW", "params": {"total_num_steps": "100"}},
     "params: total_num_steps = '100' (str): must be a finite number"),
    ("schedule gamma as a string", {"type": "AdaScale", "params": {"schedule": {"type": "exponential", "gamma": "0.9"}}},
     "schedule 'exponential': gamma = '0.9' (str): must be a finite number"),
    ("schedule params a list", {"type": "AdaScale", "params": {"schedule": {"type": "cosine", "params": [100]}}},
     "schedule.params must be a mapping of parameter name to value, got [100]"),
    ("milestones with a string", {"type": "SqrtScaling",
                                  "params": {"schedule": {"type": "multistep", "milestones": [10, "20"]}}},
     "milestones = [10, '20'] (list): must be a list of finite numbers"),
    ("single_gradient not a string", {"type": "AdaScale", "params": {"single_gradient": 1}},
     "single_gradient = 1 (int): must be a string"),
    ("params a list", {"type": "AdaScale", "params": [1]}, "params must be a mapping, got [1]"),
]


@pytest.mark.parametrize("spec, message", [row[1:] for row in SCHEMA], ids=[row[0] for row in SCHEMA])
def test_schema_refuses_wrong_types_and_non_finite_numbers(spec, message):
    with pytest.raises(ValueError) as err:
        build_policy(spec)
    assert message in str(err.value)


def test_the_api_checks_types_the_same_way():
    with pytest.raises(ValueError, match=r"scale = inf \(float\): must be a finite number"):
        AdaScale(scale=INF)


STATES = [  # (id, policy loading, state saved by, fragment)
    ("AdaScale state into LinearScaling", "LinearScaling", "AdaScale",
     "this state was saved by policy 'AdaScale', not 'LinearScaling'"),
    ("LinearScaling state into AdaScale", "AdaScale", "LinearScaling",
     "this state was saved by policy 'LinearScaling', not 'AdaScale'"),
]


@pytest.mark.parametrize("loader, saver, message", [row[1:] for row in STATES], ids=[row[0] for row in STATES])
def test_state_of_another_policy_is_refused(loader, saver, message):
    saved = build_policy(saver).state_dict()
    with pytest.raises(ValueError) as err:
        build_policy(loader).load_state_dict(saved)
    assert message in str(err.value)


def test_state_without_format_version_is_refused():
    state = build_policy("AdaScale").state_dict()
    del state["format"]
    with pytest.raises(ValueError, match="not a scaling_plugins policy state \\(no 'policy' name and 'format'"):
        build_policy("AdaScale").load_state_dict(state)


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
    ctl = attach(ddp, opt, "AdaScale", accumulation_steps=4)
    for _ in range(5):
        _backward(ddp)
        ctl.step()
        opt.zero_grad()


def step_before_backward(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, "LinearScaling").step()


def loss_vector(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    ctl = attach(ddp, opt, {"type": "AutoWU", "params": {"total_num_steps": 10}})
    _backward(ddp)
    ctl.step(torch.ones(4))


def attach_twice(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer()
    attach(ddp, opt, "LinearScaling")
    attach(ddp, opt, "LinearScaling")


def zero_lr(rank: int) -> None:
    _, ddp, opt = _model_and_optimizer(lr=0.0)
    ctl = attach(ddp, opt, "LinearScaling")
    _backward(ddp)
    ctl.step()


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
    ("a loss vector passed to ctl.step", loss_vector,
     {0: "ValueError: the loss given to the step must be one number (the batch's mean loss), got a tensor of "
         "shape (4,)"}),
    ("attach twice", attach_twice, {0: "ValueError: this optimizer already follows policy 'LinearScaling'"}),
    ("lr = 0", zero_lr, {0: "WARNING a param group has lr 0: policy 'LinearScaling' multiplies it, so that "
                            "group does not train"}),
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
    ctl = attach(ddp, opt, "AdaScale")
    if rank == 1:
        model.weight.requires_grad_(False)
        _backward(ddp)      # DDP never launches the bucket that waits for the frozen weight
        return run_case(rank, world, lambda r: ctl.step())
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
    ctl = attach(ddp, opt, policy)
    before = {}
    if state is not None:
        ctl.load_state_dict(state)
        before = {"scale": ctl.scale, "progress": ctl.progress, "metrics": ctl.metrics()}
    data = torch.Generator().manual_seed(rank)
    for _ in range(2):
        ddp(torch.randn(1, 2, generator=data)).sum().backward()
        ctl.step()
        opt.zero_grad()
    return {"state": ctl.state_dict(), "scale": ctl.scale, "progress": ctl.progress, "gain": ctl.gain,
            "metrics": ctl.metrics(), "resumed": before}


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


# -- Horovod and DeepSpeed, under their real launchers ---------------------------------------------------------
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}
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
]
LAUNCH = {
    "horovod": lambda out: [str(VENV_BIN / "horovodrun"), "--gloo", "-np", "2", str(VENV_BIN / "python"),
                            str(REPO / "tests" / "horovod_scripts" / "bad_input.py"), str(out)],
    "deepspeed": lambda out: [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()),
                              str(REPO / "tests" / "deepspeed_scripts" / "bad_input.py"), "--out", str(out)],
}


def _port() -> int:
    from tests.distributed import free_port

    return free_port()


@pytest.fixture(scope="module", params=sorted(LAUNCH))
def engine_outcomes(request, tmp_path_factory) -> tuple[str, list[dict]]:
    if request.param == "horovod":
        pytest.importorskip("horovod.torch", reason="Horovod is not installed: run `make horovod`")
    out = tmp_path_factory.mktemp(request.param)
    run_command(LAUNCH[request.param](out), timeout=300, env={**MPI_ENV, "DS_ACCELERATOR": "cpu"})
    return request.param, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_engine_bad_input(engine_outcomes):
    engine, ranks = engine_outcomes
    rows = [row for row in ENGINE_CASES if row[1] == engine]
    assert rows
    for _, _, case, expected in rows:
        for rank, fragment in expected.items():
            assert fragment in ranks[rank][case], (case, ranks[rank][case])
