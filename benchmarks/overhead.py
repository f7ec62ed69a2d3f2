"""Step-time overhead and collectives per step: DDP + AdaScale against bare DDP (and fairscale's AdaScale), side
by side in one run.

    .venv/bin/python -m benchmarks.overhead [--model mlp|many] [--steps 30] [--warmup 5] [--batch 64]
        [--repeats 3] [--fairscale DIR] [--floor]

Two ranks (spawned, gloo, one thread each) build a DDP copy of the same model per variant (``--model mlp``: the
10.5M-parameter, 8-tensor MLP; ``many``: the 194-tensor residual MLP, benchmarks/many_tensors.py): ``bare`` (DDP's
built-in all-reduce, plain SGD step), ``ours`` (``scaling_plugins.backends.ddp.attach(..., "AdaScale")``) and, with
``--fairscale DIR`` (a folder where ``fairscale`` is importable, e.g. ``pip install --no-deps --target DIR
fairscale==0.4.13``; never a project dependency), ``fairscale`` (``fairscale.optim.AdaScale`` around the same
SGD) and, with ``--floor``, ``floor``: bare DDP plus two fused reads of its reduced gradients per step
(``floor_reads``, no hook), the least work any exact AdaScale harvest adds on stock kernels (L reads the local
gradients before the reduction, T the reduced ones after it; the floor's second read even finds the bytes in the
cache). Steps rotate between the variants, the order shifting every round, with a barrier before each timed
step, so machine noise hits all alike. Reported per run: median wall, CPU (``cpu``: the training thread's) and process
CPU (``process``: every thread of the rank, the communication threads included) step time of each and the
ratios to bare; collectives per step from the torch profiler's ``gloo:*`` events (the same counter for all).
The summary is the median over runs of the per-run ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.many_tensors import MODELS, model_and_widths
from scaling_plugins.backends.ddp import attach
from scaling_plugins.backends.shared.fused_norms import squared_norm_sum
from tools.launchers import free_port

CLOCKS = ("wall", "cpu", "process")


def collectives(step: Callable[[], None]) -> dict[str, int]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return dict(Counter(e.name for e in prof.events() if e.name.startswith("gloo:")))


def floor_reads(grads: list[torch.Tensor]) -> None:
    """The least work an exact AdaScale harvest adds to a step on the engines' stock kernels: two fused reads of
    the gradient bytes (L reads each rank's gradients before the reduction, T the reduced ones after it). Every
    benchmark's ``--floor`` variant runs this between the bare engine's backward and its optimizer step."""
    for _ in range(2):
        squared_norm_sum(grads).item()


def median_ratios(times: dict[str, list[tuple[float, ...]]], clocks: Sequence[str],
                  ratios: dict[tuple[str, str], list[float]]) -> list[str]:
    """One run's report, a fragment per clock: each variant's median step time and its ratio to ``bare``. The
    ratios join ``ratios[(variant, clock)]``, one per run."""
    fragments = []
    for index, clock in enumerate(clocks):
        medians = {name: statistics.median(t[index] for t in runs) for name, runs in times.items()}
        parts = [f"{name}={seconds * 1e3:.1f} ms" for name, seconds in medians.items()]
        for name in [name for name in medians if name != "bare"]:
            ratios.setdefault((name, clock), []).append(medians[name] / medians["bare"])
            parts.append(f"{name}/bare={medians[name] / medians['bare']:.4f}")
        fragments.append(f"{clock}: " + " ".join(parts))
    return fragments


def print_summary(ratios: dict[tuple[str, str], list[float]], bare: str) -> None:
    """The median over runs of each variant's ratio to the bare engine (``bare`` names it), per clock."""
    for (name, clock), values in ratios.items():
        ratio = statistics.median(values)
        print(f"{name} / {bare} step time ({clock}): median ratio {ratio:.4f} over {len(values)} runs "
              f"(overhead {100 * (ratio - 1):+.2f}%; per run: {', '.join(f'{v:.4f}' for v in values)})")


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.fairscale:
        sys.path.insert(0, args.fairscale)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = measure(rank, args)   # the models are freed before the group goes (torch 2.13/gloo may abort otherwise)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def variant(name: str, model: torch.nn.Module, world: int) -> tuple[DDP, Callable[[], None], Callable[[], dict]]:
    """A DDP copy of ``model`` for one variant: (ddp model, its optimizer step, its metrics)."""
    ddp = DDP(model)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    if name == "bare":
        return ddp, sgd.step, dict
    if name == "ours":
        driver = attach(ddp, sgd, "AdaScale")
        return ddp, driver.step, lambda: {"gain": driver.gain}
    if name == "floor":
        def read_twice_then_step() -> None:
            floor_reads([p.grad for p in model.parameters()])
            sgd.step()

        return ddp, read_twice_then_step, dict
    from fairscale.optim import AdaScale as FairscaleAdaScale

    optimizer = FairscaleAdaScale(sgd, world_size=world)
    return ddp, optimizer.step, lambda: {"gain": optimizer.gain()}


Timings = dict[str, list[tuple[float, float, float]]]


def time_variants(step: Callable[[str], None], names: Sequence[str], warmup: int,
                  steps: int) -> tuple[dict[str, int], Timings]:
    """Side by side on this rank's group: ``warmup`` rounds of every variant's ``step(name)``, each variant's
    collectives in one step, then ``steps`` rounds timed (wall, thread CPU, process CPU per step, after a
    barrier), the variants' order rotated every round so none always runs first."""
    def timed(name: str) -> tuple[float, float, float]:
        dist.barrier()
        wall, cpu, process = time.perf_counter(), time.thread_time(), time.process_time()
        step(name)
        return time.perf_counter() - wall, time.thread_time() - cpu, time.process_time() - process

    for _ in range(warmup):
        for name in names:
            step(name)
    counts = {name: collectives(lambda: step(name)) for name in names}
    times: Timings = {name: [] for name in names}
    for i in range(steps):
        for name in [*names[i % len(names):], *names[:i % len(names)]]:
            times[name].append(timed(name))
    return counts, times


def measure(rank: int, args: argparse.Namespace) -> dict:
    """Every variant's step times and collectives on this rank."""
    names = ["bare", "ours"] + (["fairscale"] if args.fairscale else []) + (["floor"] if args.floor else [])
    _, width_in, width_out = model_and_widths(args.model)
    variants = {name: variant(name, model_and_widths(args.model)[0], dist.get_world_size()) for name in names}
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, width_in, generator=gen)
    y = torch.randn(args.batch, width_out, generator=gen)

    def step(name: str) -> None:
        ddp, optimizer_step, _ = variants[name]
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        optimizer_step()
        ddp.zero_grad()

    counts, times = time_variants(step, names, args.warmup, args.steps)
    params = sum(p.numel() for p in variants["bare"][0].parameters())
    tensors = sum(1 for _ in variants["bare"][0].parameters())
    return {"params": params, "tensors": tensors, "times": times, "collectives": counts,
            "metrics": {name: variants[name][2]() for name in names}}


def run_once(args: argparse.Namespace) -> dict:
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
    parser.add_argument("--model", choices=MODELS, default="mlp",
                        help="mlp: the 8-tensor 10.5M-parameter MLP; many: the 194-tensor residual MLP")
    parser.add_argument("--fairscale", metavar="DIR",
                        help="a folder where fairscale is importable: adds fairscale's AdaScale to the same run")
    parser.add_argument("--floor", action="store_true",
                        help="adds bare DDP plus two fused reads of the gradients per step: the cost floor")
    args = parser.parse_args()
    ratios: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        result = run_once(args)
        line = [f"run {repeat + 1}: {result['params']:,} params in {result['tensors']} tensors",
                *median_ratios(result["times"], CLOCKS, ratios)]
        line.append(f"collectives {result['collectives']} gains {result['metrics']}")
        print(" | ".join(line), flush=True)
    print_summary(ratios, "bare DDP")


if __name__ == "__main__":
    main()
