"""Multi-host runs for real, on the cluster harness (tests/cluster): two hosts with their own names, addresses
and a spare interface each, sshd, munge, slurmctld and a slurmd per host. Every launcher runs
launch/examples/train.py --golden with 2 hosts x 2 ranks (the Slurm torchrun template also with FSDP2, and
with HSDP: one replica per host); every run must report world size 4 on both hosts, the golden first-step gains
(4/3, 1, 2) on every rank, identical gain, lr and loss trajectories on every rank, equal (within float
tolerance) to the same 4-rank run on one host (DDP). Needs root; without it the module is skipped, except under
CI=true where it fails."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from scaling_plugins.app.golden import EXPECTED as GOLDEN_GAINS
from tests import cluster as harness
from tests.cluster_runs import (HOSTS, PYTHON, cluster, env_for, launch_from, results_of,  # noqa: F401 (fixture)
                                run_on_each_host, wait_for_job)
from tests.launching import run_launch
from tools.launchers import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TRAIN = ["launch/examples/train.py", "--workload", "quadratic", "--budget", "8", "--trajectory", "--golden"]
# (launch/slurm/<launcher>.sbatch, --backend and its options)
SLURM_RUNS = [("deepspeed", "deepspeed"), ("horovodrun", "horovod"), ("mpirun", "ddp"), ("torchrun", "ddp"),
              ("torchrun", "fsdp"), ("torchrun", "fsdp --replicas 2")]
NO_SSH = "#!/bin/sh\necho \"ssh $*\" >> \"$(dirname \"$0\")/ssh.log\"\nexit 255\n"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run with 4 ranks on one host (torchrun, DDP): every rank's trajectory."""
    tmp = tmp_path_factory.mktemp("one_host")
    outcome = run_launch(["launch/torchrun.sh", *TRAIN], {"NPROC_PER_NODE": "4"}, tmp)
    assert [r["rank"] for r in outcome["results"]] == [0, 1, 2, 3], outcome["output"][-3000:]
    return outcome["results"][0]


