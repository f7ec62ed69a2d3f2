"""The drop-in promise (2 ranks): ``python dropin.py OUT_DIR [all|process_sets]``.

Each set-up trains the same model (seeded alike on both ranks, different data per rank) for ``STEPS`` steps with
``hvd.DistributedOptimizer`` and with ``sph.DistributedOptimizer`` under a unit-factor policy that still runs the
whole harvest (AdaScale with scale 1: its gain (σ²+μ²)/(σ²/1+μ²) is clipped to [1, 1], so exactly 1.0), and
records whether every parameter is bit-identical. ``all`` also checks the switch-over: a plain Horovod or plain
torch optimizer state loaded into ours. ``process_sets`` runs only the process-set set-ups (the MPI launch).
Each rank writes ``OUT_DIR/rank{r}.json``; tests/test_horovod_dropin.py asserts on them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import horovod.torch as hvd
import torch

import scaling_plugins.backends.horovod as sph
from scaling_plugins import ScalingWarning

STEPS = 3
UNIT = {"type": "AdaScale", "params": {"scale": 1}}
LR = 0.05


class Net(torch.nn.Module):
    """An embedding (sparse or not), a trunk, a branch that can be skipped and a head."""

    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(12, 6, sparse=sparse)
        self.trunk, self.branch, self.head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)

    def forward(self, tokens: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        h = torch.tanh(self.trunk(self.embed(tokens)))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


def loss_of(model: Net, step: int, micro: int = 0, use_branch: bool = True) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + 10 * hvd.rank() + micro)
    tokens = torch.randint(0, 12, (5,), generator=generator)     # repeated tokens: sparse gradients coalesce
    target = torch.randn(5, 1, generator=generator)
    return torch.nn.functional.mse_loss(model(tokens, use_branch), target)


class Setup:
    """How one set-up builds its optimizer's arguments and runs its steps."""

    def __init__(self, sparse: bool = False, passes: int = 1, momentum: float = 0.9,
                 kwargs: Optional[Callable[[Net], dict]] = None, loop: str = "plain",
                 process_set: Optional[Callable[[], Any]] = None) -> None:
        self.sparse, self.passes, self.momentum, self.loop = sparse, passes, momentum, loop
        self.kwargs = kwargs or (lambda model: {})
        self.process_set = process_set


def train(setup: Setup, make: Callable[..., torch.optim.Optimizer], ours: bool) -> tuple[Net, Any]:
    torch.manual_seed(0)
    model = Net(setup.sparse)
    kwargs = setup.kwargs(model)
    if setup.process_set is not None:
        kwargs["process_set"] = setup.process_set()
    if setup.passes != 1:
        kwargs["backward_passes_per_step"] = setup.passes
    if ours:
        kwargs["policy"] = UNIT
    opt = make(torch.optim.SGD(model.parameters(), lr=LR, momentum=setup.momentum),
               named_parameters=model.named_parameters(), **kwargs)
    for step in range(STEPS):
        use_branch = not (setup.loop == "branch" and (step, hvd.rank()) == (1, 1))
        for micro in range(setup.passes):
            loss = loss_of(model, step, micro, use_branch) / setup.passes
            loss.backward()
        if setup.loop == "clip":
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            with opt.skip_synchronize():
                opt.step()
        elif ours:
            opt.step(loss=loss.detach())
        else:
            opt.step()
        if setup.loop == "inplace_zero":
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()
        else:
            opt.zero_grad()
    return model, opt


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def compare(setup: Setup) -> dict:
    plain, _ = train(setup, hvd.DistributedOptimizer, ours=False)
    mine, opt = train(setup, sph.DistributedOptimizer, ours=True)
    result = {"identical": all(torch.equal(a, b) for a, b in zip(plain.parameters(), mine.parameters())),
              "digest_hvd": digest(plain), "digest_ours": digest(mine), "active": opt.scaling.active,
              "gain": opt.gain, "lr": opt.lr, "metrics": sorted(opt.metrics())}
    if opt.scaling.active:
        statistics = opt.scaling.policy.statistics
        result.update(steps=opt.scaling.policy.steps, world_size=opt.scaling.world_size,
                      sigma_sq=statistics.sigma_sq, mu_sq=statistics.mu_sq)
    return result


