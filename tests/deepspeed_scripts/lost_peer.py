"""Launched by tests/test_faults.py: `deepspeed --num_gpus 2 lost_peer.py --backend deepspeed --out DIR --timeout S`
(and the same under `mpirun -np 2` with --backend horovod).

The example trainer's run (``scaling_plugins.app.engines.start`` with the timeout, then the built-in trainer on the
quadratic workload) on two ranks. After step ``STALL_AFTER`` rank 1 stays alive but takes no further step, as a
peer that stops answering: under DeepSpeed rank 0's next collective is the gradient all-reduce on the data-parallel
group DeepSpeed created, which no peer joins; under Horovod rank 1's background thread goes on talking to the
coordinator but never submits the gradients rank 0 submitted (a stall). With --freeze rank 1 stops itself with
SIGSTOP instead, as a host that is gone: nothing of it answers, its background thread included. Rank 1 writes the
time it went silent to DIR/silent_at. Rank 0, when its error reaches Python, writes DIR/lost_peer.json (the seconds
from its last step to the error; under DeepSpeed the timeout of its data-parallel group) and stops as the example
trainer does (launch/examples/train.py's one line, exit 1).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from scaling_plugins.app.engines import start
from scaling_plugins.app.training import RunSpec, train
from tools.launchers import REPO

STALL_AFTER = 2
STALL_S = 120     # rank 1's silence: longer than any timeout the test sets; the launcher ends it when rank 0 fails


def example_trainer():
    """launch/examples/train.py as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location("example_train", REPO / "launch" / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deepspeed_groups() -> dict:
    """The timeout of the data-parallel group the DeepSpeed engine made, and whether it is the default group."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    from scaling_plugins.backends.deepspeed import compat

    group = groups._get_data_parallel_group()
    return {"data_parallel_timeout_s": compat.group_timeout(group).total_seconds(),
            "data_parallel_is_default": group is dist.group.WORLD}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--backend", choices=("deepspeed", "horovod"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--freeze", action="store_true", help="rank 1 stops with SIGSTOP instead (a frozen host)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainer = example_trainer()
    where = start(args.backend, args.timeout)
    last_step_at = time.monotonic()

    def on_step(record: dict) -> None:
        nonlocal last_step_at
        last_step_at = time.monotonic()
        if where.rank == 1 and record["step"] == STALL_AFTER:
            print(f"rank 1 stops answering after step {STALL_AFTER}", file=sys.stderr, flush=True)
            (args.out / "silent_at").write_text(repr(time.time()))
            if args.freeze:
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(STALL_S)
            os._exit(0)

    spec = RunSpec(name="lost_peer", workload="quadratic", backend=args.backend, policy="AdaScale",
                   workers=where.world_size, budget=1000.0, seed=0, tensorboard=False)
    try:
        train(spec, args.out / "run", where.rank, where.world_size, progress_bar=False, on_step=on_step)
    except RuntimeError as err:
        report = {"waited_s": time.monotonic() - last_step_at}
        if args.backend == "deepspeed":
            report.update(deepspeed_groups())
        (args.out / "lost_peer.json").write_text(json.dumps(report))
        trainer.stop_on_lost_peer(err, where.rank, args.timeout)
    raise AssertionError(f"rank {where.rank}: training ended without the lost peer being noticed")


if __name__ == "__main__":
    main()
