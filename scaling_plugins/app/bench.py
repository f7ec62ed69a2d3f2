"""``scaling-plugins bench quality``: the quality-at-scale study (``scaling_plugins.app.quality``) and its report
(``scaling_plugins.app.quality_report``), shared by the CLI and ``benchmarks/quality.py``.

    scaling-plugins bench quality --quick          # the CI slice, about a minute
    scaling-plugins bench quality                  # the full study (about 35 min on 2 cores), resumable
    scaling-plugins bench quality --report-only    # re-render report.md and the figures from finished runs
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path
from typing import Callable

from .quality import FULL, QUICK, run_study
from .quality_report import write_report

DEFAULT_OUT = Path("runs/quality")


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's options, on ``parser``."""
    parser.add_argument("--quick", action="store_true",
                        help=f"the CI slice: {', '.join(QUICK.workloads)} at S ∈ {list(QUICK.scales)}, budget "
                             f"{QUICK.budget:g}, {QUICK.seeds} seed, every method, no S = 1 sweep (about a minute)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"study folder; finished runs in it are kept and skipped (default: {DEFAULT_OUT}, "
                             f"or {DEFAULT_OUT}-quick with --quick)")
    parser.add_argument("--jobs", type=int, default=2, help="one-rank runs trained at a time (default: 2)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds per cell (default: {FULL.seeds}; {QUICK.seeds} with --quick)")
    parser.add_argument("--workers", type=int, default=None,
                        help="ranks per scaled run (S = workers × accumulation); default 1: every scale as one "
                             "rank × S accumulation steps (the same samples and the same S gradients per step)")
    parser.add_argument("--workload", action="append", dest="workloads", metavar="NAME",
                        help=f"restrict to a workload (repeatable; default: {', '.join(FULL.workloads)})")
    parser.add_argument("--report-only", action="store_true", help="train nothing; re-render the report")


def command_line(args: argparse.Namespace) -> str:
    """The study command behind ``args`` (without ``--report-only``: the one that trains the runs), for the report."""
    words = ["scaling-plugins", "bench", "quality"] + ["--quick"] * args.quick
    for option in ("out", "seeds", "workers"):
        if getattr(args, option) is not None:
            words += [f"--{option}", str(getattr(args, option))]
    words += [] if args.jobs == 2 else ["--jobs", str(args.jobs)]
    for workload in args.workloads or []:
        words += ["--workload", workload]
    return shlex.join(words)


def run_quality(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """Run (or resume) the study that ``args`` describe, write its report, print it; exit status."""
    grid = QUICK if args.quick else FULL
    overrides = {key: value for key, value in (("seeds", args.seeds), ("workers", args.workers)) if value is not None}
    if args.workloads:
        overrides["workloads"] = tuple(args.workloads)
    grid = dataclasses.replace(grid, **overrides)
    out = args.out or (DEFAULT_OUT.with_name(DEFAULT_OUT.name + "-quick") if args.quick else DEFAULT_OUT)
    if not args.report_only:
        run_study(grid, out, jobs=args.jobs, log=log)
    report = write_report(out, command=command_line(args))
    log(report.read_text())
    log(f"wrote {report} and the figures beside it")
    return 0
