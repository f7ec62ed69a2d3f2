"""A cluster of N hosts on this machine: network namespaces with their own hostnames and addresses on a
bridge, an sshd per host, munge, slurmctld and a slurmd per host (see network.py, sshd.py, slurm.py).

    with cluster(n_hosts=2) as c:
        c.run("sp-n2", ["hostname"])                         # inside a host
        subprocess.run(["sbatch", "--wait", ...], env=c.env())   # Slurm and ssh clients, from the machine

One cluster per machine: its state (configs, keys, logs, pid files) lives in STATE_DIR, so ``up`` first
removes whatever an earlier run left behind (a crashed test, a killed ``tools/cluster.py up``), and ``down``
stops every daemon it started, every process left in its namespaces, and removes the namespaces, the
bridge, the /etc/netns folders and the state folder. Needs root."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

from . import network, packages, slurm, sshd
from .network import Host
from .procs import HarnessError, stop_pids, stop_recorded

STATE_DIR = Path(os.environ.get("SP_CLUSTER_DIR", "/run/sp-cluster"))
STATE_FILE = "cluster.json"


class Cluster:
    """The hosts of a running cluster and how to reach them."""

    def __init__(self, hosts: Sequence[Host], state_dir: Path = STATE_DIR) -> None:
        self.hosts = list(hosts)
        self.state_dir = state_dir

    @property
    def names(self) -> list[str]:
        return [host.name for host in self.hosts]

    @property
    def slurm_conf(self) -> Path:
        return self.state_dir / "slurm" / "slurm.conf"

    @property
    def bin_dir(self) -> Path:
        """Holds the ``ssh`` wrapper (the harness's key and options)."""
        return self.state_dir / "bin"

    def env(self, base: Optional[dict[str, str]] = None, path_first: Sequence[str] = ()) -> dict[str, str]:
        """The environment for Slurm and ssh clients: SLURM_CONF, and PATH with ``path_first`` and the ssh
        wrapper in front. Batch jobs started from it inherit both (sbatch exports the environment)."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join([*path_first, str(self.bin_dir), env.get("PATH", "/usr/bin:/bin")])
        env["SLURM_CONF"] = str(self.slurm_conf)
        env["PDSH_RCMD_TYPE"] = "ssh"
        return env

    def inside(self, host: str, cmd: Sequence[str]) -> list[str]:
        """The command line that runs ``cmd`` inside ``host``: its network namespace and its hostname."""
        if host not in self.names:
            raise ValueError(f"no host {host!r} in this cluster; hosts: {self.names}")
        return network.ns(host, "unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd)

    def run(self, host: str, cmd: Sequence[str], timeout: Optional[float] = 120,
            env: Optional[dict[str, str]] = None, capture: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """``cmd`` inside ``host`` with :meth:`env` (or ``env``); the completed process (output as text)."""
        return subprocess.run(self.inside(host, cmd), env=env if env is not None else self.env(), timeout=timeout,
                              capture_output=capture, text=True, **kwargs)

    def popen(self, host: str, cmd: Sequence[str], env: Optional[dict[str, str]] = None, **kwargs) -> subprocess.Popen:
        """Like :meth:`run`, started in the background (the caller waits for it)."""
        return subprocess.Popen(self.inside(host, cmd), env=env if env is not None else self.env(), **kwargs)

    def describe(self) -> dict:
        return {"hosts": [vars(host) for host in self.hosts], "bridge": network.BRIDGE,
                "bridge_addr": network.BRIDGE_ADDR, "data_iface": network.DATA_IFACE,
                "spare_iface": network.SPARE_IFACE, "slurm_conf": str(self.slurm_conf), "bin": str(self.bin_dir)}


def up(n_hosts: int = 2, state_dir: Path = STATE_DIR, session_path: Optional[str] = None) -> Cluster:
    """Bring up an ``n_hosts`` cluster (after removing any leftovers); on any failure everything started so
    far is stopped again and HarnessError says which step failed. ``session_path`` is PATH in ssh sessions
    (default: this Python's bin folder, then the system's)."""
    if os.geteuid() != 0:
        raise HarnessError("the cluster harness needs root (network namespaces, daemons)")
    down(state_dir)
    packages.ensure()
    hosts = network.plan_hosts(n_hosts)
    cluster = Cluster(hosts, state_dir)
    session_path = session_path or os.pathsep.join(
        [str(Path(sys.executable).parent), "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    try:
        for sub in ("logs", "pids", "run"):
            (state_dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        network.create(hosts)
        sshd.generate_keys(state_dir)
        sshd.write_client_wrapper(state_dir)
        for host in hosts:
            sshd.start(host, state_dir, session_path)
        slurm.start(hosts, state_dir, cluster.env())
        (state_dir / STATE_FILE).write_text(json.dumps(cluster.describe(), indent=2))
    except BaseException:
        down(state_dir)
        raise
    return cluster


def current(state_dir: Path = STATE_DIR) -> Optional[Cluster]:
    """The cluster ``up`` left running (by its state file), or None."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return Cluster([Host(**host) for host in data["hosts"]], state_dir)


def down(state_dir: Path = STATE_DIR) -> None:
    """Stop and remove everything of the harness's (also what a crashed run left): recorded daemons, any
    process still inside its namespaces, the namespaces, links, /etc/netns folders and the state folder."""
    stop_recorded(state_dir)
    for name in network.leftovers()["netns"]:
        stop_pids(network.namespace_pids(name))
    network.remove()
    shutil.rmtree(state_dir, ignore_errors=True)
    left = network.leftovers()
    if any(left.values()):
        raise HarnessError(f"could not remove the harness's {left}")


@contextlib.contextmanager
def cluster(n_hosts: int = 2, **kwargs) -> Iterator[Cluster]:
    """A running cluster for the ``with`` block; stopped and removed afterwards, also when the block fails."""
    running = up(n_hosts, **kwargs)
    try:
        yield running
    finally:
        down(running.state_dir)
