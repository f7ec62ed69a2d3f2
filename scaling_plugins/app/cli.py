"""The ``scaling-plugins`` command: ``demo``, ``report`` and ``check-config``. Run ``scaling-plugins --help``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

DESCRIPTION = """\
Batch-size-aware learning-rate policies (AdaScale, and the scaling rules in the policy registry) for
PyTorch DDP, DeepSpeed and Horovod.

  demo           train a built-in workload at a large scale with AdaScale and the baselines, against the
                 S = 1 reference; print a comparison table and write metrics and plots
  report         re-render the table and plots from saved run folders
  check-config   validate a DeepSpeed config's policy ("scheduler") entry or a standalone policy config
  bench quality  the quality-at-scale study: every method at S = 1..32 against the S = 1 reference
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _checked(convert: Callable[[str], Any], check: Callable[[Any], None]) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, then ``check`` the value; a ``ValueError`` from either
    becomes argparse's usage error (exit status 2) with the check's message."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {convert.__name__}: {text!r}") from None
        try:
            check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    parse.__name__ = convert.__name__   # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    from .demo import check_budget, check_seed
    from .engines import BACKENDS
    from .workloads import WORKLOADS

    parser = argparse.ArgumentParser(prog="scaling-plugins", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train a built-in workload: AdaScale and baselines at scale S vs the S = 1 reference",
        description="Train a built-in workload at scale S = workers × accumulation with each policy, plus the "
                    "S = 1 reference (one rank, base batch), on local CPU processes (no launcher needed). "
                    "Prints the comparison table; writes OUT/<timestamp>/<run>/metrics.jsonl and PNG plots.")
    demo.add_argument("--backend", choices=BACKENDS, default="ddp",
                      help="engine: PyTorch DDP (default), PyTorch FSDP2 (fully_shard), DeepSpeed (needs deepspeed) or "
                           "Horovod (needs `make horovod`)")
    demo.add_argument("--policy", action="append", metavar="NAME",
                      help="a registered policy to run at scale S (repeat for several); default: AdaScale and "
                           "linear scaling with warmup when registered. `--policy list` shows the registry")
    demo.add_argument("--workload", choices=sorted(WORKLOADS), default="digits",
                      help="digits: scikit-learn's digits images, small CNN; charlm: character LSTM on the Python "
                           "reference text shipped with Python; quadratic: synthetic noisy quadratic (default: digits)")
    demo.add_argument("--workers", type=_positive_int, default=2,
                      help="ranks (processes) for the scaled runs (default: 2)")
    demo.add_argument("--scale", type=_positive_int, default=16,
                      help="S = effective batch / base batch = workers × gradient-accumulation steps (default: 16); "
                           "for a batch-size controller (AdaptiveBatch) the largest S it may reach, starting from "
                           "one micro-batch per worker")
    demo.add_argument("--budget", type=_checked(float, check_budget), default=None,
                      help="training length in base-scale steps (samples / base batch), finite and > 0; AdaScale "
                           "stops when its progress τ reaches it, other policies after the same number of samples. "
                           "Default: the workload's (digits 1600, charlm 1200, quadratic 800)")
    demo.add_argument("--seed", type=_checked(int, check_seed), default=0,
                      help="seed of the data order and the model initialisation, 0 to 2**63 - 1 (default: 0)")
    demo.add_argument("--evals", type=_positive_int, default=8, help="validation evaluations per run (default: 8)")
    demo.add_argument("--out", type=Path, default=Path("runs"),
                      help="folder that receives the run folders, created if missing (default: runs)")
    demo.add_argument("--no-reference", action="store_true", help="skip the S = 1 reference run")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    report = commands.add_parser(
        "report", help="re-render the comparison table and plots from saved runs",
        description="Load run folders (or folders of run folders, as the demo writes them), print the comparison "
                    "table and write validation.png, lr_gain.png, progress.png, batch.png and table.md. A damaged or "
                    "unfinished run is skipped with a warning naming its file and line (or key) and the rest are "
                    "reported; exit status 0 when every run was reported, 1 when some were skipped, 2 when none "
                    "could be.")
    report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    report.add_argument("--out", type=Path, default=None,
                        help="where to write the figures; default: RUN_DIR when one is given, else ./report")
    report.add_argument("--title", default=None, help="figure title; default: workloads and backends")

    check = commands.add_parser(
        "check-config", help="validate a DeepSpeed config's policy entry or a standalone policy config",
        description="Check a JSON file without training: a DeepSpeed config's \"scheduler\" entry naming a "
                    "scaling_plugins policy, or a standalone {\"type\": NAME, \"params\": {...}}. Prints every "
                    "problem with its key path (or the file's line), the bad value and what is allowed; exit status "
                    "0 when valid, 1 not. A valid entry is then configured as attach configures it: at --workers × "
                    "--accumulation when --workers is given (a failure there is a problem), else at every shape of "
                    "1-1024 workers, the failing ones printed as a warning (exit 0), since some settings only fail "
                    "at some scales (LEGW's warmup grows with k). --accumulation defaults to a DeepSpeed config's "
                    "gradient_accumulation_steps, else 1.")
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("--workers", type=_positive_int, default=None,
                       help="ranks of the run; check the policy at exactly this shape (default: try 1-1024, warn)")
    check.add_argument("--accumulation", type=_positive_int, default=None,
                       help="gradient-accumulation steps of the run (default: the DeepSpeed config's "
                            "gradient_accumulation_steps, else 1)")

    from .bench import add_quality_arguments

    bench = commands.add_parser("bench", help="benchmarks: `bench quality` (quality at scale)")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    add_quality_arguments(benchmarks.add_parser(
        "quality", help="quality at scale: each method at S ∈ {1, 4, 8, 16, 32} against the S = 1 reference",
        description="Train the built-in workloads with every method at every scale (base hyperparameters tuned "
                    "once at S = 1), resumably; write report.md (tables, goal checks, gradient noise scale) and "
                    "quality.png / quality_steps.png into the study folder."))
    return parser


