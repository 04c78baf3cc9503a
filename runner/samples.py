"""Samples of one load point, for its summary row, in memory that does not grow with the run.

requests.csv keeps every column of every request on disk. A load point keeps only what its
summary row needs: counters, per-repeat times, and the series whose percentiles are reported
(latency, TTFT, TPOT, ITL, lateness, connect time, event-loop lag), each one a
``SpilledSeries`` that keeps at most one block in memory and appends the rest to a scratch
file in ``directory``. ``summarize`` returns the same row as ``runner.metrics.summarize`` of
the same rows in a data frame. Every count, sum, mean and percentile is equal bit for bit,
except that a percentile equal to zero may differ in the sign of the zero (see
``runner.spill``). Token counts are added one request at a time, which is exact because
they are whole numbers far below 2**53.

Rows are filtered as they arrive: ``summarize`` leaves out warmup and cooldown requests,
and the timed metrics use successful requests only, so only those values are kept.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from runner.metrics import COUNT_TOLERANCE, PERCENTILES, SHORT_OUTPUT_FRACTION
from runner.spill import BLOCK_VALUES, SpilledSeries, mean, pairwise_sum, percentiles

# Per-request bounds that goodput can apply, in the column order of the ``bounds`` series.
BOUND_KEYS = ("ttft", "tpot", "latency", "itl")


def _number(value: Any) -> float:
    if value is None or value == "":
        return math.nan
    return float(value)


@dataclass
class RepeatTimes:
    """Send and end times of the measured requests of one repeat (seconds since the run's origin)."""

    sent_count: int = 0
    first_sent: float = math.inf
    last_sent: float = -math.inf
    end_count: int = 0
    last_end: float = -math.inf


class PointSamples:
    """Samples of the requests of one load value, all repeats together.

    With ``directory=None`` nothing is written to disk and every sample stays in memory.
    """

    def __init__(self, directory: Optional[Path] = None, block: int = BLOCK_VALUES) -> None:
        self.directory = directory

        def series(name: str) -> SpilledSeries:
            return SpilledSeries(None if directory is None else directory / f"{name}.f64", block)

        # Successful measured requests, NaN left out.
        self.latency = series("latency")
        self.ttft = series("ttft")
        self.tpot = series("tpot")
        self.itl = series("itl")
        # Per successful measured request: ttft, tpot, latency and its largest ITL sample
        # (NaN when undefined), in BOUND_KEYS order, for goodput under per-request bounds.
        self.bounds = series("bounds")
        # Measured requests, NaN left out.
        self.lateness = series("lateness")
        self.connect = series("connect")
        # Measured requests: ended_at - scheduled_at, for closed-loop throughput.
        self.slot_seconds = series("slot_seconds")
        # Event-loop lag samples of every repeat, in seconds.
        self.loop_lag = series("loop_lag")

        self.rows = 0
        self.warmup = 0
        self.measured = 0
        self.successes = 0
        self.completion_tokens = 0.0
        self.total_tokens = 0.0
        self.empty_outputs = 0
        self.short_outputs = 0
        self.prompt_tokens_mismatch = 0
        self.completion_tokens_mismatch = 0
        # False once a measured request lacks scheduled_at or ended_at.
        self.slots_complete = True
        # Measured requests by repeat, in the order repeats first appear.
        self.repeats: dict[int, RepeatTimes] = {}

    def __len__(self) -> int:
        return self.rows

    def add(self, row: Mapping[str, Any]) -> None:
        """Take one requests.csv row (``itl`` as a sequence of seconds)."""
        self.rows += 1
        if bool(row["warmup"]):
            self.warmup += 1
            return
        if bool(row.get("cooldown", False)):
            return
        self.measured += 1
        scheduled = _number(row.get("scheduled_at"))
        sent = _number(row.get("sent_at"))
        ended = _number(row.get("ended_at"))
        dispatched = _number(row.get("dispatched_at"))
        self._add_times(int(row["repeat"]), sent, ended)
        # The client's own delay ends when it hands the request to the HTTP client.
        handed = sent if math.isnan(dispatched) else dispatched
        lateness = handed - scheduled
        if not math.isnan(lateness):
            self.lateness.append(lateness)
        connect = sent - handed
        if not math.isnan(connect):
            self.connect.append(connect)
        if math.isnan(scheduled) or math.isnan(ended):
            self.slots_complete = False
        else:
            self.slot_seconds.append(ended - scheduled)
        if bool(row["success"]):
            self._add_success(row)

    def _add_times(self, repeat: int, sent: float, ended: float) -> None:
        times = self.repeats.get(repeat)
        if times is None:
            times = self.repeats[repeat] = RepeatTimes()
        if not math.isnan(sent):
            times.sent_count += 1
            if sent < times.first_sent:
                times.first_sent = sent
            if sent > times.last_sent:
                times.last_sent = sent
        if not math.isnan(ended):
            times.end_count += 1
            if ended > times.last_end:
                times.last_end = ended

    def _add_success(self, row: Mapping[str, Any]) -> None:
        self.successes += 1
        latency = _number(row.get("latency"))
        ttft = _number(row.get("ttft"))
        tpot = _number(row.get("tpot"))
        if not math.isnan(latency):
            self.latency.append(latency)
        if not math.isnan(ttft):
            self.ttft.append(ttft)
        if not math.isnan(tpot):
            self.tpot.append(tpot)
        itl = row["itl"]
        total = sum(itl)
        if total == total:  # no NaN (nor +inf with -inf) among the samples
            self.itl.extend(itl)
            itl_max = max(itl) if len(itl) else math.nan
        else:
            self.itl.extend(sample for sample in itl if not math.isnan(sample))
            itl_max = math.nan  # numpy's max, which meets_bounds uses, is NaN when a sample is
        self.bounds.extend((ttft, tpot, latency, itl_max))

        completion = _number(row.get("completion_tokens"))
        prompt = _number(row.get("prompt_tokens"))
        # Missing counts add 0, as fillna(0) does in runner.metrics.summarize.
        completion_or_zero = 0.0 if math.isnan(completion) else completion
        prompt_or_zero = 0.0 if math.isnan(prompt) else prompt
        self.completion_tokens += completion_or_zero
        self.total_tokens += completion_or_zero + prompt_or_zero
        if math.isnan(completion) or completion == 0:
            self.empty_outputs += 1
        if completion < SHORT_OUTPUT_FRACTION * _number(row.get("max_tokens")):
            self.short_outputs += 1
        if _disagree(prompt, _number(row.get("expected_prompt_tokens"))):
            self.prompt_tokens_mismatch += 1
        if _disagree(_number(row.get("tokenizer_tokens")), completion):
            self.completion_tokens_mismatch += 1

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.add(row)

    def spill(self) -> None:
        """Write every sample held in memory to the scratch files (nothing without a directory)."""
        for series in self._series():
            series.spill()

    def remove(self) -> None:
        """Delete the scratch files; the samples are gone afterwards."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _series(self) -> list[SpilledSeries]:
        return [self.latency, self.ttft, self.tpot, self.itl, self.bounds, self.lateness, self.connect,
                self.slot_seconds, self.loop_lag]

    def measured_window(self) -> float:
        """Sum over repeats of (last end - first send) of the measured requests, in seconds."""
        total = 0.0
        for times in self.repeats.values():
            if times.sent_count and times.end_count:
                total += max(times.last_end - times.first_sent, 0.0)
        return total

    def throughput_seconds(self, parallel: Optional[float]) -> float:
        """Return the seconds that throughput is divided by (see ``runner.metrics.throughput_seconds``)."""
        if parallel and self.slots_complete:
            return pairwise_sum(self.slot_seconds) / parallel
        total = 0.0
        for times in self.repeats.values():
            if parallel is None and times.sent_count >= 2:
                sent = times.sent_count
                total += (times.last_sent - times.first_sent) * sent / (sent - 1)
        return total if total > 0 else self.measured_window()

    def rate_seconds(self, parallel: Optional[float], open_loop: bool) -> float:
        if parallel or open_loop:
            return self.throughput_seconds(None if open_loop else parallel)
        return self.measured_window()

    def meeting_bounds(self, bounds: Optional[dict[str, float]]) -> int:
        """Count the successful measured requests within every per-request bound.

        Same rule as ``runner.metrics.meets_bounds``: an undefined value passes its bound,
        and an ``itl`` bound applies to every inter-token gap of the request.
        """
        if not bounds:
            return self.successes
        unknown = sorted(set(bounds) - set(BOUND_KEYS))
        if unknown:
            raise ValueError(f"per-request bounds on {', '.join(unknown)} are not supported; "
                             f"use {', '.join(BOUND_KEYS)}")
        width = len(BOUND_KEYS)
        passing = 0
        for block in self.bounds.blocks(size=self.bounds.block // width * width):
            values = block.reshape(-1, width)
            ok = np.ones(len(values), dtype=bool)
            for key, bound in bounds.items():
                column = values[:, BOUND_KEYS.index(key)]
                ok &= np.isnan(column) | (column <= bound)
            passing += int(ok.sum())
        return passing

    def goodput(self, bounds: Optional[dict[str, float]], *, parallel: Optional[float] = None,
                open_loop: bool = False) -> float:
        """Return successful requests/s within every bound, as ``summarize`` computes it."""
        seconds = self.rate_seconds(parallel, open_loop)
        return self.meeting_bounds(bounds) / seconds if seconds > 0 else math.nan

    def summarize(self, bounds: Optional[dict[str, float]] = None, *, parallel: Optional[float] = None,
                  open_loop: bool = False) -> dict[str, Any]:
        """Compute the summary.csv row of these samples, as ``runner.metrics.summarize`` does for rows."""
        requests = self.measured
        seconds = self.rate_seconds(parallel, open_loop)

        def per_second(amount: float) -> float:
            return amount / seconds if seconds > 0 else math.nan

        row: dict[str, Any] = {
            "requests": requests,
            "success_rate": 100.0 * self.successes / requests if requests else math.nan,
            "rps": per_second(self.successes),
            "tps": per_second(self.completion_tokens),
            "total_tps": per_second(self.total_tokens),
            "goodput": per_second(self.meeting_bounds(bounds)),
        }
        for name, series in (("latency", self.latency), ("ttft", self.ttft), ("tpot", self.tpot),
                             ("itl", self.itl)):
            row |= describe(series, name)
        lateness_p50, lateness_p99 = percentiles(self.lateness, [50, 99])
        row |= {
            "runs": len(self.repeats),
            "warmup": self.warmup,
            "cooldown": self.rows - requests - self.warmup,
            "failures": requests - self.successes,
            "empty_outputs": self.empty_outputs,
            "short_outputs": self.short_outputs,
            "prompt_tokens_mismatch": self.prompt_tokens_mismatch,
            "completion_tokens_mismatch": self.completion_tokens_mismatch,
            "duration": self.measured_window(),
            "lateness_p50": lateness_p50,
            "lateness_p99": lateness_p99,
            "connect_p99": percentiles(self.connect, [99])[0],
        }
        return row


def describe(series: SpilledSeries, name: str) -> dict[str, float]:
    """Return avg_ and pXX_ statistics of a series with no NaN, as ``runner.metrics.describe`` does."""
    stats = {f"avg_{name}": mean(series)}
    for point, value in zip(PERCENTILES, percentiles(series, PERCENTILES)):
        stats[f"p{point}_{name}"] = value
    return stats


def _disagree(counted: float, expected: float) -> bool:
    # runner.metrics._disagree for one pair: NaN on either side is no disagreement.
    if math.isnan(counted) or math.isnan(expected):
        return False
    return abs(counted - expected) > max(2, COUNT_TOLERANCE * expected)
