"""Quality at scale: the full study, the same as ``scaling-plugins bench quality``.

    nohup .venv/bin/python -m benchmarks.quality > runs/quality.log 2>&1 &     # full study, resumable
    .venv/bin/python -m benchmarks.quality --quick                             # the CI slice
    .venv/bin/python -m benchmarks.quality --adaptive                          # AdaptiveBatch vs fixed S
    .venv/bin/python -m benchmarks.quality --report-only                       # re-render the report

Writes runs/quality/<workload>/<run>/ and runs/quality/{report.md,quality.png,quality_steps.png} (--adaptive:
runs/quality-adaptive/, with adaptive_<workload>.png); benchmarks/RESULTS.md "## Quality at scale" and
"## Adaptive batch size" quote the latest figures.
"""
import argparse
import sys

from scaling_plugins.app.bench import add_quality_arguments, run_quality

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_quality_arguments(parser)
    sys.exit(run_quality(parser.parse_args()))
