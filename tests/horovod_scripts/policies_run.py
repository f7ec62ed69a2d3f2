"""The fixed scaling rules, AdaScaleAdam and AutoWU through the Horovod backend (2 ranks):
``python policies_run.py OUT_DIR`` under ``horovodrun --gloo -np 2``. Each fixed rule's and AdaScaleAdam's
learning rates over a few steps with 2 backward passes per step, and a full AutoWU run with the loss given to
``opt.step(loss=loss)``. Each rank writes ``OUT_DIR/rank{r}.json``; tests/test_policies_horovod.py asserts on them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import scaling_plugins.backends.horovod as sph
from tests.policy_cases import ACCUMULATION, AUTOWU, BASE_LR, RULES, STEPS, Quadratic


def rules() -> dict:
    results = {}
    for name, spec in RULES.items():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        inner = (torch.optim.Adam if name == "AdaScaleAdam" else torch.optim.SGD)(model.parameters(), lr=BASE_LR)
        opt = sph.DistributedOptimizer(inner, named_parameters=[(f"{name}.{n}", p) for n, p in model.named_parameters()],
                                       policy=spec, backward_passes_per_step=ACCUMULATION)
        data = torch.Generator().manual_seed(100 + hvd.rank())
        lrs, gains = [], []
        for _ in range(STEPS):
            for _ in range(ACCUMULATION):
                x = torch.randn(8, 4, generator=data)
                ((model(x) - x.sum(1, keepdim=True)).pow(2).mean() / ACCUMULATION).backward()
            opt.step()
            opt.zero_grad()
            lrs.append(opt.lr)
            gains.append(opt.gain)
        results[name] = {"lrs": lrs, "gains": gains, "scale": opt.scale,
                         "params": [p.detach().reshape(-1).tolist() for p in model.parameters()]}
    return results


def autowu() -> dict:
    model = Quadratic()
    opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                   named_parameters=[("autowu.w", model.w)], policy=AUTOWU)
    data = torch.Generator().manual_seed(hvd.rank())
    lrs = []
    while not opt.done:
        loss = model(torch.randn(4, 20, generator=data))
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
        lrs.append(opt.lr)
    policy = opt.scaling.policy
    return {"lrs": lrs, "switch_step": policy.switch_step, "peak_lr": policy.peak_lr, "losses": policy.losses,
            "w": model.w.detach().tolist()}


def main() -> None:
    hvd.init()
    results = {"rules": rules(), "autowu": autowu()}
    (Path(sys.argv[1]) / f"rank{hvd.rank()}.json").write_text(json.dumps(results))
    hvd.shutdown()


if __name__ == "__main__":
    main()
