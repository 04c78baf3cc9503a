"""Console output for people: the progress bar and the result tables.

Every table is built from a summary data frame and rendered by rich, to the terminal and
again, as plain text, into performance_summary.txt.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import pandas as pd
from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from runner.sla.probe import answer_text

TEXT_WIDTH = 120


def _num(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _load_label(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:g}"


def _any_client_bound(summary: pd.DataFrame) -> bool:
    return "client_bound" in summary.columns and bool(summary["client_bound"].fillna(False).astype(bool).any())


def metrics_table(summary: pd.DataFrame) -> Table:
    """Build the "Detailed Performance Metrics" table: one row per load point."""
    open_loop = summary["rate"].notna().any()
    table = Table(title="Detailed Performance Metrics", title_style="bold")
    table.add_column("Conc.", justify="right")
    if open_loop:
        table.add_column("Rate", justify="right")
    for header in ("RPS", "Avg\nLat.(s)", "P99\nLat.(s)", "Gen.\ntoks/s", "Avg\nTTFT(s)", "P99\nTTFT(s)",
                   "Avg\nTPOT(s)", "P99\nTPOT(s)", "Success\nRate"):
        table.add_column(header, justify="right")
    show_bound = _any_client_bound(summary)
    if show_bound:
        table.add_column("Client\nbound", justify="center")

    for row in summary.sort_values(["rate" if open_loop else "parallel"]).to_dict("records"):
        cells = [_load_label(row.get("parallel"))]
        if open_loop:
            cells.append(_load_label(row.get("rate")))
        cells += [
            _num(row["rps"], 2), _num(row["avg_latency"], 3), _num(row["p99_latency"], 3),
            _num(row["tps"], 2), _num(row["avg_ttft"], 3), _num(row["p99_ttft"], 3),
            _num(row["avg_tpot"], 3), _num(row["p99_tpot"], 3), f"{_num(row['success_rate'], 1)}%",
        ]
        if show_bound:
            cells.append("yes" if row.get("client_bound") else "")
        table.add_row(*cells)
    return table


def best_configuration(summary: pd.DataFrame) -> Optional[Table]:
    """Build the "Best Performance Configuration" table (highest RPS, lowest latency)."""
    usable = summary[summary["success_rate"] > 0].dropna(subset=["rps"])
    if usable.empty:
        return None
    open_loop = usable["rate"].notna().any()
    knob, label = ("rate", "Rate") if open_loop else ("parallel", "Concurrency")
    fastest = usable.loc[usable["rps"].idxmax()]
    table = Table(title="Best Performance Configuration", show_header=False, box=None, title_style="bold")
    table.add_row("Highest RPS", f"{label} {fastest[knob]:g} ({fastest['rps']:.2f} req/sec)")
    latencies = usable.dropna(subset=["avg_latency"])
    if not latencies.empty:
        quickest = latencies.loc[latencies["avg_latency"].idxmin()]
        table.add_row("Lowest Latency", f"{label} {quickest[knob]:g} ({quickest['avg_latency']:.3f} seconds)")
    return table


@dataclass(frozen=True)
class SearchRange:
    """The range an SLA tune searched: ``search.variable`` and its lower and upper bound."""

    variable: str
    lower_bound: float
    upper_bound: float


def recommendations(summary: pd.DataFrame, sla_rows: Optional[list[dict[str, Any]]] = None,
                    search: Optional[SearchRange] = None) -> list[str]:
    """Return short advice drawn from how throughput and success change with load.

    After an SLA tune (``sla_rows`` and ``search`` given) the advice about the search range
    comes from each rule group's answer, because a throughput still rising at the highest
    load probed is no evidence for loads that already failed the rules.
    """
    if summary.empty:
        return []
    tuned = sla_rows is not None and search is not None
    open_loop = summary["rate"].notna().any()
    knob = "rate" if open_loop else "parallel"
    ordered = summary.sort_values(knob)
    advice = []
    if _any_client_bound(ordered):
        advice.append("Some load points were client-bound: the client, not the server, limited them; "
                      "their numbers are not the server's")
    rps = ordered["rps"].fillna(0).to_numpy()
    loads = ordered[knob].to_numpy(dtype=float)
    # The first load that reaches 95 % of the best throughput. When it lies far below the
    # highest load probed, throughput has flattened (saturated) rather than still climbing.
    knee = loads[int((rps >= 0.95 * rps.max()).argmax())] if len(rps) else 0.0
    if len(rps) >= 2 and rps[-1] >= 0.95 * rps.max() and knee <= loads[-1] / 2:
        advice.append(f"Throughput saturates near {knob} {knee:g} ({rps.max():.2f} req/s at most); "
                      f"higher load only adds latency")
    elif len(rps) >= 2 and rps[-1] >= 0.95 * rps.max():
        if not tuned:
            advice.append(f"The system seems not to have reached its performance bottleneck, try a higher {knob}")
    elif len(rps) >= 2:
        best = ordered.iloc[int(rps.argmax())][knob]
        advice.append(f"Optimal {knob} range is around {best:g}")
    if tuned:
        for number, row in enumerate(sla_rows, start=1):
            line = _search_range_advice(row, search)
            if line is not None:
                advice.append(f"SLA {number} ({row['criteria']}): {line}")
    if (ordered["success_rate"] < 100).any():
        advice.append("Success rate is below 100% at some load points: check the errors in requests.csv "
                      "and the server's resources")
    return advice


def _search_range_advice(row: dict[str, Any], search: SearchRange) -> Optional[str]:
    """Return the advice about the search range that one rule group's answer supports, or None.

    An answer below the upper bound with a failing load above it needs no advice. So does a
    group that stopped at a client-bound load or was interrupted, because its note gives the reason.
    """
    note = str(row.get("note", ""))
    if note.startswith("interrupted") or "client-bound" in note:
        return None
    best = _number(row.get("max_satisfied"))
    upper, lower, variable = search.upper_bound, search.lower_bound, search.variable
    if best is None:
        if variable == "parallel" and lower <= 1:
            return (f"no load passed, not even {variable} 1, so no concurrency meets these rules; "
                    "relax the rules or check the server")
        return (f"no load passed down to {variable} {lower:g}; lower search.lower_bound (now {lower:g}) "
                "to look further down")
    objective = "->" in str(row["criteria"])
    if best >= upper and _number(row.get("first_fail")) is None:
        reached = f"the best load is the upper bound {upper:g}" if objective else \
            f"every probe passed up to the upper bound {upper:g}"
        return f"{reached}; raise search.upper_bound (now {upper:g}) to look further up"
    if objective and best <= lower:
        return (f"the best load is the lower bound {lower:g}; lower search.lower_bound (now {lower:g}) "
                "to look further down")
    return None


def _number(value: Any) -> Optional[float]:
    """Return ``value`` as a float, or None for a missing value (None or NaN from a CSV)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def recommendations_text(lines: Iterable[str]) -> Text:
    lines = list(lines)
    if not lines:
        return Text("")
    text = Text("Performance Recommendations:\n", style="bold")
    for line in lines:
        text.append(f"• {line}\n", style="")
    return text


