"""One sshd per host, and the client side: a host key and a client key generated in the harness's state
folder (never ~/.ssh), a config per host, and an ``ssh`` wrapper (in state/bin, put first on PATH) that adds
the client key and the options a throw-away cluster needs, for launchers that call plain ``ssh``.

Sessions get ``session_path`` as PATH (sshd's SetEnv), as a site's login environment would put the
training software on PATH."""
from __future__ import annotations

import os
import shlex
import socket
from pathlib import Path

from .network import Host, ns
from .procs import sh, start_daemon, wait_for

SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
               "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]


def generate_keys(state_dir: Path) -> Path:
    """A host key and a client key (with its authorized_keys) under state/ssh; returns that folder."""
    keys = state_dir / "ssh"
    keys.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "client_key"):
        if not (keys / name).exists():
            sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)])
    (keys / "authorized_keys").write_text((keys / "client_key.pub").read_text())
    os.chmod(keys / "authorized_keys", 0o600)
    return keys


def write_client_wrapper(state_dir: Path) -> Path:
    """state/bin/ssh: the system ssh with the client key and SSH_OPTIONS; returns state/bin."""
    bin_dir = state_dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    key = state_dir / "ssh" / "client_key"
    wrapper = bin_dir / "ssh"
    wrapper.write_text("#!/bin/sh\n# the cluster harness's client: its own key, no known_hosts\n"
                       f"exec /usr/bin/ssh -i {shlex.quote(str(key))} {' '.join(SSH_OPTIONS)} \"$@\"\n")
    wrapper.chmod(0o755)
    return bin_dir


def write_config(host: Host, state_dir: Path, session_path: str) -> Path:
    """sshd_config for ``host``: listens on its address only, keys and pid file in the state folder."""
    keys = state_dir / "ssh"
    config = keys / f"sshd_{host.name}.conf"
    config.write_text("\n".join([
        f"ListenAddress {host.addr}", "Port 22", f"HostKey {keys / 'host_key'}",
        f"AuthorizedKeysFile {keys / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        f"PidFile {state_dir / 'run' / ('sshd-' + host.name + '.pid')}", "AcceptEnv LANG LC_*",
        f"SetEnv PATH={session_path}", "MaxStartups 64", "MaxSessions 64", "LogLevel ERROR", ""]))
    return config


def start(host: Host, state_dir: Path, session_path: str) -> None:
    """sshd for ``host`` inside its namespace and UTS namespace (so that ``ssh HOST hostname`` says HOST);
    returns once it accepts connections."""
    Path("/run/sshd").mkdir(exist_ok=True)
    config = write_config(host, state_dir, session_path)
    start_daemon(ns(host.name, "unshare", "--uts", "sh", "-c",
                    f"hostname {host.name} && exec /usr/sbin/sshd -D -e -f {shlex.quote(str(config))}"),
                 f"sshd-{host.name}", state_dir)
    wait_for(lambda: _accepts(host.addr, 22), f"sshd on {host.name}", timeout=20,
             log=state_dir / "logs" / f"sshd-{host.name}.log")


def _accepts(addr: str, port: int) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=1):
            return True
    except OSError:
        return False
