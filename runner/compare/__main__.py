"""Command line: ``python -m runner.compare RUN_A RUN_B [--out DIR]``."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console

from runner.compare.diff import compare
from runner.compare.render import print_comparison, write_files
from runner.errors import RunnerError
from runner.pipes import run_until_pipe_closes


def default_out_dir(now: Optional[dt.datetime] = None) -> Path:
    """Return ``outputs/compare/<date>/<time with microseconds>`` under the current folder."""
    now = now or dt.datetime.now()
    out_dir = Path("outputs") / "compare" / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")
    # Another comparison started in the same microsecond: the process id distinguishes them.
    return out_dir.with_name(f"{out_dir.name}-{os.getpid()}") if out_dir.exists() else out_dir


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m runner.compare",
        description=(
            "Compare two run folders: every summary.csv metric at the load points both runs measured "
            "(matched on parallel and rate), and the SLA results matched on their criteria. Prints the "
            "tables and writes compare.csv and compare.md. Warns when the runs used other prompts, request "
            "settings, output lengths, load settings, SLA search settings, models or servers (simulated-server "
            "profile or seed)."
        ),
    )
    parser.add_argument("run_a", type=Path, metavar="RUN_A", help="run folder A, the baseline")
    parser.add_argument("run_b", type=Path, metavar="RUN_B", help="run folder B, compared with A")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="folder for compare.csv and compare.md (default: outputs/compare/<date>/<time>)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None, console: Optional[Console] = None) -> int:
    args = parse_args(argv)
    console = console or Console()
    try:
        comparison = compare(args.run_a, args.run_b)
        paths = write_files(comparison, args.out or default_out_dir())
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_comparison(comparison, console)
    console.print(f"Comparison written to {paths[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(run_until_pipe_closes(main))
