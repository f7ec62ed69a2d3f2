"""Train a built-in workload with a scaling_plugins policy, under any launcher, with any backend.

    launch/torchrun.sh   launch/examples/train.py --backend ddp --policy AdaScale
    launch/torchrun.sh   launch/examples/train.py --backend fsdp
    launch/torchrun.sh   launch/examples/train.py --backend fsdp --replicas 2   (HSDP: a replica per host)
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

Faults: --checkpoint-every K saves every K steps to OUT/checkpoint and a restarted job (torchrun
--max-restarts, or the same command again) resumes there, bit for bit; --timeout S bounds how long a rank waits
for a lost peer, after which it prints one line naming the failure and exits 1 (under Horovod over MPI a lost host
makes Open MPI abort the job instead); --fault-kill RANK:STEP is a drill (that rank SIGKILLs itself once); a
rank the launcher or the batch system stops with SIGTERM says so in one line, unless it is already reporting its
own failure. docs/faults.md has what each fault looks like and how to resume.
"""
import argparse
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable, NoReturn, Optional

from scaling_plugins.app.demo import check_budget
from scaling_plugins.app.engines import BACKENDS, check_replicas, start, stop
from scaling_plugins.app.golden import golden_gains
from scaling_plugins.app.launch_env import Placement, placement
from scaling_plugins.app.training import RunSpec, train
from scaling_plugins.app.workloads import WORKLOADS


def int_at_least_1(key: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= 1, else argparse's usage error with RunSpec's message."""
    def parse(text: str) -> int:
        try:
            value: object = int(text)
        except ValueError:
            value = text
        if not (isinstance(value, int) and value >= 1):
            raise argparse.ArgumentTypeError(f"{key} must be an int >= 1, got {value!r}")
        return value
    return parse


def budget_steps(text: str) -> float:
    """An argparse ``type`` for --budget: a finite number of base-scale steps > 0 (the demo's rule and message)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a finite number of base-scale steps > 0, got {text!r}") \
            from None
    try:
        check_budget(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS, default="ddp")
    parser.add_argument("--policy", default="AdaScale", help="a name registered in scaling_plugins.POLICIES")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="digits")
    parser.add_argument("--accumulation", type=int_at_least_1("accumulation"), default=1,
                        help="micro-batches per rank per optimizer step")
    parser.add_argument("--budget", type=budget_steps, default=None, help="base-scale steps (default: the workload's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/example"))
    parser.add_argument("--checkpoint-every", type=int_at_least_1("checkpoint_every"), default=None, metavar="K",
                        help="checkpoint to OUT/checkpoint every K steps; resume from it when it is there")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="how long a collective waits for a lost peer before this rank stops with an error "
                             "(the process group timeout, which also reaches DeepSpeed's own groups, default "
                             "torch's 30 minutes; Horovod: its Gloo timeout, Open MPI's failure detector and its "
                             "stall shutdown; docs/faults.md)")
    parser.add_argument("--fault-kill", default=None, metavar="RANK:STEP",
                        help="fault drill: that rank kills itself with SIGKILL after that step, once per OUT")
    parser.add_argument("--trajectory", action="store_true", help="add every step's gain, lr and loss to RESULT")
    parser.add_argument("--golden", action="store_true", help="first check the known gains 4/3, 1, 2 (RESULT golden)")
    parser.add_argument("--replicas", type=int_at_least_1("replicas"), default=1, metavar="R",
                        help="--backend fsdp: HSDP, the mesh (R, ranks / R) of replicas x shards; the ranks are "
                             "numbered host by host, so with ranks / R per host each replica is a host")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    args = parser.parse_args()
    world_size = placement().world_size   # the launcher's, known before any process group
    try:
        check_replicas(args.backend, args.replicas, world_size)
    except ValueError as err:
        parser.error(f"argument --replicas: {err}")
    return args


LOST_PEER_WORDS = ("timed out", "timeout", "connection", "closed", "reset by peer", "broken pipe",
                   "has been shut down")   # the last: Horovod's stall shutdown, which --timeout sets


