"""The Horovod backend's checks, all in one launch (2 ranks): ``python checks.py OUT_DIR``.

Each rank writes ``OUT_DIR/rank{r}.json``; tests/test_horovod.py asserts on them. Run under
``horovodrun --gloo -np 2`` and under ``mpirun -np 2`` (with HOROVOD_TIMELINE set for the fusion check).
Parameter names carry the case name so the timeline tells the cases apart.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import scaling_plugins
import scaling_plugins.backends.horovod as sph
from scaling_plugins.config import allowed_keys


def named(model: torch.nn.Module, case: str) -> list[tuple[str, torch.nn.Parameter]]:
    return [(f"{case}.{name}", p) for name, p in model.named_parameters()]


class WithUnused(torch.nn.Module):
    """Linear(2, 2) plus a layer that gets no gradient (the fallback path: the norm is enqueued on its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def golden_gain(case: str, inputs: list[list[float]], unused: bool = False, **hvd_kwargs) -> dict:
    """Linear(2, 2) with bias, loss = output.sum(), one sample per rank, SGD: the first step's gain and lr."""
    torch.manual_seed(0)
    model = WithUnused() if unused else torch.nn.Linear(2, 2)
    opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=named(model, case), policy="AdaScale", **hvd_kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.tensor([inputs[hvd.rank()]])).sum().backward()
    opt.step()
    step = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, model.parameters())])
    reduced = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return {"gain": opt.gain, "lr": opt.lr, "scale": opt.scale,
            "applied_lr": (step[reduced != 0] / reduced[reduced != 0]).tolist()}


def one_hot_passes(loss_reduction: str, groups: int | None, set_later: bool = False) -> dict:
    """Bias-free Linear(4, 2), 2 ranks × 2 backward passes, micro-batch k of rank r is e_{2r+k} (with
    ``set_later`` the 2 passes come from ``set_backward_passes_per_step`` after construction)."""
    model = torch.nn.Linear(4, 2, bias=False)
    opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=named(model, f"onehot_{loss_reduction}_{groups}_{set_later}"),
                                   backward_passes_per_step=1 if set_later else 2, loss_reduction=loss_reduction,
                                   groups=groups)
    if set_later:
        opt.set_backward_passes_per_step(2)
    for k in range(2):
        loss = model(torch.eye(4)[2 * hvd.rank() + k].reshape(1, 4)).sum()
        (loss / 2 if loss_reduction == "mean" else loss).backward()
    opt.step()
    return {"gain": opt.gain, "scale": opt.scale}


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + hvd.rank())
    x = torch.randn(4, 8, generator=generator)
    return x, x.sum(dim=1, keepdim=True) + 0.5 * torch.randn(4, 1, generator=generator)


def train(steps: range, model: torch.nn.Module, opt: torch.optim.Optimizer, passes: int = 1) -> list[str]:
    """Momentum-SGD steps on per-rank data; the learning rate of every step, as exact hex strings."""
    lrs = []
    for step in steps:
        for _ in range(passes):
            x, y = batch(step)
            (torch.nn.functional.mse_loss(model(x), y) / passes).backward()
        opt.step()
        opt.zero_grad()
        lrs.append(float(opt.param_groups[0]["lr"]).hex())
    return lrs


def scaled_sgd(model: torch.nn.Module, case: str, **kwargs) -> torch.optim.Optimizer:
    return sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                    named_parameters=named(model, case), **kwargs)


def resume() -> dict:
    """12 steps straight, versus 6 steps, state_dict round trip into fresh objects, 6 more steps."""
    model = mlp(1)
    opt = scaled_sgd(model, "resume_a", backward_passes_per_step=2)
    straight = train(range(6), model, opt, passes=2)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    straight += train(range(6, 12), model, opt, passes=2)
    model_b = mlp(2)
    opt_b = scaled_sgd(model_b, "resume_b", backward_passes_per_step=2)
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["opt"])
    resumed = train(range(6, 12), model_b, opt_b, passes=2)
    return {"straight": straight, "resumed": resumed, "progress": opt.progress, "progress_resumed": opt_b.progress,
            "params_equal": all(torch.equal(a, b) for a, b in zip(model.parameters(), model_b.parameters()))}


def agreement() -> dict:
    """Per-step gain, lr and σ² of a noisy run, as hex, to compare across ranks bit for bit."""
    model = mlp(3)
    opt = scaled_sgd(model, "agree")
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)     # Horovod's usual start, state hooks and all
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    record = []
    for step in range(8):
        train(range(step, step + 1), model, opt)
        metrics = opt.metrics()
        record.append([float(v).hex() for v in (metrics["gain"], metrics["lr"], metrics["sigma_sq"], metrics["mu_sq"])])
    return {"record": record}


