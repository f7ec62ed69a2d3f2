"""Step-time overhead and collectives per step: Horovod + AdaScale against bare hvd.DistributedOptimizer.

    .venv/bin/python -m benchmarks.overhead_horovod [--steps 30] [--warmup 5] [--batch 64] [--repeats 3]
        [--model mlp|many] [--floor]

Each repeat launches `horovodrun --gloo -np 2` on this script's worker mode. Both ranks (one thread each) build two
copies of the model (``--model mlp``: benchmarks/overhead.py's ≥ 10M-parameter MLP; ``many``:
benchmarks/many_tensors.py's 194-tensor residual MLP): one under bare ``hvd.DistributedOptimizer`` (plain SGD step),
one under ``scaling_plugins.backends.horovod.DistributedOptimizer`` with AdaScale; with ``--floor`` a third,
``floor``: bare Horovod plus two fused reads of the reduced gradients per step (``benchmarks.overhead.floor_reads``
after ``synchronize()``, no hook), the least work any exact AdaScale harvest adds on stock kernels (L reads the
local gradients, T the reduced ones). Steps rotate between the variants, the order shifting every round, with a
barrier before each timed step. Reported: median step time of each and the ratio of medians, in wall time and in the
main thread's CPU time (what the backend adds runs on the main thread; CPU time is steadier than wall time on a
shared machine, and excludes Horovod's background thread and waits); then, from a Horovod timeline recorded over a
few more steps of each, the all-reduce responses (fusion buffers) per step and where the AdaScale norm travelled;
and the CPU time of one pass over the model's gradients (a float64-accumulated fused read,
``fused_norms.squared_norm_sum``), of which the backend adds two per step: local norms in the gradient hooks, ‖ḡ‖²
after synchronize (``--floor`` measures both in the run itself).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.many_tensors import MODELS, model_and_widths
from benchmarks.overhead import floor_reads, median_ratios, print_summary, timing_parser
from scaling_plugins.backends.shared.fused_norms import squared_norm_sum
from tools.horovod_timeline import fusion_batches, norm_placement, tensor_role
from tools.launchers import horovodrun

TIMELINE_STEPS = 5
CLOCKS = ("wall", "cpu")     # what timed() returns: wall time and the main thread's CPU time


def worker(args: argparse.Namespace) -> None:
    import horovod.torch as hvd

    import scaling_plugins.backends.horovod as sph

    hvd.init()
    torch.set_num_threads(1)
    names = ["bare", "ours"] + (["floor"] if args.floor else [])
    models = {name: model_and_widths(args.model)[0] for name in names}
    _, width_in, width_out = model_and_widths(args.model)
    named = {name: [(f"{name}.{key}", p) for key, p in model.named_parameters()] for name, model in models.items()}
    optimizers = {name: (sph.DistributedOptimizer if name == "ours" else hvd.DistributedOptimizer)(
        torch.optim.SGD(models[name].parameters(), lr=1e-4, momentum=0.9), named_parameters=named[name],
        **({"policy": "AdaScale"} if name == "ours" else {})) for name in names}
    gen = torch.Generator().manual_seed(hvd.rank())
    x = torch.randn(args.batch, width_in, generator=gen)
    y = torch.randn(args.batch, width_out, generator=gen)

    def step(name: str) -> None:
        optimizer = optimizers[name]
        torch.nn.functional.mse_loss(models[name](x), y).backward()
        if name == "floor":
            optimizer.synchronize()
            floor_reads([p.grad for p in models[name].parameters()])
            with optimizer.skip_synchronize():
                optimizer.step()
        else:
            optimizer.step()
        optimizer.zero_grad()

    def timed(name: str) -> tuple[float, float]:
        hvd.barrier()
        wall, cpu = time.perf_counter(), time.thread_time()
        step(name)
        return time.perf_counter() - wall, time.thread_time() - cpu

    for _ in range(args.warmup):
        for name in names:
            step(name)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for i in range(args.steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(timed(name))
    timeline = Path(args.worker) / "timeline.json"
    hvd.start_timeline(str(timeline))
    for name in names:
        for _ in range(TIMELINE_STEPS):
            step(name)
    hvd.stop_timeline()
    grads = [torch.randn_like(p) for p in models["bare"].parameters()]
    passes = []
    for _ in range(20):
        cpu = time.thread_time()
        squared_norm_sum(grads).item()
        passes.append(time.thread_time() - cpu)
    if hvd.rank() == 0:
        params = sum(p.numel() for p in models["bare"].parameters())
        (Path(args.worker) / "result.json").write_text(json.dumps(
            {"params": params, "times": times, "gradient_pass": statistics.median(passes),
             "gain": optimizers["ours"].gain}))
    hvd.shutdown()


def responses_per_step(batches: list[list[str]]) -> dict[str, float]:
    """All-reduce responses per step of each variant (a response counts for the variant whose tensors it holds)."""
    counts: dict[str, int] = {}
    for batch in batches:
        for case in {case for _, case in map(tensor_role, batch)}:
            counts[case] = counts.get(case, 0) + 1
    return {case: n / TIMELINE_STEPS for case, n in counts.items()}


def run_once(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        horovodrun(__file__, ["--worker", tmp, "--model", args.model, "--steps", str(args.steps), "--warmup",
                              str(args.warmup), "--batch", str(args.batch), *(["--floor"] if args.floor else [])],
                   timeout=None, env={"HOROVOD_TIMELINE": "DYNAMIC"})    # recorded only between start/stop
        result = json.loads((Path(tmp) / "result.json").read_text())
        batches = fusion_batches(Path(tmp) / "timeline.json")
    result["responses_per_step"] = responses_per_step(batches)
    result["norm_fused"], result["norm_alone"] = norm_placement(batches)
    return result


def main() -> None:
    parser = timing_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="independent runs; the median ratio is reported")
    parser.add_argument("--model", choices=MODELS, default="mlp",
                        help="mlp: benchmarks/overhead.py's 8-tensor MLP; many: 194-tensor residual MLP")
    parser.add_argument("--floor", action="store_true",
                        help="adds bare Horovod plus two fused reads of the gradients per step: the cost floor")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    ratios: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        result = run_once(args)
        line = [f"run {repeat + 1}: params={result['params']:,}", *median_ratios(result["times"], CLOCKS, ratios)]
        bare_cpu = statistics.median(cpu for _, cpu in result["times"]["bare"])
        line.append(f"one gradient pass={result['gradient_pass'] * 1e3:.2f} ms CPU "
                    f"({100 * result['gradient_pass'] / bare_cpu:.2f}% of bare CPU step)")
        fused, alone = result["norm_fused"].get("ours", 0), result["norm_alone"].get("ours", 0)
        line.append(f"responses/step={result['responses_per_step']} norm fused={fused}/{TIMELINE_STEPS} alone={alone}")
        print(" | ".join(line), flush=True)
    print_summary(ratios, "bare hvd.DistributedOptimizer")


if __name__ == "__main__":
    main()
