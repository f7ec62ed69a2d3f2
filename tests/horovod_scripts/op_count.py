"""The ops the Horovod backend adds per step, counted with torch.profiler (2 ranks): ``python op_count.py OUT``.

The same number of parameter elements in 16 or in 160 tensors, with and without accumulation: per step, the
top-level aten ops (those no other aten op called: the CPU stand-in for kernel launches) of
``sph.DistributedOptimizer`` minus those of plain ``hvd.DistributedOptimizer``, same model, same data. Also the
gain, so the run is known to measure something. Rank r writes ``OUT/rank{r}.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import scaling_plugins.backends.horovod as sph
from tests.profiling import top_level_ops

ELEMENTS = 16 * 4096


def ops_per_step(tensors: int, passes: int, scaled: bool) -> tuple[int, float]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(ELEMENTS // tensors)) for _ in range(tensors)]
    named = [(f"ops{tensors}_{passes}_{scaled}.{i}", p) for i, p in enumerate(params)]
    inner = torch.optim.SGD(params, lr=0.01)
    opt = (sph.DistributedOptimizer(inner, named_parameters=named, backward_passes_per_step=passes) if scaled
           else hvd.DistributedOptimizer(inner, named_parameters=named, backward_passes_per_step=passes))

    def step() -> None:
        for k in range(passes):
            weight = 1.0 + hvd.rank() + k
            (sum((weight * p * p).sum() for p in params) / passes).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    counts = sorted(top_level_ops(step) for _ in range(3))
    return counts[1], getattr(opt, "gain", 1.0)


def main() -> None:
    out = Path(sys.argv[1])
    hvd.init()
    torch.set_num_threads(1)
    results = {}
    for passes in (1, 2):
        for tensors in (16, 160):
            ours, gain = ops_per_step(tensors, passes, True)
            bare, _ = ops_per_step(tensors, passes, False)
            results[f"{tensors}x{passes}"] = {"ours": ours, "bare": bare, "added": ours - bare, "gain": gain}
    (out / f"rank{hvd.rank()}.json").write_text(json.dumps(results))
    hvd.shutdown()


if __name__ == "__main__":
    main()
