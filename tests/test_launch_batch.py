"""The SLURM and PBS templates under a simulated batch environment (the variables the scheduler sets; a fake
`srun` that starts one copy per simulated node): the right hostfile and launcher command for a multi-node
allocation (dry run), then a real 2-rank launch on localhost."""
import pytest

from tests.launching import TRAIN, assert_two_ranks_trained_together, pbs_env, run_launch, slurm_env
from tools.launchers import VENV_BIN

MULTI_NODE_COMMANDS = {   # launcher -> (command start, with the hostfile as {hostfile}); no ssh under SLURM
    "deepspeed": "srun --nodes 3 --ntasks 3 --ntasks-per-node=1 --kill-on-bad-exit=1 ",
    "mpirun": "mpirun -np 5 --hostfile {hostfile} --map-by slot",
}


@pytest.mark.parametrize("launcher", sorted(MULTI_NODE_COMMANDS))
def test_slurm_multi_node_hostfile_and_command(tmp_path, launcher):
    env = {**slurm_env("cn[01-02,05]", "2(x2),1"), "DRY_RUN": "1"}
    outcome = run_launch(["bash", f"launch/slurm/{launcher}.sbatch", *TRAIN], env, tmp_path, free=False)
    expected = MULTI_NODE_COMMANDS[launcher].format(hostfile=tmp_path / "hostfile")
    assert outcome["commands"][0].startswith(expected), outcome["commands"]
    assert outcome["hostfile"] == ["cn01 slots=2", "cn02 slots=2", "cn05 slots=1"]


def test_slurm_torchrun_starts_one_torchrun_per_node_with_an_explicit_task_count(tmp_path):
    """A nested srun inherits the job's task count unless told --ntasks: two torchruns per node otherwise."""
    env = {**slurm_env("cn[01-03]", "2(x3)"), "DRY_RUN": "1"}
    outcome = run_launch(["bash", "launch/slurm/torchrun.sbatch", *TRAIN], env, tmp_path, free=False)
    assert outcome["commands"][0].startswith("srun --nodes 3 --ntasks 3 --ntasks-per-node=1 --kill-on-bad-exit=1 ")


def test_slurm_deepspeed_on_each_node_runs_without_ssh(tmp_path):
    env = {**slurm_env("cn[01-02,05]", "2(x2),1"), "SCALING_PLUGINS_ON_NODE": "1", "SLURM_NODEID": "2",
           "DRY_RUN": "1"}
    outcome = run_launch(["bash", "launch/deepspeed.sh", *TRAIN], env, tmp_path, free=False)
    assert outcome["commands"][0].startswith(f"deepspeed --hostfile {tmp_path / 'hostfile'} --no_ssh --node_rank 2 "
                                             "--master_addr cn01 --master_port 24242 launch/examples/train.py")


