"""What the Horovod Elastic scripts (elastic.py, elastic_hosts.py) share: the model and its scaled optimizer, one
optimizer step of PASSES micro-batches with data drawn from the step and rank, the record of a step, and rank 0
writing the records."""
from __future__ import annotations

import json
from pathlib import Path

import horovod.torch as hvd
import torch

import scaling_plugins.backends.horovod as sph

PASSES = 2


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                   named_parameters=model.named_parameters(), backward_passes_per_step=PASSES)
    return model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> float:
    """One optimizer step of PASSES micro-batches (each loss divided by PASSES); the last micro-batch's loss."""
    generator = torch.Generator().manual_seed(1000 * step + hvd.rank())
    for _ in range(PASSES):
        x = torch.randn(8, 8, generator=generator)
        y = x.sum(dim=1, keepdim=True) + torch.randn(8, 1, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x), y)
        (loss / PASSES).backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def step_record(opt: torch.optim.Optimizer, step: int, **extra: object) -> dict:
    return {"step": step, "size": hvd.size(), "scale": opt.scale, "gain": opt.gain, "progress": opt.progress,
            "lr": opt.lr, "policy_world_size": opt.scaling.policy.world_size, **extra}


def write_records(out_dir: Path, records: list[dict]) -> None:
    if hvd.rank() == 0:
        (out_dir / "records.json").write_text(json.dumps(records, indent=1))