def fusion(case: str, **kwargs) -> dict:
    """Four steps of an MLP, read back from the timeline; case "bare" is plain hvd.DistributedOptimizer."""
    model = mlp(4)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if case == "bare":
        opt = hvd.DistributedOptimizer(inner, named_parameters=named(model, case))
    else:
        opt = sph.DistributedOptimizer(inner, named_parameters=named(model, case), **kwargs)
    train(range(4), model, opt)
    return {"steps": 4}


def elastic_state() -> dict:
    """hvd.elastic.TorchState carries the policy: restore() rolls it back to the last save(), and sync()
    gives every rank rank 0's policy (here rank 1 alone rolls back before the sync)."""
    model = mlp(6)
    opt = scaled_sgd(model, "elastic_state")
    state = hvd.elastic.TorchState(model=model, optimizer=opt)
    train(range(3), model, opt)
    state.save()
    saved = (opt.progress, opt.scaling.policy.steps, opt.lr)
    train(range(3, 5), model, opt)
    ahead = (opt.progress, opt.scaling.policy.steps, opt.lr)
    state.restore()
    restored = (opt.progress, opt.scaling.policy.steps, opt.lr)
    train(range(3, 5), model, opt)
    if hvd.rank() == 1:
        state.restore()
    state.sync()
    return {"saved": saved, "ahead": ahead, "restored": restored,
            "synced": (opt.progress, opt.scaling.policy.steps, opt.lr)}


def every_policy() -> dict:
    """Each registered policy by name with a 100-step budget where it takes one (and AdaScale as an object),
    three steps with the loss passed along."""
    specs = {name: {"type": name, "params": {"total_num_steps": 100} if "total_num_steps" in allowed_keys(cls) else {}}
             for name, cls in scaling_plugins.POLICIES.items()}
    specs["AdaScale object"] = scaling_plugins.AdaScale(scale=8.0)
    results = {}
    for key, spec in specs.items():
        model = mlp(5)
        opt = scaled_sgd(model, f"policy_{key.replace(' ', '_')}", policy=spec)
        lrs = []
        for step in range(3):
            x, y = batch(step)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss=loss)
            opt.zero_grad()
            lrs.append(opt.lr)
        results[key] = {"lrs": lrs, "scale": opt.scale, "policy": opt.scaling.policy.name}
    return results


def refusals() -> dict:
    """Bad arguments: the message of each error."""
    model = torch.nn.Linear(2, 2)
    messages = {}
    for key, kwargs in {"adasum": {"op": hvd.Adasum}, "loss_reduction": {"loss_reduction": "median"},
                        "policy": {"policy": "NoSuchPolicy"}, "unknown_arg": {"no_such_argument": 1}}.items():
        try:
            sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     named_parameters=named(model, f"refuse_{key}"), **kwargs)
            messages[key] = None
        except (ValueError, TypeError) as err:
            messages[key] = f"{type(err).__name__}: {err}"
    return messages


def main() -> None:
    out_dir = Path(sys.argv[1])
    hvd.init()
    results = {
        "size": hvd.size(),
        "golden": {"orthogonal": golden_gain("orth", [[1.0, 0.0], [0.0, 1.0]]),
                   "identical": golden_gain("same", [[1.0, 0.0], [1.0, 0.0]]),
                   "opposite": golden_gain("opp", [[-1.0, 1.0], [1.0, -1.0]]),
                   "orthogonal_unused": golden_gain("unused", [[1.0, 0.0], [0.0, 1.0]], unused=True),
                   "orthogonal_sum": golden_gain("orthsum", [[1.0, 0.0], [0.0, 1.0]], op=hvd.Sum),
                   "orthogonal_predivide": golden_gain("orthpre", [[1.0, 0.0], [0.0, 1.0]],
                                                       gradient_predivide_factor=2.0),
                   "orthogonal_fp16": golden_gain("orthfp16", [[1.0, 0.0], [0.0, 1.0]],
                                                  compression=hvd.Compression.fp16),
                   "orthogonal_groups": golden_gain("orthgroups", [[1.0, 0.0], [0.0, 1.0]], groups=1)},
        "one_hot": {**{f"{reduction}_groups{groups}": one_hot_passes(reduction, groups)
                       for reduction in ("mean", "sum") for groups in (None, 1)},
                    "mean_set_later": one_hot_passes("mean", None, set_later=True)},
        "resume": resume(),
        "agreement": agreement(),
        "fusion": {case: fusion(case, **kwargs) for case, kwargs in
                   {"bare": {}, "append": {}, "grouped": {"groups": 2},
                    "fp16": {"compression": hvd.Compression.fp16},
                    "predivide": {"gradient_predivide_factor": 2.0}}.items()},
        "elastic_state": elastic_state(),
        "policies": every_policy(),
        "refusals": refusals(),
    }
    (out_dir / f"rank{hvd.rank()}.json").write_text(json.dumps(results, indent=1))
    hvd.shutdown()


if __name__ == "__main__":
    main()
