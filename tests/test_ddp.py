"""The DDP backend on real gloo process groups (spawned ranks): golden gains, accumulation, the noisy quadratic,
agreement across ranks, resume, collectives, bad input."""
import copy
import gc
import math
import weakref

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins.backends.ddp import attach
from tests.distributed import run_ranks

GOLDEN = {  # one input per rank into Linear(2, 2) with bias, loss = output.sum(): first-step gain
    "orthogonal": ([[1.0, 0.0], [0.0, 1.0]], 4 / 3),
    "identical": ([[1.0, 1.0], [1.0, 1.0]], 1.0),
    "opposite": ([[-1.0, 1.0], [1.0, -1.0]], 2.0),
}


def golden_first_step(rank, world, inputs, unused_branch):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 2)})
    if unused_branch:
        model["unused"] = torch.nn.Linear(3, 3)
    ddp = DDP(_Used(model), find_unused_parameters=unused_branch)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    driver = attach(ddp, optimizer, {"type": "AdaScale", "params": {}})
    before = model["used"].bias.detach().clone()
    ddp(torch.tensor([inputs[rank]])).sum().backward()
    driver.step()
    applied_lr = ((before - model["used"].bias.detach()) / model["used"].bias.grad).mean().item()
    return {"gain": driver.gain, "lr": driver.lr, "applied_lr": applied_lr, "scale": driver.scale}


class _Used(torch.nn.Module):
    """Only the "used" branch takes part; the other's parameters keep grad None."""

    def __init__(self, modules):
        super().__init__()
        self.modules_ = modules

    def forward(self, x):
        return self.modules_["used"](x)


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden_first_step_gain(case):
    inputs, gain = GOLDEN[case]
    results = run_ranks(golden_first_step, 2, inputs, False)
    for r in results:
        assert r["gain"] == pytest.approx(gain, rel=1e-6)
        assert r["lr"] == pytest.approx(0.1 * gain, rel=1e-6)
        assert r["applied_lr"] == pytest.approx(0.1 * gain, rel=1e-5)   # what the optimizer really used
        assert r["scale"] == 2
    assert results[0] == results[1]


def test_parameters_without_gradient_are_fine():
    inputs, gain = GOLDEN["orthogonal"]
    for r in run_ranks(golden_first_step, 2, inputs, True):
        assert r["gain"] == pytest.approx(gain, rel=1e-6)


def one_hot_accumulation(rank, world, loss_reduction):
    model = DDP(torch.nn.Linear(4, 2, bias=False))
    driver = attach(model, torch.optim.SGD(model.parameters(), lr=1.0), "AdaScale", accumulation_steps=2,
                 loss_reduction=loss_reduction)
    divisor = 2 if loss_reduction == "mean" else 1
    for micro in range(2):
        x = torch.nn.functional.one_hot(torch.tensor([2 * rank + micro]), 4).float()
        if micro == 0:
            with model.no_sync():
                (model(x).sum() / divisor).backward()
        else:
            (model(x).sum() / divisor).backward()
    driver.step()
    return driver.gain, driver.scale


@pytest.mark.parametrize("loss_reduction", ["mean", "sum"])
def test_four_one_hot_micro_batches_give_gain_equal_to_scale(loss_reduction):
    for gain, scale in run_ranks(one_hot_accumulation, 2, loss_reduction):
        assert scale == 4
        assert gain == pytest.approx(4.0, rel=1e-6)


def noisy_quadratic(rank, world, scale, dim, nu, mu_sq, steps):
    """f(w) = ½‖w − x‖², x ~ N(0, νI), one sample per micro-batch: σ² = dν, μ² = ‖w‖², lr 0 keeps w fixed."""
    accumulation = scale // world
    w = torch.full((dim,), math.sqrt(mu_sq / dim))
    model = DDP(_Quadratic(w))
    driver = attach(model, torch.optim.SGD(model.parameters(), lr=0.0), "AdaScale", accumulation_steps=accumulation)
    gen = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps):
        for micro in range(accumulation):
            x = torch.randn(dim, generator=gen) * math.sqrt(nu)
            if micro < accumulation - 1:
                with model.no_sync():
                    (model(x) / accumulation).backward()
            else:
                (model(x) / accumulation).backward()
        driver.step()
        model.zero_grad()
    return driver.gain, driver.policy.statistics.sigma_sq, driver.policy.statistics.mu_sq


