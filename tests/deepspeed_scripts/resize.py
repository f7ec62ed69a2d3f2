"""The run's shape changing under DeepSpeed. Rank 0 writes ``DIR/<mode>.json``.

- A checkpoint saved at one world size, loaded at another: ``deepspeed --num_gpus 2 resize.py --out DIR --mode
  save`` (gas 2: 4 gradients per step), then ``deepspeed --num_gpus 1 resize.py --out DIR --mode load``
  (2 gradients): scale, τ, σ², μ² right after the save or the load.
- ``--mode ramp`` (2 ranks): ``engine.set_train_batch_size`` from gas 2 to gas 4 after 2 steps, lr 0 and no
  smoothing (so σ², μ² are the last step's own): the last step's numbers, and those of a fresh gas-4 engine fed
  the same micro-batches.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

import scaling_plugins.backends.deepspeed  # noqa: F401  (registers the policy names with DeepSpeed)
from tests.deepspeed_scripts.common import config


def engine_at(gas: int) -> tuple:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        config=config(0, gas=gas, optimizer={"type": "SGD", "params": {"lr": 0.0}},
                      scheduler={"type": "AdaScale", "params": {"smoothing": 0.0}}))
    return engine, scheduler


def last_step(scheduler) -> dict:
    metrics = scheduler.metrics()
    return {"scale": scheduler.scale, "sigma_sq": metrics["sigma_sq"], "mu_sq": metrics["mu_sq"],
            "gain": scheduler.gain}


def ramp(out: Path) -> None:
    batches = torch.randn(2 * 2 + 2 * 4, 1, 2, generator=torch.Generator().manual_seed(dist.get_rank()))
    engine, scheduler = engine_at(2)
    for i, x in enumerate(batches):
        if i == 4:
            engine.set_train_batch_size(1 * dist.get_world_size() * 4)
        engine.backward(engine(x).sum())
        engine.step()
    fresh, fresh_scheduler = engine_at(4)
    for x in batches[4:]:
        fresh.backward(fresh(x).sum())
        fresh.step()
    if dist.get_rank() == 0:
        (out / "ramp.json").write_text(json.dumps({"ramped": last_step(scheduler), "steps": engine.global_steps,
                                                   "fresh": last_step(fresh_scheduler)}))


def main() -> None:
    mode = sys.argv[sys.argv.index("--mode") + 1]
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    if mode == "ramp":
        ramp(out)
        dist.barrier()
        return
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        config=config(0, gas=2, scheduler={"type": "AdaScale", "params": {}}))
    if mode == "load":
        engine.load_checkpoint(str(out / "checkpoint"))
    else:
        data = torch.Generator().manual_seed(dist.get_rank())
        for _ in range(3 * 2):
            engine.backward(engine(torch.randn(1, 2, generator=data)).sum())
            engine.step()
        engine.save_checkpoint(str(out / "checkpoint"))
    metrics = scheduler.metrics()
    if dist.get_rank() == 0:
        (out / f"{mode}.json").write_text(json.dumps({"scale": scheduler.scale, "progress": scheduler.progress,
                                                      "sigma_sq": metrics["sigma_sq"], "mu_sq": metrics["mu_sq"]}))
    dist.barrier()


if __name__ == "__main__":
    main()
