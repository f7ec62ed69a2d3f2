"""``scaling-plugins bench quality``: the quality-at-scale study (``scaling_plugins.app.quality``) and its report
(``scaling_plugins.app.quality_report``), shared by the CLI and ``benchmarks/quality.py``.

    scaling-plugins bench quality --quick          # the CI slice, about a minute
    scaling-plugins bench quality                  # the full study (about 35 min on 2 cores), resumable
    scaling-plugins bench quality --adaptive       # AdaptiveBatch against AdaScale at fixed S, 2 ranks
    scaling-plugins bench quality --report-only    # re-render report.md and the figures from finished runs
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path
from typing import Callable

from .quality import ADAPTIVE, FULL, QUICK, QUICK_ADAPTIVE, run_study
from .quality_report import write_report

DEFAULT_OUT = Path("runs/quality")


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's options, on ``parser``."""
    parser.add_argument("--quick", action="store_true",
                        help=f"the CI slice: {', '.join(QUICK.workloads)} at S ∈ {list(QUICK.scales)}, budget "
                             f"{QUICK.budget:g}, {QUICK.seeds} seed, every method, no S = 1 sweep (about a minute)")
    parser.add_argument("--adaptive", action="store_true",
                        help=f"the adaptive-batch study: {', '.join(ADAPTIVE.methods)} on "
                             f"{', '.join(ADAPTIVE.workloads)}, AdaScale at S ∈ {list(ADAPTIVE.scales[1:])} and "
                             f"AdaptiveBatch up to S = {max(ADAPTIVE.scales)}, {ADAPTIVE.workers} ranks per scaled "
                             f"run, lr tuned at S = 1; with --quick: {', '.join(QUICK_ADAPTIVE.workloads)}, up to "
                             f"S = {max(QUICK_ADAPTIVE.scales)}, budget {QUICK_ADAPTIVE.budget:g}")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"study folder; finished runs in it are kept and skipped (default: {DEFAULT_OUT}, "
                             f"with -adaptive and/or -quick appended for those studies)")
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
    words = ["scaling-plugins", "bench", "quality"] + ["--adaptive"] * args.adaptive + ["--quick"] * args.quick
    for option in ("out", "seeds", "workers"):
        if getattr(args, option) is not None:
            words += [f"--{option}", str(getattr(args, option))]
    words += [] if args.jobs == 2 else ["--jobs", str(args.jobs)]
    for workload in args.workloads or []:
        words += ["--workload", workload]
    return shlex.join(words)


def run_quality(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """Run (or resume) the study that ``args`` describe, write its report, print it; exit status."""
    grid = {(False, False): FULL, (False, True): QUICK, (True, False): ADAPTIVE,
            (True, True): QUICK_ADAPTIVE}[args.adaptive, args.quick]
    overrides = {key: value for key, value in (("seeds", args.seeds), ("workers", args.workers)) if value is not None}
    if args.workloads:
        overrides["workloads"] = tuple(args.workloads)
    grid = dataclasses.replace(grid, **overrides)
    suffix = "-adaptive" * args.adaptive + "-quick" * args.quick
    out = args.out or DEFAULT_OUT.with_name(DEFAULT_OUT.name + suffix)
    if not args.report_only:
        run_study(grid, out, jobs=args.jobs, log=log)
    report = write_report(out, command=command_line(args))
    log(report.read_text())
    log(f"wrote {report} and the figures beside it")
    return 0