@pytest.mark.parametrize("env, message", [
    ({"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST is set but empty"),
    ({"SLURM_JOB_NODELIST": "cn[01-"}, "cannot read SLURM_JOB_NODELIST=cn[01-"),
    ({"SLURM_JOB_NODELIST": "sp-nowhere[1-2]", "SLURM_TASKS_PER_NODE": "1(x2)"},
     "node sp-nowhere1 of the slurm node list does not resolve"),
    ({"SLURM_JOB_NODELIST": "localhost,127.0.0.1", "SLURM_TASKS_PER_NODE": "2(x1),1"},
     "torchrun starts the same number of ranks on every node, but this allocation has 2 1"),
])
def test_bad_allocations_get_a_clear_message(tmp_path, env, message):
    import subprocess

    from tools.launchers import REPO

    os = __import__("os")
    full = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7", **env}
    proc = subprocess.run(["bash", "launch/slurm/torchrun.sbatch", *TRAIN], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "+ " not in proc.stderr   # nothing was started


def test_slurm_torchrun_on_each_node_gets_its_node_rank(tmp_path):
    env = {**slurm_env("cn[01-03]", "4(x3)"), "SCALING_PLUGINS_ON_NODE": "1", "SLURM_NODEID": "2",
           "NPROC_PER_NODE": "4", "DRY_RUN": "1"}
    outcome = run_launch(["bash", "launch/torchrun.sh", *TRAIN], env, tmp_path, free=False)
    assert outcome["commands"][0].startswith("torchrun --nnodes 3 --nproc_per_node 4 --node_rank 2 "
                                             "--master_addr cn01 --master_port 24242 launch/examples/train.py")


def test_slurm_torchrun_with_restarts_takes_a_c10d_rendezvous_at_the_first_node(tmp_path):
    """A static rendezvous restarts one node's workers alone; c10d restarts every node's together."""
    env = {**slurm_env("cn[01-03]", "4(x3)"), "SCALING_PLUGINS_ON_NODE": "1", "SLURM_NODEID": "2",
           "NPROC_PER_NODE": "4", "DRY_RUN": "1", "TORCHRUN_ARGS": "--max-restarts 2"}
    outcome = run_launch(["bash", "launch/torchrun.sh", *TRAIN], env, tmp_path, free=False)
    assert outcome["commands"][0].startswith("torchrun --nnodes 3 --nproc_per_node 4 --rdzv-backend c10d "
                                             "--rdzv-endpoint cn01:24242 --rdzv-id 4242 --max-restarts 2 "
                                             "launch/examples/train.py")


@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun", "torchrun"])
def test_pbs_multi_node_hostfile_and_command(tmp_path, launcher):
    env = {**pbs_env(tmp_path, ["n07", "n07", "n03", "n03"]), "LAUNCHER": launcher,
           "TRAIN_ARGS": " ".join(TRAIN), "DRY_RUN": "1"}
    outcome = run_launch(["bash", "launch/pbs/train.pbs"], env, tmp_path, free=False)
    assert outcome["hostfile"] == ["n07 slots=2", "n03 slots=2"]
    hostfile = tmp_path / "hostfile"
    expected = {"deepspeed": f"deepspeed --hostfile {hostfile} --master_addr n07 --master_port 21234",
                "mpirun": f"mpirun -np 4 --hostfile {hostfile} --map-by slot",
                "torchrun": f"mpirun -np 2 --hostfile {hostfile} --map-by ppr:1:node"}[launcher]
    assert outcome["commands"][0].startswith(expected), outcome["commands"]


@pytest.mark.slow
def test_slurm_torchrun_launches_two_simulated_nodes(tmp_path):
    """Two 'nodes' (localhost and 127.0.0.1), one rank each: srun starts torchrun.sh per node, each torchrun
    joins the static rendezvous at the first node with its SLURM_NODEID as node rank."""
    env = {**slurm_env("localhost,127.0.0.1", "1(x2)"), "FAKE_SRUN_LOG": str(tmp_path / "srun.log")}
    outcome = run_launch(["bash", "launch/slurm/torchrun.sbatch", *TRAIN], env, tmp_path)
    node_commands = sorted(c for c in outcome["commands"] if c.startswith("torchrun"))
    assert [c.split("--node_rank ")[1].split()[0] for c in node_commands] == ["0", "1"]
    assert all("--nnodes 2 " in c and "--nproc_per_node 1 " in c for c in node_commands)
    assert (tmp_path / "srun.log").read_text().startswith("srun --nodes 2 --ntasks 2 --ntasks-per-node=1")
    assert_two_ranks_trained_together(outcome)


@pytest.mark.slow
@pytest.mark.parametrize("launcher, backend", [("mpirun", "ddp"), ("horovodrun", "horovod")])
def test_slurm_template_launches_locally(tmp_path, launcher, backend):
    if launcher == "horovodrun" and not (VENV_BIN / "horovodrun").exists():
        pytest.skip("Horovod is not built here (make horovod)")
    outcome = run_launch(["bash", f"launch/slurm/{launcher}.sbatch", *TRAIN, "--backend", backend],
                         slurm_env("localhost", "2"), tmp_path)
    assert outcome["hostfile"] == ["localhost slots=2"]
    assert_two_ranks_trained_together(outcome)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mpirun", "torchrun"])
def test_pbs_template_launches_locally(tmp_path, launcher):
    env = {**pbs_env(tmp_path, ["localhost", "localhost"]), "LAUNCHER": launcher, "TRAIN_ARGS": " ".join(TRAIN)}
    outcome = run_launch(["bash", "launch/pbs/train.pbs"], env, tmp_path)
    assert_two_ranks_trained_together(outcome)
    assert outcome["commands"][0].split()[0] == launcher


def test_pbs_template_rejects_an_unknown_launcher(tmp_path):
    import subprocess

    from tools.launchers import REPO

    env = {**pbs_env(tmp_path, ["localhost"]), "LAUNCHER": "srun"}
    proc = subprocess.run(["bash", "launch/pbs/train.pbs"], cwd=REPO, env={**__import__("os").environ, **env},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "allowed: torchrun, deepspeed, mpirun, horovodrun" in proc.stderr
