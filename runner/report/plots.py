"""PNG plots of summary tables, drawn with matplotlib's Agg renderer.

Figures are built with ``matplotlib.figure.Figure`` and an Agg canvas, not pyplot, so no global
figure state or interactive backend is involved and a long sweep leaks no figures. Every plot
function returns whether it wrote a file: a metric with no data gives no plot, and a single load
point gives a plot with one marker per line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

DPI = 100
FIGURE_SIZE = (8.0, 4.8)  # inches; 800 x 480 pixels at DPI
STATS = ("avg", "p50", "p90", "p99")
STAT_COLORS = {"avg": "tab:blue", "p50": "tab:green", "p90": "tab:orange", "p99": "tab:red"}
METRIC_TITLES = {
    "latency": "End-to-end latency",
    "ttft": "Time to first token (TTFT)",
    "tpot": "Time per output token (TPOT)",
    "itl": "Inter-token latency (ITL)",
}
LOAD_LABELS = {"parallel": "Concurrency (requests in flight)", "rate": "Request rate (req/s)"}
THROUGHPUT_METRICS = ("rps", "tps", "goodput")
# Load ranges at least this wide (max / min) get a log2 x axis, so 1, 2, 4 ... 512 spread evenly.
LOG_AXIS_RATIO = 16
# Legends with more entries than this are left out; they would cover the plot.
MAX_LEGEND_ENTRIES = 15
BOUNDARY_STYLES = (("black", ":"), ("dimgray", "-."), ("purple", ":"), ("saddlebrown", "-."))

_THRESHOLD = re.compile(r"^\s*(<=|<|>=|>)\s*([-+0-9.eE]+)\s*$")
_METRIC_KIND = re.compile(r"\b(?:(?:avg|p50|p90|p99)_)?(latency|ttft|tpot|itl)\b")
_THROUGHPUT_NAME = re.compile(r"\b(rps|tps|goodput)\b")


@dataclass(frozen=True)
class Threshold:
    """One SLA comparison from the run's config, drawn as a horizontal line."""

    metric: str
    op: str
    value: float

    @property
    def label(self) -> str:
        return f"SLA {self.metric} {self.op} {self.value:g}"


@dataclass(frozen=True)
class Boundary:
    """The max_satisfied load of one rule group, drawn as a vertical line."""

    value: float
    criteria: str
    # Metric kinds the group's rules mention: latency, ttft, tpot, itl, throughput.
    kinds: frozenset[str]


def rule_thresholds(config: Mapping[str, Any]) -> list[Threshold]:
    """Collect the comparisons in ``sla.rules`` of a composed config; objectives are skipped."""
    sla = config.get("sla") or {}
    groups = sla.get("rules") if isinstance(sla, Mapping) else None
    thresholds = []
    for group in groups if isinstance(groups, list) else []:
        if not isinstance(group, Mapping):
            continue
        for metric, spec in group.items():
            match = _THRESHOLD.match(str(spec))
            if match is None:
                continue
            try:
                thresholds.append(Threshold(str(metric), match[1], float(match[2])))
            except ValueError:
                continue
    return thresholds


def sla_boundaries(sla: Optional[pd.DataFrame]) -> list[Boundary]:
    """Read the found boundaries from sla_summary rows; groups with no passing load give none."""
    if sla is None or sla.empty or "max_satisfied" not in sla.columns:
        return []
    boundaries = []
    for row in sla.to_dict("records"):
        value = pd.to_numeric(row.get("max_satisfied"), errors="coerce")
        if pd.isna(value):
            continue
        criteria = str(row.get("criteria", ""))
        kinds = set(_METRIC_KIND.findall(criteria))
        if _THROUGHPUT_NAME.search(criteria):
            kinds.add("throughput")
        boundaries.append(Boundary(float(value), criteria, frozenset(kinds)))
    return boundaries


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name not in frame.columns:
        return pd.Series(math.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[name], errors="coerce")


