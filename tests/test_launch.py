"""The launch/ wrappers run for real on localhost with 2 ranks (no batch system), with the example script."""
import importlib.util
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaling_plugins.app.golden import EXPECTED as GOLDEN_GAINS
from tests.launching import TRAIN, assert_two_ranks_trained_together, run_launch, slurm_env
from tools.launchers import REPO, VENV_BIN, free_port, run_command

LOCAL = {"NPROC_PER_NODE": "2"}


@pytest.mark.slow
def test_torchrun_wrapper(tmp_path):
    outcome = run_launch(["launch/torchrun.sh", *TRAIN], LOCAL, tmp_path)
    assert outcome["commands"][0].startswith("torchrun --nnodes 1 --nproc_per_node 2 --node_rank 0 "
                                             "--master_addr 127.0.0.1 --master_port ")
    assert_two_ranks_trained_together(outcome)
    assert outcome["results"][0]["rank_from"] == "RANK"
    assert (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_torchrun_wrapper_with_restarts_gives_every_round_a_fresh_store(tmp_path):
    """--max-restarts: a c10d rendezvous and no shared agent store, so the workers print no stale-store warning
    (the detection itself: test_a_restartable_torchrun_sharing_its_store_is_recognised)."""
    outcome = run_launch(["launch/torchrun.sh", *TRAIN], {**LOCAL, "TORCHRUN_ARGS": "--max-restarts 1"}, tmp_path)
    assert outcome["commands"][0].startswith("torchrun --nnodes 1 --nproc_per_node 2 --rdzv-backend c10d ")
    assert_two_ranks_trained_together(outcome)
    assert "pytorch/pytorch#135712" not in outcome["output"]


@pytest.mark.slow
def test_mpirun_wrapper(tmp_path):
    """With the Horovod backend where Horovod is built (its MPI controller), else DDP (ranks from Open MPI)."""
    horovod = shutil.which("horovodrun", path=str(VENV_BIN)) is not None
    backend = "horovod" if horovod else "ddp"
    outcome = run_launch(["launch/mpirun.sh", *TRAIN, "--backend", backend], LOCAL, tmp_path)
    assert outcome["hostfile"] == ["127.0.0.1 slots=2"]
    assert outcome["commands"][0].startswith(f"mpirun -np 2 --hostfile {tmp_path / 'hostfile'} --map-by slot")
    assert_two_ranks_trained_together(outcome)
    assert outcome["results"][0]["rank_from"] == ("horovod" if horovod else "OMPI_COMM_WORLD_RANK")


@pytest.mark.slow
def test_deepspeed_wrapper(tmp_path):
    outcome = run_launch(["launch/deepspeed.sh", *TRAIN, "--backend", "deepspeed"], LOCAL, tmp_path)
    assert outcome["hostfile"] == ["127.0.0.1 slots=2"]
    assert outcome["commands"][0].startswith(f"deepspeed --hostfile {tmp_path / 'hostfile'} --no_ssh_check "
                                             "--master_addr 127.0.0.1")
    assert_two_ranks_trained_together(outcome)


@pytest.mark.slow
def test_torchrun_wrapper_with_the_fsdp_backend_checkpoints_and_resumes(tmp_path):
    """FSDP2 through torchrun: the golden gains on both ranks, a run that checkpoints through
    torch.distributed.checkpoint, and the same command again resuming from its last checkpoint to the same end,
bit for bit."""
    command = ["launch/torchrun.sh", *TRAIN, "--backend", "fsdp", "--golden", "--checkpoint-every", "5"]
    first = run_launch(command, LOCAL, tmp_path)
    assert_two_ranks_trained_together(first)
    assert all(r["golden"] == pytest.approx(GOLDEN_GAINS, rel=1e-6) for r in first["results"])
    assert (tmp_path / "run" / "checkpoint" / ".metadata").exists()
    again = run_launch(command, LOCAL, tmp_path)
    assert_two_ranks_trained_together(again)
    last_saved = first["results"][0]["steps"] // 5 * 5
    assert 0 < last_saved < first["results"][0]["steps"]          # the resumed run trains the last steps again
    assert [r["resumed_from"] for r in again["results"]] == [last_saved] * 2
    assert again["results"][0]["final_val_loss"] == first["results"][0]["final_val_loss"]


def require_horovod():
    if shutil.which("horovodrun", path=str(VENV_BIN)) is None:
        pytest.skip("Horovod is not built here (make horovod)")


@pytest.mark.slow
def test_horovodrun_wrapper(tmp_path):
    require_horovod()
    outcome = run_launch(["launch/horovodrun.sh", *TRAIN, "--backend", "horovod"], LOCAL, tmp_path)
    assert outcome["hostfile"] == ["127.0.0.1 slots=2"]
    assert outcome["commands"][0].startswith(f"horovodrun -np 2 --hostfile {tmp_path / 'hostfile'} --gloo")
    assert_two_ranks_trained_together(outcome)
    assert outcome["results"][0]["rank_from"] == "horovod"


@pytest.mark.parametrize("wrapper", ["torchrun", "deepspeed", "mpirun", "horovodrun"])
def test_wrappers_explain_their_usage(wrapper):
    proc = subprocess.run([f"launch/{wrapper}.sh"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr and "TRAINING_SCRIPT" in proc.stderr


NPROC_REFUSED = ("is not a number of ranks: set it to an integer >= 1 (the ranks to start on every node), or leave it "
                 "unset")


@pytest.mark.parametrize("script, value", [
    ("launch/torchrun.sh", "abc"), ("launch/torchrun.sh", "auto"), ("launch/torchrun.sh", "0"),
    ("launch/torchrun.sh", "-1"), ("launch/torchrun.sh", "1.5"), ("launch/mpirun.sh", "0"),
    ("launch/deepspeed.sh", "auto"), ("launch/horovodrun.sh", "abc"), ("launch/slurm/mpirun.sbatch", "0"),
])
def test_nproc_per_node_must_be_an_integer_of_at_least_1(tmp_path, script, value):
    """Refused by every wrapper and template, before anything starts (a dry run would print the command)."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "NPROC_PER_NODE": value,
           "DRY_RUN": "1", "HOSTFILE": str(tmp_path / "hostfile"),
           **(slurm_env("localhost", "2") if "slurm" in script else {})}
    proc = subprocess.run(["bash", script, *TRAIN], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"launch: NPROC_PER_NODE={value} {NPROC_REFUSED}" in proc.stderr, proc.stderr
    assert "+ " not in proc.stderr and not (tmp_path / "hostfile").exists()


def test_nproc_per_node_is_read_in_base_10(tmp_path):
    outcome = run_launch(["launch/torchrun.sh", *TRAIN], {"NPROC_PER_NODE": "08", "DRY_RUN": "1"}, tmp_path)
    assert outcome["commands"][0].startswith("torchrun --nnodes 1 --nproc_per_node 8 ")


@pytest.mark.parametrize("wrapper", ["torchrun", "deepspeed", "mpirun", "horovodrun"])
def test_the_printed_command_is_shell_quoted(tmp_path, wrapper):
    """Paths with spaces (and quotes) print so that the line pastes back as the same words."""
    if wrapper == "horovodrun":
        require_horovod()
    spaced = tmp_path / "my runs"
    spaced.mkdir()
    outcome = run_launch([f"launch/{wrapper}.sh", *TRAIN, "--policy", "it's"], {**LOCAL, "DRY_RUN": "1"}, spaced)
    words = shlex.split(outcome["commands"][0])
    assert words[-4:] == ["--policy", "it's", "--out", str(spaced / "run")], outcome["commands"]
    if wrapper != "torchrun":
        assert str(spaced / "hostfile") in words


@pytest.mark.parametrize("wrapper", ["torchrun", "deepspeed", "mpirun"])
def test_a_master_port_in_use_is_refused_before_the_launch(tmp_path, wrapper):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "NPROC_PER_NODE": "2",
               "MASTER_PORT": str(port), "HOSTFILE": str(tmp_path / "hostfile")}
        proc = subprocess.run([f"launch/{wrapper}.sh", *TRAIN, "--out", str(tmp_path / "run")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"launch: MASTER_PORT={port} is in use on 127.0.0.1 (another job, or a process left over from an earlier "
            "run, listens there): set MASTER_PORT to a free port") in proc.stderr
    assert "+ " not in proc.stderr


def test_the_example_trainer_names_a_master_port_in_use(tmp_path):
    """Started without a wrapper (one rank, the launcher's variables by hand): its store cannot open the port."""
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, *TRAIN, "--out", str(tmp_path / "run")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (f"training not started: MASTER_PORT={port} is in use on 127.0.0.1 (another job, or a process left over "
            "from an earlier run, listens there): set MASTER_PORT to a free port") in proc.stderr
    assert "Traceback" not in proc.stderr


def example_trainer():
    spec = importlib.util.spec_from_file_location("example_train", REPO / "launch" / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--budget", "inf"], "argument --budget: budget must be a finite number of base-scale steps > 0, got inf"),
    (["--budget", "0"], "argument --budget: budget must be a finite number of base-scale steps > 0, got 0.0"),
    (["--budget", "many"], "argument --budget: budget must be a finite number of base-scale steps > 0, got 'many'"),
    (["--accumulation", "0"], "argument --accumulation: accumulation must be an int >= 1, got 0"),
    (["--checkpoint-every", "0"], "argument --checkpoint-every: checkpoint_every must be an int >= 1, got 0"),
])
def test_the_example_trainers_bad_options_are_usage_errors(monkeypatch, capsys, args, message):
    """Refused by argparse (its usage line, exit status 2) before any process group, not in a traceback."""
    monkeypatch.setattr(sys, "argv", ["train.py", "--workload", "quadratic", *args])
    with pytest.raises(SystemExit) as exit_info:
        example_trainer().parse_args()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: train.py ")
    assert f"train.py: error: {message}" in err


@pytest.mark.slow
def test_horovod_backend_refuses_a_launcher_horovod_cannot_see(tmp_path):
    """Under torchrun each Horovod process would silently train alone (size 1): it must fail and say why."""
    require_horovod()
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "NPROC_PER_NODE": "2",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run(["launch/torchrun.sh", *TRAIN, "--backend", "horovod", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "RESULT" not in proc.stdout
    assert "Horovod sees 1: start the horovod backend with horovodrun or mpirun" in proc.stderr


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, 0, "single process")),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4, 1, "RANK")),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     (1, 2, 1, "OMPI_COMM_WORLD_RANK")),
    ({"PMI_RANK": "2", "PMI_SIZE": "3"}, (2, 3, 2, "PMI_RANK")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, (5, 8, 1, "SLURM_PROCID")),
    # torchrun's variables win over the srun task that started torchrun
    ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (0, 2, 0, "RANK")),
])
def test_placement_reads_every_launchers_variables(env, expected):
    from scaling_plugins.app.launch_env import placement

    where = placement(env)
    assert (where.rank, where.world_size, where.local_rank, where.source) == expected


