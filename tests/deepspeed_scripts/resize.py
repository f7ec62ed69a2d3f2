"""A checkpoint saved at one world size, loaded at another: ``deepspeed --num_gpus 2 resize.py --out DIR --mode
save`` (gas 2: 4 gradients per step), then ``deepspeed --num_gpus 1 resize.py --out DIR --mode load``
(2 gradients). Rank 0 writes ``DIR/<mode>.json``: scale, τ, σ², μ² right after the save or the load."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

import scaling_plugins.backends.deepspeed  # noqa: F401  (registers the policy names with DeepSpeed)
from tests.deepspeed_scripts.common import config


def main() -> None:
    mode = sys.argv[sys.argv.index("--mode") + 1]
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        config=config(0, gas=2, scheduler={"type": "AdaScale", "params": {}}))
    if mode == "load":
        engine.load_checkpoint(str(out / "checkpoint"))
    else:
        data = torch.Generator().manual_seed(dist.get_rank())
        for _ in range(3 * 2):
            engine.backward(engine(torch.randn(1, 2, generator=data)).sum())
            engine.step()
        engine.save_checkpoint(str(out / "checkpoint"))
    metrics = scheduler.metrics()
    if dist.get_rank() == 0:
        (out / f"{mode}.json").write_text(json.dumps({"scale": scheduler.scale, "progress": scheduler.progress,
                                                      "sigma_sq": metrics["sigma_sq"], "mu_sq": metrics["mu_sq"]}))
    dist.barrier()


if __name__ == "__main__":
    main()
