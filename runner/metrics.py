"""Per-request rows and the statistics of one load point.

A load point's statistics pool the measured (non-warmup) requests of all its repeats and
compute percentiles over all samples at once, never averaging per-repeat percentiles.
Percentiles use linear interpolation between closest ranks (numpy's default method).
Latency, TTFT, TPOT and ITL come from successful requests only; an undefined value (no
TTFT for an empty output, no TPOT for fewer than two tokens) is left out, never counted as 0.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

PERCENTILES = (50, 90, 99)
TIMED_METRICS = ("latency", "ttft", "tpot", "itl")

# requests.csv columns, in order. `itl` contains the request's inter-token latencies,
# space-separated, in seconds.
REQUEST_COLUMNS = [
    "variable", "value", "repeat", "request_id", "warmup", "cooldown",
    "scheduled_at", "dispatched_at", "sent_at", "first_token_at", "ended_at",
    "ttft", "latency", "tpot", "prompt_tokens", "completion_tokens",
    "token_source", "finish_reason", "success", "error", "status",
    "max_tokens", "expected_prompt_tokens", "tokenizer_tokens", "itl",
]

# summary.csv columns, in order: the contract's columns first, then client-health columns.
SUMMARY_COLUMNS = (
    ["parallel", "rate", "requests", "success_rate", "rps", "tps", "total_tps", "goodput"]
    + [f"{stat}_{metric}" for metric in TIMED_METRICS for stat in ("avg", "p50", "p90", "p99")]
    + ["runs", "warmup", "cooldown", "failures", "empty_outputs", "short_outputs", "prompt_tokens_mismatch",
       "completion_tokens_mismatch", "duration",
       "lateness_p50", "lateness_p99", "connect_p99", "loop_lag_p99", "client_bound", "client_note"]
)


def describe(values: Iterable[float] | np.ndarray, name: str) -> dict[str, float]:
    """Return avg_ and pXX_ statistics of ``values`` (NaN for each when there are none)."""
    array = np.asarray(values, dtype=float)
    array = array[~np.isnan(array)]
    if array.size == 0:
        return {f"avg_{name}": math.nan} | {f"p{p}_{name}": math.nan for p in PERCENTILES}
    stats = {f"avg_{name}": float(array.mean())}
    for p, value in zip(PERCENTILES, np.percentile(array, PERCENTILES)):
        stats[f"p{p}_{name}"] = float(value)
    return stats


def measured_window(frame: pd.DataFrame) -> float:
    """Sum over repeats of (last end - first send) of the measured requests, in seconds."""
    total = 0.0
    for _, repeat in frame.groupby("repeat", sort=False):
        sent = repeat["sent_at"].dropna()
        ended = repeat["ended_at"].dropna()
        if len(sent) and len(ended):
            total += max(float(ended.max()) - float(sent.min()), 0.0)
    return total


def throughput_seconds(measured: pd.DataFrame, parallel: Optional[float]) -> float:
    """Return the seconds that throughput is divided by: rps = successful requests / this.

    Closed loop (``parallel`` given): every slot runs its requests back to back, so the
    seconds are the summed slot time of the measured requests (scheduled_at to ended_at)
    divided by ``parallel``. Unlike the span from first send to last end, this does not
    depend on how the request count divides into waves of ``parallel`` requests, because
    cooldown requests keep every slot busy until the last measured request ends.
    Open loop: the span of the measured sends, stretched by n / (n - 1) so that n arrivals
    span n inter-arrival gaps; draining the last requests after the final arrival is left out.
    Falls back to the measured window when the times needed are missing.
    """
    if parallel and measured["scheduled_at"].notna().all() and measured["ended_at"].notna().all():
        return float((measured["ended_at"] - measured["scheduled_at"]).sum()) / parallel
    total = 0.0
    for _, rows in measured.groupby("repeat", sort=False):
        sent = rows["sent_at"].dropna()
        if parallel is None and len(sent) >= 2:
            total += (float(sent.max()) - float(sent.min())) * len(sent) / (len(sent) - 1)
    return total if total > 0 else measured_window(measured)


def meets_bounds(frame: pd.DataFrame, bounds: dict[str, float]) -> pd.Series:
    """Return which rows are successful and within every per-request bound.

    Bounds are keyed by ``ttft``, ``tpot``, ``latency`` or ``itl``, and an ``itl`` bound
    applies to every inter-token gap of the request. An undefined value (no TPOT for one
    token) passes its bound, because the request has nothing to measure there.
    """
    passing = frame["success"].astype(bool)
    for key, bound in bounds.items():
        values = frame["itl"].map(_max_or_nan) if key == "itl" else frame[key]
        passing &= values.isna() | (values <= bound)
    return passing


def _max_or_nan(samples: Any) -> float:
    return float(np.max(samples)) if len(samples) else math.nan


# Two token counts disagree when they differ by more than this fraction (and by 2 tokens).
COUNT_TOLERANCE = 0.05
# An output under ignore_eos is short when it has fewer than this fraction of max_tokens.
SHORT_OUTPUT_FRACTION = 0.9


def _disagree(counted: pd.Series, expected: pd.Series) -> int:
    both = counted.notna() & expected.notna()
    gap = (counted[both] - expected[both]).abs()
    return int((gap > np.maximum(2, COUNT_TOLERANCE * expected[both])).sum())


def count_checks(ok: pd.DataFrame) -> dict[str, int]:
    """Count successful requests whose token counts look wrong.

    short_outputs: fewer than 90 % of max_tokens. With request.ignore_eos every output should
    reach max_tokens, so a count above 0 warns that two runs with different real output
    lengths are not the same workload.
    prompt_tokens_mismatch: the server's usage.prompt_tokens differs from the dataset's count.
    completion_tokens_mismatch: usage.completion_tokens differs from the client tokenizer's.
    """
    checks = {"short_outputs": 0, "prompt_tokens_mismatch": 0, "completion_tokens_mismatch": 0}
    if "max_tokens" in ok:
        checks["short_outputs"] = int((ok["completion_tokens"] < SHORT_OUTPUT_FRACTION * ok["max_tokens"]).sum())
    if "expected_prompt_tokens" in ok:
        checks["prompt_tokens_mismatch"] = _disagree(ok["prompt_tokens"], ok["expected_prompt_tokens"])
    if "tokenizer_tokens" in ok:
        checks["completion_tokens_mismatch"] = _disagree(ok["tokenizer_tokens"], ok["completion_tokens"])
    return checks


def summarize(
    frame: pd.DataFrame,
    bounds: Optional[dict[str, float]] = None,
    *,
    parallel: Optional[float] = None,
    open_loop: bool = False,
) -> dict[str, Any]:
    """Compute one summary.csv row (without the load columns) from request rows.

    ``frame`` has the in-memory request columns (``itl`` as a sequence of floats); warmup
    and cooldown rows are dropped here. ``parallel`` (closed loop) or ``open_loop`` selects
    how throughput is timed (see ``throughput_seconds``); with neither, rps, tps and goodput
    use the measured window. ``bounds`` are the per-request bounds that define goodput;
    with none, goodput equals rps.
    """
    excluded = frame["warmup"].astype(bool)
    if "cooldown" in frame:
        excluded |= frame["cooldown"].fillna(False).astype(bool)
    measured = frame[~excluded]
    requests = len(measured)
    ok = measured[measured["success"].astype(bool)]
    window = measured_window(measured)
    if parallel or open_loop:
        rate_seconds = throughput_seconds(measured, None if open_loop else parallel)
    else:
        rate_seconds = window

    def per_second(amount: float) -> float:
        return amount / rate_seconds if rate_seconds > 0 else math.nan

    row: dict[str, Any] = {
        "requests": requests,
        "success_rate": 100.0 * len(ok) / requests if requests else math.nan,
        "rps": per_second(len(ok)),
        "tps": per_second(float(ok["completion_tokens"].fillna(0).sum())),
        "total_tps": per_second(float((ok["completion_tokens"].fillna(0) + ok["prompt_tokens"].fillna(0)).sum())),
        "goodput": per_second(int(meets_bounds(ok, bounds or {}).sum())),
    }
    row |= describe(ok["latency"], "latency")
    row |= describe(ok["ttft"], "ttft")
    row |= describe(ok["tpot"], "tpot")
    itl = np.concatenate([np.asarray(s, dtype=float) for s in ok["itl"]]) if len(ok) else np.array([])
    row |= describe(itl, "itl")

    # The client's own delay ends when it hands the request to the HTTP client. Waiting for a
    # pooled connection and opening one (connect) depend on the server accepting connections.
    handed = measured["dispatched_at"] if "dispatched_at" in measured else measured["sent_at"]
    handed = handed.fillna(measured["sent_at"])
    lateness = (handed - measured["scheduled_at"]).dropna()
    connect = (measured["sent_at"] - handed).dropna()
    row |= {
        "runs": int(measured["repeat"].nunique()) if requests else 0,
        "warmup": int(frame["warmup"].astype(bool).sum()),
        "cooldown": int(len(frame) - requests - frame["warmup"].astype(bool).sum()),
        "failures": int(requests - len(ok)),
        "empty_outputs": int((ok["completion_tokens"].fillna(0) == 0).sum()),
        **count_checks(ok),
        "duration": window,
        "lateness_p50": float(np.percentile(lateness, 50)) if len(lateness) else math.nan,
        "lateness_p99": float(np.percentile(lateness, 99)) if len(lateness) else math.nan,
        "connect_p99": float(np.percentile(connect, 99)) if len(connect) else math.nan,
    }
    return row
