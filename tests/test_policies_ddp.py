"""The fixed scaling rules, AdaScaleAdam and AutoWU driving a real 2-rank DDP run (gloo): the rules' learning
rates equal their own trajectories at k = 2 ranks × 2 micro-batches, AdaScaleAdam applies base_lr·√gain to Adam,
a ModelEMA stays identical on both ranks, and AutoWU, fed driver.step(loss), switches at the same step on both
ranks."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from scaling_plugins.backends import ddp
from scaling_plugins.ema import ModelEMA

from .distributed import run_ranks
from .policy_cases import (ACCUMULATION, AUTOWU, BASE_LR, RULES, STEPS, Quadratic, check_autowu_run,
                           check_rule_run)


def _train_rules(rank: int, world: int) -> dict:
    results = {}
    for name, spec in RULES.items():
        torch.manual_seed(0)
        model = DistributedDataParallel(torch.nn.Linear(4, 1))
        optimizer = (torch.optim.Adam if name == "AdaScaleAdam" else torch.optim.SGD)(model.parameters(), lr=BASE_LR)
        driver = ddp.attach(model, optimizer, spec, accumulation_steps=ACCUMULATION)
        ema = ModelEMA(model, momentum=0.9, kappa=driver.scale)
        data = torch.Generator().manual_seed(100 + rank)
        lrs, gains = [], []
        for _ in range(STEPS):
            for micro in range(ACCUMULATION):
                x = torch.randn(8, 4, generator=data)
                with model.no_sync() if micro < ACCUMULATION - 1 else contextlib.nullcontext():
                    ((model(x) - x.sum(1, keepdim=True)).pow(2).mean() / ACCUMULATION).backward()
            driver.step()
            optimizer.zero_grad()
            ema.update(model)
            lrs.append(driver.lr)
            gains.append(driver.gain)
        results[name] = {"lrs": lrs, "gains": gains, "scale": driver.scale,
                         "params": [p.detach().reshape(-1).tolist() for p in model.parameters()],
                         "ema": [p.reshape(-1).tolist() for p in ema.module.parameters()]}
    return results


def _train_autowu(rank: int, world: int) -> dict:
    model = DistributedDataParallel(Quadratic())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    driver = ddp.attach(model, optimizer, AUTOWU)
    data = torch.Generator().manual_seed(rank)
    lrs = []
    while not driver.done:
        loss = model(torch.randn(4, 20, generator=data))
        loss.backward()
        driver.step(loss)
        optimizer.zero_grad()
        lrs.append(driver.lr)
    policy = driver.policy
    return {"lrs": lrs, "switch_step": policy.switch_step, "peak_lr": policy.peak_lr, "losses": policy.losses,
            "w": model.module.w.detach().tolist()}


@pytest.fixture(scope="module")
def rule_results():
    return run_ranks(_train_rules, 2)


@pytest.mark.parametrize("name", sorted(RULES))
def test_rule_learning_rates(rule_results, name):
    check_rule_run(name, *(results[name] for results in rule_results))


def test_autowu_switches_at_the_same_step_on_both_ranks():
    check_autowu_run(*run_ranks(_train_autowu, 2))