def _demo(args: argparse.Namespace) -> int:
    from .demo import default_policies, plan, run_demo
    from .engines import BackendUnavailable
    from ..policies import POLICIES

    if args.policy == ["list"]:
        print("\n".join(sorted(POLICIES)))
        return 0
    try:
        specs = plan(args.workload, args.backend, args.policy or default_policies(), args.workers, args.scale,
                     args.budget, args.seed, reference=not args.no_reference, evals=args.evals)
        run_demo(specs, args.out, progress_bar=not args.no_progress)
    except (ValueError, BackendUnavailable) as err:
        print(f"scaling-plugins demo: {err}", file=sys.stderr)
        return 2
    return 0


def _report(args: argparse.Namespace) -> int:
    """Exit status 0 when every run was reported, 1 when some were skipped (each with a warning on stderr),
    2 when none could be loaded or the figures could not be written."""
    from .inputs import make_folder
    from .noise_scale import advice_lines
    from .plots import comparison_table, load_runs, render

    skipped: list[str] = []

    def skip(problem: str) -> None:
        print(f"scaling-plugins report: warning: skipping {problem}", file=sys.stderr)
        skipped.append(problem)

    runs = load_runs(args.run_dirs, skip=skip)
    if not runs:
        print("scaling-plugins report: no run could be loaded; nothing to report", file=sys.stderr)
        return 2
    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else Path("report"))
    print(comparison_table(runs))
    for line in advice_lines(runs):
        print(line)
    try:
        written = render(runs, make_folder(out, "the figures (--out)"), title=args.title)
    except OSError as err:
        print(f"scaling-plugins report: cannot write the figures (--out) into {out}: {err.strerror or err}",
              file=sys.stderr)
        return 2
    except (ValueError, ImportError) as err:   # ImportError: no matplotlib, with the command that installs it
        print(f"scaling-plugins report: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    if skipped:
        print(f"scaling-plugins report: {len(skipped)} run(s) or folder(s) skipped (see the warnings above)",
              file=sys.stderr)
    return 1 if skipped else 0


def _check_config(args: argparse.Namespace) -> int:
    from .config_check import Shape, check_file

    problems, notes = check_file(args.file, Shape(args.workers, args.accumulation))
    for note in notes:
        print(f"{args.file}: {note}")
    for problem in problems:
        print(f"{args.file}: {problem}")
    print(f"{args.file}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_quality

    try:
        return run_quality(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"scaling-plugins bench {args.benchmark}: {err}", file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"demo": _demo, "report": _report, "check-config": _check_config, "bench": _bench}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
