"""Faults across the cluster harness's hosts (2 hosts x 2 ranks, tests/cluster), each injected for real:

- a rank SIGKILLed under torchrun --max-restarts: the job restarts from its last checkpoint and goes on bit for
  bit as the uninterrupted run (gain, lr, τ, loss);
- a DeepSpeed job (deepspeed --hostfile, pdsh) killed by one SIGKILLed rank, then started again: it resumes
  from engine.save_checkpoint's checkpoint, bit for bit;
- a link cut under Slurm: one host's interface goes down mid-run; the ranks on the other host stop with one
  clear line naming the failure within the timeout the user set (--timeout), and the job ends FAILED;
- Horovod Elastic: a host removed from the discovery script, added back (growth), a worker SIGKILLed; the
  scale follows and the policy state comes through every reset.

Every wait is bounded; every process started is stopped (the launch helpers kill what outlives its timeout,
and the Slurm job is cancelled). docs/faults.md has the table these tests stand behind.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster_runs import (PYTHON, cluster, env_for, results_of,  # noqa: F401 (fixture)
                                run_on_each_host, wait_for_job)
from tools.launchers import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TRAIN = ["launch/examples/train.py", "--workload", "quadratic", "--budget", "40", "--trajectory",
         "--checkpoint-every", "5"]
KILL = ["--fault-kill", "3:7"]   # rank 3 SIGKILLs itself after step 7; the last checkpoint is step 5
RESUMED_AT = 5
LINK = "eth1"


def assert_resumed_bit_for_bit(results: list[dict], straight: list[dict], output: str) -> None:
    """Every rank of the resumed run picked up at the checkpoint and then took exactly the steps of the
    uninterrupted run, with the same gain, learning rate, τ and loss bit for bit."""
    assert [r["rank"] for r in results] == [0, 1, 2, 3], output[-6000:]
    assert "kills itself (SIGKILL) after step 7" in output
    reference = straight[0]
    for row in results:
        assert row["resumed_from"] == RESUMED_AT
        assert row["steps"] == reference["steps"] > 7
        for key in ("gain", "lr", "progress", "loss"):
            assert row[key] == reference[key][RESUMED_AT:], key
        assert row["final_val_loss"] == reference["final_val_loss"]


def torchrun_on_both_hosts(cluster, out: Path, extra: list[str], max_restarts: int) -> tuple[list[int], str]:
    """torchrun with c10d rendezvous started on each host, as docs/clusters.md's recipe;
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 as it asks for restartable jobs (torch's shared store keeps a dead round's
    addresses)."""
    port = free_port()
    cmd = ["torchrun", "--nnodes", "2", "--nproc_per_node", "2", "--max-restarts", str(max_restarts),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"sp-n1:{port}", "--rdzv-id", f"faults-{port}",
           *TRAIN, *extra, "--backend", "ddp", "--out", str(out)]
    env = env_for(cluster, {"GLOO_SOCKET_IFNAME": LINK, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    return run_on_each_host(cluster, cmd, env)


def test_a_rank_killed_under_torchrun_restarts_from_the_checkpoint_bit_for_bit(cluster, tmp_path):
    codes, straight = torchrun_on_both_hosts(cluster, tmp_path / "straight", [], max_restarts=0)
    assert codes == [0, 0], straight[-6000:]
    codes, output = torchrun_on_both_hosts(cluster, tmp_path / "killed", KILL, max_restarts=1)
    assert codes == [0, 0], output[-6000:]
    assert "resumed from" in output
    assert_resumed_bit_for_bit(results_of(output), results_of(straight), output)


def deepspeed_from_first_host(cluster, tmp_path: Path, out: Path, extra: list[str]) -> subprocess.CompletedProcess:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("sp-n1 slots=2\nsp-n2 slots=2\n")
    cmd = ["deepspeed", "--hostfile", str(hostfile), "--master_addr", "sp-n1", "--master_port", str(free_port()),
           *TRAIN, *extra, "--backend", "deepspeed", "--out", str(out)]
    return cluster.run("sp-n1", cmd, env=env_for(cluster, {"GLOO_SOCKET_IFNAME": LINK}), cwd=REPO, timeout=300)


def test_a_killed_deepspeed_job_started_again_resumes_from_its_checkpoint_bit_for_bit(cluster, tmp_path):
    straight = deepspeed_from_first_host(cluster, tmp_path, tmp_path / "straight", [])
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-6000:]
    out = tmp_path / "killed"
    killed = deepspeed_from_first_host(cluster, tmp_path, out, KILL)
    first = killed.stdout + killed.stderr
    assert killed.returncode != 0 and results_of(killed.stdout) == [], first[-6000:]
    assert (out / "checkpoint" / "latest").read_text().strip() == f"global_step{RESUMED_AT}"
    again = deepspeed_from_first_host(cluster, tmp_path, out, KILL)   # the same command, submitted again
    output = first + again.stdout + again.stderr
    assert again.returncode == 0, output[-6000:]
    assert_resumed_bit_for_bit(results_of(again.stdout), results_of(straight.stdout), output)


def test_a_cut_link_ends_the_slurm_job_with_a_clear_error_within_the_timeout(cluster, tmp_path):
    """A long run under launch/slurm/torchrun.sbatch with --timeout 15; once it has checkpointed, sp-n2's
    interface goes down. The ranks on sp-n1 must each print the one-line failure naming the timeout within
    15 s + a margin; the link comes back and the job must end FAILED (not hang)."""
    timeout, margin = 15, 30
    log, out = tmp_path / "job.log", tmp_path / "run"
    cmd = ["sbatch", "--parsable", "-N", "2", "--ntasks-per-node=2", "-o", str(log), "launch/slurm/torchrun.sbatch",
           "launch/examples/train.py", "--workload", "quadratic", "--budget", "1000000", "--checkpoint-every", "20",
           "--timeout", str(timeout), "--backend", "ddp", "--out", str(out)]
    job = subprocess.run(cmd, cwd=REPO, env=env_for(cluster), capture_output=True, text=True, timeout=60,
                         check=True).stdout.strip().split(";")[0]
    link_down = False
    try:
        wait_for(lambda: (out / "checkpoint" / "state.pt").exists(), 180, "the job's first checkpoint")
        cluster.run("sp-n2", ["ip", "link", "set", LINK, "down"], timeout=30)
        link_down, cut_at = True, time.monotonic()
        lines = wait_for(lambda: stopped_lines(log, "sp-n1"), timeout + margin, "both sp-n1 ranks to stop")
        detected_in = time.monotonic() - cut_at
        cluster.run("sp-n2", ["ip", "link", "set", LINK, "up"], timeout=30)
        link_down = False
        state = wait_for_job(cluster, job, timeout=240)
    finally:
        if link_down:
            cluster.run("sp-n2", ["ip", "link", "set", LINK, "up"], timeout=30)
        subprocess.run(["scancel", job], env=env_for(cluster), timeout=30)
    assert state == "FAILED", log.read_text(errors="replace")[-4000:]
    assert detected_in <= timeout + margin
    for line in lines:
        assert f"within the collective timeout ({timeout} s; set it with --timeout)" in line, line
    print(f"link cut: detected in {detected_in:.1f} s (timeout {timeout} s)")


def stopped_lines(log: Path, host: str) -> list[str] | None:
    """The ranks of ``host`` that printed the one-line failure, once both have."""
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = [line for line in text.splitlines() if re.match(rf"rank \d on {host}: training stopped", line)]
    return lines if len(lines) == 2 else None


def wait_for(condition, timeout: float, what: str):
    """Poll ``condition`` every 0.2 s until it returns something truthy (returned), at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


