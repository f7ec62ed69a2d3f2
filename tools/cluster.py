#!/usr/bin/env python3
"""A Slurm cluster of N hosts on this machine, for trying the launchers and batch templates by hand (root).

    tools/cluster.py up [--hosts 2]     bring it up (removes leftovers of an earlier run first)
    tools/cluster.py status             hosts, addresses, sinfo
    tools/cluster.py env                shell lines that point Slurm and ssh clients at it: eval "$(... env)"
    tools/cluster.py run HOST CMD...    run CMD inside HOST (its namespace and hostname)
    tools/cluster.py down               stop every daemon and remove the namespaces, bridge and state

The hosts are sp-n1 .. sp-nN (10.213.47.11 ..) on the bridge sp-br0 (10.213.47.1); see tests/cluster/.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import HarnessError, current, down, up  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up").add_argument("--hosts", type=int, default=2, help="number of hosts, 1..4 (default 2)")
    sub.add_parser("down")
    sub.add_parser("status")
    sub.add_parser("env")
    run = sub.add_parser("run")
    run.add_argument("host")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            cluster = up(args.hosts)
            print(f"up: {', '.join(f'{h.name} ({h.addr})' for h in cluster.hosts)}; "
                  f'point clients at it with: eval "$({sys.argv[0]} env)"')
        elif args.command == "down":
            down()
            print("down: nothing of the harness is left")
        else:
            cluster = current()
            if cluster is None:
                print("no cluster is up (tools/cluster.py up)", file=sys.stderr)
                return 1
            if args.command == "status":
                for host in cluster.hosts:
                    print(f"{host.name}  {host.addr}  (unused interface: {host.spare_addr})")
                print(subprocess.run(["sinfo", "-N"], env=cluster.env(), capture_output=True, text=True).stdout,
                      end="")
            elif args.command == "env":
                env = cluster.env()
                for key in ("SLURM_CONF", "PATH", "PDSH_RCMD_TYPE"):
                    print(f"export {key}={shlex.quote(env[key])}")
            else:
                if not args.cmd:
                    parser.error("run needs a command")
                proc = cluster.run(args.host, args.cmd, timeout=None, capture=False)
                return proc.returncode
    except (HarnessError, ValueError) as err:
        print(f"cluster: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