def choose_load_axis(summary: pd.DataFrame, preferred: Optional[str] = None) -> str:
    """Pick the load column to plot against: ``preferred`` when it has values, else the one that varied."""
    rate, parallel = _column(summary, "rate").dropna(), _column(summary, "parallel").dropna()
    if preferred == "rate" and len(rate):
        return "rate"
    if preferred == "parallel" and len(parallel):
        return "parallel"
    if rate.nunique() > 1:
        return "rate"
    if parallel.nunique() > 1:
        return "parallel"
    return "rate" if len(rate) else "parallel"


def _new_figure(ncols: int = 1) -> tuple[Figure, Any]:
    width, height = FIGURE_SIZE
    figure = Figure(figsize=(width * (1 + 0.5 * (ncols - 1)), height), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    # Fixed margins (fractions of the figure) instead of a layout engine, which would double
    # the drawing time of each figure.
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.88, wspace=0.3)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return figure, axes


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")


def _set_load_axis(ax: Any, values: Sequence[float], load: str) -> None:
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if positive and len(positive) == len(values) and min(positive) * LOG_AXIS_RATIO <= max(positive):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    elif load == "parallel":
        # Concurrency is a whole number, so a linear axis gets no ticks such as 2.25.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(LOAD_LABELS.get(load, load))