def fault_drill(spec: str, rank: int, out: Path) -> Callable[[dict], None]:
    """An ``on_step`` that, on rank RANK of ``spec`` = "RANK:STEP", kills this process with SIGKILL right after
    step STEP — once: a marker in ``out`` keeps a restarted or resubmitted job from doing it again."""
    drill_rank, drill_step = (int(part) for part in spec.split(":"))
    marker = out / "fault-drill.done"

    def on_step(record: dict) -> None:
        if rank == drill_rank and record["step"] == drill_step and not marker.exists():
            out.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"rank {rank} killed itself after step {drill_step}\n")
            print(f"fault drill: rank {rank} on {socket.gethostname()} kills itself (SIGKILL) after step "
                  f"{drill_step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return on_step


def stop_on_lost_peer(err: BaseException, rank: int, timeout: Optional[float]) -> NoReturn:
    """One clear line for the log, then exit 1 at once: with a peer gone, an orderly teardown of the process
    group could wait on that peer again."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    hint = ""
    if any(word in str(err).lower() for word in LOST_PEER_WORDS):
        limit = f"{timeout:g} s" if timeout is not None else "torch's default of 30 minutes"
        hint = (f" — a peer was lost or did not answer within the collective timeout ({limit}; set it with "
                "--timeout)")
    print(f"rank {rank} on {socket.gethostname()}: training stopped: {first}{hint}", file=sys.stderr, flush=True)
    os._exit(1)


REPORT_GRACE_S = 5.0    # how long a rank that got SIGTERM while an error was being handled has to report it


def report_termination(rank: int) -> None:
    """On SIGTERM (the launcher stopping this rank because another rank failed, or the batch system ending the
    job): one line for the log, then death by the signal, as without the handler.

    A rank that is already reporting its own failure finishes that report instead (its line names the real cause,
    and it exits). That happens when the signal came while this rank was blocked in a failing collective: torchrun
    checks its workers every 0.1 s and SIGTERMs the others as soon as one exits, often before their own collective
    timeout has fired. Python runs the handler only between bytecodes of the main thread, so a rank blocked in a
    collective runs it when the collective returns, and then inside the handling of its error. Should the error
    being handled be one some library catches and handles itself, the rank still stops, ``REPORT_GRACE_S`` later,
    with the SIGTERM line and exit status 143. The cost: a rank blocked on a peer that never answers ends at its
    collective timeout or at the launcher's SIGKILL (torchrun and Slurm send it 30 s after SIGTERM), not at once."""
    line = (f"rank {rank} on {socket.gethostname()}: training stopped: SIGTERM (the launcher or the batch system "
            "ended this rank; when another rank failed first, its line names the cause)")

    def stop_after_grace() -> None:       # on a timer thread, where signal.signal cannot be called
        print(line, file=sys.stderr, flush=True)
        os._exit(128 + signal.SIGTERM)

    def on_sigterm(signum: int, frame: object) -> None:
        if sys.exc_info()[0] is not None:     # inside an error's handling: stop_on_lost_peer reports and exits
            threading.Timer(REPORT_GRACE_S, stop_after_grace).start()
            return
        print(line, file=sys.stderr, flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def main() -> None:
    args = parse_args()
    try:
        where = start(args.backend, args.timeout)
    except RuntimeError as err:   # torch's DistNetworkError: rank 0 could not open the store on MASTER_PORT
        if "EADDRINUSE" not in str(err) and "address already in use" not in str(err).lower():
            raise
        print(f"training not started: MASTER_PORT={os.environ.get('MASTER_PORT')} is in use on "
              f"{os.environ.get('MASTER_ADDR')} (another job, or a process left over from an earlier run, listens "
              "there): set MASTER_PORT to a free port", file=sys.stderr, flush=True)
        sys.exit(1)
    report_termination(where.rank)
    try:
        run(args, where)
    except RuntimeError as err:   # torch.distributed's errors (DistBackendError, ...) are RuntimeErrors
        stop_on_lost_peer(err, where.rank, args.timeout)
    stop(args.backend)


def run(args: argparse.Namespace, where: Placement) -> None:
    golden = golden_gains(args.backend, where.rank, where.world_size, args.replicas) if args.golden else None
    spec = RunSpec(name=args.out.name, workload=args.workload, backend=args.backend, policy=args.policy,
                   workers=where.world_size, accumulation=args.accumulation, budget=args.budget, seed=args.seed,
                   checkpoint_every=args.checkpoint_every, replicas=args.replicas)
    steps: list[dict] = []
    drill = fault_drill(args.fault_kill, where.rank, args.out) if args.fault_kill else None

    def on_step(record: dict) -> None:
        steps.append(record)
        if drill is not None:
            drill(record)

    summary = train(spec, args.out, where.rank, where.world_size, on_step=on_step)
    result = {"node": socket.gethostname(), "rank": where.rank, "world_size": where.world_size,
              "rank_from": where.source, **summary}
    if golden is not None:
        result["golden"] = golden
    if args.trajectory:
        result.update({key: [step[key] for step in steps] for key in ("gain", "lr", "loss", "progress")})
    sys.stdout.write(f"RESULT {json.dumps(result)}\n")   # one write: ranks share the launcher's stdout
    sys.stdout.flush()


if __name__ == "__main__":
    main()
