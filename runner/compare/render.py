"""Presenting a comparison: compare.csv, compare.md and the console tables."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from runner.compare.diff import Comparison, load_label
from runner.errors import RunnerError
from runner.report.tables import markdown_table
from runner.sla.probe import INTERRUPTED_NOTE

CSV_COLUMNS = ["kind", "parallel", "rate", "criteria", "metric", "a", "b", "change", "relative_change",
               "note_a", "note_b", "message"]


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"


def _percent(value: float) -> str:
    return "" if math.isnan(value) else f"{value:+.1%}"


def _sla_value(value: float, note: str) -> str:
    if not math.isnan(value):
        return f"{value:g}"
    # The note of an interrupted search gives the highest load that passed before it stopped.
    return "interrupted" if note.startswith(INTERRUPTED_NOTE) else "none"


def csv_frame(comparison: Comparison) -> pd.DataFrame:
    """Return the rows of compare.csv: warnings first, then metric rows, then SLA rows."""
    warnings = pd.DataFrame({"kind": "warning", "message": comparison.warnings})
    metrics = comparison.metrics.assign(kind="metric")
    sla = comparison.sla.rename(columns={"variable": "metric"}).assign(kind="sla")
    sla["metric"] = "max_satisfied (" + sla["metric"] + ")"
    frames = [frame for frame in (warnings, metrics, sla) if not frame.empty]
    if not frames:
        return pd.DataFrame(columns=CSV_COLUMNS)
    return pd.concat(frames, ignore_index=True).reindex(columns=CSV_COLUMNS)


def _display_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    rows = [{"load point": load_label(row.parallel, row.rate), "metric": row.metric, "A": _number(row.a),
             "B": _number(row.b), "change": _number(row.change), "relative change": _percent(row.relative_change)}
            for row in metrics.itertuples()]
    return pd.DataFrame(rows, columns=["load point", "metric", "A", "B", "change", "relative change"])


def _display_sla(sla: pd.DataFrame) -> pd.DataFrame:
    rows = [{"criteria": row.criteria, "variable": row.variable, "A": _sla_value(row.a, row.note_a),
             "B": _sla_value(row.b, row.note_b),
             "change": _number(row.change), "note A": row.note_a, "note B": row.note_b}
            for row in sla.itertuples()]
    return pd.DataFrame(rows, columns=["criteria", "variable", "A", "B", "change", "note A", "note B"])


def _notes(comparison: Comparison) -> list[str]:
    notes = [f"Load points only in run {label}: {', '.join(labels)}"
             for label, labels in comparison.only_in.items() if labels]
    if comparison.metrics.empty:
        notes.append("No load point was measured in both runs, so no metric is compared.")
    return notes


def markdown_report(comparison: Comparison) -> str:
    lines = ["# Run comparison", "", f"- A: `{comparison.a.path}`", f"- B: `{comparison.b.path}`", "",
             "Change is B - A; relative change is (B - A) / |A|. Times in seconds.", "", "## Warnings", ""]
    lines += [f"- {warning}" for warning in comparison.warnings] or ["None: the runs are comparable."]
    lines.append("")
    for note in _notes(comparison):
        lines += [note, ""]
    if not comparison.metrics.empty:
        lines += ["## Metrics per load point", "", markdown_table(_display_metrics(comparison.metrics))]
    if not comparison.sla.empty:
        lines += ["## SLA: max satisfied load", "", markdown_table(_display_sla(comparison.sla))]
    return "\n".join(lines)


def write_files(comparison: Comparison, out_dir: Path) -> list[Path]:
    """Write compare.csv and compare.md into ``out_dir``; return their paths."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunnerError(f"--out {out_dir} cannot be created: {exc.strerror}; pass a writable folder") from None
    csv_path, md_path = out_dir / "compare.csv", out_dir / "compare.md"
    csv_frame(comparison).to_csv(csv_path, index=False, float_format="%.12g")
    md_path.write_text(markdown_report(comparison), encoding="utf-8")
    return [csv_path, md_path]


def print_comparison(comparison: Comparison, console: Console) -> None:
    for warning in comparison.warnings:
        # soft_wrap keeps each warning on one line, whole, however narrow the terminal.
        console.print(Text(f"warning: {warning}", style="yellow"), soft_wrap=True)
    for note in _notes(comparison):
        console.print(Text(note))
    if not comparison.metrics.empty:
        table = Table(title="Metrics per load point (change = B - A)")
        frame = _display_metrics(comparison.metrics)
        for column in frame.columns:
            table.add_column(column, justify="left" if column in ("load point", "metric") else "right")
        previous = None
        for row in frame.itertuples(index=False):
            if previous is not None and row[0] != previous:
                table.add_section()
            table.add_row(*(str(value) for value in row))
            previous = row[0]
        console.print(table)
    if not comparison.sla.empty:
        table = Table(title="SLA: max satisfied load")
        frame = _display_sla(comparison.sla)
        for column in frame.columns:
            table.add_column(column, justify="right" if column in ("A", "B", "change") else "left")
        for row in frame.itertuples(index=False):
            table.add_row(*(str(value) for value in row))
        console.print(table)
