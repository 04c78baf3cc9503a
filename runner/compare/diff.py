"""Reading two run folders and computing their differences and comparability warnings.

Load points present in both runs (matched on ``parallel`` and ``rate``) are compared metric by
metric from summary.csv; SLA results are matched on their criteria from sla_summary.csv.
Warnings say when the two runs did not measure the same thing: other prompts, request
settings, output lengths, load settings, search settings, model or server (for the
simulated server, its profile and seed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import pandas as pd

from runner.errors import RunnerError
from runner.report.folders import read_config

# Relative difference in mean output tokens per request above which two runs are not comparable.
COMPLETION_TOKENS_TOLERANCE = 0.05
# Decimal places used to match load values, so 2.0 and 2.0000001 are the same point.
LOAD_DECIMALS = 6
KEY_COLUMNS = ("parallel", "rate")
# summary.csv columns that describe a load point but are not numbers to compare.
NON_METRIC_COLUMNS = ("client_bound", "client_note")

# Settings of the embedded simulated server (endpoint=sim).
SIM_KEYS = ("model.sim_profile", "endpoint.sim_seed")
REQUEST_KEYS = ("request.max_tokens", "request.min_tokens", "request.ignore_eos", "request.stream",
                "request.temperature", "request.extra_body")
# Settings that decide how much load a plain run sends ...
LOAD_KEYS = ("load.number", "load.warmup", "load.duration")
# ... and how many requests each probe of an SLA search sends.
SEARCH_KEYS = ("load.warmup", "search.num_runs", "search.min_requests", "search.requests_per_unit",
               "search.rate_repeat_seconds", "search.max_requests", "search.rate_parallel_cap")
# Settings that decide where an SLA search looks and when it stops, and so its result.
SEARCH_RANGE_KEYS = ("search.variable", "search.lower_bound", "search.upper_bound", "search.parallel_resolution",
                     "search.rate_resolution", "search.max_extra_runs", "search.noise_band", "search.tail_noise")


@dataclass
class RunData:
    """The files of one run that a comparison reads."""

    path: Path
    summary: pd.DataFrame
    sla: Optional[pd.DataFrame]
    # .hydra/config.yaml as plain data ({} when missing).
    config: dict[str, Any]
    # manifest.json ({} when missing).
    manifest: dict[str, Any]


@dataclass
class Comparison:
    """The differences between run A (the baseline) and run B; every change is B - A."""

    a: RunData
    b: RunData
    warnings: list[str]
    # One row per (load point, metric): parallel, rate, metric, a, b, change, relative_change.
    metrics: pd.DataFrame
    # One row per criteria: criteria, variable, a, b, change, note_a, note_b.
    sla: pd.DataFrame
    # Load points found in one run only, as labels such as "parallel=8".
    only_in: dict[str, list[str]] = field(default_factory=dict)


def _read_csv(path: Path, label: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunnerError(f"{label} {path} cannot be read: {first_line}") from None


def load_run_data(path: Path, label: str) -> RunData:
    """Read one run folder; raise RunnerError with one line when it is not a usable run."""
    if not path.is_dir():
        raise RunnerError(f"{label} folder not found: {path}; pass a run folder written by python -m runner")
    summary_path = path / "summary.csv"
    # A sweep has its own aggregated summary.csv at the top, so look for job folders first.
    jobs = sorted((c.name for c in path.iterdir() if c.is_dir() and (c / ".hydra").is_dir()),
                  key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name))
    if jobs or (path / "multirun.yaml").is_file():
        listed = ", ".join(str(path / job) for job in jobs) or "none"
        raise RunnerError(f"{label} {path} contains runs in subfolders (a sweep), not a run; pass two of its job folders: {listed}")
    if not summary_path.is_file():
        hint = f"; python -m runner.report {path} rebuilds it" if (path / "requests.csv").is_file() else ""
        raise RunnerError(f"{label} {path} has no summary.csv{hint}")
    summary = _read_csv(summary_path, label)
    missing = [column for column in KEY_COLUMNS if column not in summary.columns]
    if missing:
        raise RunnerError(f"{label} {summary_path} lacks the column(s) {', '.join(missing)}; it is not a run summary")
    sla_path = path / "sla_summary.csv"
    sla = _read_csv(sla_path, label) if sla_path.is_file() else None
    if sla is not None and "criteria" not in sla.columns:
        raise RunnerError(f"{label} {sla_path} lacks the column criteria; it is not an SLA summary")
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    return RunData(path=path, summary=summary, sla=sla, config=read_config(path),
                   manifest=manifest if isinstance(manifest, dict) else {})


def _key(value: Any) -> Optional[float]:
    number = pd.to_numeric(value, errors="coerce")
    return None if pd.isna(number) else round(float(number), LOAD_DECIMALS)


def load_label(parallel: Optional[float], rate: Optional[float]) -> str:
    if rate is None:
        return f"parallel={parallel:g}" if parallel is not None else "parallel=?"
    cap = "" if parallel is None else f" (parallel {parallel:g})"
    return f"rate={rate:g}{cap}"


def _points(summary: pd.DataFrame) -> dict[tuple[Optional[float], Optional[float]], pd.Series]:
    points = {}
    for _, row in summary.iterrows():
        points.setdefault((_key(row["parallel"]), _key(row["rate"])), row)
    return points


def _changes(a: float, b: float) -> tuple[float, float]:
    """Return b - a and (b - a) / |a|; the relative change of a zero or missing ``a`` is NaN."""
    change = b - a
    if math.isnan(change) or a == 0:
        return change, math.nan if change != 0 else 0.0
    return change, change / abs(a)


def metric_rows(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Compare every numeric summary column at the load points of both runs.

    Returns the rows and the labels of the points found in only one of the runs.
    """
    points_a, points_b = _points(a), _points(b)
    metrics = [c for c in a.columns if c in b.columns and c not in KEY_COLUMNS and c not in NON_METRIC_COLUMNS
               and pd.api.types.is_numeric_dtype(a[c]) and pd.api.types.is_numeric_dtype(b[c])
               and not pd.api.types.is_bool_dtype(a[c]) and not pd.api.types.is_bool_dtype(b[c])]
    common = [key for key in points_a if key in points_b]
    rows = []
    for parallel, rate in common:
        for metric in metrics:
            value_a = float(points_a[(parallel, rate)][metric])
            value_b = float(points_b[(parallel, rate)][metric])
            change, relative = _changes(value_a, value_b)
            rows.append({"parallel": parallel, "rate": rate, "metric": metric, "a": value_a, "b": value_b,
                         "change": change, "relative_change": relative})
    only_in = {
        "A": [load_label(*key) for key in points_a if key not in points_b],
        "B": [load_label(*key) for key in points_b if key not in points_a],
    }
    columns = ["parallel", "rate", "metric", "a", "b", "change", "relative_change"]
    return pd.DataFrame(rows, columns=columns), only_in


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def sla_rows(a: Optional[pd.DataFrame], b: Optional[pd.DataFrame]) -> pd.DataFrame:
    """Match the SLA results of both runs on their criteria, in A's order, then B's extra ones."""
    columns = ["criteria", "variable", "a", "b", "change", "relative_change", "note_a", "note_b"]
    if a is None and b is None:
        return pd.DataFrame(columns=columns)
    by_criteria = [
        {str(row["criteria"]): row for _, row in frame.iterrows()} if frame is not None else {}
        for frame in (a, b)
    ]
    rows = []
    for criteria in dict.fromkeys([*by_criteria[0], *by_criteria[1]]):
        row_a, row_b = by_criteria[0].get(criteria), by_criteria[1].get(criteria)
        value_a = float(pd.to_numeric(row_a.get("max_satisfied"), errors="coerce")) if row_a is not None else math.nan
        value_b = float(pd.to_numeric(row_b.get("max_satisfied"), errors="coerce")) if row_b is not None else math.nan
        change, relative = _changes(value_a, value_b)
        variables = [_text(row.get("variable")) for row in (row_a, row_b) if row is not None]
        rows.append({
            "criteria": criteria,
            "variable": " / ".join(dict.fromkeys(variables)),
            "a": value_a,
            "b": value_b,
            "change": change,
            "relative_change": relative,
            "note_a": _text(row_a.get("note")) if row_a is not None else "not in run A",
            "note_b": _text(row_b.get("note")) if row_b is not None else "not in run B",
        })
    return pd.DataFrame(rows, columns=columns)


