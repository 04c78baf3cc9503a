"""Building the report of a run or a sweep folder: ``build_report`` is the entry point.

For a sweep, the top folder gets summary.csv and sla_summary.csv (every job's rows plus ``job``
and one column per override key), summary.md, sweep-level plots and report.html. Each job
folder gets its own plots and report.html unless that is turned off. A job without results is
listed as failed, with the text of its error.txt when it has one, and the rest goes on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import pandas as pd

from runner.errors import RunnerError
from runner.report import plots
from runner.report.aggregate import RunResult, SweepTables, combine_runs, load_run, write_table
from runner.report.folders import Layout, find_layout, read_text
from runner.report.html import Page
from runner.report.run_report import sla_variable, write_run_report
from runner.report.tables import best_points, jobs_table, key_metrics, markdown_table, sla_comparison

log = logging.getLogger(__name__)

# Sweeps of up to this many jobs get per-job plots and report.html by default. One job's five
# plots took 0.5-1 s to draw on a shared 2-core VM, so a 200-job sweep would spend minutes.
RUN_PLOTS_MAX_JOBS = 20
# Maximum characters of a job label in a plot legend.
LABEL_LIMIT = 60

SWEEP_PLOTS = {
    "sweep_tps_vs_latency.png": "Output throughput against p99 latency",
    "sweep_tps_vs_load.png": "Output throughput against load",
    "sweep_p99_latency_vs_load.png": "p99 latency against load",
    "sweep_p99_ttft_vs_load.png": "p99 TTFT against load",
    "sweep_p99_tpot_vs_load.png": "p99 TPOT against load",
}


def build_report(path: Path, *, run_plots: Optional[bool] = None) -> list[Path]:
    """Write the report files of a run or sweep folder and return their paths.

    ``run_plots`` decides whether each job of a sweep gets its own plots and report.html;
    None means yes for sweeps of up to RUN_PLOTS_MAX_JOBS jobs. Raises RunnerError when
    ``path`` does not exist or contains no run.
    """
    layout = find_layout(Path(path))
    if layout.kind == "run":
        result = load_run(layout.runs[0])
        if result.summary is None:
            raise RunnerError(f"no usable results in {layout.root}: {_first_line(result.error)}")
        return result.written + write_run_report(result)
    return build_sweep_report(layout, run_plots=run_plots)


def _first_line(text: Optional[str]) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else "unknown error"


def _truncate(label: str) -> str:
    return label if len(label) <= LABEL_LIMIT else label[: LABEL_LIMIT - 3] + "..."


def sweep_curves(tables: SweepTables, results: list[RunResult], load: str) -> dict[str, pd.DataFrame]:
    """Split the sweep's summary rows into lines, labelled by the overrides that tell them apart.

    Every job gets its own line, with one exception: jobs that differ only in the override of
    the plotted load (``load.parallel=1,2,4`` on a concurrency axis) are the points of one
    line, unless two of them measured the same load value.
    """
    summary = tables.summary
    if summary.empty:
        return {}
    varying, _ = varying_overrides(results, tables)
    label_keys = [key for key in varying if key != f"load.{load}"]
    groups: dict[tuple[str, ...], list[RunResult]] = {}
    for result in results:
        if result.summary is not None:
            groups.setdefault(tuple(result.folder.overrides.get(k, "") for k in label_keys), []).append(result)

    jobs = summary["job"].astype(str)
    curves: dict[str, pd.DataFrame] = {}
    for values, members in groups.items():
        settings = ", ".join(f"{key}={value}" for key, value in zip(label_keys, values))
        frames = [summary[jobs == member.folder.name] for member in members]
        joined = pd.concat(frames, ignore_index=True)
        loads = pd.to_numeric(joined[load], errors="coerce").dropna() if load in joined else pd.Series(dtype=float)
        if len(members) > 1 and not loads.duplicated().any():
            curves[_truncate(settings or "all jobs")] = joined
            continue
        for member, frame in zip(members, frames):
            name = f"job {member.folder.name}"
            label = _truncate(f"{name} ({settings})" if settings and len(members) > 1 else settings or name)
            # Two labels cut to the same text would draw one line over the other.
            curves[f"{label} [{name}]" if label in curves else label] = frame
    return curves


def plot_sweep(tables: SweepTables, results: list[RunResult], out_dir: Path) -> list[tuple[Path, str]]:
    """Write the sweep-level plots into ``out_dir``; return (path, caption) of each file written."""
    load = plots.choose_load_axis(tables.summary, sla_variable(tables.sla if not tables.sla.empty else None))
    curves = sweep_curves(tables, results, load)
    if not curves:
        return []
    written = []
    if plots.plot_tradeoff(curves, out_dir / "sweep_tps_vs_latency.png", load, annotate=False):
        written.append("sweep_tps_vs_latency.png")
    charts = [
        ("sweep_tps_vs_load.png", "tps", "Output throughput (tokens/s)"),
        ("sweep_p99_latency_vs_load.png", "p99_latency", "p99 latency (s)"),
        ("sweep_p99_ttft_vs_load.png", "p99_ttft", "p99 TTFT (s)"),
        ("sweep_p99_tpot_vs_load.png", "p99_tpot", "p99 TPOT (s)"),
    ]
    for name, metric, ylabel in charts:
        if plots.plot_lines(curves, out_dir / name, load, metric, ylabel, SWEEP_PLOTS[name]):
            written.append(name)
    return [(out_dir / name, SWEEP_PLOTS[name]) for name in written]


def varying_overrides(results: list[RunResult], tables: SweepTables) -> tuple[dict[str, str], dict[str, str]]:
    """Split the override columns into those that differ between jobs and those every job shares.

    Returns (key -> column of the varying ones, key -> value of the shared ones). The display
    tables show only the varying columns; the CSVs keep all of them.
    """
    varying, shared = {}, {}
    for key, column in tables.override_columns.items():
        values = {result.folder.overrides.get(key) for result in results}
        if len(values) > 1:
            varying[key] = column
        else:
            shared[key] = values.pop() or ""
    return varying, shared


def _shared_text(shared: dict[str, str]) -> str:
    return "Overrides shared by every job: " + ", ".join(f"{key}={value}" for key, value in shared.items())


def _comparison_caption(tables: SweepTables) -> str:
    variable = sla_variable(tables.sla)
    unit = f"the highest {variable}" if variable else "the highest value of each run's search variable"
    return (f"Cells hold {unit} meeting each rule set; 'none' means no load met it, 'so far (interrupted)' "
            f"gives the highest load that passed before the search was stopped, and empty means not run.")


def not_started(results: list[RunResult], planned_jobs: Optional[int]) -> int:
    """Return how many of the planned jobs have no folder, such as those a signal kept from starting."""
    return max(0, (planned_jobs or 0) - len(results))


def _count_line(results: list[RunResult], planned_jobs: Optional[int] = None) -> str:
    """Return the sentence that counts the jobs with results, interrupted, failed and not started."""
    failed = sum(r.failed for r in results)
    with_results = [r for r in results if r.summary is not None]
    interrupted = sum(bool(r.interrupted_by) for r in with_results)
    stopped_empty = sum(r.stopped_before_results for r in results)
    missing = not_started(results, planned_jobs)
    counts = f"{len(with_results)} with results"
    if interrupted:
        counts += f" ({interrupted} of them interrupted, so their results are partial)"
    if stopped_empty:
        counts += f", {stopped_empty} interrupted before a request completed"
    counts += f", {failed} failed"
    if missing:
        counts += f", {missing} not started"
    return f"{len(results) + missing} jobs: {counts}."


def _damage_lines(results: list[RunResult]) -> list[str]:
    return [f"job {r.folder.name}: {message}" for r in results for message in r.damage]


def write_summary_markdown(path: Path, root: Path, results: list[RunResult], tables: SweepTables,
                           planned_jobs: Optional[int] = None) -> Path:
    """Write summary.md: job status, the SLA comparison and the best load point of each job."""
    failed = [r for r in results if r.failed]
    varying, shared = varying_overrides(results, tables)
    lines = [
        "# Sweep report",
        "",
        f"Folder: `{root}`",
        "",
        _count_line(results, planned_jobs),
        "",
    ]
    if shared:
        spans = " ".join(f"`{key}={value}`" for key, value in shared.items())
        lines += [f"Overrides shared by every job: {spans}", ""]
    lines += ["## Jobs", "", markdown_table(jobs_table(results, varying))]
    comparison = sla_comparison(tables.sla, tables.override_columns)
    if not comparison.empty:
        lines += ["## SLA: max satisfied load", "", _comparison_caption(tables), "", markdown_table(comparison)]
    best = best_points(tables.summary, varying)
    if not best.empty:
        lines += ["## Highest throughput per job", "", "Times in seconds, throughput in tokens/s and req/s.", "",
                  markdown_table(best)]
    if failed:
        lines += ["## Failed jobs", ""]
        lines += [f"- job {r.folder.name}: {_first_line(r.error)}" for r in failed]
        lines.append("")
    damage = _damage_lines(results)
    if damage:
        lines += ["## Damaged files", ""] + [f"- {line}" for line in damage] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _sweep_page(root: Path, results: list[RunResult], tables: SweepTables, figures: list[tuple[Path, str]],
                job_pages: list[Path], planned_jobs: Optional[int] = None) -> Page:
    failed = [r for r in results if r.failed]
    varying, shared = varying_overrides(results, tables)
    page = Page(f"Sweep report: {root.name}", root)
    partial = failed or any(r.interrupted_by for r in results) or not_started(results, planned_jobs)
    page.paragraph(_count_line(results, planned_jobs), css_class="failed" if partial else None)
    for line in _damage_lines(results):
        page.paragraph(line, css_class="failed")
    if shared:
        page.paragraph(_shared_text(shared))

    page.heading("Jobs")
    page.table(jobs_table(results, varying))
    for result in failed:
        page.preformatted(result.error or "unknown error", summary=f"Error of job {result.folder.name}")

    comparison = sla_comparison(tables.sla, tables.override_columns)
    if not comparison.empty:
        page.heading("SLA: max satisfied load")
        page.table(comparison, caption=_comparison_caption(tables))
    best = best_points(tables.summary, varying)
    if not best.empty:
        page.heading("Highest throughput per job")
        page.table(best, caption="The load point with the most output tokens/s of each job. Times in seconds.")
    if not tables.sla.empty:
        page.heading("SLA auto-tune, all jobs")
        page.table(tables.sla)
    if not tables.summary.empty:
        page.heading("Summary, all jobs")
        page.table(key_metrics(tables.summary, leading=["job", *varying.values()]),
                   caption="One row per load point of each job. Times in seconds.")
        page.collapsed_table(tables.summary, "All summary.csv columns")

    if figures:
        page.heading("Plots")
        for path, caption in figures:
            page.image(path, caption)
    if job_pages:
        page.heading("Job reports")
        page.links([(p.relative_to(root).as_posix(), f"job {p.parent.name}") for p in job_pages])

    page.heading("Configuration")
    config_text = read_text(root / "multirun.yaml")
    if config_text is None and results:
        config_text = read_text(results[0].folder.path / ".hydra" / "config.yaml")
    page.preformatted(config_text if config_text is not None else "(no multirun.yaml in this folder)")
    return page


def build_sweep_report(layout: Layout, run_plots: Optional[bool] = None) -> list[Path]:
    """Aggregate every job of a sweep and write the sweep's files; return the paths written."""
    root = layout.root
    results = [load_run(folder) for folder in layout.runs]
    written = [path for result in results for path in result.written]
    for result in results:
        if result.failed:
            log.warning("job %s has no results: %s", result.folder.name, _first_line(result.error))
        elif result.summary is None:
            log.info("job %s has no results: %s", result.folder.name, result.status)
    tables = combine_runs(results)

    write_table(tables.summary, root / "summary.csv")
    written.append(root / "summary.csv")
    if not tables.sla.empty:
        write_table(tables.sla, root / "sla_summary.csv")
        written.append(root / "sla_summary.csv")
    written.append(write_summary_markdown(root / "summary.md", root, results, tables, layout.planned_jobs))

    job_pages: list[Path] = []
    if run_plots if run_plots is not None else len(results) <= RUN_PLOTS_MAX_JOBS:
        for result in results:
            if result.summary is not None:
                paths = write_run_report(result, title=f"Job {result.folder.name} of sweep {root.name}")
                written += paths
                job_pages.append(paths[-1])

    figures = plot_sweep(tables, results, root)
    written += [path for path, _ in figures]
    page = _sweep_page(root, results, tables, figures, job_pages, layout.planned_jobs)
    written.append(page.write(root / "report.html"))
    return written
