"""A bare ``python mistakes.py PORT``: one rank, no logging set-up, and one of each mistake the package warns the
user about in the DDP backend. The test reads the warnings from stderr; each names this file's line."""
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins.backends.ddp import attach


def backward(ddp: DDP) -> None:
    ddp(torch.ones(1, 2)).sum().backward()


def main(port: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    model = torch.nn.Linear(2, 1)
    frozen = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.0}], lr=0.1)
    ddp = DDP(model)
    driver = attach(ddp, frozen, {"type": "AdaScale", "params": {"total_num_steps": 2}}, accumulation_steps=1)
    for _ in range(3):                               # one gradient per step; then past the budget
        backward(ddp)
        driver.step()
    frozen.param_groups[0]["lr"] = 1e-4              # set by hand: undone at the next step
    backward(ddp)
    driver.step()

    model = torch.nn.Linear(2, 1)
    ddp = DDP(model)
    driver = attach(ddp, torch.optim.SGD(model.parameters(), lr=0.1), "LinearScaling", accumulation_steps=2)
    backward(ddp)                                    # one backward pass where two are declared
    driver.step()

    model = torch.nn.Linear(2, 1)
    attach(DDP(model), torch.optim.Adam(model.parameters(), lr=1e-3), "AdaScale")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
