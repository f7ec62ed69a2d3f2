"""Helpers for the launcher tests: run a launch/ wrapper or batch template for real and read what it did."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tools.launchers import REPO, VENV_BIN, free_port, run_command

FAKE_BIN = Path(__file__).resolve().parent / "fake_bin"
TRAIN = ["launch/examples/train.py", "--workload", "quadratic", "--budget", "16"]


def run_launch(cmd: list[str], env: dict[str, str], tmp_path: Path, free: bool = True, timeout: float = 240) -> dict:
    """Run ``cmd`` (a wrapper or template with the example script) with a fresh HOSTFILE and output folder
    (and a free MASTER_PORT unless ``free`` is off); return its printed launcher commands, its hostfile lines
    and the RESULT of every rank."""
    hostfile = tmp_path / "hostfile"
    path = os.pathsep.join([str(FAKE_BIN), str(VENV_BIN), os.environ["PATH"]])
    full_env = {"HOSTFILE": str(hostfile), "PATH": path, **({"MASTER_PORT": str(free_port())} if free else {}), **env}
    proc = run_command(cmd + ["--out", str(tmp_path / "run")], env=full_env, timeout=timeout)
    output = proc.stdout + proc.stderr
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in output.splitlines() if "RESULT {" in line]
    return {"commands": [line[2:] for line in output.splitlines() if line.startswith("+ ")],
            "hostfile": hostfile.read_text().splitlines() if hostfile.exists() else None,
            "results": sorted(results, key=lambda r: r["rank"]), "output": output}


def assert_two_ranks_trained_together(outcome: dict) -> None:
    """Both ranks of one 2-rank job ran the whole budget and agree on every number."""
    results = outcome["results"]
    assert [r["rank"] for r in results] == [0, 1], outcome["output"][-3000:]
    assert all(r["world_size"] == 2 for r in results)
    assert results[0]["steps"] > 0 and results[0]["final_progress"] >= 16
    for key in ("steps", "mean_gain", "final_val_loss"):
        assert results[0][key] == results[1][key]


def slurm_env(nodelist: str, tasks_per_node: str, job_id: int = 4242) -> dict[str, str]:
    """The variables SLURM sets in a batch job's environment."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": nodelist, "SLURM_TASKS_PER_NODE": tasks_per_node,
            "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NAME": "scaling-plugins"}


def pbs_env(tmp_path: Path, slots: list[str], job_id: str = "1234.pbs-server") -> dict[str, str]:
    """The variables PBS sets, with a PBS_NODEFILE of one line per rank slot."""
    nodefile = tmp_path / "PBS_NODEFILE"
    nodefile.write_text("".join(f"{host}\n" for host in slots))
    return {"PBS_NODEFILE": str(nodefile), "PBS_JOBID": job_id, "PBS_O_WORKDIR": str(REPO),
            "PBS_ENVIRONMENT": "PBS_BATCH"}
