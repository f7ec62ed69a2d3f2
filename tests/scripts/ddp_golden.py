"""Run under torchrun: the orthogonal-inputs golden case for 3 steps; each rank writes OUT_DIR/rank<k>.json."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins.backends.ddp import attach


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(2, 2))
    ctl = attach(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "AdaScale")
    x = torch.eye(2)[rank % 2].reshape(1, 2)
    gains = []
    for _ in range(3):
        model(x).sum().backward()
        ctl.step()
        model.zero_grad()
        gains.append(ctl.gain)
    result = {"rank": rank, "world": world, "gains": gains, "lr": ctl.lr, "progress": ctl.progress}
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
