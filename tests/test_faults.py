"""Faults across the cluster harness's hosts (2 hosts x 2 ranks, tests/cluster), each injected for real:

- a rank SIGKILLed under torchrun --max-restarts: the job restarts from its last checkpoint and goes on bit for
  bit as the uninterrupted run (gain, lr, τ, loss);
- a DeepSpeed job (deepspeed --hostfile, pdsh) killed by one SIGKILLed rank, then started again: it resumes
  from engine.save_checkpoint's checkpoint, bit for bit;
- a link cut under Slurm: one host's interface goes down mid-run; the ranks on the other host stop with one
  clear line naming the failure within the timeout the user set (--timeout), and the job ends FAILED; under
  DeepSpeed (whose own groups must carry the timeout) and Horovod over MPI (Open MPI's failure detector, which
  --timeout sets) also a cut shorter than the timeout, which training rides out, and the job submitted again,
  which resumes from its checkpoint;
- on one host: a DeepSpeed peer that stops answering (the timeout reaches DeepSpeed's data-parallel group), a
  Horovod rank over MPI that stops submitting (the stall shutdown --timeout sets) or freezes (the failure detector);
- Horovod Elastic: a host removed from the discovery script, added back (growth), a worker SIGKILLed; the
  scale follows and the policy state comes through every reset.

Every wait is bounded; every process started is stopped (the launch helpers kill what outlives its timeout,
and the Slurm job is cancelled). docs/faults.md has the table these tests stand behind.
"""
from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.cluster_runs import (PYTHON, cluster, env_for, results_of,  # noqa: F401 (fixture)
                                run_on_each_host, wait_for_job)
from tools import launchers
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
    job = submit(cluster, "torchrun", log, [*ENDLESS, "--checkpoint-every", "20", "--timeout", str(timeout),
                                            "--backend", "ddp", "--out", str(out)])
    with second_host_link(cluster, job) as link:
        wait_for(lambda: (out / "checkpoint" / "state.pt").exists(), 180, "the job's first checkpoint")
        lines, detected_in = link.cut_until(lambda: stopped_lines(log, "sp-n1"), timeout + margin,
                                            "both sp-n1 ranks to stop")
        state = wait_for_job(cluster, job, timeout=240)
    assert state == "FAILED", log.read_text(errors="replace")[-4000:]
    assert detected_in <= timeout + margin
    for line in lines:
        assert f"within the collective timeout ({timeout} s; set it with --timeout)" in line, line
    print(f"link cut: detected in {detected_in:.1f} s (timeout {timeout} s)")


ENDLESS = ["launch/examples/train.py", "--workload", "quadratic", "--budget", "1000000"]   # runs until stopped


def submit(cluster, launcher: str, log: Path, args: list[str]) -> str:
    """``sbatch -N 2 --ntasks-per-node=2 -o LOG launch/slurm/LAUNCHER.sbatch ARGS...`` from the repository; the job id."""
    cmd = ["sbatch", "--parsable", "-N", "2", "--ntasks-per-node=2", "-o", str(log), f"launch/slurm/{launcher}.sbatch",
           *args]
    return subprocess.run(cmd, cwd=REPO, env=env_for(cluster), capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip().split(";")[0]


def set_link(cluster, host: str, state: str) -> None:
    cluster.run(host, ["ip", "link", "set", LINK, state], timeout=30)


class SecondHostLink:
    """sp-n2's link to the other host, cut and restored by a test (``second_host_link``)."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.is_down = False

    def set(self, down: bool) -> None:
        set_link(self.cluster, "sp-n2", "down" if down else "up")
        self.is_down = down

    def cut_for(self, seconds: float) -> None:
        """Down for ``seconds``, then up."""
        self.set(True)
        time.sleep(seconds)
        self.set(False)

    def cut_until(self, reported, bound: float, what: str) -> tuple[list[str], float]:
        """Down until ``reported()`` gives the lines that report the loss (at most ``bound`` s), then up: (the
        lines, seconds from the cut to the report)."""
        self.set(True)
        cut_at = time.monotonic()
        lines = wait_for(reported, bound, what)
        detected_in = time.monotonic() - cut_at
        self.set(False)
        return lines, detected_in


@contextlib.contextmanager
def second_host_link(cluster, job: str):
    """The link of a test that cuts it under Slurm job ``job``: on the way out, also when the test fails, the
    link is up again and the job cancelled."""
    link = SecondHostLink(cluster)
    try:
        yield link
    finally:
        if link.is_down:
            link.set(False)
        subprocess.run(["scancel", job], env=env_for(cluster), timeout=30)


def checkpoint_step(backend: str, out: Path) -> int | None:
    """The step of the trainer's last checkpoint in OUT/checkpoint: DeepSpeed's ``latest`` file names it; the
    one-file checkpoint of the other engines (replaced whole when written) holds it among the trainer's counters."""
    if backend == "deepspeed":
        latest = out / "checkpoint" / "latest"
        text = latest.read_text().strip() if latest.exists() else ""
        return int(text.removeprefix("global_step")) if text.startswith("global_step") else None
    path = out / "checkpoint" / "state.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["client"]["step"] if path.exists() else None


def later_checkpoint(backend: str, out: Path, after: int) -> int | None:
    """The step of OUT's last checkpoint once it is later than ``after``."""
    step = checkpoint_step(backend, out)
    return step if step is not None and step > after else None


def log_lines(log: Path, pattern: str) -> list[str]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if re.search(pattern, line)]


