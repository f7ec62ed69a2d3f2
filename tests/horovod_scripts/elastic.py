"""A real Horovod Elastic run that shrinks from 2 workers to 1: ``python elastic.py OUT_DIR``.

Launched by tests/test_horovod_elastic.py with ``horovodrun -np 2 --min-np 1 --host-discovery-script
discover_hosts.sh``; the discovery script prints the file $SCALING_PLUGINS_HOSTS_FILE, which rank 0 rewrites
from "localhost:2" to "localhost:1" after SHRINK_AT steps. Training goes on until SMALL_STEPS steps ran on
the single remaining worker; that worker writes every step's record to OUT_DIR/records.json.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import horovod.torch as hvd
import torch

import scaling_plugins.backends.horovod as sph

SHRINK_AT = 4
SMALL_STEPS = 4
STEP_LIMIT = 200          # fail instead of looping forever if the shrink never comes
PASSES = 2


def main() -> None:
    out_dir = Path(sys.argv[1])
    hvd.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                   named_parameters=model.named_parameters(), backward_passes_per_step=PASSES)
    state = hvd.elastic.TorchState(model=model, optimizer=opt, step=0, small_steps=0)
    records = []

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        while state.small_steps < SMALL_STEPS:
            if state.step >= STEP_LIMIT:
                raise RuntimeError(f"no shrink to 1 worker after {STEP_LIMIT} steps")
            generator = torch.Generator().manual_seed(1000 * state.step + hvd.rank())
            for _ in range(PASSES):
                x = torch.randn(8, 8, generator=generator)
                y = x.sum(dim=1, keepdim=True) + torch.randn(8, 1, generator=generator)
                loss = torch.nn.functional.mse_loss(model(x), y)
                (loss / PASSES).backward()
            opt.step()
            opt.zero_grad()
            state.step += 1
            state.small_steps += hvd.size() == 1
            records.append({"step": state.step, "size": hvd.size(), "scale": opt.scale, "gain": opt.gain,
                            "progress": opt.progress, "lr": opt.lr, "loss": loss.item(),
                            "policy_world_size": opt.scaling.policy.world_size})
            if state.step == SHRINK_AT and hvd.rank() == 0:
                Path(os.environ["SCALING_PLUGINS_HOSTS_FILE"]).write_text("localhost:1\n")
            if state.step >= SHRINK_AT and hvd.size() > 1:
                time.sleep(0.2)            # let the driver see the new hosts before the next commit
            state.commit()

    train(state)
    if hvd.rank() == 0:
        (out_dir / "records.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
