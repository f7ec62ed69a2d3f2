"""The hosts' network: one network namespace per host, each with a veth into a bridge the harness creates
(``eth1``, the interface that reaches the other hosts) and a second interface that leads nowhere (``eth0``, a
veth whose other end stays in the namespace, with an address of its own, so that whatever picks "the first interface" picks the wrong one), plus
``/etc/netns/<host>/hosts`` naming every host (``ip netns exec`` mounts it over /etc/hosts).

Names and addresses are the harness's own: namespaces and hostnames ``sp-n1`` .. ``sp-n4``, bridge
``sp-br0`` at 10.213.47.1, hosts at 10.213.47.11 .. 14; the unused interfaces at 10.213.48.11 .. 14."""
from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from .procs import sh

PREFIX = "sp-"
BRIDGE = "sp-br0"
SUBNET = "10.213.47"
SPARE_SUBNET = "10.213.48"
BRIDGE_ADDR = f"{SUBNET}.1"
DATA_IFACE = "eth1"
SPARE_IFACE = "eth0"
SPARE_PEER = "eth0-end"   # the other end of the unused interface, in the same namespace: a dead end
NETNS_ETC = Path("/etc/netns")
MAX_HOSTS = 4


@dataclass(frozen=True)
class Host:
    """One host of the cluster: its name (= namespace = hostname) and its addresses."""

    name: str
    addr: str
    spare_addr: str


def plan_hosts(n_hosts: int) -> list[Host]:
    """The hosts of an ``n_hosts`` cluster (1 .. MAX_HOSTS)."""
    if not 1 <= n_hosts <= MAX_HOSTS:
        raise ValueError(f"n_hosts must be 1..{MAX_HOSTS}, got {n_hosts}")
    return [Host(f"{PREFIX}n{i}", f"{SUBNET}.{10 + i}", f"{SPARE_SUBNET}.{10 + i}") for i in range(1, n_hosts + 1)]


def hosts_file(hosts: list[Host]) -> str:
    """/etc/hosts for every host: localhost, the machine itself at the bridge address, and every host."""
    lines = ["127.0.0.1 localhost", f"{BRIDGE_ADDR} {socket.gethostname()}"]
    lines += [f"{host.addr} {host.name}" for host in hosts]
    return "\n".join(lines) + "\n"


def ns(host: str, *cmd: str) -> list[str]:
    """``cmd`` run inside the network namespace of ``host``."""
    return ["ip", "netns", "exec", host, *cmd]


def create(hosts: list[Host]) -> None:
    """The bridge, and per host its namespace, both interfaces, lo and its hosts file."""
    sh(["ip", "link", "add", BRIDGE, "type", "bridge"])
    sh(["ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE])
    sh(["ip", "link", "set", BRIDGE, "up"])
    text = hosts_file(hosts)
    for host in hosts:
        outside = f"{host.name}-v"
        sh(["ip", "netns", "add", host.name])
        sh(["ip", "link", "add", outside, "type", "veth", "peer", "name", f"{host.name}-i"])
        sh(["ip", "link", "set", outside, "master", BRIDGE, "up"])
        sh(["ip", "link", "set", f"{host.name}-i", "netns", host.name])
        sh(ns(host.name, "ip", "link", "set", f"{host.name}-i", "name", DATA_IFACE))
        sh(ns(host.name, "ip", "addr", "add", f"{host.addr}/24", "dev", DATA_IFACE))
        sh(ns(host.name, "ip", "link", "set", DATA_IFACE, "up"))
        sh(ns(host.name, "ip", "link", "set", "lo", "up"))
        sh(ns(host.name, "ip", "link", "add", SPARE_IFACE, "type", "veth", "peer", "name", SPARE_PEER))
        sh(ns(host.name, "ip", "addr", "add", f"{host.spare_addr}/24", "dev", SPARE_IFACE))
        sh(ns(host.name, "ip", "link", "set", SPARE_PEER, "up"))
        sh(ns(host.name, "ip", "link", "set", SPARE_IFACE, "up"))
        etc = NETNS_ETC / host.name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(text)


def leftovers() -> dict[str, list[str]]:
    """The harness's namespaces, links and /etc/netns folders that exist now (by their prefix)."""
    names = sh(["ip", "netns", "list"], check=False).stdout.split()
    links = [line.split(":")[1].strip().split("@")[0]
             for line in sh(["ip", "-o", "link", "show"], check=False).stdout.splitlines() if ":" in line]
    etc = sorted(p.name for p in NETNS_ETC.glob(f"{PREFIX}*")) if NETNS_ETC.is_dir() else []
    return {"netns": [n for n in names if n.startswith(PREFIX)],
            "links": [link for link in links if link.startswith(PREFIX)], "etc": etc}


def namespace_pids(host: str) -> list[int]:
    """Processes inside the namespace of ``host`` (daemons and whatever they started)."""
    out = sh(["ip", "netns", "pids", host], check=False).stdout
    return [int(pid) for pid in out.split() if pid.isdigit()]


def remove() -> None:
    """Remove every namespace, link and /etc/netns folder with the harness's prefix (processes inside the
    namespaces must be stopped first: see Cluster.down)."""
    found = leftovers()
    for name in found["netns"]:
        sh(["ip", "netns", "del", name], check=False)
    for link in leftovers()["links"]:   # veths die with their namespace; the bridge and strays remain
        sh(["ip", "link", "del", link], check=False)
    for name in found["etc"]:
        shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
