"""First-step AdaScale gains with known values, on however many ranks started this (an even number): one input
per rank into Linear(2, 2) with bias, loss = output.sum(), so the gradient is (x, x, 1, 1) and, with S = n
ranks, gain = mean ||g_i||^2 / ||mean g||^2:

    orthogonal  x = e_(rank mod 2)       gain 4/3
    identical   x = (1, 1)               gain 1
    opposite    x = (+-1, 0) alternating gain 2

Prints `GOLDEN {...}` with this rank's host and gains (DDP backend, gloo across the hosts)."""
import json
import socket

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins.app.launch_env import init_process_group, shutdown_process_group
from scaling_plugins.backends.ddp import attach

INPUTS = {
    "orthogonal": lambda rank: [1.0, 0.0] if rank % 2 == 0 else [0.0, 1.0],
    "identical": lambda rank: [1.0, 1.0],
    "opposite": lambda rank: [1.0, 0.0] if rank % 2 == 0 else [-1.0, 0.0],
}


def first_gain(rank: int, case: str) -> float:
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(2, 2))
    ctl = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), {"type": "AdaScale", "params": {}})
    model(torch.tensor([INPUTS[case](rank)])).sum().backward()
    ctl.step()
    return ctl.gain


def main() -> None:
    where = init_process_group("gloo")
    gains = {case: first_gain(where.rank, case) for case in INPUTS}
    print(f"GOLDEN {json.dumps({'node': socket.gethostname(), 'rank': where.rank, 'world_size': where.world_size, **gains})}",
          flush=True)
    shutdown_process_group()


if __name__ == "__main__":
    main()
