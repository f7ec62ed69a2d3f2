"""Run under ``torchrun --nproc_per_node 2``: AdaptiveBatch through ``scaling_plugins.backends.ddp.attach``
(tests/adaptive_cases.py); each rank writes OUT_DIR/rank<k>.json.

The models are trained inside functions so they are freed before the process group is destroyed (with torch 2.13
and gloo, destroying the group while a DDP model is alive can abort the interpreter at exit).
"""
import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins.backends.ddp import DDPDriver, attach
from tests.adaptive_cases import BASE_LR, SPEC, DriverLoop, run_with_resume
from tests.distributed import torchrun_main
from tests.policy_cases import Quadratic


class DDPLoop(DriverLoop):
    """The user's loop: ``driver.accumulation_steps`` micro-batches, all but the last under ``no_sync()``."""

    def __init__(self) -> None:
        self.model = DDP(Quadratic())
        self.net = self.model.module
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=BASE_LR)
        self.driver: DDPDriver = attach(self.model, self.optimizer, SPEC)
        self._micro = 0

    def accumulation(self) -> int:
        self._micro = 0
        return super().accumulation()

    def backward(self, x: torch.Tensor, accumulation: int) -> None:
        self._micro += 1
        with self.model.no_sync() if self._micro < accumulation else contextlib.nullcontext():
            (self.model(x) / accumulation).backward()


def train(rank: int, world: int) -> dict:
    return run_with_resume(DDPLoop, rank)


if __name__ == "__main__":
    torchrun_main(train)
