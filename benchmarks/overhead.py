"""Step-time overhead and collectives per step: DDP + AdaScale against bare DDP, side by side in one run.

    .venv/bin/python -m benchmarks.overhead [--steps 30] [--warmup 5] [--batch 64] [--repeats 3]

Two ranks (spawned, gloo, one thread each) build two DDP copies of the same ≥ 10M-parameter MLP: one bare
(DDP's built-in all-reduce hook, plain SGD step) and one driven by AdaScale. Steps alternate between the
two, the order flipping every round, with a barrier before each timed step, so machine noise hits both
alike. Reported: median step time of each, the ratio of medians, and collectives per step counted from
the torch profiler's ``gloo:*`` events for both (the same counter for both paths).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from scaling_plugins.backends.ddp import attach

WIDTHS = (1024, 2048, 2048, 2048, 16)


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for width_in, width_out in zip(WIDTHS, WIDTHS[1:]):
        layers += [torch.nn.Linear(width_in, width_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def collectives(step) -> dict[str, int]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return dict(Counter(e.name for e in prof.events() if e.name.startswith("gloo:")))


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = measure(rank, args)   # the models are freed before the group goes (torch 2.13/gloo may abort otherwise)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def measure(rank: int, args: argparse.Namespace) -> dict:
    """Both variants' step times and collectives on this rank."""
    bare = DDP(build_model())
    ours = DDP(build_model())
    bare_opt = torch.optim.SGD(bare.parameters(), lr=1e-4, momentum=0.9)
    ours_opt = torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)
    ctl = attach(ours, ours_opt, "AdaScale")
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, WIDTHS[0], generator=gen)
    y = torch.randn(args.batch, WIDTHS[-1], generator=gen)

    def bare_step() -> None:
        torch.nn.functional.mse_loss(bare(x), y).backward()
        bare_opt.step()
        bare_opt.zero_grad()

    def ours_step() -> None:
        torch.nn.functional.mse_loss(ours(x), y).backward()
        ctl.step()
        ours_opt.zero_grad()

    def timed(step) -> float:
        dist.barrier()
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        bare_step()
        ours_step()
    counts = {"bare": collectives(bare_step), "ours": collectives(ours_step)}
    times: dict[str, list[float]] = {"bare": [], "ours": []}
    for i in range(args.steps):
        order = [("bare", bare_step), ("ours", ours_step)]
        for name, step in order if i % 2 == 0 else order[::-1]:
            times[name].append(timed(step))
    return {"params": sum(p.numel() for p in bare.parameters()), "times": times, "collectives": counts,
            "gain": ctl.gain}


def run_once(args: argparse.Namespace) -> dict:
    from tests.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(rank_main, args=(2, free_port(), args, out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


def timing_parser(description: str) -> argparse.ArgumentParser:
    """The options every overhead benchmark (DDP, DeepSpeed, Horovod) shares: --steps, --warmup, --batch."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    parser.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    return parser


def main() -> None:
    parser = timing_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="independent runs; the median ratio is reported")
    args = parser.parse_args()
    ratios = []
    for repeat in range(args.repeats):
        result = run_once(args)
        bare = statistics.median(result["times"]["bare"])
        ours = statistics.median(result["times"]["ours"])
        ratios.append(ours / bare)
        print(f"run {repeat + 1}: params={result['params']:,} bare={bare * 1e3:.1f} ms ours={ours * 1e3:.1f} ms "
              f"ratio={ours / bare:.4f} collectives bare={result['collectives']['bare']} "
              f"ours={result['collectives']['ours']}", flush=True)
    print(f"DDP + AdaScale / bare DDP step time: median ratio {statistics.median(ratios):.4f} "
          f"over {args.repeats} runs (overhead {100 * (statistics.median(ratios) - 1):+.2f}%)")


if __name__ == "__main__":
    main()