def rank_reports(log: Path, pattern: str) -> list[str]:
    """Every rank's report matching ``pattern`` (which starts with ``rank \\d``) in the job's log, each up to the
    next report or the end of its line: ranks of one node share the output srun forwards, and Python's ``print``
    writes the text and its newline apart, so two reports can land on one line."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return re.findall(rf"{pattern}.*?(?=rank \d on \S+: |rank \d: |$)", text, flags=re.M)


def resumed_lines(log: Path) -> list[str] | None:
    """The "resumed from" reports of a 4-rank job's log, once every rank has printed one."""
    lines = rank_reports(log, r"rank \d: resumed from ")
    return lines if len(lines) == 4 else None


MPI_ABORT = r"^\[sp-n1:\d+\] \*\*\* MPI_ERR_PROC_FAILED: Process Failure"


def failure_lines(backend: str, log: Path) -> list[str] | None:
    """How the sp-n1 side reports the lost host, once it has: under DeepSpeed the trainer's line from each sp-n1
    rank; under Horovod over MPI, Open MPI's abort (its failure detector declared the peer failed; MPI aborts from
    inside Horovod's MPI call, before Python sees an error), printed by the first rank to notice."""
    if backend == "deepspeed":
        return stopped_lines(log, "sp-n1")
    return log_lines(log, MPI_ABORT) or None


@pytest.mark.parametrize("launcher, backend", [("deepspeed", "deepspeed"), ("mpirun", "horovod")])
def test_a_slurm_job_rides_out_a_short_cut_stops_on_a_long_one_within_the_timeout_and_resumes(cluster, tmp_path,
                                                                                           launcher, backend):
    """launch/slurm/LAUNCHER.sbatch with --timeout 10 (the example trainer, checkpoint every 10 steps). Once it has
    checkpointed, sp-n2's link goes down for 4 s: training goes on (a later checkpoint, no rank stops, nothing
    restarts). Then down until the sp-n1 side reports the lost peer, within the timeout plus a margin: DeepSpeed's
    gradient all-reduce runs on the data-parallel group it made itself, which takes the timeout, and each sp-n1
    rank prints the trainer's line naming the knob; under Horovod over MPI, Open MPI's failure detector (which
    --timeout sets) aborts the job. The link comes back, the job ends FAILED, and the same job submitted again
    resumes from the last checkpoint."""
    timeout, margin, short_cut = 10, 10, 4
    log, out = tmp_path / "job.log", tmp_path / "run"
    args = [*ENDLESS, "--checkpoint-every", "10", "--timeout", str(timeout), "--backend", backend, "--out", str(out)]
    job = submit(cluster, launcher, log, args)
    with second_host_link(cluster, job) as link:
        first = wait_for(lambda: checkpoint_step(backend, out), 240, "the job's first checkpoint")
        link.cut_for(short_cut)
        went_on = wait_for(lambda: later_checkpoint(backend, out, first + 10), timeout + 60,
                           "checkpoints after the short cut")
        assert not log_lines(log, "training stopped|resumed from|MPI_ERR"), log.read_text(errors="replace")[-4000:]
        lines, detected_in = link.cut_until(lambda: failure_lines(backend, log), timeout + margin,
                                            "the sp-n1 side to report the loss")
        state = wait_for_job(cluster, job, timeout=240)
    assert state == "FAILED", log.read_text(errors="replace")[-4000:]
    assert detected_in <= timeout + margin
    if backend == "deepspeed":
        for line in lines:
            assert f"within the collective timeout ({timeout} s; set it with --timeout)" in line, line
    saved = checkpoint_step(backend, out)
    assert saved >= went_on
    again_log = tmp_path / "again.log"
    again = submit(cluster, launcher, again_log, args)
    try:
        resumed = wait_for(lambda: resumed_lines(again_log), 240, "every rank of the resubmitted job to resume")
    finally:
        subprocess.run(["scancel", again], env=env_for(cluster), timeout=30)
        wait_for_job(cluster, again, timeout=120)
    for line in resumed:
        assert line.endswith(f"resumed from {out / 'checkpoint'} at step {saved}"), line
    print(f"{backend} link cut: {short_cut} s ridden out (checkpoint {first} -> {went_on}); a long cut detected in "
          f"{detected_in:.1f} s (timeout {timeout} s); resubmitted job resumed at step {saved}")


