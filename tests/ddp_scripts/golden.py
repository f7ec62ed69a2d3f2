"""Run under torchrun: the orthogonal-inputs golden case for 3 steps; each rank writes OUT_DIR/rank<k>.json.

The model is trained inside ``train`` so it is freed before the process group is destroyed: with torch 2.13
and gloo, destroying the group while a DDP model is alive can abort the interpreter at exit (bare DDP too).
"""
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins.backends.ddp import attach
from tests.distributed import torchrun_main


def train(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(2, 2))
    driver = attach(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "AdaScale")
    x = torch.eye(2)[rank % 2].reshape(1, 2)
    gains = []
    for _ in range(3):
        model(x).sum().backward()
        driver.step()
        model.zero_grad()
        gains.append(driver.gain)
    return {"rank": rank, "world": world, "gains": gains, "lr": driver.lr, "progress": driver.progress}


if __name__ == "__main__":
    torchrun_main(train)