def assert_trained_across_hosts(results: list[dict], reference: dict, log: str) -> None:
    """4 ranks, 2 per host, the golden gains on each, one trajectory, equal to the one-host run's."""
    assert [r["rank"] for r in results] == [0, 1, 2, 3], log[-4000:]
    assert all(r["world_size"] == 4 for r in results)
    assert sorted(r["node"] for r in results) == ["sp-n1", "sp-n1", "sp-n2", "sp-n2"]
    for row in results:
        assert row["golden"] == pytest.approx(GOLDEN_GAINS, rel=1e-6), (row["rank"], row["golden"])
    first = results[0]
    assert len(first["gain"]) == first["steps"] > 0 and first["final_progress"] >= 8
    for other in results[1:]:
        assert (other["gain"], other["lr"], other["loss"]) == (first["gain"], first["lr"], first["loss"])
    assert first["gain"] == pytest.approx(reference["gain"], rel=1e-6)
    assert first["lr"] == pytest.approx(reference["lr"], rel=1e-6)
    assert first["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert max(first["gain"]) > 1.0   # AdaScale measured something


def test_hosts_have_names_addresses_ssh_slurm_and_a_spare_interface(cluster):
    assert cluster.run("sp-n2", ["hostname"]).stdout.strip() == "sp-n2"
    assert cluster.run("sp-n2", ["getent", "hosts", "sp-n1"]).stdout.split()[0] == "10.213.47.11"
    route = cluster.run("sp-n1", ["ip", "route", "get", "10.213.47.12"]).stdout
    assert " dev eth1 " in route
    spare = cluster.run("sp-n1", ["ip", "-o", "-4", "addr", "show", "eth0"]).stdout
    assert "10.213.48.11/24" in spare
    assert cluster.run("sp-n1", ["ssh", "sp-n2", "hostname"]).stdout.strip() == "sp-n2"
    srun = subprocess.run(["srun", "-N", "2", "hostname"], env=cluster.env(), capture_output=True, text=True,
                          timeout=60)
    assert sorted(srun.stdout.split()) == HOSTS, srun.stderr


def test_launch_picks_the_interface_of_the_route_unless_set(cluster):
    base = {"SLURM_JOB_NODELIST": "sp-n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "9",
            "DRY_RUN": "1"}
    script = 'source launch/common.sh x; echo "$GLOO_SOCKET_IFNAME $NCCL_SOCKET_IFNAME $HOROVOD_GLOO_IFACE"'
    picked = cluster.run("sp-n2", ["bash", "-c", script], env=env_for(cluster, base), cwd=REPO)
    assert picked.stdout.split() == ["eth1"] * 3, picked.stderr
    spare = cluster.run("sp-n2", ["bash", "-c", script], cwd=REPO,
                        env=env_for(cluster, {**base, "MASTER_ADDR": "10.213.48.12"}))
    assert spare.stdout.split() == ["eth0"] * 3, spare.stderr
    chosen = cluster.run("sp-n2", ["bash", "-c", script], cwd=REPO,
                         env=env_for(cluster, {**base, "GLOO_SOCKET_IFNAME": "mine"}))
    assert chosen.stdout.split() == ["mine", "eth1", "eth1"], chosen.stderr


@pytest.mark.parametrize("launcher, backend", SLURM_RUNS)
def test_slurm_template_across_two_hosts_without_ssh(cluster, reference, tmp_path, launcher, backend):
    """sbatch -N 2 --ntasks-per-node=2: the template starts every rank through Slurm; any ssh fails and is
    logged (an ssh stub first on PATH). FSDP2 shards over the 4 ranks of both hosts, HSDP (--replicas 2) within
    each host with the replicas across the hosts; both must give the one-host DDP run's trajectory."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "ssh").write_text(NO_SSH)
    (stub / "ssh").chmod(0o755)
    log = tmp_path / "job.log"
    cmd = ["sbatch", "--parsable", "-N", "2", "--ntasks-per-node=2", "-o", str(log), f"launch/slurm/{launcher}.sbatch",
           *TRAIN, "--backend", *backend.split(), "--out", str(tmp_path / "run")]
    env = env_for(cluster, path_first=(str(stub),))
    job = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    state = wait_for_job(cluster, job.stdout.strip().split(";")[0], timeout=360)
    text = log.read_text(errors="replace") if log.exists() else ""
    assert state == "COMPLETED", state + "\n" + text[-4000:]
    assert not (stub / "ssh.log").exists(), (stub / "ssh.log").read_text()
    assert_trained_across_hosts(results_of(text), reference, text)
    progress = [line for line in text.splitlines() if line.startswith("progress sp-n1 rank 0 |")]
    assert len(progress) >= 2 and "\r" not in text
    assert re.search(r"\| loss \S+ lr \S+ gain \S+$", progress[-1]), progress[-1]


SSH_LAUNCHES = {
    "mpirun --host": lambda port: [
        "mpirun", "--allow-run-as-root", "-np", "4", "--host", "sp-n1:2,sp-n2:2", "--mca", "btl_tcp_if_include",
        "eth1", "-x", "MASTER_ADDR=sp-n1", "-x", f"MASTER_PORT={port}", "-x", "GLOO_SOCKET_IFNAME=eth1", "-x", "PATH",
        PYTHON, *TRAIN, "--backend", "ddp"],
    "horovodrun --gloo": lambda port: [
        "horovodrun", "-np", "4", "-H", "sp-n1:2,sp-n2:2", "--gloo", "--network-interface", "eth1",
        PYTHON, *TRAIN, "--backend", "horovod"],
    "horovodrun --mpi": lambda port: [
        "horovodrun", "-np", "4", "-H", "sp-n1:2,sp-n2:2", "--mpi", "--network-interface", "eth1",
        "--mpi-args=--allow-run-as-root", PYTHON, *TRAIN, "--backend", "horovod"],
}


@pytest.mark.parametrize("name", sorted(SSH_LAUNCHES))
def test_ssh_launch_across_two_hosts(cluster, reference, tmp_path, name):
    results, output = launch_from(cluster, "sp-n1", SSH_LAUNCHES[name](free_port()), tmp_path)
    assert_trained_across_hosts(results, reference, output)


def test_deepspeed_hostfile_with_pdsh(cluster, reference, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("sp-n1 slots=2\nsp-n2 slots=2\n")
    cmd = ["deepspeed", "--hostfile", str(hostfile), "--master_addr", "sp-n1", "--master_port", str(free_port()),
           *TRAIN, "--backend", "deepspeed"]
    results, output = launch_from(cluster, "sp-n1", cmd, tmp_path, env={"GLOO_SOCKET_IFNAME": "eth1"})
    assert "pdsh" in output
    assert_trained_across_hosts(results, reference, output)


def test_torchrun_c10d_rendezvous_started_on_each_host(cluster, reference, tmp_path):
    port = free_port()
    cmd = ["torchrun", "--nnodes", "2", "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
           f"sp-n1:{port}", "--rdzv-id", "sp-test", *TRAIN, "--backend", "ddp", "--out", str(tmp_path / "run")]
    codes, output = run_on_each_host(cluster, cmd, env_for(cluster, {"GLOO_SOCKET_IFNAME": "eth1"}))
    assert codes == [0, 0], output[-6000:]
    assert_trained_across_hosts(results_of(output), reference, output)


def pbs_env(tmp_path: Path, slots: list[str]) -> dict[str, str]:
    nodefile = tmp_path / "PBS_NODEFILE"
    nodefile.write_text("".join(f"{host}\n" for host in slots))
    return {"PBS_NODEFILE": str(nodefile), "PBS_JOBID": "77.pbs", "PBS_O_WORKDIR": str(REPO),
            "HOSTFILE": str(tmp_path / "hostfile"), "MASTER_PORT": str(free_port())}


@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_pbs_job_across_two_hosts(cluster, reference, tmp_path, launcher):
    """PBS's environment simulated (PBS_NODEFILE etc.), the job script run on the first host, the launch real."""
    env = {**pbs_env(tmp_path, ["sp-n1", "sp-n1", "sp-n2", "sp-n2"]), "LAUNCHER": launcher,
           "TRAIN_ARGS": " ".join([*TRAIN, "--out", str(tmp_path / "run")]), "PYTHON": PYTHON}
    proc = cluster.run("sp-n1", ["bash", "launch/pbs/train.pbs"], env=env_for(cluster, env), cwd=REPO, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert_trained_across_hosts(results_of(proc.stdout), reference, output)


def test_a_host_that_does_not_answer_is_named_quickly(cluster, tmp_path):
    env = {**pbs_env(tmp_path, ["sp-n1", "sp-n1", "10.213.47.99", "10.213.47.99"]), "LAUNCHER": "mpirun",
           "TRAIN_ARGS": " ".join(TRAIN), "SSH_TIMEOUT": "5"}
    started = time.monotonic()
    proc = cluster.run("sp-n1", ["bash", "launch/pbs/train.pbs"], env=env_for(cluster, env), cwd=REPO, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "node(s) 10.213.47.99 did not answer ssh within 5 s" in proc.stderr
    assert time.monotonic() - started < 30


def test_srun_starts_the_ranks_itself_across_hosts(cluster, reference, tmp_path):
    """srun starts 4 ranks on 2 hosts with no launcher in between (each reads SLURM_PROCID, SLURM_NTASKS)."""
    env = env_for(cluster, {"MASTER_ADDR": "sp-n1", "MASTER_PORT": str(free_port()), "GLOO_SOCKET_IFNAME": "eth1",
                            "PYTHONPATH": str(REPO)})
    proc = subprocess.run(["srun", "-N", "2", "--ntasks-per-node=2", "--kill-on-bad-exit=1", PYTHON, *TRAIN,
                           "--backend", "ddp", "--out", str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = results_of(proc.stdout)
    assert {r["rank_from"] for r in results} == {"SLURM_PROCID"}, results
    assert_trained_across_hosts(results, reference, proc.stdout + proc.stderr)


def test_a_second_up_after_a_crash_works_and_down_leaves_nothing(cluster):
    """Last in the module: kill slurmctld as a crash would, bring the cluster up again over the leftovers,
    use it, take it down."""
    pid = int((harness.STATE_DIR / "pids" / "slurmctld.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    again = harness.up(2)
    srun = subprocess.run(["srun", "-N", "2", "hostname"], env=again.env(), capture_output=True, text=True,
                          timeout=60)
    assert sorted(srun.stdout.split()) == HOSTS, srun.stderr
    harness.down()
    assert harness.network.leftovers() == {"netns": [], "links": [], "etc": []}
    assert not harness.STATE_DIR.exists()
    daemons = subprocess.run(["pgrep", "-af", str(harness.STATE_DIR)], capture_output=True, text=True).stdout
    assert daemons == ""   # every daemon's command line names the state folder
