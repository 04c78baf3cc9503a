"""Reports of run and sweep folders: aggregated CSVs, summary.md, PNG plots and report.html.

``build_report(path)`` is the one entry point: ``python -m runner.report DIR`` calls it, and a
Hydra multirun callback can call it at the end of a sweep.
"""

from runner.report.build import RUN_PLOTS_MAX_JOBS, build_report

__all__ = ["RUN_PLOTS_MAX_JOBS", "build_report"]
