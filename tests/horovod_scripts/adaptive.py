"""Run under ``horovodrun --gloo -np 2``: AdaptiveBatch through ``scaling_plugins.backends.horovod``'s
``DistributedOptimizer`` (tests/adaptive_cases.py); the loop reads Horovod's own ``opt.backward_passes_per_step``.
Each rank writes OUT_DIR/rank<k>.json."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import scaling_plugins.backends.horovod as sph
from tests.adaptive_cases import BASE_LR, SPEC, run_with_resume
from tests.policy_cases import Quadratic


class HorovodLoop:
    def __init__(self) -> None:
        self.model = Quadratic()
        self.opt = sph.DistributedOptimizer(torch.optim.SGD(self.model.parameters(), lr=BASE_LR),
                                            named_parameters=self.model.named_parameters(), policy=SPEC)

    def accumulation(self) -> int:
        assert self.opt.accumulation_steps == self.opt.backward_passes_per_step
        return self.opt.backward_passes_per_step

    def backward(self, x: torch.Tensor, accumulation: int) -> None:
        (self.model(x) / accumulation).backward()

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad()

    def metrics(self) -> dict:
        return self.opt.metrics()

    def engine_accumulation(self) -> int:
        return self.opt.backward_passes_per_step

    def state(self) -> dict:
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.opt.state_dict()})

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])

    def final_loss(self) -> float:
        return self.model(torch.zeros(1, 20)).item()


def main(out: Path) -> None:
    hvd.init()
    (out / f"rank{hvd.rank()}.json").write_text(json.dumps(run_with_resume(HorovodLoop, hvd.rank())))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
