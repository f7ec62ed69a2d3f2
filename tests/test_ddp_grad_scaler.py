"""DDP with torch.amp.GradScaler (attach(..., grad_scaler=scaler)), 2 gloo ranks on CPU: the statistics are in
unscaled units (the gains equal an unscaled run's), and an overflow on one rank skips the step on every rank,
leaving the parameters and the policy as they were."""
import math

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins.backends.ddp import attach
from tests.distributed import run_ranks

POISONED = "poisoned"


def run(rank, world, keys, scaled):
    """One step per entry of ``keys`` (the data of step k is drawn from k and the rank; ``POISONED`` puts an inf
    into rank 1's input of that step); per step: gain, lr, policy steps, τ, whether any parameter changed."""
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16) if scaled else None
    driver = attach(model, optimizer, "AdaScale", grad_scaler=scaler)
    record = []
    for key in keys:
        gen = torch.Generator().manual_seed(100 * (3 if key == POISONED else key) + rank)
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
        if key == POISONED and rank == 1:
            x[0, 0] = math.inf
        loss = torch.nn.functional.mse_loss(model(x), y)
        (scaler.scale(loss) if scaled else loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        driver.step()
        optimizer.zero_grad()
        record.append({"gain": driver.gain, "lr": driver.lr, "steps": driver.policy.steps, "progress": driver.progress,
                       "changed": any(not torch.equal(b, p) for b, p in zip(before, model.parameters())),
                       "sigma_sq": driver.metrics()["sigma_sq"], "skipped": driver.skipped_steps,
                       "params": [p.detach().clone() for p in model.parameters()]})
    return record


def test_scaled_gradients_give_the_unscaled_gains():
    plain = run_ranks(run, 2, [0, 1, 2, 4], False)
    scaled = run_ranks(run, 2, [0, 1, 2, 4], True)
    for mine, theirs in zip(scaled[0], plain[0]):
        assert mine["gain"] == pytest.approx(theirs["gain"], rel=1e-9)
        assert mine["sigma_sq"] == pytest.approx(theirs["sigma_sq"], rel=1e-9)   # true units, not × 2^32
        assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-9)
    assert max(step["gain"] for step in plain[0]) > 1.0


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank_and_the_policy_stays():
    poisoned = run_ranks(run, 2, [0, 1, POISONED, 2, 4], True)
    reference = run_ranks(run, 2, [0, 1, 2, 4], True)
    for rank in (0, 1):
        steps = poisoned[rank]
        skipped = steps[2]
        assert not skipped["changed"] and skipped["skipped"] == 1
        assert (skipped["steps"], skipped["progress"], skipped["gain"]) == (
            steps[1]["steps"], steps[1]["progress"], steps[1]["gain"])
        after = [steps[k] for k in (0, 1, 3, 4)]
        for mine, theirs in zip(after, reference[rank]):
            assert mine["gain"] == pytest.approx(theirs["gain"], rel=1e-9)
            assert mine["progress"] == theirs["progress"]
            for a, b in zip(mine["params"], theirs["params"]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [s["gain"] for s in poisoned[0]] == [s["gain"] for s in poisoned[1]]


def refuse_a_non_scaler(rank, world):
    model = DDP(torch.nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    errors = []
    for scaler in (object(), torch.amp.GradScaler("cpu", enabled=False)):
        try:
            attach(model, optimizer, "AdaScale", grad_scaler=scaler)
        except ValueError as err:
            errors.append(str(err))
    return errors


def test_a_grad_scaler_that_is_not_one_is_refused():
    errors = run_ranks(refuse_a_non_scaler, 2)[0]
    assert errors == ["grad_scaler must be a torch.amp.GradScaler, got object",
                      "grad_scaler is disabled (enabled=False): pass grad_scaler=None instead"]