class _Quadratic(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return 0.5 * (self.w - x).pow(2).sum()


@pytest.mark.parametrize("scale, mu_sq", [(4, 16.0), (16, 4.0)])
def test_noisy_quadratic_gain_within_five_percent_of_exact(scale, mu_sq):
    dim, nu = 64, 1.0
    sigma_sq = dim * nu
    exact = (sigma_sq + mu_sq) / (sigma_sq / scale + mu_sq)
    results = run_ranks(noisy_quadratic, 2, scale, dim, nu, mu_sq, 400)
    gain, est_sigma_sq, est_mu_sq = results[0]
    assert results[0] == results[1]
    assert abs(gain - exact) / exact < 0.05, (gain, exact, est_sigma_sq, est_mu_sq)


def random_run(rank, world, steps, resume_at, state):
    """SGD with momentum on random data seeded by (rank, step); optionally restored from ``state`` at step
    ``resume_at``. Returns the learning rates, gains and a checkpoint taken after step ``resume_at``."""
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    driver = attach(model, optimizer,
                 {"type": "AdaScale", "params": {"schedule": {"type": "cosine", "total_num_steps": 40}}},
                 accumulation_steps=2)
    start = 0
    if state is not None:
        model.module.load_state_dict(state["model"][rank])
        optimizer.load_state_dict(state["optimizer"][rank])
        driver.load_state_dict(state["driver"][rank])
        start = resume_at
    lrs, gains, checkpoint = [], [], None
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(100 * step + rank)
        for micro in range(2):
            x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 1, generator=gen)
            loss = torch.nn.functional.mse_loss(model(x), y) / 2
            if micro == 0:
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
        driver.step()
        optimizer.zero_grad()
        lrs.append(driver.lr)
        gains.append(driver.gain)
        if step + 1 == resume_at:
            checkpoint = copy.deepcopy({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                                        "driver": driver.state_dict()})
    return lrs, gains, checkpoint


def test_every_rank_gets_the_same_gain_bit_for_bit_and_resume_is_exact():
    full = run_ranks(random_run, 2, 12, 5, None)
    (lrs0, gains0, ckpt0), (lrs1, gains1, ckpt1) = full
    assert lrs0 == lrs1 and gains0 == gains1
    assert len(set(gains0)) > 3 and all(1.0 <= g <= 4.0 for g in gains0)
    state = {"model": [ckpt0["model"], ckpt1["model"]], "optimizer": [ckpt0["optimizer"], ckpt1["optimizer"]],
             "driver": [ckpt0["driver"], ckpt1["driver"]]}
    resumed = run_ranks(random_run, 2, 12, 5, state)
    assert resumed[0][0] == lrs0[5:] and resumed[1][0] == lrs1[5:]


def count_collectives(rank, world, with_policy):
    model = DDP(torch.nn.Sequential(torch.nn.Linear(4, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                                    torch.nn.ReLU(), torch.nn.Linear(512, 2)), bucket_cap_mb=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    driver = attach(model, optimizer, "AdaScale") if with_policy else None
    counts = []
    for step in range(4):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(torch.randn(3, 4)).sum().backward()
            driver.step() if driver else optimizer.step()
        counts.append(sorted(e.name for e in prof.events() if e.name.startswith("gloo:")))
    return counts


def test_collectives_per_step_equal_bare_ddp():
    bare = run_ranks(count_collectives, 2, False)[0]
    ours = run_ranks(count_collectives, 2, True)[0]
    assert ours == bare
    assert bare[-1].count("gloo:all_reduce") >= 2       # several buckets: the count is not trivially one


def averaging_refused(rank, world, refuse):
    """Three steps on a model of several buckets; with ``refuse`` the backend's all-reduce refuses ReduceOp.AVG as
    a backend without it does (torch's gloo before AVG support, MPI)."""
    import logging

    import torch.distributed as dist

    real_all_reduce, averaging_calls, records = dist.all_reduce, [], []

    def all_reduce_without_avg(tensor, op=dist.ReduceOp.SUM, **kwargs):
        if op == dist.ReduceOp.AVG:
            averaging_calls.append(tensor.numel())
            if refuse:
                raise RuntimeError("Cannot use ReduceOp.AVG with Gloo")
        return real_all_reduce(tensor, op=op, **kwargs)

    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("scaling_plugins.backends.ddp.harvest").addHandler(handler)
    logging.getLogger("scaling_plugins.backends.ddp.harvest").setLevel(logging.INFO)
    dist.all_reduce = all_reduce_without_avg
    try:
        torch.manual_seed(0)
        model = DDP(torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                        torch.nn.ReLU(), torch.nn.Linear(256, 1)), bucket_cap_mb=0.1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        driver = attach(model, optimizer, "AdaScale")
        gains = []
        for step in range(3):
            gen = torch.Generator().manual_seed(10 * step + rank)
            model(torch.randn(4, 8, generator=gen)).pow(2).sum().backward()
            driver.step()
            optimizer.zero_grad()
            gains.append(driver.gain)
        weights = [p.detach().clone() for p in model.parameters()]
    finally:
        dist.all_reduce = real_all_reduce
    return gains, weights, averaging_calls, [r.getMessage() for r in records]


def test_a_backend_without_an_averaging_all_reduce_divides_then_sums_with_the_same_results():
    averaged = run_ranks(averaging_refused, 2, False)
    refused = run_ranks(averaging_refused, 2, True)
    for rank in range(2):
        gains, weights, calls, logs = averaged[rank]
        assert len(calls) > 3 and not logs          # every bucket of every step averaged (several after the rebuild)
        refused_gains, refused_weights, refused_calls, refused_logs = refused[rank]
        assert len(refused_calls) == 1              # refused once, never asked again
        assert len(refused_logs) == 1 and "no averaging all-reduce" in refused_logs[0]
        assert refused_gains == gains and len(set(gains)) == 3 and all(1.0 < g < 2.0 for g in gains)
        assert all(torch.equal(a, b) for a, b in zip(weights, refused_weights))   # W = 2: x/2 is exact


def nan_step(rank, world):
    model = DDP(torch.nn.Linear(2, 2))
    driver = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), "AdaScale")
    records = []
    for x in ([[1.0, 0.0], [0.0, 1.0]][rank], [float("nan"), 0.0]):
        model(torch.tensor([x])).sum().backward()
        driver.step()
        model.zero_grad()
        records.append(driver.metrics())
    return records


