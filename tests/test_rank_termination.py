"""What a rank of launch/examples/train.py says when it is stopped with SIGTERM (2 real ranks, gloo, started the
way a launcher starts them: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

torchrun checks its workers every 0.1 s and SIGTERMs the others as soon as one has exited; under a lost link the
others are then often still blocked in a collective whose timeout fires a moment later. Each must still print
the line naming that failure (docs/faults.md). A rank stopped while it trains says it got SIGTERM and dies of it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

from tools.launchers import REPO, VENV_BIN, free_port

TIMEOUT = 6          # the run's --timeout: how long a collective waits for a lost peer


def start_ranks(tmp_path: Path) -> tuple[list[subprocess.Popen], list[Path]]:
    """Two ranks of a long quadratic run, each in its own session, stderr to a file."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs, logs = [], []
    for rank in (0, 1):
        log = tmp_path / f"rank{rank}.err"
        logs.append(log)
        with log.open("w") as err:
            procs.append(subprocess.Popen(
                [str(VENV_BIN / "python"), "launch/examples/train.py", "--workload", "quadratic", "--budget",
                 "1000000", "--timeout", str(TIMEOUT), "--backend", "ddp", "--out", str(tmp_path / "run")],
                cwd=REPO, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.DEVNULL,
                stderr=err, start_new_session=True))
    return procs, logs


def wait_until_training(procs: list[subprocess.Popen], metrics: Path, limit: float = 120) -> None:
    """Until rank 0 has logged a few steps (at most ``limit`` s)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert all(proc.poll() is None for proc in procs), "a rank ended before training"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            return
        time.sleep(0.2)
    raise AssertionError(f"no training steps within {limit} s")


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)    # a stopped (SIGSTOP) process dies of SIGKILL too
        proc.wait(timeout=30)


def test_a_rank_sigtermed_while_its_collective_is_failing_still_names_the_failure(tmp_path):
    """Rank 1 hangs (SIGSTOP), so rank 0 blocks in a collective; rank 0 gets SIGTERM before its timeout fires,
    as from torchrun after a sibling's exit. It must finish reporting the lost peer and exit 1, not die silently."""
    procs, logs = start_ranks(tmp_path)
    try:
        wait_until_training(procs, tmp_path / "run" / "metrics.jsonl")
        os.kill(procs[1].pid, signal.SIGSTOP)
        time.sleep(1.5)                          # rank 0 is now waiting for rank 1
        os.kill(procs[0].pid, signal.SIGTERM)
        terminated_at = time.monotonic()
        code = procs[0].wait(timeout=TIMEOUT + 60)
        reported_after = time.monotonic() - terminated_at
    finally:
        stop_all(procs)
    text = logs[0].read_text(errors="replace")
    assert code == 1, text[-3000:]
    stopped = f"rank 0 on {socket.gethostname()}: training stopped:"
    lines = [line for line in text.splitlines() if line.startswith(stopped)]
    assert len(lines) == 1, text[-3000:]
    assert f"within the collective timeout ({TIMEOUT} s; set it with --timeout)" in lines[0]
    assert "SIGTERM" not in text
    assert reported_after < TIMEOUT + 30


def test_a_rank_sigtermed_while_training_says_so_and_dies_of_the_signal(tmp_path):
    """SIGTERM mid-run (a batch system ending the job): one line naming SIGTERM, exit by the signal; the other
    rank then reports its lost peer."""
    procs, logs = start_ranks(tmp_path)
    try:
        wait_until_training(procs, tmp_path / "run" / "metrics.jsonl")
        os.kill(procs[0].pid, signal.SIGTERM)
        codes = [proc.wait(timeout=TIMEOUT + 60) for proc in procs]
    finally:
        stop_all(procs)
    first, second = (log.read_text(errors="replace") for log in logs)
    assert codes == [-signal.SIGTERM, 1], first[-2000:] + second[-2000:]
    host = socket.gethostname()
    assert f"rank 0 on {host}: training stopped: SIGTERM" in first
    assert f"rank 1 on {host}: training stopped:" in second and "a peer was lost" in second


def test_sigterm_during_an_error_that_a_library_handles_still_stops_the_rank():
    """The handler leaves an error being handled to its report. When that error was one a library catches and
    handles itself (training goes on), the rank must still stop: REPORT_GRACE_S later, with the SIGTERM line and
    exit status 143, not run on until the launcher's SIGKILL."""
    code = textwrap.dedent("""
        import importlib.util, os, signal, time
        spec = importlib.util.spec_from_file_location("train", "launch/examples/train.py")
        train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)
        train.report_termination(3)
        try:
            raise KeyError("a library's own error, handled here")
        except KeyError:
            os.kill(os.getpid(), signal.SIGTERM)       # the handler runs inside this except block
        time.sleep(60)                                 # training would go on
    """)
    started = time.monotonic()
    proc = subprocess.run([str(VENV_BIN / "python"), "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert f"rank 3 on {socket.gethostname()}: training stopped: SIGTERM" in proc.stderr
    assert elapsed < 40