def setting(config: dict[str, Any], dotted: str) -> Any:
    """Return the value at a dotted key of a plain config, or None when any part is missing."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def api_path(config: dict[str, Any]) -> Optional[str]:
    url = setting(config, "endpoint.url")
    if not isinstance(url, str):
        return None
    return (urlsplit(url).path if "://" in url else url).rstrip("/") or "/"


def _shown(value: Any) -> str:
    """Return a setting as a warning shows it: whole numbers without ".0", strings quoted."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _differences(a: dict[str, Any], b: dict[str, Any], keys: Sequence[str]) -> list[str]:
    return [f"{key} {_shown(setting(a, key))} vs {_shown(setting(b, key))}"
            for key in keys if setting(a, key) != setting(b, key)]


def mean_completion_tokens(run: RunData, use_requests: bool) -> Optional[float]:
    """Return the mean output tokens per successful measured request.

    From requests.csv when ``use_requests``; otherwise from summary.csv, where tps / rps is
    each load point's output tokens per successful request, weighted by its measured window.
    """
    if use_requests:
        try:
            frame = pd.read_csv(run.path / "requests.csv", usecols=["warmup", "success", "completion_tokens"])
        except (OSError, ValueError, pd.errors.EmptyDataError, pd.errors.ParserError):
            return None
        measured = frame[frame["success"].astype(bool) & ~frame["warmup"].astype(bool)]
        tokens = pd.to_numeric(measured["completion_tokens"], errors="coerce").dropna()
        return float(tokens.mean()) if len(tokens) else None
    summary = run.summary
    if not {"tps", "rps"} <= set(summary.columns):
        return None
    window = summary["duration"] if "duration" in summary.columns else pd.Series(1.0, index=summary.index)
    requests = (summary["rps"] * window).sum()
    return float((summary["tps"] * window).sum() / requests) if requests > 0 else None


