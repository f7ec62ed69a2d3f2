"""What AutoWU's once-per-epoch Gaussian-process test costs, against an epoch of a built-in workload.

    .venv/bin/python -m benchmarks.autowu_cost [--workloads digits charlm] [--scale 16] [--epochs 3]

Epoch: one process, one thread, trains the workload at scale S (S micro-batches of B0 accumulated per
optimizer step, SGD with momentum, the workload's base learning rate × S), ⌈N / (S·B0)⌉ steps per epoch; the
median of ``--epochs`` timed epochs after one untimed warm-up epoch. With W workers an epoch's wall time shrinks by up
to W while every rank runs the same test, so the ratio grows by up to W.

Test: an AutoWU policy (default settings unless ``--max-points`` says otherwise: 200-point subsamples, 3 subsamples voting, 200 posterior draws,
each fit started from the previous epoch's hyperparameters) is fed a noisy decreasing loss history of
``--history`` steps, one epoch at a time, with that workload's steps per epoch; the time of each step that
ran the test, less the median time of the steps that did not, is the test's cost per epoch. Reported: the
median and the maximum over the tests run once the history holds at least 200 points (the cost grows with
the history only up to the subsample size, ``--max-points``).

Both are timed in wall-clock seconds and in this process's CPU seconds; on a machine shared with other jobs
the CPU-time ratio is the steadier figure (both sides run on one thread).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from scaling_plugins.policies import AutoWU, StepObservation
from scaling_plugins.app.workloads import get_workload


Timing = tuple[float, float]   # (wall seconds, CPU seconds)


def clock() -> Timing:
    return time.perf_counter(), time.process_time()


def since(start: Timing) -> Timing:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def median(timings: list[Timing]) -> Timing:
    return statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)


def epoch_seconds(name: str, scale: int, epochs: int) -> tuple[Timing, int]:
    """(median (wall, CPU) seconds per epoch, steps per epoch) of single-process training at scale ``scale``."""
    workload = get_workload(name)
    model = workload.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=workload.base_lr * scale, momentum=workload.momentum)
    steps_per_epoch = math.ceil(workload.num_train / (scale * workload.micro_batch_size))
    times, step = [], 0
    for epoch in range(epochs + 1):
        start = clock()
        for _ in range(steps_per_epoch):
            for micro in range(scale):
                x, y = workload.micro_batch_at(step * scale * workload.micro_batch_size, 0, 1, micro)
                (workload.loss(model(x), y) / scale).backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
        if epoch:                       # epoch 0 warms up
            times.append(since(start))
    return median(times), steps_per_epoch


def test_seconds(steps_per_epoch: int, history: int, max_points: int, seed: int = 0) -> list[Timing]:
    """The GP test's (wall, CPU) cost at each epoch end once the history holds ≥ max_points losses."""
    policy = AutoWU(total_num_steps=2 * history + 2, steps_per_epoch=steps_per_epoch, max_points=max_points)
    rng = np.random.default_rng(seed)
    t = np.arange(history)
    losses = 0.3 + 2 * np.exp(-3 * t / history) + 0.05 * rng.standard_normal(history)
    tested, plain = [], []
    for step, loss in enumerate(losses):
        start = clock()
        policy.step(StepObservation(loss=float(loss)))
        elapsed = since(start)
        if (step + 1) % steps_per_epoch:
            plain.append(elapsed)
        elif step + 1 >= max_points:
            tested.append(elapsed)
        if policy.phase != "warmup":
            raise RuntimeError(f"the synthetic decreasing history switched AutoWU at step {step}")
    base_wall, base_cpu = median(plain)
    return [(wall - base_wall, cpu - base_cpu) for wall, cpu in tested]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["digits", "charlm"])
    parser.add_argument("--scale", type=int, default=16, help="S = effective batch / B0 (the demo's default: 16)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per workload")
    parser.add_argument("--history", type=int, default=2000, help="loss-history length fed to AutoWU")
    parser.add_argument("--max-points", type=int, default=200, help="AutoWU's max_points (subsample size)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"scale S = {args.scale}, history = {args.history} steps, max_points = {args.max_points}, one thread; "
          "wall / CPU")
    print("| workload | steps/epoch | epoch (s) | GP test, median (ms) | GP test, max (ms) | tests "
          "| median test / epoch |")
    print("|---|---|---|---|---|---|---|")
    for name in args.workloads:
        epoch, steps_per_epoch = epoch_seconds(name, args.scale, args.epochs)
        costs = test_seconds(steps_per_epoch, args.history, args.max_points)
        test = median(costs)
        worst = max(c[0] for c in costs), max(c[1] for c in costs)
        print(f"| {name} | {steps_per_epoch} | {epoch[0]:.2f} / {epoch[1]:.2f} | {1e3 * test[0]:.1f} / "
              f"{1e3 * test[1]:.1f} | {1e3 * worst[0]:.1f} / {1e3 * worst[1]:.1f} | {len(costs)} | "
              f"{100 * test[0] / epoch[0]:.1f}% / {100 * test[1] / epoch[1]:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
