"""The cluster harness: N hosts on one machine (network + UTS namespaces on a bridge), each with sshd and a
slurmd, plus munge and slurmctld; used by the multi-host tests and by ``tools/cluster.py``.
See harness.py for the life cycle."""
from .harness import STATE_DIR, Cluster, cluster, current, down, up
from .network import BRIDGE_ADDR, DATA_IFACE, SPARE_IFACE, Host
from .procs import HarnessError

__all__ = ["BRIDGE_ADDR", "DATA_IFACE", "SPARE_IFACE", "STATE_DIR", "Cluster", "HarnessError", "Host", "cluster",
           "current", "down", "up"]
