"""The report of one run: PNG plots and report.html in the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import pandas as pd

from runner.report import plots
from runner.report.aggregate import RunResult
from runner.report.folders import read_config, read_text
from runner.report.html import Page
from runner.report.tables import key_metrics, sort_by_load

# File name -> caption of the plots of one run, in report order.
RUN_PLOTS = {
    "latency_vs_load.png": "Latency percentiles against load",
    "ttft_vs_load.png": "TTFT percentiles against load",
    "tpot_vs_load.png": "TPOT percentiles against load",
    "throughput_vs_load.png": "Throughput against load",
    "tps_vs_latency.png": "Output throughput against p99 latency",
}


def sla_variable(sla: Optional[pd.DataFrame]) -> Optional[str]:
    """Return the search variable shared by all SLA rows, or None when there is none or several."""
    if sla is None or "variable" not in sla.columns:
        return None
    variables = sla["variable"].dropna().astype(str).unique()
    return str(variables[0]) if len(variables) == 1 else None


def plot_run(
    summary: pd.DataFrame,
    out_dir: Path,
    config: Mapping[str, Any],
    sla: Optional[pd.DataFrame],
) -> list[tuple[Path, str]]:
    """Write the plots of one run into ``out_dir``; return (path, caption) of each file written."""
    load = plots.choose_load_axis(summary, sla_variable(sla))
    thresholds = plots.rule_thresholds(config)
    boundaries = plots.sla_boundaries(sla)
    written = []
    for kind in ("latency", "ttft", "tpot"):
        name = f"{kind}_vs_load.png"
        if plots.plot_percentiles(summary, kind, out_dir / name, load, thresholds, boundaries):
            written.append((out_dir / name, RUN_PLOTS[name]))
    if plots.plot_throughput(summary, out_dir / "throughput_vs_load.png", load, thresholds, boundaries):
        written.append((out_dir / "throughput_vs_load.png", RUN_PLOTS["throughput_vs_load.png"]))
    if plots.plot_tradeoff({"run": summary}, out_dir / "tps_vs_latency.png", load):
        written.append((out_dir / "tps_vs_latency.png", RUN_PLOTS["tps_vs_latency.png"]))
    return written


def write_run_report(result: RunResult, title: Optional[str] = None) -> list[Path]:
    """Write the plots and report.html of a run that has a summary; return the paths written."""
    assert result.summary is not None, "write_run_report needs a run with a summary"
    run_dir = result.folder.path
    config = read_config(run_dir)
    figures = plot_run(result.summary, run_dir, config, result.sla)
    load = plots.choose_load_axis(result.summary, sla_variable(result.sla))

    page = Page(title or f"Load test report: {result.folder.name}", run_dir)
    if result.folder.overrides:
        page.heading("Overrides")
        page.table(pd.DataFrame({"key": list(result.folder.overrides), "value": list(result.folder.overrides.values())}))
    if result.interrupted_by:
        page.paragraph(f"The run was interrupted by {result.interrupted_by}, so its results are partial.",
                       css_class="failed")
    if result.rebuilt:
        page.paragraph("summary.csv was missing and has been rebuilt from requests.csv.")
    for message in result.damage:
        page.paragraph(message, css_class="failed")

    page.heading("Summary")
    ordered = sort_by_load(result.summary, load)
    page.table(key_metrics(ordered), caption=f"One row per load point, ordered by {load}. Times in seconds.")
    page.collapsed_table(ordered, "All summary.csv columns")

    if result.sla is not None:
        page.heading("SLA auto-tune")
        page.table(result.sla, caption="max_satisfied is the highest load meeting each rule group; empty when none did.")

    if figures:
        page.heading("Plots")
        for path, caption in figures:
            page.image(path, caption)

    console_text = read_text(run_dir / "performance_summary.txt")
    if console_text:
        page.heading("Console summary")
        page.preformatted(console_text, summary="performance_summary.txt")

    page.heading("Configuration")
    config_text = read_text(run_dir / ".hydra" / "config.yaml")
    page.preformatted(config_text if config_text is not None else "(no .hydra/config.yaml in this folder)")

    return [path for path, _ in figures] + [page.write(run_dir / "report.html")]