def test_horovod_elastic_loses_a_host_grows_back_and_survives_a_killed_worker(cluster, tmp_path):
    """tests/horovod_scripts/elastic_hosts.py under horovodrun with a discovery script, started on sp-n1 (ssh to
    sp-n2): 4 workers, sp-n2 removed (2), added back (4), a worker on sp-n2 SIGKILLed (Horovod blacklists
    the host for its cooldown: 2), the host back (4). The scale follows every size, the policy state comes through every reset (τ continuous:
    each step's τ is the previous step's plus this step's gain), the run ends."""
    hosts = tmp_path / "hosts"
    hosts.write_text("sp-n1:2\nsp-n2:2\n")
    cmd = ["horovodrun", "-np", "4", "--min-np", "2", "--max-np", "4", "--blacklist-cooldown-range", "1", "2",
           "--gloo", "--network-interface", LINK,
           "--host-discovery-script", str(REPO / "tests/horovod_scripts/discover_hosts.sh"), PYTHON,
           "tests/horovod_scripts/elastic_hosts.py", str(tmp_path)]
    env = env_for(cluster, {"SCALING_PLUGINS_HOSTS_FILE": str(hosts), "PYTHONPATH": str(REPO),
                            "HOROVOD_GLOO_TIMEOUT_SECONDS": "15"})   # how soon the survivors notice the kill
    proc = cluster.run("sp-n1", cmd, env=env, cwd=REPO, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert (tmp_path / "killed").exists()
    records = json.loads((tmp_path / "records.json").read_text())
    final = {record["step"]: record for record in records}   # a step redone after a reset: its last run
    steps = [final[step] for step in sorted(final)]
    assert [step for step in sorted(final)] == list(range(1, len(steps) + 1))
    sizes = [s["size"] for s in steps]
    assert [size for k, size in enumerate(sizes) if k == 0 or size != sizes[k - 1]] == [4, 2, 4, 2, 4], sizes
    for step in steps:
        assert step["scale"] == 2 * step["size"] and step["policy_world_size"] == step["size"]
        assert 1.0 <= step["gain"] <= step["scale"]
    for before, after in zip(steps, steps[1:]):
        assert after["progress"] == pytest.approx(before["progress"] + after["gain"], rel=1e-9), after["step"]
