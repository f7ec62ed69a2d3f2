"""Slurm on the harness's hosts: munged (its own key and socket), slurmctld in the machine's namespace at the
bridge address, one slurmd per host inside the host's namespace and UTS namespace (slurmd finds its NodeName
from the hostname). Everything lives in the state folder; clients find it through SLURM_CONF.

Settings verified with Debian 12's Slurm 22.05 in network namespaces: proctrack/linuxproc, task/none,
MpiDefault=none (Debian's PMIx plugin lacks its library), a cgroup.conf with cgroup/v1 and no automount,
%n in SlurmdSpoolDir and SlurmdPidFile."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from .network import BRIDGE_ADDR, Host, ns
from .procs import sh, start_daemon, wait_for

CTLD_PORT = 16817
SLURMD_PORT = 16818
PARTITION = "sp"
CPUS_PER_HOST = 2


def munge_socket(state_dir: Path) -> Path:
    return state_dir / "munge" / "munge.socket"


def start_munge(state_dir: Path) -> None:
    """munged with a fresh key (mungekey -c), its socket under state/munge."""
    folder = state_dir / "munge"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    key = folder / "munge.key"
    if not key.exists():
        sh(["mungekey", "-c", "-k", str(key)])
    os.chmod(key, 0o600)
    start_daemon(["/usr/sbin/munged", "-F", "--force", f"--key-file={key}", f"--socket={munge_socket(state_dir)}",
                  f"--pid-file={state_dir / 'run' / 'munged.pid'}", f"--seed-file={folder / 'munge.seed'}",
                  f"--log-file={state_dir / 'logs' / 'munged.file.log'}"], "munged", state_dir)
    wait_for(lambda: munge_socket(state_dir).exists(), "munged's socket", timeout=15,
             log=state_dir / "logs" / "munged.log")


def write_config(hosts: list[Host], state_dir: Path) -> Path:
    """slurm.conf and cgroup.conf in state/slurm; returns slurm.conf's path (SLURM_CONF)."""
    folder = state_dir / "slurm"
    (folder / "ctld").mkdir(parents=True, exist_ok=True)
    (folder / "spool").mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    run = state_dir / "run"
    names = ",".join(host.name for host in hosts)
    lines = [
        "ClusterName=spcluster", f"SlurmctldHost={socket.gethostname()}({BRIDGE_ADDR})",
        f"SlurmctldPort={CTLD_PORT}", f"SlurmdPort={SLURMD_PORT}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket(state_dir)}",
        f"StateSaveLocation={folder / 'ctld'}", f"SlurmdSpoolDir={folder / 'spool' / '%n'}",
        f"SlurmctldPidFile={run / 'slurmctld.pid'}", f"SlurmdPidFile={run / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={logs / 'slurmctld.file.log'}", f"SlurmdLogFile={logs / 'slurmd-%n.file.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "MpiDefault=none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill", "ReturnToService=2", "SlurmctldTimeout=30", "SlurmdTimeout=30",
        "InactiveLimit=0", "MinJobAge=30", "KillWait=5", "Waittime=0", "MessageTimeout=10",
        "SlurmctldDebug=info", "SlurmdDebug=info",
    ]
    lines += [f"NodeName={host.name} NodeAddr={host.addr} CPUs={CPUS_PER_HOST} State=UNKNOWN" for host in hosts]
    lines.append(f"PartitionName={PARTITION} Nodes={names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES")
    conf = folder / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    (folder / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
    return conf


def start(hosts: list[Host], state_dir: Path, env: dict[str, str]) -> None:
    """munged, slurmctld and every slurmd; returns once ``sinfo`` says every node is idle."""
    conf = write_config(hosts, state_dir)
    start_munge(state_dir)
    start_daemon(["/usr/sbin/slurmctld", "-D", "-i", "-f", str(conf)], "slurmctld", state_dir)
    wait_for(lambda: sh(["scontrol", "ping"], check=False, env=env, timeout=15).stdout.count("UP") > 0,
             "slurmctld to answer scontrol ping", timeout=30, interval=0.5, log=state_dir / "logs" / "slurmctld.log")
    for host in hosts:
        (state_dir / "slurm" / "spool" / host.name).mkdir(parents=True, exist_ok=True)
        start_daemon(ns(host.name, "unshare", "--uts", "sh", "-c",
                        f"hostname {host.name} && exec /usr/sbin/slurmd -D -f {conf}"),
                     f"slurmd-{host.name}", state_dir)
    wait_for(lambda: _all_idle(hosts, env), "every slurmd to register (sinfo: idle)", timeout=60, interval=0.5,
             log=state_dir / "logs" / f"slurmd-{hosts[-1].name}.log")


def _all_idle(hosts: list[Host], env: dict[str, str]) -> bool:
    out = sh(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, env=env, timeout=15).stdout.split()
    states = dict(zip(out[::2], out[1::2]))
    return all(states.get(host.name) == "idle" for host in hosts)
