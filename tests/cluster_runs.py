"""What the multi-host test modules share: the module's 2-host cluster (tests/cluster) and running things on it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests import cluster as harness
from tests.distributed import REPO, VENV_BIN

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
    exit codes and their output together. Every process is killed if it outlives ``timeout``."""
    procs = [cluster.popen(host, cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for host in HOSTS]
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [proc.returncode for proc in procs], "".join(outputs)
