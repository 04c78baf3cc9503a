"""Loading the result tables of runs and stacking them into sweep-wide tables.

Only summary.csv and sla_summary.csv are read. requests.csv is read only for a run whose
summary.csv is missing, and then the summary is rebuilt from it and written back, so the
next report of the same folder is fast again.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from runner.metrics import summarize
from runner.output import cut_last_line, integral_column, read_requests_checked, write_summary
from runner.report.folders import RunFolder, read_config, read_text

log = logging.getLogger(__name__)

# Characters of error.txt kept for the report; the file itself stays complete.
ERROR_TEXT_LIMIT = 4000


@dataclass
class RunResult:
    """The tables of one run, or why it has none."""

    folder: RunFolder
    summary: Optional[pd.DataFrame]
    sla: Optional[pd.DataFrame] = None
    # Why the run has no summary: error.txt when the job wrote one, else a short reason.
    error: Optional[str] = None
    # Files written while loading: summary.csv rebuilt from requests.csv.
    written: list[Path] = field(default_factory=list)
    # Name of the signal that stopped the run (manifest.json's interrupted_by), None when none did.
    interrupted_by: Optional[str] = None
    # One message per damaged line of requests.csv, such as a last line cut short.
    damage: list[str] = field(default_factory=list)
    # True when a signal stopped the job before its first request completed, so it has no
    # summary although it did not fail.
    stopped_before_results: bool = False

    @property
    def failed(self) -> bool:
        """Return True when the job has no summary for a reason other than a signal."""
        return self.summary is None and not self.stopped_before_results

    @property
    def rebuilt(self) -> bool:
        return bool(self.written)

    @property
    def status(self) -> str:
        """Return the job's status as the report tables show it."""
        if self.failed:
            return "failed"
        if self.summary is None:
            return f"interrupted by {self.interrupted_by}, no complete request"
        parts = []
        if self.interrupted_by:
            parts.append(f"interrupted by {self.interrupted_by}")
        if self.rebuilt:
            parts.append("rebuilt from requests.csv")
        return ", ".join(parts) or "ok"


def _read_csv(path: Path) -> Optional[pd.DataFrame]:
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None


def _parallel_cap(config: dict[str, Any]) -> float:
    """Return the cap on requests in flight that an open-loop run used (NaN when none)."""
    if config.get("sla") is not None:
        cap = (config.get("search") or {}).get("rate_parallel_cap")
    else:
        cap = (config.get("load") or {}).get("parallel")
    return math.nan if cap is None else float(cap)


class NoCompleteRequest(ValueError):
    """requests.csv contains no complete request row, so no summary can be built from it."""


def rebuild_summary(run_dir: Path, damage: Optional[list[str]] = None) -> pd.DataFrame:
    """Compute summary.csv from requests.csv, one row per load value, and write it.

    Damaged lines of requests.csv are left out, logged and appended to ``damage``. Raises
    NoCompleteRequest when no complete request row is left.
    """
    path = run_dir / "requests.csv"
    if path.stat().st_size == 0:
        raise NoCompleteRequest("no complete request row (the file is empty)")
    requests, problems = read_requests_checked(path)
    for problem in problems:
        log.warning("%s %s, so the line is left out of the rebuilt summary.csv", path, problem)
    if damage is not None:
        damage += [f"requests.csv {problem}, so the line is left out" for problem in problems]
    if requests.empty:
        detail = f" ({problems[0]})" if problems else ""
        raise NoCompleteRequest(f"no complete request row{detail}")
    cap = _parallel_cap(read_config(run_dir))
    rows = []
    for (variable, value), frame in requests.groupby(["variable", "value"], sort=True):
        row: dict[str, Any] = {"parallel": math.nan, "rate": math.nan}
        if variable == "rate":
            row["rate"] = float(value)
            row["parallel"] = cap
        else:
            row["parallel"] = float(value)
        # NOTE: goodput equals rps here, as in the runner's own summary.csv, and the event-loop
        # lag and client-bound columns stay empty because requests.csv does not record them.
        if variable == "rate":
            row |= summarize(frame, open_loop=True)
        else:
            row |= summarize(frame, parallel=float(value))
        rows.append(row)
    return write_summary(rows, run_dir / "summary.csv")


def _failure_reason(run_dir: Path, default: str) -> str:
    text = read_text(run_dir / "error.txt", ERROR_TEXT_LIMIT)
    return text.strip() if text and text.strip() else default


def _interrupted_by(run_dir: Path) -> Optional[str]:
    """Return the signal named in manifest.json's interrupted_by, or None."""
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = manifest.get("interrupted_by") if isinstance(manifest, dict) else None
    return str(name) if name else None


def _tail_damage(requests_path: Path) -> list[str]:
    """Return a message when the last line of a requests.csv that the report does not read is cut short."""
    try:
        line = cut_last_line(requests_path)
    except OSError as exc:
        return [f"{requests_path} cannot be read: {exc.strerror}"]
    if line is None:
        return []
    log.warning("%s line %s is cut short because the file ends inside it; the report uses summary.csv as it is",
                requests_path, line)
    return [f"requests.csv line {line} is cut short because the file ends inside it; the report uses summary.csv as it is"]


def _has_measured_request(summary: pd.DataFrame) -> bool:
    """Return True when a summary row counts a measured request, cancelled ones left aside."""
    if summary.empty or "requests" not in summary.columns:
        return False
    return bool((pd.to_numeric(summary["requests"], errors="coerce") > 0).any())


