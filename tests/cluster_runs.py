"""What the multi-host test modules share: the module's 2-host cluster (tests/cluster) and running things on it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests import cluster as harness
from tools.launchers import REPO, VENV_BIN, stop_gently

HOSTS = ["sp-n1", "sp-n2"]
PYTHON = str(VENV_BIN / "python")


@pytest.fixture(scope="module")
def cluster():
    """One 2-host cluster for the module, stopped and removed afterwards (also when a test fails)."""
    try:
        running = harness.up(2)
    except harness.HarnessError as err:
        message = f"the cluster harness cannot run here: {err}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield running
    finally:
        harness.down()


def env_for(cluster, extra: dict | None = None, path_first: tuple[str, ...] = ()) -> dict[str, str]:
    """This environment plus ``extra``, with the venv (and ``path_first``) first on PATH, pointed at the cluster."""
    return cluster.env({**os.environ, **(extra or {})}, path_first=[*path_first, str(VENV_BIN)])


def results_of(text: str) -> list[dict]:
    rows = [json.loads(line.split("RESULT ", 1)[1]) for line in text.splitlines() if "RESULT {" in line]
    return sorted(rows, key=lambda r: r["rank"])


def wait_for_job(cluster, job_id: str, timeout: float) -> str:
    """Poll the job's state every half second (``sbatch --wait`` polls in ever longer sleeps) until it ends;
    its final state. Bounded by ``timeout`` seconds; a job still running then is cancelled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=cluster.env(), capture_output=True,
                             text=True, timeout=30).stdout
        state = re.search(r"JobState=(\S+)", out)
        if state and state.group(1) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state.group(1)
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=cluster.env(), timeout=30)
    raise AssertionError(f"job {job_id} did not end within {timeout:.0f} s")


def launch_from(cluster, host: str, cmd: list[str], tmp_path: Path, env: dict | None = None,
                timeout: float = 300) -> tuple[list[dict], str]:
    """``cmd`` started on ``host`` (as a user logged in there would), in the repository; results and output."""
    proc = cluster.run(host, cmd + ["--out", str(tmp_path / "run")], env=env_for(cluster, env), cwd=REPO,
                       timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return results_of(proc.stdout), output


def run_on_each_host(cluster, cmd: list[str], env: dict[str, str], timeout: float = 300) -> tuple[list[int], str]:
    """``cmd`` started at once on every host (as torchrun's multi-node recipe does), in the repository; their
    exit codes and their output together. What is still running after ``timeout`` seconds is stopped
    (:func:`stop_gently`) and reported with exit code None, its output so far kept, so a hang shows where it stood."""
    procs = [cluster.popen(host, cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True) for host in HOSTS]
    outputs: list[list[str]] = [[] for _ in procs]
    readers = [threading.Thread(target=lambda p=proc, o=out: o.extend(p.stdout), daemon=True)
               for proc, out in zip(procs, outputs)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        codes = [proc.poll() for proc in procs]
        stop_gently(procs)
        for reader in readers:
            reader.join(timeout=10)
    text = "".join("".join(out) + ("" if code is not None else f"\n[killed after {timeout:.0f} s]\n")
                   for out, code in zip(outputs, codes))
    return codes, text
