"""Data exchanged between the SLA tuner and the rest of the runner.

In: the tuner decides which load values to measure, and a ``Prober`` measures them. The
tuner calls ``await prober.probe(value, runs)`` and gets back a ``ProbeResult`` with metrics
pooled over every repeat that exists at that value.
Out: the tuner reports its progress as ``TuneEvent``s and its results as ``GroupAnswer``s.

Contract of ``Prober.probe(value, runs)``:

- ``value`` is the concurrency (an ``int``) or the open-loop rate in requests/s (a ``float``),
  depending on the search variable. The tuner has already rounded it.
- At least ``runs`` repeats must exist at ``value`` afterwards. The prober keeps every repeat
  it has run and runs only the missing ones, so a second call with a larger ``runs`` adds
  repeats instead of starting over.
- ``metrics`` are pooled over all repeats at that value (percentiles over all samples, never
  averaged percentiles) and use the ``summary.csv`` column names: ``avg_ttft``, ``p99_ttft``,
  ``rps``, ``tps``, ``success_rate``, ``requests`` and so on. An undefined statistic (for
  example TPOT when no request produced two tokens) is NaN, never 0.
- ``success_rate`` is a percent computed from exact counts and never rounded. A single failed
  request must leave it below 100, because any failure fails a group without its own
  success_rate rule.
- ``client_bound`` is set when the client could not deliver the load faithfully (open-loop
  sends running late, event-loop lag). The tuner then treats the point as not measured and
  reports that the client, not the server, limited the search.
- ``goodput``, when given, returns the requests/s of successful requests meeting the given
  per-request bounds. The keys are ``ttft``, ``tpot``, ``latency`` and ``itl``, each an upper
  bound in seconds, and ``itl`` bounds every gap of the request. When ``goodput`` is absent
  the tuner uses ``metrics["goodput"]``, or NaN.
- Cancelling ``probe`` must stop the load it is sending and re-raise ``CancelledError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol


@dataclass
class ProbeResult:
    """Metrics of one load value, pooled over ``runs`` repeats."""

    # The load value probed: concurrency or requests/s.
    value: float
    # Repeats pooled into ``metrics``.
    runs: int
    # Pooled statistics by summary.csv column name, NaN when undefined.
    metrics: dict[str, float] = field(default_factory=dict)
    # True when the client could not deliver this load faithfully.
    client_bound: bool = False
    # Reason the client was the limit, e.g. "p99 schedule lateness 0.35 s".
    client_note: str = ""
    # Requests/s of successful requests that meet the given per-request bounds.
    goodput: Callable[[Mapping[str, float]], float] | None = None

    def metrics_for(self, bounds: Mapping[str, float] | None) -> dict[str, float]:
        """Return a copy of the metrics with ``goodput`` computed for ``bounds``.

        With ``bounds`` None the metrics are returned unchanged.
        """
        metrics = dict(self.metrics)
        if bounds is None:
            return metrics
        if self.goodput is not None:
            metrics["goodput"] = float(self.goodput(bounds))
        else:
            metrics.setdefault("goodput", math.nan)
        return metrics


class Prober(Protocol):
    """Measurer of load values for the tuner, following the contract in the module docstring."""

    async def probe(self, value: float, runs: int) -> ProbeResult: ...


class Verdict(Enum):
    passed = "pass"
    failed = "fail"
    # The client could not deliver the load, so the point is no evidence about the server.
    client_bound = "client-bound"


@dataclass
class GroupAnswer:
    """Result of tuning one rule group, written as one row of sla_summary.csv.

    For constraint groups ``last_pass`` and ``first_fail`` bound the result: the highest
    passing value and the lowest value above it that the server failed. For objective groups
    they are the ends of the final search bracket around the best value.
    """

    criteria: str
    variable: str
    # Highest load meeting the group (constraints) or the best load (objectives), None if none.
    max_satisfied: float | None
    note: str
    last_pass: float | None = None
    first_fail: float | None = None
    # Distinct load values this group used, including values measured for earlier groups.
    probes: int = 0
    # Wall time spent on this group, in seconds.
    seconds: float = 0.0
    # Objective groups: the metric's value at max_satisfied.
    best_metric: float | None = None

    def to_row(self) -> dict[str, object]:
        """Return the sla_summary.csv row, where None stands for an empty cell."""
        return {
            "criteria": self.criteria,
            "variable": self.variable,
            "max_satisfied": self.max_satisfied,
            "note": self.note,
            "probes": self.probes,
            "seconds": round(self.seconds, 3),
            "last_pass": self.last_pass,
            "first_fail": self.first_fail,
        }


# Start of the note of a rule group whose search a signal stopped before it converged.
INTERRUPTED_NOTE = "interrupted"


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def answer_text(max_satisfied: object, note: object, last_pass: object) -> str:
    """Return how a rule group's answer reads in a table.

    That is the load, "none" when the search ended with no load meeting the group, or, for
    an interrupted search, that it was interrupted and the highest load that passed so far.
    Values may come from a GroupAnswer or from sla_summary.csv (NaN or "" for empty cells).
    """
    if not _missing(max_satisfied):
        return f"{float(max_satisfied):g}"  # type: ignore[arg-type]
    if str(note).startswith(INTERRUPTED_NOTE):
        if _missing(last_pass):
            return "none so far (interrupted)"
        return f"{float(last_pass):g} so far (interrupted)"  # type: ignore[arg-type]
    return "none"


@dataclass(frozen=True)
class TuneEvent:
    """Progress report of the search, for the console.

    ``kind`` is "probe" before a value is measured, "verdict" after it (with ``verdict``,
    ``violations`` and the bracket so far) and "answer" when the group is done.
    """

    kind: str
    # Position of the group in sla.rules.
    group: int
    criteria: str
    value: float | None = None
    runs: int = 0
    verdict: Verdict | None = None
    violations: tuple[str, ...] = ()
    client_note: str = ""
    # Objective groups: the objective metric at this value.
    metric: float | None = None
    last_pass: float | None = None
    first_fail: float | None = None
    answer: GroupAnswer | None = None