class Records(logging.Handler):
    """The package logger's records, for counting its info lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self, level: int) -> list[str]:
        lines = [r.getMessage() for r in self.records if r.levelno == level]
        self.records.clear()
        return lines


def momentum_buffers(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [opt.state[p]["momentum_buffer"] for group in opt.param_groups for p in group["params"]]


def switch_over(plain_hvd: bool) -> dict:
    """A plain Horovod (or torch) job trains 2 steps and saves; our optimizer loads that state and the job goes on
    for one step, beside the plain job going on: the same weights."""
    torch.manual_seed(0)
    model = Net()
    plain = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    if plain_hvd:
        plain = hvd.DistributedOptimizer(plain, named_parameters=model.named_parameters())
    for step in range(2):
        loss_of(model, step).backward()
        if not plain_hvd:          # a plain torch job: average the gradients itself
            for i, p in enumerate(model.parameters()):
                p.grad = hvd.allreduce(p.grad, op=hvd.Average, name=f"switch.{step}.{i}")
        plain.step()
        plain.zero_grad()
    saved_state, saved_weights = copy.deepcopy(plain.state_dict()), copy.deepcopy(model.state_dict())
    loss_of(model, 2).backward()
    if not plain_hvd:
        for i, p in enumerate(model.parameters()):
            p.grad = hvd.allreduce(p.grad, op=hvd.Average, name=f"switch.2.{i}")
    plain.step()

    resumed = Net()
    resumed.load_state_dict(saved_weights)
    ours = sph.DistributedOptimizer(torch.optim.SGD(resumed.parameters(), lr=LR, momentum=0.9),
                                    named_parameters=resumed.named_parameters(), policy=UNIT)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        ours.load_state_dict(saved_state)
    buffers_equal = all(torch.equal(a, b) for a, b in zip(momentum_buffers(ours), [
        saved_state["state"][i]["momentum_buffer"] for i in sorted(saved_state["state"])]))
    fresh = {"steps": ours.scaling.policy.steps, "progress": ours.progress, "gain": ours.gain, "lr": ours.lr}
    loss_of(resumed, 2).backward()
    ours.step()
    return {"warnings": [str(w.message) for w in shown if w.category is ScalingWarning],
            "buffers_equal": buffers_equal, "fresh": fresh,
            "identical": all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters())),
            "has_entry": "scaling_plugins" in ours.state_dict()}


def outside_rank(records: Records, process_set: Any) -> dict:
    """A scaled policy (LinearScaling ×4) on a process set: its factor applies inside only; outside, the
    learning rate is the user's, step(loss=...) works, no collective, and the state round-trips."""
    torch.manual_seed(0)
    model = Net()
    records.take(logging.INFO)
    opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
                                   named_parameters=model.named_parameters(), process_set=process_set,
                                   policy={"type": "LinearScaling", "params": {"scale": 4}})
    infos = [line for line in records.take(logging.INFO) if "not driven" in line]
    lr_at_construction = opt.lr
    for step in range(2):
        loss = loss_of(model, step)
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
    state = opt.state_dict()
    opt.load_state_dict(copy.deepcopy(state))
    return {"active": opt.scaling.active, "lr_at_construction": lr_at_construction, "lr": opt.lr,
            "metrics": opt.metrics(), "infos": infos, "has_entry": "scaling_plugins" in state,
            "reloaded_lr": opt.lr, "steps": opt.scaling.policy.steps}


def setups(group: str, first: Any, second: Any) -> dict[str, Setup]:
    """The set-ups (process sets: ``first`` = [0], ``second`` = [1], registered on every rank)."""
    process_sets = {
        "process_set_rank0": Setup(process_set=lambda: first),          # rank 0 inside, rank 1 outside
        "process_set_even_odd": Setup(process_set=lambda: first if hvd.rank() % 2 == 0 else second),
    }
    if group == "process_sets":
        return process_sets
    return {
        "default": Setup(),
        "backward_passes_2": Setup(passes=2),
        "groups_2": Setup(kwargs=lambda model: {"groups": 2}),
        "groups_list": Setup(kwargs=lambda model: {"groups": [[model.trunk.weight, model.trunk.bias],
                                                              [model.head.weight, model.branch.weight]]}),
        "fp16": Setup(kwargs=lambda model: {"compression": hvd.Compression.fp16}),
        "op_sum": Setup(kwargs=lambda model: {"op": hvd.Sum}),
        "predivide_2": Setup(kwargs=lambda model: {"gradient_predivide_factor": 2.0}),
        "sync_clip_skip": Setup(loop="clip"),
        "inplace_zero": Setup(loop="inplace_zero"),
        "branch_skipped": Setup(loop="branch"),
        "sparse": Setup(sparse=True, momentum=0.0),
        "sparse_as_dense": Setup(sparse=True, momentum=0.0, kwargs=lambda model: {"sparse_as_dense": True}),
        **process_sets,
    }


def main() -> None:
    out_dir = Path(sys.argv[1])
    group = sys.argv[2] if len(sys.argv) > 2 else "all"
    hvd.init(process_sets="dynamic")
    first, second = hvd.add_process_set([0]), hvd.add_process_set([1])   # every rank registers both
    records = Records()
    package_log = logging.getLogger("scaling_plugins")
    package_log.addHandler(records)
    package_log.setLevel(logging.INFO)
    results: dict[str, Any] = {"size": hvd.size(), "rank": hvd.rank(),
                               "setups": {name: compare(setup) for name, setup in setups(group, first, second).items()},
                               "outside": outside_rank(records, first)}
    if group == "all":
        results["switch_over"] = {"horovod": switch_over(plain_hvd=True), "torch": switch_over(plain_hvd=False)}
    (out_dir / f"rank{hvd.rank()}.json").write_text(json.dumps(results, indent=1))
    hvd.barrier()       # rank 1, outside [0], finishes first: its shutdown would end rank 0's set collectives
    hvd.shutdown()


if __name__ == "__main__":
    main()
