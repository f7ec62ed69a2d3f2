"""Unusual training loops under Horovod (2 ranks): ``python training_loops.py OUT_DIR``.

- ``sparse``: an ``nn.Embedding(sparse=True)`` under ``sparse_as_dense=True``: the local norm of each sparse
  gradient is read from its coalesced values before Horovod densifies it;
- ``sam``: SAM's two passes, the first under ``opt.extra_backward()`` and reduced by Horovod (then
  ``synchronize()``, as Horovod needs between two backward passes of one step);
- ``penalty``: a gradient penalty taken with ``torch.autograd.grad`` with respect to the parameters.

Every step records what the test needs to recompute the gain offline (AdaScale without smoothing): this rank's
Σ‖g‖² of the step's own pass, captured by the script's own tensor hooks (sparse gradients densified), and the
reduced gradient's ‖·‖² the optimizer applied. Each rank writes ``OUT_DIR/rank{r}.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import scaling_plugins.backends.horovod as sph
from tests.loop_checks import Capture, applied_sq_norm, sam_perturbation, shift

STEPS = 3
RAW = {"type": "AdaScale", "params": {"smoothing": 0}}


def model_and_optimizer(sparse: bool, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 4, sparse=sparse), "head": torch.nn.Linear(4, 1)})
    opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                   named_parameters=model.named_parameters(), policy=RAW, **kwargs)
    return model, opt


def loss_of(model, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * step + hvd.rank())
    tokens = torch.randint(0, 10, (6,), generator=generator)     # repeated tokens: the sparse gradient coalesces
    return model["head"](model["embed"](tokens)).pow(2).mean()


def record(model, opt, capture: Capture) -> dict:
    return {"local_sq": capture.take(), "applied_sq": applied_sq_norm(model.parameters()), "gain": opt.gain}


def single_pass_run(sparse: bool, backward, **kwargs) -> list[dict]:
    """STEPS steps of ``backward(model, step)`` (the step's one pass, captured), then ``opt.step()``."""
    model, opt = model_and_optimizer(sparse, **kwargs)
    capture = Capture(model.parameters())
    rows = []
    for step in range(STEPS):
        backward(model, step, capture)
        opt.step()
        rows.append(record(model, opt, capture))
        opt.zero_grad()
    return rows


def plain_backward(model, step: int, capture: Capture) -> None:
    capture.on = True
    loss_of(model, step).backward()
    capture.on = False


def penalty_backward(model, step: int, capture: Capture) -> None:
    """The loss plus 0.1·‖∇loss‖², the gradient taken with torch.autograd.grad (a pass that accumulates nothing)."""
    loss = loss_of(model, step)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    capture.on = True
    (loss + 0.1 * sum(g.pow(2).sum() for g in grads)).backward()
    capture.on = False


def sam_run() -> list[dict]:
    model, opt = model_and_optimizer(False)
    params = list(model.parameters())
    capture = Capture(params)
    rows = []
    for step in range(STEPS):
        with opt.extra_backward():                 # the ascent pass: finds the perturbation
            loss_of(model, step).backward()
        opt.synchronize()
        perturbation = sam_perturbation(params)
        shift(params, perturbation, 1.0)
        opt.zero_grad()
        plain_backward(model, step, capture)       # the step's own gradient, at the perturbed point
        opt.synchronize()
        shift(params, perturbation, -1.0)
        with opt.skip_synchronize():
            opt.step()
        rows.append(record(model, opt, capture))
        opt.zero_grad()
    return rows


def main() -> None:
    out_dir = Path(sys.argv[1])
    hvd.init()
    results = {"sparse": single_pass_run(True, plain_backward, sparse_as_dense=True), "sam": sam_run(),
               "penalty": single_pass_run(False, penalty_backward)}
    (out_dir / f"rank{hvd.rank()}.json").write_text(json.dumps(results))
    hvd.shutdown()


if __name__ == "__main__":
    main()
