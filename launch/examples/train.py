"""Train a built-in workload with a scaling_plugins policy, under any launcher, with any backend.

    launch/torchrun.sh   launch/examples/train.py --backend ddp --policy AdaScale
    launch/deepspeed.sh  launch/examples/train.py --backend ddp
    launch/mpirun.sh     launch/examples/train.py --backend ddp
    launch/horovodrun.sh launch/examples/train.py --backend horovod
    (or the launchers themselves: torchrun --nproc_per_node 2 launch/examples/train.py ...)

The rank comes from whatever started the process (scaling_plugins.app.engines.start); the run is the built-in
trainer's (scaling_plugins.app.training), so metrics land in OUT/metrics.jsonl exactly as in the demo. Rank 0
shows its progress (plain periodic lines in a batch job's log). Every rank prints one line `RESULT {...}` with
its node, rank, the world size and the run's summary; with --trajectory also this rank's gain, learning rate
and loss at every step (what the multi-host tests compare across ranks and hosts); with --golden first the
three first-step gains of known value (scaling_plugins.app.golden: 4/3, 1 and 2 on any even number of ranks).
"""
import argparse
import json
import socket
import sys
from pathlib import Path

from scaling_plugins.app.engines import BACKENDS, start, stop
from scaling_plugins.app.golden import golden_gains
from scaling_plugins.app.training import RunSpec, train
from scaling_plugins.app.workloads import WORKLOADS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS, default="ddp")
    parser.add_argument("--policy", default="AdaScale", help="a name registered in scaling_plugins.POLICIES")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="digits")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per rank per optimizer step")
    parser.add_argument("--budget", type=float, default=None, help="base-scale steps (default: the workload's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/example"))
    parser.add_argument("--trajectory", action="store_true", help="add every step's gain, lr and loss to RESULT")
    parser.add_argument("--golden", action="store_true", help="first check the known gains 4/3, 1, 2 (RESULT golden)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    where = start(args.backend)
    golden = golden_gains(args.backend, where.rank, where.world_size) if args.golden else None
    spec = RunSpec(name=args.out.name, workload=args.workload, backend=args.backend, policy=args.policy,
                   workers=where.world_size, accumulation=args.accumulation, budget=args.budget, seed=args.seed)
    steps: list[dict] = []
    summary = train(spec, args.out, where.rank, where.world_size, on_step=steps.append if args.trajectory else None)
    result = {"node": socket.gethostname(), "rank": where.rank, "world_size": where.world_size,
              "rank_from": where.source, **summary}
    if golden is not None:
        result["golden"] = golden
    if args.trajectory:
        result.update({key: [step[key] for step in steps] for key in ("gain", "lr", "loss")})
    sys.stdout.write(f"RESULT {json.dumps(result)}\n")   # one write: ranks share the launcher's stdout
    sys.stdout.flush()
    stop(args.backend)


if __name__ == "__main__":
    main()