def _legend(ax: Any, title: Optional[str] = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if 0 < len(handles) <= MAX_LEGEND_ENTRIES:
        ax.legend(fontsize="small", loc="best", title=title, title_fontsize="small")


def _draw_boundaries(ax: Any, boundaries: Sequence[Boundary]) -> None:
    for index, boundary in enumerate(boundaries):
        color, style = BOUNDARY_STYLES[index % len(BOUNDARY_STYLES)]
        ax.axvline(boundary.value, color=color, linestyle=style, linewidth=1.5,
                   label=f"max satisfied {boundary.value:g}: {boundary.criteria}")


def plot_percentiles(
    summary: pd.DataFrame,
    kind: str,
    path: Path,
    load: str,
    thresholds: Sequence[Threshold] = (),
    boundaries: Sequence[Boundary] = (),
) -> bool:
    """Plot avg/p50/p90/p99 of ``kind`` (latency, ttft, tpot, itl) in seconds against load."""
    frame = summary.assign(_load=_column(summary, load)).dropna(subset=["_load"]).sort_values("_load")
    lines = {stat: _column(frame, f"{stat}_{kind}") for stat in STATS}
    lines = {stat: values for stat, values in lines.items() if values.notna().any()}
    if not lines:
        return False
    figure, (ax,) = _new_figure()
    for stat, values in lines.items():
        present = values.notna()
        ax.plot(frame["_load"][present], values[present], marker="o", color=STAT_COLORS[stat], label=stat)
    for threshold in thresholds:
        stat = threshold.metric.split("_", 1)[0]
        if threshold.metric.endswith(f"_{kind}") and threshold.op in ("<=", "<"):
            ax.axhline(threshold.value, color=STAT_COLORS.get(stat, "gray"), linestyle="--", linewidth=1.2,
                       label=threshold.label)
    _draw_boundaries(ax, [b for b in boundaries if kind in b.kinds])
    _set_load_axis(ax, frame["_load"].tolist(), load)
    ax.set_ylabel(f"{METRIC_TITLES.get(kind, kind)} (s)")
    ax.set_title(f"{METRIC_TITLES.get(kind, kind)} against load")
    _legend(ax)
    _save(figure, path)
    return True


def plot_throughput(
    summary: pd.DataFrame,
    path: Path,
    load: str,
    thresholds: Sequence[Threshold] = (),
    boundaries: Sequence[Boundary] = (),
) -> bool:
    """Plot requests/s (with goodput when it differs) and output tokens/s against load, side by side."""
    frame = summary.assign(_load=_column(summary, load)).dropna(subset=["_load"]).sort_values("_load")
    rps, tps, goodput = _column(frame, "rps"), _column(frame, "tps"), _column(frame, "goodput")
    if rps.isna().all() and tps.isna().all():
        return False
    figure, (left, right) = _new_figure(ncols=2)
    panels = [
        (left, [("rps", rps, "tab:blue")] + ([("goodput", goodput, "tab:green")]
                                              if goodput.notna().any() and not goodput.equals(rps) else []),
         "Throughput (req/s)", ("rps", "goodput")),
        (right, [("tps", tps, "tab:purple")], "Output throughput (tokens/s)", ("tps",)),
    ]
    for ax, series, ylabel, metrics in panels:
        for name, values, color in series:
            present = values.notna()
            ax.plot(frame["_load"][present], values[present], marker="o", color=color, label=name)
        for threshold in thresholds:
            if threshold.metric in metrics and threshold.op in (">=", ">"):
                ax.axhline(threshold.value, color="gray", linestyle="--", linewidth=1.2, label=threshold.label)
        _draw_boundaries(ax, boundaries)
        _set_load_axis(ax, frame["_load"].tolist(), load)
        ax.set_ylabel(ylabel)
        _legend(ax)
    figure.suptitle("Throughput against load")
    _save(figure, path)
    return True


def plot_tradeoff(
    curves: Mapping[str, pd.DataFrame],
    path: Path,
    load: str,
    latency: str = "p99_latency",
    annotate: bool = True,
    legend_title: Optional[str] = None,
) -> bool:
    """Plot output tokens/s against ``latency``, one line per curve, each ordered by load.

    With ``annotate`` each point of a lone curve is labelled with its load value.
    """
    prepared = {}
    for name, frame in curves.items():
        points = pd.DataFrame({"load": _column(frame, load), "x": _column(frame, latency), "y": _column(frame, "tps")})
        points = points.dropna(subset=["x", "y"]).sort_values("load", na_position="last")
        if not points.empty:
            prepared[name] = points
    if not prepared:
        return False
    figure, (ax,) = _new_figure()
    for name, points in prepared.items():
        ax.plot(points["x"], points["y"], marker="o", label=str(name))
    if annotate and len(prepared) == 1:
        (points,) = prepared.values()
        for row in points.itertuples(index=False):
            if not pd.isna(row.load):
                ax.annotate(f"{row.load:g}", (row.x, row.y), textcoords="offset points", xytext=(4, 4),
                            fontsize="x-small")
    stat, kind = latency.split("_", 1)
    ax.set_xlabel(f"{stat} {METRIC_TITLES.get(kind, kind).lower()} (s)")
    ax.set_ylabel("Output throughput (tokens/s)")
    ax.set_title(f"Throughput against {stat} {kind}" + (f" (points labelled by {load})" if annotate and len(prepared) == 1 else ""))
    if len(prepared) > 1:
        _legend(ax, legend_title)
    _save(figure, path)
    return True


def plot_lines(
    curves: Mapping[str, pd.DataFrame],
    path: Path,
    load: str,
    metric: str,
    ylabel: str,
    title: str,
    legend_title: Optional[str] = None,
) -> bool:
    """Plot ``metric`` against load, one line per curve (the sweep-level comparison plots)."""
    figure, (ax,) = _new_figure()
    loads: list[float] = []
    drawn = 0
    for name, frame in curves.items():
        points = pd.DataFrame({"x": _column(frame, load), "y": _column(frame, metric)}).dropna().sort_values("x")
        if points.empty:
            continue
        ax.plot(points["x"], points["y"], marker="o", label=str(name))
        loads += points["x"].tolist()
        drawn += 1
    if not drawn:
        return False
    _set_load_axis(ax, loads, load)
    ax.set_ylabel(ylabel)
    ax.set_title(title if drawn <= MAX_LEGEND_ENTRIES else f"{title} ({drawn} lines, legend omitted)")
    _legend(ax, legend_title)
    _save(figure, path)
    return True
