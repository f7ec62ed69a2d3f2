"""Test helpers: run a function on N gloo ranks in fresh processes, and run real launcher commands."""
from __future__ import annotations

import gc
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        gc.collect()  # a DDP model held in a cycle (comm-hook state) must go before its process group
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(fn: Callable[..., Any], world: int = 2, *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned processes in one gloo group; their results by rank.

    ``fn`` must be a module-level function (it is pickled into the child processes).
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(world, free_port(), out_dir, fn, args), nprocs=world, join=True)
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results


def torchrun_main(train: Callable[[int, int], Any]) -> None:
    """The body of a script run under torchrun: join the gloo group, ``train(rank, world)``, write its result to
    ``sys.argv[1]/rank<k>.json``, leave together. ``train`` must let its models go before it returns (with torch
    2.13 and gloo, destroying the group while a DDP model is alive can abort the interpreter at exit)."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = train(rank, dist.get_world_size())
    gc.collect()
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_command(cmd: Sequence[str], timeout: float = 600, env: dict | None = None,
                cwd: Path | str = REPO) -> subprocess.CompletedProcess:
    """Run a real launcher command with the venv's bin first on PATH; fail with its output if it fails or outlives
    ``timeout`` seconds. The command runs in a session of its own, and what is still running when it times out (or
    the test is interrupted) is stopped with :func:`stop_gently`: the launcher and every process it started (its
    ranks, a compiler a rank runs), not the launcher alone."""
    full_env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_gently([proc])
        stdout, stderr = _output_left(proc)
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s; stopped with everything it "
                             f"started\n--- stdout\n{stdout[-6000:]}\n--- stderr\n{stderr[-6000:]}") from None
    finally:
        stop_gently([proc])     # nothing left running when the test is interrupted
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{stdout[-6000:]}"
                             f"\n--- stderr\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _output_left(proc: subprocess.Popen, wait: float = 10) -> tuple[str, str]:
    """What a stopped process wrote, read for at most ``wait`` seconds (a process that left its session may still
    hold the pipes open)."""
    try:
        return proc.communicate(timeout=wait)
    except subprocess.TimeoutExpired:
        return "", "[output not readable: a process it started still holds its pipes]"


def stop_gently(procs: list[subprocess.Popen], grace: float = 15) -> None:
    """SIGTERM to each running process's group first: launchers such as torchrun start their workers in
    sessions of their own and stop them only on a signal they can catch; SIGKILL after ``grace`` seconds. Each
    process must lead its own group (``start_new_session=True``)."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
