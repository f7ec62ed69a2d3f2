"""Bad input under Horovod (2 ranks): ``horovodrun --gloo -np 2 python bad_input.py OUT_DIR``.

Each case meets its bad input on both ranks alike; each rank writes ``OUT_DIR/rank{r}.json`` with every case's
outcome (``"Type: message"`` or "no error"); tests/test_engine_input.py asserts on the messages.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import scaling_plugins.backends.horovod as sph


def optimizer_for(case: str, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    named = [(f"{case}.{name}", p) for name, p in model.named_parameters()]
    opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named, **kwargs)
    return model, opt


def policy_differs() -> None:
    optimizer_for("policy_differs", policy="AdaScale" if hvd.rank() == 0 else "LinearScaling")


def predivide_zero() -> None:
    optimizer_for("predivide_zero", policy="AdaScale", gradient_predivide_factor=0)


def fewer_passes() -> None:
    model, opt = optimizer_for("fewer_passes", policy="AdaScale", backward_passes_per_step=2)
    for _ in range(4):
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        opt.zero_grad()


def wrapped_by_horovod() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    named = [(f"wrapped_by_horovod.{name}", p) for name, p in model.named_parameters()]
    horovod_opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named)
    sph.DistributedOptimizer(horovod_opt, named_parameters=named, policy="AdaScale")


def wrapped_twice() -> None:
    model, opt = optimizer_for("wrapped_twice", policy="AdaScale")
    sph.DistributedOptimizer(opt, named_parameters=[(f"wrapped_twice_again.{name}", p)
                                                    for name, p in model.named_parameters()], policy="AdaScale")


def adascale_on_adam() -> None:
    """Warned about on stderr (no logging set up here): AdaScale's rule is SGD's."""
    model = torch.nn.Linear(2, 1)
    named = [(f"adascale_on_adam.{name}", p) for name, p in model.named_parameters()]
    sph.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), named_parameters=named, policy="AdaScale")


def stepped_twice() -> None:
    """opt.step() twice after one backward pass: the second has no reduced gradients to apply."""
    model, opt = optimizer_for("stepped_twice", policy="AdaScale")
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    opt.step()


CASES = (policy_differs, predivide_zero, fewer_passes, wrapped_by_horovod, wrapped_twice, adascale_on_adam,
         stepped_twice)


def outcome(case) -> str:
    try:
        case()
    except Exception as err:  # noqa: BLE001 - the test asserts on the type and message
        return f"{type(err).__name__}: {err}"
    return "no error"


if __name__ == "__main__":
    hvd.init()
    results = {case.__name__: outcome(case) for case in CASES}
    Path(sys.argv[1], f"rank{hvd.rank()}.json").write_text(json.dumps(results))