def load_run(folder: RunFolder) -> RunResult:
    """Read one run's summary.csv and sla_summary.csv, rebuilding the summary when missing."""
    run_dir = folder.path
    sla_path = run_dir / "sla_summary.csv"
    sla = _read_csv(sla_path) if sla_path.is_file() else None
    interrupted_by = _interrupted_by(run_dir)
    requests_path = run_dir / "requests.csv"

    # A job that a signal stopped before its first request completed has a manifest naming
    # the signal, no error.txt, and no summary row: summary.csv is missing or contains only
    # its header, and requests.csv, if any, contains no complete row.
    stopped_early = bool(interrupted_by) and not (run_dir / "error.txt").is_file()
    summary_path = run_dir / "summary.csv"
    if summary_path.is_file():
        summary = _read_csv(summary_path)
        if summary is not None and stopped_early and not _has_measured_request(summary):
            return RunResult(folder, None, sla, interrupted_by=interrupted_by, stopped_before_results=True)
        if summary is not None:
            damage = _tail_damage(requests_path) if requests_path.is_file() else []
            return RunResult(folder, summary, sla, interrupted_by=interrupted_by, damage=damage)
        return RunResult(folder, None, sla, error=_failure_reason(run_dir, "summary.csv cannot be read"),
                         interrupted_by=interrupted_by)

    if requests_path.is_file():
        damage: list[str] = []
        try:
            summary = rebuild_summary(run_dir, damage)
        except NoCompleteRequest as exc:
            reason = f"summary.csv missing and requests.csv unusable: {exc}"
            return RunResult(folder, None, sla, error=None if stopped_early else _failure_reason(run_dir, reason),
                             interrupted_by=interrupted_by, damage=damage, stopped_before_results=stopped_early)
        except (OSError, ValueError, KeyError, pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            reason = f"summary.csv missing and requests.csv unusable: {exc}"
            return RunResult(folder, None, sla, error=_failure_reason(run_dir, reason),
                             interrupted_by=interrupted_by, damage=damage)
        log.info("rebuilt %s from requests.csv", summary_path)
        if stopped_early and not _has_measured_request(summary):
            return RunResult(folder, None, sla, written=[summary_path], interrupted_by=interrupted_by,
                             damage=damage, stopped_before_results=True)
        return RunResult(folder, summary, sla, written=[summary_path], interrupted_by=interrupted_by,
                         damage=damage)

    if stopped_early:
        return RunResult(folder, None, sla, interrupted_by=interrupted_by, stopped_before_results=True)
    return RunResult(folder, None, sla, error=_failure_reason(run_dir, "no summary.csv: the job did not finish"),
                     interrupted_by=interrupted_by)


def override_columns(results: list[RunResult], reserved: set[str]) -> dict[str, str]:
    """Map each override key, in order of first appearance, to its column name.

    A key that clashes with a result column, ``job`` or ``job_status`` gets an ``override.`` prefix.
    """
    columns: dict[str, str] = {}
    for result in results:
        for key in result.folder.overrides:
            if key not in columns:
                columns[key] = f"override.{key}" if key in reserved or key in ("job", "job_status") else key
    return columns


def _stack(frames: list[pd.DataFrame], results: list[RunResult], columns: dict[str, str]) -> pd.DataFrame:
    labelled = []
    for frame, result in zip(frames, results):
        frame = frame.copy()
        leading = {"job": result.folder.name}
        for key, column in columns.items():
            leading[column] = result.folder.overrides.get(key, "")
        leading["job_status"] = result.status
        for position, (column, value) in enumerate(leading.items()):
            frame.insert(position, column, value)
        labelled.append(frame)
    if not labelled:
        return pd.DataFrame(columns=["job", *columns.values(), "job_status"])
    return pd.concat(labelled, ignore_index=True, sort=False)


# Load columns of the sweep tables; a concurrency, and the load an SLA group found, are counts.
LOAD_COLUMNS = ("parallel", "max_satisfied", "last_pass", "first_fail")


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Write a sweep table as CSV, with whole load values as integers (16, not 16.0)."""
    loads = {column: integral_column(frame[column]) for column in LOAD_COLUMNS if column in frame.columns}
    frame.assign(**loads).to_csv(path, index=False)


@dataclass
class SweepTables:
    """Every job's rows, labelled with ``job``, one column per override key and ``job_status``."""

    summary: pd.DataFrame
    sla: pd.DataFrame
    # Override key -> column name in both tables.
    override_columns: dict[str, str]


def combine_runs(results: list[RunResult]) -> SweepTables:
    """Stack the summary and SLA rows of all runs that have them."""
    with_summary = [r for r in results if r.summary is not None]
    with_sla = [r for r in results if r.sla is not None]
    reserved: set[str] = set()
    for result in with_summary:
        reserved.update(result.summary.columns)  # type: ignore[union-attr]
    for result in with_sla:
        reserved.update(result.sla.columns)  # type: ignore[union-attr]
    columns = override_columns(results, reserved)
    summary = _stack([r.summary for r in with_summary], with_summary, columns)  # type: ignore[misc]
    sla = _stack([r.sla for r in with_sla], with_sla, columns)  # type: ignore[misc]
    return SweepTables(summary=summary, sla=sla, override_columns=columns)
