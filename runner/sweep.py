"""The end of a multirun sweep: the aggregated report, written also when a signal stops the sweep.

Hydra calls the ``on_multirun_end`` callback only when every job returned, so after
Ctrl-C or SIGTERM the command line calls ``aggregate`` itself, for the sweep folder that
``record_start`` noted when the sweep began.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

# Name of the file in which a multirun job leaves its one-line error for the aggregation.
JOB_ERROR_FILE = "error.txt"

# Sweep folder of the multirun that this process started, if any.
_started_sweep: Optional[Path] = None


# Folder of the job that a signal stopped, if any.
_interrupted_job: Optional[Path] = None


def record_interrupted_job(job_dir: Path) -> None:
    """Note the folder of the job that a signal stopped, for the sweep's closing line."""
    global _interrupted_job
    _interrupted_job = job_dir


def interrupted_job() -> Optional[Path]:
    """Return the folder of the job that a signal stopped, or None."""
    return _interrupted_job


def record_start(sweep_dir: Path) -> None:
    """Note the folder of the sweep that is starting, for the aggregation after a signal."""
    global _started_sweep
    _started_sweep = sweep_dir


def started_sweep() -> Optional[Path]:
    """Return the folder of the sweep this process started, or None outside a multirun."""
    return _started_sweep


def failed_jobs(sweep_dir: Path) -> list[str]:
    """Return the names of the job folders that hold an error.txt, in job order."""
    names = (path.parent.name for path in sweep_dir.glob(f"*/{JOB_ERROR_FILE}"))
    return sorted(names, key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name))


def job_folders(sweep_dir: Path) -> list[Path]:
    """Return the job folders of a sweep: its subfolders with a numeric name."""
    return [path for path in sweep_dir.iterdir() if path.is_dir() and path.name.isdigit()]


def aggregate(sweep_dir: Path) -> list[str]:
    """Write the sweep's report files, print their paths and return the failed jobs.

    Raises RunnerError when the folder contains no job yet.
    """
    from runner.report import build_report

    for path in build_report(sweep_dir):
        print(f"wrote {path}")
    return failed_jobs(sweep_dir)