def stopped_lines(log: Path, host: str) -> list[str] | None:
    """The one-line failures of the ranks of ``host``, once both have printed theirs."""
    lines = rank_reports(log, rf"rank \d on {host}: training stopped")
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


LOST_PEER = "tests/deepspeed_scripts/lost_peer.py"


def test_a_deepspeed_peer_that_stops_answering_ends_the_job_within_the_timeout(tmp_path):
    """Two DeepSpeed ranks on this host (tests/deepspeed_scripts/lost_peer.py, the example trainer's start and
    training loop, --timeout 5); rank 1 goes silent after step 2. Rank 0's gradient all-reduce runs on the
    data-parallel group DeepSpeed created itself, which must carry the 5 s (not gloo's 30 minutes): rank 0 stops
    with the example trainer's line saying a peer was lost and naming the knob, and the job fails, all within the
    timeout (plus the moment rank 0 takes to reach the all-reduce)."""
    timeout, margin = 5, 2
    with pytest.raises(AssertionError, match="exited 1") as failed:
        launchers.deepspeed(LOST_PEER, ["--backend", "deepspeed", "--out", str(tmp_path), "--timeout", str(timeout)],
                            timeout=150)
    report = json.loads((tmp_path / "lost_peer.json").read_text())
    assert not report["data_parallel_is_default"] and report["data_parallel_timeout_s"] == timeout
    assert timeout <= report["waited_s"] <= timeout + margin, report
    assert re.search(r"rank 0 on \S+: training stopped: .*Timed out waiting 5000ms .* — a peer was lost or did not "
                     r"answer within the collective timeout \(5 s; set it with --timeout\)", str(failed.value)), \
        str(failed.value)[-4000:]
    print(f"DeepSpeed, a silent peer: detected in {report['waited_s']:.1f} s (timeout {timeout} s)")


def test_a_horovod_peer_that_stops_submitting_ends_the_mpi_job_within_the_stall_bound(tmp_path):
    """The same under `mpirun -np 2` with --backend horovod and --timeout 6, which sets Horovod's stall shutdown
    to 6 s, checked every 2 s: rank 1 goes silent after step 2 (its background thread still talks to the
    coordinator, but it submits no more tensors). Horovod names the missing rank and shuts down between the
    timeout and the timeout plus three checks; rank 0 stops with the example trainer's line naming the knob."""
    timeout, check = 6, 2
    with pytest.raises(AssertionError, match="exited 1") as failed:
        launchers.mpirun(LOST_PEER, ["--backend", "horovod", "--out", str(tmp_path), "--timeout", str(timeout)],
                         timeout=150, env=launchers.MPI_ENV)
    output = str(failed.value)
    waited = json.loads((tmp_path / "lost_peer.json").read_text())["waited_s"]
    assert timeout < waited <= timeout + 3 * check + 1, waited   # + 1: the shutdown reaching rank 0's Python
    assert re.search(r"Missing ranks:\n1!: \[", output) and f"stalled for longer than {timeout} seconds" in output, \
        output[-4000:]
    assert re.search(r"rank 0 on \S+: training stopped: Horovod has been shut down\..* — a peer was lost or did not "
                     r"answer within the collective timeout \(6 s; set it with --timeout\)", output), output[-4000:]
    print(f"Horovod over MPI, a silent peer: detected in {waited:.1f} s (timeout {timeout} s)")


def test_a_frozen_horovod_peer_ends_the_mpi_job_within_the_timeout(tmp_path):
    """The same with --freeze: rank 1 stops itself with SIGSTOP, as a host that is gone (no stall check can see it:
    the coordinator blocks on it). Open MPI's failure detector, which --timeout 6 switches on, declares it failed
    6 s after its last heartbeat (sent every 6 / 4 s, so up to that long before it froze) and MPI aborts the job."""
    timeout, period = 6, 1.5
    with pytest.raises(AssertionError, match=r"exited \d+") as failed:
        launchers.mpirun(LOST_PEER, ["--backend", "horovod", "--out", str(tmp_path), "--timeout", str(timeout),
                                     "--freeze"], timeout=150, env=launchers.MPI_ENV)
    silent_for = time.time() - float((tmp_path / "silent_at").read_text())
    output = str(failed.value)
    assert "MPI_ERR_PROC_FAILED: Process Failure" in output, output[-4000:]
    assert timeout - period <= silent_for <= timeout + period + 2, silent_for   # + 2: mpirun ending the ranks
    print(f"Horovod over MPI, a frozen peer: the job ended {silent_for:.1f} s after it froze (timeout {timeout} s)")


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
