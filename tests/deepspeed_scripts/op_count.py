"""Launched by tests/test_deepspeed_harvest.py: `deepspeed --num_gpus 2 op_count.py --out DIR --stage S`.

The ops the DeepSpeed backend adds per optimizer step, counted with torch.profiler: the same number of
parameter elements in 16 or in 160 tensors, gradient accumulation 1 and 2; top-level aten ops (those no other
aten op called: the CPU stand-in for kernel launches) of an engine with AdaScale minus those of a bare engine
with the same config, same data. Each rank writes DIR/rank<r>.json.
"""
from __future__ import annotations

import deepspeed
import torch

import scaling_plugins.backends.deepspeed  # noqa: F401  (registers the policies with DeepSpeed)
from tests.deepspeed_scripts.common import config, setup, write_and_finish
from tests.profiling import top_level_ops

ELEMENTS = 16 * 4096


class Squares(torch.nn.Module):
    def __init__(self, tensors: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.params = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(ELEMENTS // tensors))
                                             for _ in range(tensors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum() * sum((p * p).sum() for p in self.params)


def ops_per_step(rank: int, stage: int, tensors: int, gas: int, scaled: bool) -> tuple[int, float]:
    extra = {"scheduler": {"type": "AdaScale", "params": {}}} if scaled else {}
    model = Squares(tensors)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=config(stage, gas=gas, **extra))

    def step() -> None:
        for k in range(gas):
            engine.backward(engine(torch.full((1,), 1.0 + rank + k)))
            engine.step()

    for _ in range(2):
        step()
    counts = sorted(top_level_ops(step) for _ in range(3))
    return counts[1], scheduler.gain if scaled else 1.0


def main() -> None:
    rank, args = setup()
    results = {}
    for gas in (1, 2):
        for tensors in (16, 160):
            ours, gain = ops_per_step(rank, args.stage, tensors, gas, True)
            bare, _ = ops_per_step(rank, args.stage, tensors, gas, False)
            results[f"{tensors}x{gas}"] = {"ours": ours, "bare": bare, "added": ours - bare, "gain": gain}
    write_and_finish(args.out, rank, results)


if __name__ == "__main__":
    main()
