"""Tables derived from the stacked results, and their text formatting.

Builders return data frames; ``markdown_table`` and the HTML page only format them.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import pandas as pd

from runner.report.aggregate import RunResult
from runner.sla.probe import answer_text

# Summary columns shown in the main tables, in this order. The report keeps the full table in a
# collapsed section.
KEY_COLUMNS = [
    "parallel", "rate", "requests", "success_rate", "rps", "tps", "goodput",
    "avg_latency", "p99_latency", "avg_ttft", "p99_ttft", "avg_tpot", "p99_tpot", "client_bound",
]

# Columns of the "highest throughput per run" table, after job, override and job_status columns.
BEST_COLUMNS = ["parallel", "rate", "tps", "rps", "p99_latency", "p99_ttft", "p99_tpot", "success_rate"]


def format_value(value: Any) -> str:
    """Format a table cell: integers without decimals, others to about four significant digits."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.4g}"
    return str(value)


def _markdown_cell(value: Any) -> str:
    text = format_value(value)
    for special in ("\\", "|", "<", ">"):
        text = text.replace(special, "\\" + special)
    return " ".join(text.splitlines())


def markdown_table(frame: pd.DataFrame) -> str:
    """Render a GitHub-flavoured markdown table; numbers are right-aligned."""
    if frame.columns.empty:
        return ""
    header = "| " + " | ".join(_markdown_cell(c) for c in frame.columns) + " |"
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
               for c in frame.columns]
    rule = "| " + " | ".join("---:" if is_number else "---" for is_number in numeric) + " |"
    lines = [header, rule]
    for row in frame.itertuples(index=False, name=None):
        lines.append("| " + " | ".join(_markdown_cell(value) for value in row) + " |")
    return "\n".join(lines) + "\n"


def key_metrics(summary: pd.DataFrame, leading: Iterable[str] = ()) -> pd.DataFrame:
    """Select the ``leading`` columns, then those of KEY_COLUMNS that exist."""
    columns = [c for c in leading if c in summary.columns]
    columns += [c for c in KEY_COLUMNS if c in summary.columns and c not in columns]
    return summary[columns]


def sort_by_load(summary: pd.DataFrame, load: str) -> pd.DataFrame:
    if load not in summary.columns:
        return summary
    return summary.sort_values(load, kind="stable", na_position="last")


def jobs_table(results: list[RunResult], override_columns: dict[str, str]) -> pd.DataFrame:
    """Build one row per job: its overrides, status (ok, interrupted, rebuilt, failed), load points and error."""
    rows = []
    for result in results:
        row: dict[str, Any] = {"job": result.folder.name}
        for key, column in override_columns.items():
            row[column] = result.folder.overrides.get(key, "")
        row["status"] = result.status
        row["load points"] = 0 if result.summary is None else len(result.summary)
        row["SLA groups"] = 0 if result.sla is None else len(result.sla)
        row["error"] = (result.error or "").strip().splitlines()[0] if result.error else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _first_seen(values: pd.Series) -> list[Any]:
    return list(pd.unique(values))


def sla_comparison(sla: pd.DataFrame, override_columns: dict[str, str]) -> pd.DataFrame:
    """Pivot max_satisfied: one row per run setting, one column per SLA rule set.

    Rows are keyed by the override columns that vary and are not about SLA rules (``model``
    in ``-m model=a,b +sla=x,y``), columns by the ``sla`` override (or the rule text when the
    sweep has no ``sla`` override). A rule set with several groups gets one column per group.
    ``job`` joins the row key when the other columns do not tell the jobs apart.
    """
    if sla.empty or "max_satisfied" not in sla.columns:
        return pd.DataFrame()
    frame = sla.copy()
    names = list(override_columns.values())
    sla_names = [c for c in names if c == "sla" or c.startswith("sla.")]
    row_names = [c for c in names if c not in sla_names and frame[c].nunique(dropna=False) > 1]

    criteria = frame["criteria"].fillna("").astype(str) if "criteria" in frame.columns else pd.Series("", index=frame.index)
    if sla_names:
        label = frame[sla_names].fillna("").astype(str).agg(" ".join, axis=1).str.strip()
        one_group_each = criteria.groupby(label).nunique().max() <= 1
        frame["_column"] = label if one_group_each else label + ": " + criteria
    else:
        frame["_column"] = criteria

    if not row_names:
        frame["runs"] = "all"
        row_names = ["runs"]
    if frame.duplicated(subset=row_names + ["_column"]).any():
        row_names = row_names + ["job"]
    frame[row_names] = frame[row_names].fillna("").astype(str)
    # "none" marks a rule set no load met, and an interrupted search shows the highest load
    # that passed before it stopped. A cell left empty means that pair was not run.
    notes = frame["note"] if "note" in frame.columns else pd.Series("", index=frame.index)
    last_pass = frame["last_pass"] if "last_pass" in frame.columns else pd.Series(math.nan, index=frame.index)
    values = frame["max_satisfied"]
    texts = [answer_text(value, note, passed) for value, note, passed in zip(values, notes, last_pass)]
    frame["max_satisfied"] = values.astype(object).where(values.notna(), pd.Series(texts, index=frame.index))

    table = frame.pivot(index=row_names, columns="_column", values="max_satisfied")
    table = table.reindex(columns=_first_seen(frame["_column"]))
    order = pd.MultiIndex.from_frame(frame[row_names].drop_duplicates()) if len(row_names) > 1 \
        else pd.Index(_first_seen(frame[row_names[0]]), name=row_names[0])
    table = table.reindex(order).reset_index()
    table.columns.name = None
    return table


def best_points(summary: pd.DataFrame, override_columns: dict[str, str]) -> pd.DataFrame:
    """Select, for each job, the load point with the highest output tokens/s and its latencies."""
    if summary.empty or "tps" not in summary.columns:
        return pd.DataFrame()
    usable = summary.dropna(subset=["tps"])
    if usable.empty:
        return pd.DataFrame()
    best = usable.loc[usable.groupby("job", sort=False)["tps"].idxmax()]
    leading = ["job", *override_columns.values(), "job_status"]
    columns = [c for c in leading + BEST_COLUMNS if c in best.columns]
    return best[columns].reset_index(drop=True)
