"""Commands and daemons for the cluster harness: run a command and fail with its output, wait for a condition
within a bounded number of tries and seconds, start a daemon in the background with its log and pid file,
and stop processes by pid."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence


class HarnessError(RuntimeError):
    """The cluster could not be brought up (or down); the message says which step and shows its output."""


def sh(cmd: Sequence[str], check: bool = True, timeout: float = 60, env: Optional[dict] = None,
       input: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; with ``check``, a non-zero exit raises HarnessError with the command and its output."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env, input=input)
    except subprocess.TimeoutExpired as err:
        raise HarnessError(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from err
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30, interval: float = 0.2,
             log: Optional[Path] = None) -> None:
    """Poll ``condition`` until it holds: at most ``timeout`` seconds and timeout/interval tries. On failure
    raise HarnessError naming ``what`` (with the tail of ``log`` when given)."""
    deadline = time.monotonic() + timeout
    for _ in range(max(1, int(timeout / interval))):
        if condition():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    if condition():
        return
    tail = ""
    if log is not None and log.exists():
        tail = "\n--- " + str(log) + "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")


def start_daemon(cmd: Sequence[str], name: str, state_dir: Path) -> int:
    """Start ``cmd`` (a daemon kept in the foreground) in its own session, output to logs/NAME.log; record its
    pid in pids/NAME.pid (what :func:`stop_recorded` reads); return the pid."""
    logs, pids = state_dir / "logs", state_dir / "pids"
    logs.mkdir(parents=True, exist_ok=True)
    pids.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    (pids / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def stop_pids(pids: Sequence[int], grace: float = 5) -> None:
    """SIGTERM each pid, wait up to ``grace`` seconds, SIGKILL what is left; reap those that are our children."""
    for pid in pids:
        with _ignore_gone():
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        _reap(pids)
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            with _ignore_gone():
                os.kill(pid, signal.SIGKILL)
    _reap(pids)


def stop_recorded(state_dir: Path) -> None:
    """Stop every daemon whose pid file is under state_dir/pids (leftovers of an earlier run included)."""
    pid_dir = state_dir / "pids"
    files = sorted(pid_dir.glob("*.pid")) if pid_dir.is_dir() else []
    pids = []
    for path in files:
        try:
            pids.append(int(path.read_text().split()[0]))
        except (ValueError, IndexError):
            pass
    stop_pids([pid for pid in pids if alive(pid)])
    for path in files:
        path.unlink(missing_ok=True)


def _reap(pids: Sequence[int]) -> None:
    """Collect the exit status of those of ``pids`` that are our children and have ended."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


class _ignore_gone:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        return kind is not None and issubclass(kind, ProcessLookupError)