@pytest.mark.parametrize("env, stale", [
    ({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "3"}, True),
    ({"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "0"}, False),
    ({"TORCHELASTIC_USE_AGENT_STORE": "False", "TORCHELASTIC_MAX_RESTARTS": "3"}, False),
    ({}, False),
])
def test_a_restartable_torchrun_sharing_its_store_is_recognised(env, stale):
    from scaling_plugins.app.launch_env import restarts_share_a_stale_store

    assert restarts_share_a_stale_store(env) is stale


def test_placement_rejects_a_rank_outside_the_world():
    from scaling_plugins.app.launch_env import placement

    with pytest.raises(ValueError, match="RANK=2 is outside"):
        placement({"RANK": "2", "WORLD_SIZE": "2"})


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_a_launch_that_times_out_is_stopped_with_the_processes_it_started(tmp_path):
    """The helper every launcher test runs through: on a timeout it stops the launcher and its ranks (a
    launcher killed alone leaves its ranks running)."""
    pid_file = tmp_path / "rank.pid"
    launcher = ("import subprocess, sys, time\n"
                "rank = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                f"open({str(pid_file)!r}, 'w').write(str(rank.pid))\n"
                "time.sleep(300)\n")
    with pytest.raises(AssertionError, match="did not finish within 5 s; stopped with everything it started"):
        run_command([sys.executable, "-c", launcher], timeout=5)
    rank = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(rank) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(rank)


HSDP_RUN = ["launch/torchrun.sh", *TRAIN, "--backend", "fsdp", "--golden", "--trajectory"]


@pytest.mark.slow
def test_torchrun_wrapper_with_fsdp_replicas_trains_as_plain_fsdp(tmp_path):
    """--replicas 2 on 4 ranks (HSDP, mesh (2, 2)): the golden gains on every rank, and every rank the trajectory
    of the same run with --replicas 1 (FSDP2 sharding over all 4 ranks)."""
    four = {"NPROC_PER_NODE": "4"}
    hsdp = run_launch([*HSDP_RUN, "--replicas", "2"], four, tmp_path / "hsdp")
    plain = run_launch([*HSDP_RUN, "--replicas", "1"], four, tmp_path / "plain")
    for outcome in (hsdp, plain):
        assert [r["rank"] for r in outcome["results"]] == [0, 1, 2, 3], outcome["output"][-3000:]
    for row in hsdp["results"]:
        assert row["golden"] == pytest.approx(GOLDEN_GAINS, rel=1e-6), (row["rank"], row["golden"])
    expected = plain["results"][0]
    assert expected["steps"] > 0 and expected["final_progress"] >= 16 and max(expected["gain"]) > 1.0
    for row in hsdp["results"]:
        assert row["steps"] == expected["steps"]
        for key in ("gain", "lr", "loss"):
            assert row[key] == pytest.approx(expected[key], rel=1e-6), (row["rank"], key)   # float32 sums


@pytest.mark.slow
def test_fsdp_replicas_reach_the_mesh(tmp_path):
    """--replicas 2 on 2 ranks leaves shard groups of one rank, which the FSDP2 driver refuses for AdaScale: the
    option reached fully_shard's mesh."""
    with pytest.raises(AssertionError) as failed:   # run_command's: the launch exited non-zero
        run_launch(["launch/torchrun.sh", *TRAIN, "--backend", "fsdp", "--replicas", "2"], LOCAL, tmp_path)
    assert "the FSDP mesh shards over 1 rank" in str(failed.value), str(failed.value)[-3000:]


@pytest.mark.parametrize("args, message", [
    (["--backend", "ddp", "--replicas", "2"],
     "replicas=2 (HSDP) needs the fsdp backend, not 'ddp': use --backend fsdp, or leave replicas at 1"),
    (["--backend", "fsdp", "--replicas", "3"],
     "replicas=3 does not divide the world size 4: the HSDP mesh is (replicas, world size / replicas); pick a "
     "divisor of 4"),
    (["--backend", "fsdp", "--replicas", "0"], "replicas must be an int >= 1, got 0"),
])
def test_the_example_trainer_refuses_replicas_it_cannot_use(monkeypatch, capsys, args, message):
    """Under a launcher of 4 ranks, before any process group: argparse's usage error (exit status 2)."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(sys, "argv", ["train.py", "--workload", "quadratic", *args])
    with pytest.raises(SystemExit) as exit_info:
        example_trainer().parse_args()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"train.py: error: argument --replicas: {message}" in err
