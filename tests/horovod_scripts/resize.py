"""A checkpoint saved at one world size, loaded at another: ``resize.py save OUT`` under a 2-rank launcher (4
gradients per step: 2 ranks × 2 backward passes), then ``resize.py load OUT`` as one process (2 gradients).
Each writes ``OUT/<mode>.json`` (rank 0): scale, τ, σ², μ² right after the save or the load."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import scaling_plugins.backends.horovod as sph


def main(mode: str, out: Path) -> None:
    hvd.init()
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), backward_passes_per_step=2)
    if mode == "load":
        opt.load_state_dict(torch.load(out / "state.pt", weights_only=True))
    else:
        data = torch.Generator().manual_seed(hvd.rank())
        for _ in range(3):
            for _ in range(2):
                (model(torch.randn(1, 2, generator=data)).sum() / 2).backward()
            opt.step()
            opt.zero_grad()
        if hvd.rank() == 0:
            torch.save(opt.state_dict(), out / "state.pt")
    metrics = opt.metrics()
    if hvd.rank() == 0:
        (out / f"{mode}.json").write_text(json.dumps({"scale": opt.scale, "progress": opt.progress,
                                                      "sigma_sq": metrics["sigma_sq"], "mu_sq": metrics["mu_sq"]}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