def sla_table(rows: list[dict[str, Any]]) -> Table:
    """Build the "SLA Auto-tune Summary" table from sla_summary rows."""
    table = Table(title="SLA Auto-tune Summary", title_style="bold")
    for header in ("Criteria", "Variable", "Max Satisfied", "Bracket", "Probes", "Note"):
        table.add_column(header)
    for row in rows:
        if "->" in str(row["criteria"]):
            # An objective group's best load has no passing/failing bracket.
            bracket = "-"
        elif _number(row.get("first_fail")) is None and _number(row.get("last_pass")) is not None:
            # Nothing failed: the search stopped at the upper bound or at a client-bound load.
            bracket = f"none failed up to {_load_label(row.get('last_pass'))}"
        else:
            bracket = f"[{_load_label(row.get('last_pass'))}, {_load_label(row.get('first_fail'))})"
        best = answer_text(row.get("max_satisfied"), row.get("note", ""), row.get("last_pass"))
        table.add_row(str(row["criteria"]), str(row["variable"]), best, bracket, str(row.get("probes", "")),
                      str(row.get("note", "")))
    return table


def render_text(renderables: Iterable[RenderableType]) -> str:
    """Render rich objects to plain text of TEXT_WIDTH columns, without colour codes."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=TEXT_WIDTH, color_system=None, force_terminal=False, record=False)
    for item in renderables:
        console.print(item)
    return buffer.getvalue()


class CountColumn(ProgressColumn):
    """Completed of total ("12/40"), or for a task without a total the count and its unit ("3 probes done")."""

    def render(self, task: Task) -> Text:
        if task.total is not None:
            return Text(f"{int(task.completed)}/{int(task.total)}", style="progress.download")
        unit = task.fields.get("unit")
        count = f"{int(task.completed)} {unit} done" if unit else f"{int(task.completed)} done"
        return Text(count, style="progress.download")


def make_progress(console: Console, enabled: bool) -> Progress:
    """Return a progress display; when disabled it draws nothing.

    A task added with ``total=None`` draws a pulsing bar, and a ``unit`` field names what it counts.
    """
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        CountColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        refresh_per_second=4,
        transient=False,
    )
