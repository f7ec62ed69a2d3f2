"""Running commands and scripts under the engines' real launchers, for the tests and the benchmarks.

:func:`run_command` runs one command with the venv's bin first on PATH and the repository on PYTHONPATH, in a
session of its own, and stops everything it started when it fails, times out or is interrupted. One function per
launcher runs a script under it, 2 local ranks by default: :func:`torchrun`, :func:`deepspeed` (CPU
accelerator), :func:`horovodrun` (Gloo or MPI) and :func:`mpirun`.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

PathLike = Union[str, Path]
# What DeepSpeed needs to run on CPU ranks; one thread per rank.
DEEPSPEED_CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
# mpirun as root needs the first two; the third stops idle ranks spinning on a machine with few cores.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_command(cmd: Sequence[str], timeout: Optional[float] = 600, env: Optional[Mapping[str, str]] = None,
                cwd: PathLike = REPO) -> subprocess.CompletedProcess:
    """Run a real launcher command with the venv's bin first on PATH; fail with its output if it fails or outlives
    ``timeout`` seconds (None: no limit). The command runs in a session of its own, and what is still running when
    it times out (or the caller is interrupted) is stopped with :func:`stop_gently`: the launcher and every process
    it started (its ranks, a compiler a rank runs), not the launcher alone."""
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
        stop_gently([proc])     # nothing left running when the caller is interrupted
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


# -- the launchers: each runs ``script args...`` through run_command ---------------------------------------------
def torchrun(script: PathLike, args: Sequence[str] = (), *, nproc: int = 2, timeout: Optional[float] = 600,
             env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC --master_port PORT script args...`` (a free port)."""
    return run_command([str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port",
                        str(free_port()), str(script), *args], timeout=timeout, env=env)


def deepspeed(script: PathLike, args: Sequence[str] = (), *, num_gpus: int = 2, timeout: Optional[float] = 600,
              env: Optional[Mapping[str, str]] = DEEPSPEED_CPU_ENV) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N --master_port PORT script args...`` (a free port), on CPU ranks unless ``env``
    says otherwise (``env`` replaces :data:`DEEPSPEED_CPU_ENV`)."""
    return run_command([str(VENV_BIN / "deepspeed"), "--num_gpus", str(num_gpus), "--master_port", str(free_port()),
                        str(script), *args], timeout=timeout, env=env)


def horovodrun(script: PathLike, args: Sequence[str] = (), *, np: int = 2, gloo: bool = True,
               options: Sequence[str] = (), timeout: Optional[float] = 600,
               env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    """``horovodrun [--gloo] -np NP options... python script args...``: Gloo, or MPI with ``gloo=False``;
    ``options`` are more horovodrun options (Elastic's, for one)."""
    return run_command([str(VENV_BIN / "horovodrun"), *(["--gloo"] if gloo else []), "-np", str(np), *options,
                        str(VENV_BIN / "python"), str(script), *args], timeout=timeout, env=env)


def mpirun(script: PathLike, args: Sequence[str] = (), *, np: int = 2, timeout: Optional[float] = 600,
           env: Optional[Mapping[str, str]] = None) -> subprocess.CompletedProcess:
    """``mpirun -np NP python script args...`` (as root, pass :data:`MPI_ENV`). mpirun is named, not given as a
    path: Open MPI takes an absolute path to mpirun as its install prefix on every rank."""
    return run_command(["mpirun", "-np", str(np), str(VENV_BIN / "python"), str(script), *args], timeout=timeout,
                       env=env)