def comparability_warnings(a: RunData, b: RunData) -> list[str]:
    """Return one line per reason why the two runs may not be comparable."""
    warnings = []
    prints = [setting(run.manifest, "dataset.fingerprint") for run in (a, b)]
    if None in prints:
        missing = " and ".join(label for label, value in zip("AB", prints) if value is None)
        warnings.append(f"no dataset fingerprint in manifest.json of run {missing}: prompts cannot be checked")
    elif prints[0] != prints[1]:
        warnings.append(f"different prompts: dataset fingerprint {prints[0][:12]} (A) vs {prints[1][:12]} (B)")

    if not a.config or not b.config:
        missing = " and ".join(label for label, run in zip("AB", (a, b)) if not run.config)
        warnings.append(f"no .hydra/config.yaml in run {missing}: request, load and model settings cannot be checked")
    else:
        request = _differences(a.config, b.config, REQUEST_KEYS)
        if api_path(a.config) != api_path(b.config):
            request.append(f"API path {api_path(a.config)!r} vs {api_path(b.config)!r}")
        if request:
            warnings.append("different request settings: " + "; ".join(request))
        warnings += _load_warnings(a.config, b.config)
        if setting(a.config, "model.name") != setting(b.config, "model.name"):
            warnings.append(f"different models: model.name {setting(a.config, 'model.name')!r} (A) vs "
                            f"{setting(b.config, 'model.name')!r} (B)")
        warnings += _server_warnings(a.config, b.config)

    use_requests = all((run.path / "requests.csv").is_file() for run in (a, b))
    tokens_a, tokens_b = mean_completion_tokens(a, use_requests), mean_completion_tokens(b, use_requests)
    if tokens_a and tokens_b and abs(tokens_b - tokens_a) / tokens_a > COMPLETION_TOKENS_TOLERANCE:
        source = "requests.csv" if use_requests else "summary.csv tps / rps"
        warnings.append(f"different output lengths: {tokens_a:.1f} (A) vs {tokens_b:.1f} (B) mean completion tokens "
                        f"per request ({source}), more than {COMPLETION_TOKENS_TOLERANCE:.0%} apart")
    return warnings


def _server_warnings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Warn when one run measured the simulated server and the other did not, or two differently set-up ones."""
    kinds = [setting(config, "endpoint.kind") for config in (a, b)]
    if kinds[0] != kinds[1]:
        return [f"different servers: endpoint.kind {kinds[0]!r} (A) vs {kinds[1]!r} (B)"]
    if kinds[0] != "sim":
        return []
    # With endpoint=sim the profile is the server, so two profiles are two different servers.
    simulated = _differences(a, b, SIM_KEYS)
    return ["different simulated servers: " + "; ".join(simulated)] if simulated else []


def _load_warnings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    searched = [setting(config, "sla") is not None for config in (a, b)]
    if searched[0] != searched[1]:
        kinds = ["an SLA search" if value else "a single load point" for value in searched]
        return [f"different run kinds: run A is {kinds[0]}, run B is {kinds[1]}"]
    load = _differences(a, b, SEARCH_KEYS if searched[0] else LOAD_KEYS)
    if any(setting(config, "load.rate") is not None for config in (a, b)):
        # Arrival settings shape open-loop load only.
        load += _differences(a, b, ("load.arrival",))
        if "gamma" in (setting(a, "load.arrival"), setting(b, "load.arrival")):
            load += _differences(a, b, ("load.burstiness",))
    warnings = ["different load settings: " + "; ".join(load)] if load else []
    search = _differences(a, b, SEARCH_RANGE_KEYS) if searched[0] else []
    if search:
        warnings.append("different search settings, so the SLA answers are not comparable: " + "; ".join(search))
    return warnings


def client_bound_warnings(a: RunData, b: RunData, metrics: pd.DataFrame) -> list[str]:
    """Warn about compared load points that either run marked client-bound."""
    common = set(zip(metrics["parallel"], metrics["rate"]))
    warnings = []
    for label, run in (("A", a), ("B", b)):
        if "client_bound" not in run.summary.columns:
            continue
        for _, row in run.summary.iterrows():
            key = (_key(row["parallel"]), _key(row["rate"]))
            if key in common and str(row["client_bound"]).lower() == "true":
                note = _text(row.get("client_note"))
                warnings.append(f"{load_label(*key)} is client-bound in run {label}"
                                f"{f' ({note})' if note else ''}: its numbers describe the client, not the server")
    return warnings


def compare(path_a: Path, path_b: Path) -> Comparison:
    """Compare two run folders; raise RunnerError with one line on unusable input."""
    a, b = load_run_data(path_a, "run A"), load_run_data(path_b, "run B")
    metrics, only_in = metric_rows(a.summary, b.summary)
    warnings = comparability_warnings(a, b) + client_bound_warnings(a, b, metrics)
    return Comparison(a=a, b=b, warnings=warnings, metrics=metrics, sla=sla_rows(a.sla, b.sla), only_in=only_in)
