"""Step-time overhead and collectives per step: DeepSpeed + AdaScale against bare DeepSpeed, same config.

    .venv/bin/python -m benchmarks.overhead_deepspeed [--steps 30] [--warmup 5] [--batch 64] [--blocks 3]
        [--model mlp|many] [--floor]

This re-launches itself under ``deepspeed --num_gpus 2`` (CPU accelerator, gloo, one thread per rank). For
ZeRO stage 0 and stage 2, each rank builds two engines over the same model (``--model mlp``: the DDP
benchmark's ≥ 10M-parameter MLP, ``benchmarks/overhead.py``; ``many``: benchmarks/many_tensors.py's
194-tensor residual MLP) from the same config, one bare and one whose config adds
``"scheduler": {"type": "AdaScale", "params": {}}``; with ``--floor``, for ZeRO-0 a third, ``floor``: the bare
engine plus two fused reads of its reduced gradients between ``engine.backward`` and ``engine.step``
(``benchmarks.overhead.floor_reads``, no hook), the least work any exact AdaScale harvest adds on stock kernels (L
reads the local gradients, T the reduced ones). Their steps rotate, the order shifting every step, with a
barrier before each timed step. Reported per stage: median step time of each over ``blocks`` blocks of
``steps`` steps (wall clock, and CPU time of the rank's process, steadier on a shared machine), the ratio of
medians per block and its median, CPU time split into forward + backward (where ZeRO-0 reduces) and
``engine.step``, and collectives per step from the torch
profiler's ``gloo:*`` events (the DDP benchmark's counter). A third ZeRO-2 variant with
``compute_grad_norm: false`` shows the documented fallback's one extra all-reduce.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks.many_tensors import MODELS, model_and_widths
from benchmarks.overhead import collectives, floor_reads, timing_parser
from tools import launchers

ADASCALE = {"type": "AdaScale", "params": {}}


def ds_config(stage: int, batch: int, **zero: Any) -> dict:
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "optimizer": {"type": "SGD", "params": {"lr": 1e-4, "momentum": 0.9}},
            "zero_optimization": {"stage": stage, **zero}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 9}


def worker(args: argparse.Namespace) -> None:
    """One rank under the deepspeed launcher: build the engines, interleave their steps, time and count."""
    import deepspeed
    import torch.distributed as dist

    import scaling_plugins.backends.deepspeed  # noqa: F401  (registers AdaScale with DeepSpeed)

    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(rank)
    _, width_in, width_out = model_and_widths(args.model)

    def build_model() -> torch.nn.Module:
        return model_and_widths(args.model)[0]

    x = torch.randn(args.batch, width_in, generator=gen)
    y = torch.randn(args.batch, width_out, generator=gen)
    results = {}
    for stage in (0, 2):
        base = ds_config(stage, args.batch)
        variants = {"bare": base, "adascale": {**base, "scheduler": ADASCALE}}
        if args.floor and stage == 0:
            variants["floor"] = base
        engines = {name: deepspeed.initialize(model=build_model(), config=cfg) for name, cfg in variants.items()}
        steps = {name: _step_fn(engine, x, y, floor=name == "floor") for name, (engine, *_) in engines.items()}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        counts = {name: collectives(step) for name, step in steps.items()}
        blocks = []
        phases: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
        for _ in range(args.blocks):
            wall: dict[str, list[float]] = {name: [] for name in steps}
            cpu: dict[str, list[float]] = {name: [] for name in steps}
            for i in range(args.steps):
                order = list(steps.items())
                for name, step in order[i % len(order):] + order[:i % len(order)]:
                    dist.barrier()
                    start, start_cpu = time.perf_counter(), time.process_time()
                    step(phases[name])
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
            blocks.append({name: [statistics.median(wall[name]), statistics.median(cpu[name])] for name in steps})
        scheduler = engines["adascale"][3]
        results[f"zero{stage}"] = {
            "blocks": blocks, "collectives": counts, "gain": scheduler.gain,
            "extra_collectives": scheduler.extra_collectives_per_step,
            "phases": {name: [statistics.median(phase) for phase in zip(*times)] for name, times in phases.items()}}
        del engines, steps
    fallback = {**ds_config(2, args.batch, compute_grad_norm=False), "scheduler": ADASCALE}
    engine, _, _, scheduler = deepspeed.initialize(model=build_model(), config=fallback)
    bare, _, _, _ = deepspeed.initialize(model=build_model(), config=ds_config(2, args.batch, compute_grad_norm=False))
    results["zero2_no_grad_norm"] = {
        "collectives": {"bare": collectives(_step_fn(bare, x, y)), "adascale": collectives(_step_fn(engine, x, y))},
        "extra_collectives": scheduler.extra_collectives_per_step}
    if rank == 0:
        results["load"] = [round(x, 1) for x in os.getloadavg()]
        results["params"] = sum(p.numel() for p in build_model().parameters())
        Path(args.out).write_text(json.dumps(results))


def _step_fn(engine: Any, x: torch.Tensor, y: torch.Tensor, floor: bool = False) -> Callable[..., None]:
    """``step(phases=None)``: one step (``floor``: with ``floor_reads`` of the gradients after the backward);
    appends (CPU s of forward + backward (+ reads), CPU s of engine.step) to phases."""
    def step(phases: Optional[list] = None) -> None:
        start = time.process_time()
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        if floor:
            floor_reads([p.grad for p in engine.module.parameters() if p.grad is not None])
        middle = time.process_time()
        engine.step()
        if phases is not None:
            phases.append((middle - start, time.process_time() - middle))
    return step


def main() -> None:
    parser = timing_parser(__doc__)
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks; the median ratio is reported")
    parser.add_argument("--model", choices=MODELS, default="mlp",
                        help="mlp: benchmarks/overhead.py's 8-tensor MLP; many: 194-tensor residual MLP")
    parser.add_argument("--floor", action="store_true",
                        help="adds (ZeRO-0) the bare engine plus two fused reads of the gradients per step: the floor")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "result.json")
        launchers.deepspeed(Path(__file__).resolve(),
                            ["--worker", "--out", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup),
                             "--batch", str(args.batch), "--blocks", str(args.blocks), "--model", args.model,
                             *(["--floor"] if args.floor else [])], timeout=None)
        results = json.loads(out.read_text())
    print(f"DeepSpeed 2 ranks (CPU, gloo), {args.model} model {results['params']:,} parameters, batch {args.batch}/rank, "
          f"{args.blocks} blocks x {args.steps} interleaved steps; load average {results['load']}")
    for stage in ("zero0", "zero2"):
        result = results[stage]
        for name in [name for name in result["blocks"][0] if name != "bare"]:
            for column, label in ((0, "wall"), (1, "CPU")):
                ratios = [block[name][column] / block["bare"][column] for block in result["blocks"]]
                blocks = ", ".join(f"{block['bare'][column] * 1e3:.1f}/{block[name][column] * 1e3:.1f} ms"
                                   for block in result["blocks"])
                ratio = statistics.median(ratios)
                print(f"{stage} {label} time per step, bare/{name} by block: {blocks}; median ratio {ratio:.4f} "
                      f"(overhead {100 * (ratio - 1):+.2f}%)")
        phases = result["phases"]
        print(f"{stage} CPU time per step by phase, bare/adascale (all blocks): forward+backward "
              f"{phases['bare'][0] * 1e3:.1f}/{phases['adascale'][0] * 1e3:.1f} ms, engine.step "
              f"{phases['bare'][1] * 1e3:.1f}/{phases['adascale'][1] * 1e3:.1f} ms")
        print(f"{stage} collectives per step: bare={result['collectives']['bare']} "
              f"adascale={result['collectives']['adascale']} (extra: {result['extra_collectives']}); "
              f"gain {result['gain']:.3f}")
    fallback = results["zero2_no_grad_norm"]
    print(f"zero2 with compute_grad_norm=false (fallback): collectives per step bare={fallback['collectives']['bare']} "
          f"adascale={fallback['collectives']['adascale']} (extra: {fallback['extra_collectives']})")


if __name__ == "__main__":
    main()
