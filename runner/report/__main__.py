"""Command line: ``python -m runner.report DIR``; (re)builds the report of a run or sweep folder."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from runner.errors import RunnerError
from runner.pipes import run_until_pipe_closes
from runner.report.build import RUN_PLOTS_MAX_JOBS, build_report


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m runner.report",
        description=(
            "Build the report of a run or sweep folder. A run folder gets PNG plots and report.html. "
            "A sweep (Hydra multirun) folder, or any folder whose subfolders are runs, gets at its top "
            "summary.csv and sla_summary.csv with every job's rows plus a 'job' column, one column per "
            "override key and a 'job_status' column, summary.md, sweep-level plots and report.html. Only "
            "summary.csv files are read; a run without one gets it rebuilt from its requests.csv, leaving out "
            "damaged lines, each named in a warning. Jobs without results are listed as failed, and jobs "
            "stopped by a signal as interrupted."
        ),
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="run folder, sweep folder or folder of run folders")
    parser.add_argument(
        "--run-plots",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "in a sweep, also write plots and report.html into every job folder "
            f"(default: only for sweeps of up to {RUN_PLOTS_MAX_JOBS} jobs, because each job takes up to "
            "a second to plot); --no-run-plots writes the sweep-level files only"
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and skipped files to stderr")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = build_report(args.dir, run_plots=args.run_plots)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_until_pipe_closes(main))
