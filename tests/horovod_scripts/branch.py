"""A data-dependent graph under Horovod (2 ranks): ``python branch.py OUT_DIR [passes]``.

A trunk Linear(4, 4), a head Linear(4, 1) and a branch Linear(4, 4) that is used on every step except step 1 on
rank 1, where the branch's parameters get no gradient (plain Horovod reduces zeros for them). Each step also
records this rank's local gradient of every micro-batch (from a hook-free copy of the model, zeros for the skipped
branch), so the test can compute L = Σ_i ‖g_i‖², T = ‖ḡ‖² and the gain offline. Each rank writes
``OUT_DIR/rank{r}.json``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import scaling_plugins.backends.horovod as sph

STEPS = 4
SKIP = (1, 1)   # (step, rank): the branch is skipped there


class Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.branch, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


def local_gradient(model: Branchy, x: torch.Tensor, y: torch.Tensor, use_branch: bool, passes: int) -> list[float]:
    """This micro-batch's gradient (loss / passes), all parameters flattened, from a copy without hooks."""
    copy = Branchy()
    copy.load_state_dict(model.state_dict())
    loss = torch.nn.functional.mse_loss(copy(x, use_branch), y) / passes
    grads = torch.autograd.grad(loss, list(copy.parameters()), allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(copy.parameters(), grads)]).double().tolist()


def main() -> None:
    out_dir = Path(sys.argv[1])
    passes = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    hvd.init()
    torch.manual_seed(0)
    model = Branchy()
    opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                   named_parameters=model.named_parameters(), backward_passes_per_step=passes)
    steps = []
    for step in range(STEPS):
        use_branch = (step, hvd.rank()) != SKIP
        micro = []
        for k in range(passes):
            generator = torch.Generator().manual_seed(100 * step + 10 * hvd.rank() + k)
            x = torch.randn(3, 4, generator=generator)
            y = x.sum(dim=1, keepdim=True) + torch.randn(3, 1, generator=generator)
            micro.append(local_gradient(model, x, y, use_branch, passes))
            (torch.nn.functional.mse_loss(model(x, use_branch), y) / passes).backward()
        opt.step()
        reduced = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double().tolist()
        opt.zero_grad()
        steps.append({"used_branch": use_branch, "local": micro, "reduced": reduced, "gain": opt.gain,
                      "gain_hex": float(opt.gain).hex(), "scale": opt.scale})
    (out_dir / f"rank{hvd.rank()}.json").write_text(json.dumps({"size": hvd.size(), "steps": steps}))
    hvd.shutdown()


if __name__ == "__main__":
    main()