def test_nan_gradients_skip_the_update_and_keep_the_gain():
    for first, second in run_ranks(nan_step, 2):
        assert not first["skipped_update"] and second["skipped_update"]
        assert second["gain"] == first["gain"] == pytest.approx(4 / 3)


def single_worker(rank, world):
    model = DDP(torch.nn.Linear(2, 2))
    driver = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), "AdaScale")
    model(torch.ones(1, 2)).sum().backward()
    driver.step()
    result = driver.gain, driver.progress
    gc.disable()                    # freed by reference counting alone: the hook state makes no cycle
    alive = weakref.ref(model)
    del model, driver
    freed = alive() is None
    gc.enable()
    return result, freed


def test_single_worker_without_accumulation_uses_unit_gain_and_the_model_is_freed_without_gc():
    assert run_ranks(single_worker, 1) == [((1.0, 1.0), True)]


def bad_inputs(rank, world):
    model = DDP(torch.nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    errors = {}
    for name, call in {
        "not_ddp": lambda: attach(model.module, optimizer),
        "accumulation": lambda: attach(model, optimizer, accumulation_steps=0),
        "reduction": lambda: attach(model, optimizer, loss_reduction="avg"),
        "scale": lambda: attach(model, optimizer, {"type": "AdaScale", "params": {"scale": 0.5}}),
        "name": lambda: attach(model, optimizer, "Adascale"),
    }.items():
        try:
            call()
        except ValueError as err:
            errors[name] = str(err)
    driver = attach(model, optimizer)
    try:
        driver.step()
    except RuntimeError as err:
        errors["no_backward"] = str(err)
    return errors


def test_bad_input_gets_clear_errors():
    errors = run_ranks(bad_inputs, 2)[0]
    assert "DistributedDataParallel" in errors["not_ddp"]
    assert "accumulation_steps must be an int >= 1, got 0" in errors["accumulation"]
    assert "loss_reduction must be one of ('mean', 'sum'), got 'avg'" in errors["reduction"]
    assert "scale must be >= 1, got 0.5" in errors["scale"]
    assert "valid policies" in errors["name"] and "'AdaScale'" in errors["name"]
    assert "call loss.backward()" in errors["no_backward"]


def base_lrs_from_groups(rank, world):
    """LinearScaling (k = world = 2, no warmup): each group's rate is 2 × its own initial lr, for a group added
    after attach too; a second attach on the same optimizer is refused."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    ddp = DDP(torch.nn.Sequential(first, second))
    optimizer = torch.optim.SGD(first.parameters(), lr=0.1)
    driver = attach(ddp, optimizer, "LinearScaling")
    try:
        attach(ddp, optimizer, "LinearScaling")
        second_attach = "accepted"
    except ValueError as err:
        second_attach = str(err)
    optimizer.add_param_group({"params": list(second.parameters()), "lr": 0.05})
    ddp(torch.ones(1, 2)).sum().backward()
    before = second.bias.detach().clone()
    driver.step()
    applied = ((before - second.bias.detach()) / second.bias.grad).item()
    return {"lrs": [g["lr"] for g in optimizer.param_groups], "applied": applied, "second_attach": second_attach,
            "initial": [g["initial_lr"] for g in optimizer.param_groups], "state": driver.state_dict()["base_lrs"]}


def test_base_learning_rates_come_from_each_group():
    result = run_ranks(base_lrs_from_groups, 2)[0]
    assert result["lrs"] == pytest.approx([0.2, 0.1], rel=1e-12)
    assert result["applied"] == pytest.approx(0.1, rel=1e-6)
    assert result["initial"] == result["state"] == [0.1, 0.05]
    assert "already follows policy 'LinearScaling'" in result["second_attach"]
