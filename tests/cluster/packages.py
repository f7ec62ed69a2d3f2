"""The system packages the harness needs, installed with apt-get when a command is missing."""
from __future__ import annotations

import os
import shutil

from .procs import HarnessError, sh

# command -> Debian package
NEEDED = {"slurmd": "slurmd", "slurmctld": "slurmctld", "munged": "munge", "sshd": "openssh-server",
          "ssh": "openssh-client", "pdsh": "pdsh", "unshare": "util-linux", "ip": "iproute2"}
SBIN = ("/usr/sbin", "/sbin")


def missing() -> list[str]:
    """Debian packages whose command is not installed."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return sorted({package for command, package in NEEDED.items() if shutil.which(command, path=path) is None})


def ensure() -> None:
    """Install what is missing (apt-get; needs root and a package mirror)."""
    packages = missing()
    if not packages:
        return
    if shutil.which("apt-get") is None:
        raise HarnessError(f"missing {packages} and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sh(["apt-get", "update", "-q"], timeout=300, env=env)
    sh(["apt-get", "install", "-y", "-q", *packages], timeout=600, env=env)
    if missing():
        raise HarnessError(f"apt-get install {packages} left {missing()} missing")
