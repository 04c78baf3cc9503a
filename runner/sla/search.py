"""SLA auto-tune: find, for each rule group, the highest load at which the server meets it.

A constraint group starts at the start value. While it passes, the load doubles up to the
upper bound, and the last step probes the upper bound itself. If the start fails, the load
halves down to the lower bound in the same way. Bisection then narrows the bracket
[last pass, first fail] down to the resolution. Objective groups (``tps: max``,
``p99_latency: min``, ``goodput: max``) look for the load with the best metric value instead.

The search assumes that latency rises and the pass/fail verdict flips at most once as load
grows. A measurement that contradicts this (a pass above a fail) does not break the search:
bisection only ever probes inside the current bracket, so it still converges, just possibly
to a different crossing.

All groups share one table of results by load value, and the prober keeps its repeats, so a
value measured for one group is never measured again for the next.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runner.config import RunConfig, SearchVariable
from runner.errors import ConfigError
from runner.sla.probe import INTERRUPTED_NOTE, GroupAnswer, Prober, ProbeResult, TuneEvent, Verdict
from runner.sla.rules import RuleGroup

logger = logging.getLogger(__name__)

# Golden-section step: the new point splits the wider side of the bracket at this fraction.
_GOLDEN_STEP = (3 - math.sqrt(5)) / 2


@dataclass
class _GroupState:
    index: int
    group: RuleGroup
    started: float | None = None
    ended: float | None = None
    values: set[float] = field(default_factory=set)
    last_pass: float | None = None
    first_fail: float | None = None
    # Lowest client-bound value seen above last_pass (constraints) or anywhere (objectives).
    client_limit: float | None = None
    client_note: str = ""
    # Objective groups: higher-is-better score and raw metric by value.
    scores: dict[float, float] = field(default_factory=dict)
    metric_values: dict[float, float] = field(default_factory=dict)
    last_violations: tuple[str, ...] = ()
    answer: GroupAnswer | None = None

    @property
    def ceiling(self) -> float | None:
        limits = [v for v in (self.first_fail, self.client_limit) if v is not None]
        return min(limits) if limits else None

    @property
    def limited_by_client(self) -> bool:
        return self.client_limit is not None and (self.first_fail is None or self.client_limit < self.first_fail)

    def client_text(self) -> str:
        return f"client-bound at {self.client_limit:g}: {self.client_note}"


class SlaTuner:
    """Tune each rule group in turn against a shared Prober."""

    def __init__(
        self,
        groups: list[RuleGroup],
        *,
        variable: SearchVariable,
        start: float,
        lower_bound: float,
        upper_bound: float,
        num_runs: int,
        resolution: float,
        max_extra_runs: int,
        noise_band: float,
        prober: Prober,
        on_event: Callable[[TuneEvent], None] | None = None,
        tail_noise: float = 0.0,
    ) -> None:
        self._variable = variable
        self._integer = variable is SearchVariable.parallel

        if self._integer:
            lower, upper = math.ceil(lower_bound), math.floor(upper_bound)
        else:
            lower, upper = float(lower_bound), float(upper_bound)
        if not 0 < lower <= upper:
            raise ConfigError(
                f"invalid search range [{lower_bound:g}, {upper_bound:g}] for search.variable={variable.value}: "
                f"pass search.lower_bound > 0 and search.upper_bound >= search.lower_bound"
                + (" with a whole number between them" if self._integer else "")
            )
        if num_runs < 1:
            raise ConfigError(f"search.num_runs must be >= 1, got {num_runs}")
        if not (resolution >= 1 if self._integer else 0 < resolution < 1):
            expected = "a whole number >= 1" if self._integer else "a fraction between 0 and 1"
            raise ConfigError(f"search resolution for {variable.value} must be {expected}, got {resolution}")

        self._lower = lower
        self._upper = upper
        self._start = min(max(round(start) if self._integer else float(start), lower), upper)
        self._num_runs = num_runs
        self._resolution = resolution
        self._max_extra_runs = max_extra_runs
        self._noise_band = noise_band
        self._tail_noise = tail_noise
        self._prober = prober
        self._on_event = on_event
        # Significant digits of probed rates: enough to split a bracket at the resolution.
        self._rate_digits = max(3, math.ceil(-math.log10(resolution)) + 1) if not self._integer else 0
        self._results: dict[float, ProbeResult] = {}
        self._states = [_GroupState(index, group) for index, group in enumerate(groups)]

    @classmethod
    def from_config(
        cls,
        groups: list[RuleGroup],
        config: RunConfig,
        prober: Prober,
        *,
        on_event: Callable[[TuneEvent], None] | None = None,
    ) -> SlaTuner:
        """Build a tuner from ``search.*``, starting at load.parallel or load.rate."""
        search = config.search
        parallel = search.variable is SearchVariable.parallel
        start = config.load.parallel if parallel else config.load.rate
        if start is None:
            key = "load.parallel" if parallel else "load.rate"
            raise ConfigError(f"{key} must be set as the search start for search.variable={search.variable.value}")
        return cls(
            groups,
            variable=search.variable,
            start=start,
            lower_bound=search.lower_bound,
            upper_bound=search.upper_bound,
            num_runs=search.num_runs,
            resolution=search.parallel_resolution if parallel else search.rate_resolution,
            max_extra_runs=search.max_extra_runs,
            noise_band=search.noise_band,
            prober=prober,
            on_event=on_event,
            tail_noise=search.tail_noise,
        )

    async def run(self) -> list[GroupAnswer]:
        """Tune every group in order and return one GroupAnswer per group."""
        for state in self._states:
            state.started = time.monotonic()
            try:
                if state.group.objective is None:
                    answer = await self._tune_constraints(state)
                else:
                    answer = await self._tune_objective(state)
            finally:
                state.ended = time.monotonic()
            answer.probes = len(state.values)
            answer.seconds = state.ended - state.started
            state.answer = answer
            logger.info("SLA group %s (%s): %s, %s", state.index, answer.criteria, answer.max_satisfied, answer.note)
            self._emit(
                TuneEvent("answer", state.index, answer.criteria, value=answer.max_satisfied,
                          last_pass=answer.last_pass, first_fail=answer.first_fail, answer=answer)
            )
        return self.answers()

    def answers(self) -> list[GroupAnswer]:
        """Return a GroupAnswer per group so far, with the note "interrupted" for unfinished ones.

        An interrupted group reports its bracket in last_pass/first_fail but no max_satisfied,
        because the bracket was never narrowed to the resolution.
        """
        answers: list[GroupAnswer] = []
        for state in self._states:
            if state.answer is not None:
                answers.append(state.answer)
                continue
            seconds = 0.0
            if state.started is not None:
                seconds = (state.ended or time.monotonic()) - state.started
            last_pass = self._load(state.last_pass)
            note = INTERRUPTED_NOTE if last_pass is None else f"{INTERRUPTED_NOTE}: at least {last_pass:g} passed"
            answers.append(
                GroupAnswer(
                    state.group.criteria,
                    self._variable.value,
                    None,
                    note,
                    last_pass=self._load(state.last_pass),
                    first_fail=self._load(state.first_fail),
                    probes=len(state.values),
                    seconds=seconds,
                )
            )
        return answers

    # -- constraint groups ---------------------------------------------------------------

    async def _tune_constraints(self, state: _GroupState) -> GroupAnswer:
        value = self._start
        verdict = await self._measure(state, value)
        if verdict is Verdict.passed:
            while state.ceiling is None and value < self._upper:
                value = self._double(value)
                await self._measure(state, value)
            if state.ceiling is None:
                return self._answer(state, state.last_pass, "upper bound reached")
        else:
            while state.last_pass is None and value > self._lower:
                value = self._halve(value)
                await self._measure(state, value)
            if state.last_pass is None:
                note = state.client_text() if state.limited_by_client else "failed at lower bound"
                return self._answer(state, None, note)

        # Bisect [last pass, lowest fail or client-bound value] down to the resolution.
        while not self._converged(state.last_pass, state.ceiling):
            middle = self._midpoint(state.last_pass, state.ceiling)
            if middle is None:
                break
            await self._measure(state, middle)

        note = state.client_text() if state.limited_by_client else "Satisfied"
        return self._answer(state, state.last_pass, note)

    # -- objective groups ----------------------------------------------------------------

    async def _tune_objective(self, state: _GroupState) -> GroupAnswer:
        # Assumes the metric is unimodal in the load (one peak for max, one valley for min).
        # NOTE: objective probes get no noise repeats, so two loads whose metrics differ by
        # less than the run-to-run noise are still ranked by their measured values.
        points = [self._start]
        await self._measure(state, self._start)
        value = self._start
        while value < self._upper:
            higher = self._double(value)
            await self._measure(state, higher)
            points.append(higher)
            if not state.scores[higher] > state.scores[value]:
                break
            value = higher

        if self._best(state, points) == points[0]:
            # The best point is the lowest one, so the optimum may lie further down.
            value = points[0]
            while value > self._lower:
                below = self._halve(value)
                await self._measure(state, below)
                points.insert(0, below)
                improved = state.scores[below] > state.scores[value]
                # Keep halving while no probe has passed yet (failed requests, client-bound).
                none_passed = state.scores[below] == state.scores[value] == -math.inf
                if not (improved or none_passed):
                    break
                value = below

        best = self._best(state, points)
        if state.scores[best] == -math.inf:
            reasons = [state.last_violations[0]] if state.last_violations else []
            if state.client_limit is not None:
                reasons.append(state.client_text())
            note = "no probe passed"
            if reasons:
                note += ": " + "; ".join(reasons)
            return self._answer(state, None, note)

        # Narrow the bracket (left, best, right) from both sides by golden-section steps.
        index = points.index(best)
        left = points[max(index - 1, 0)]
        right = points[min(index + 1, len(points) - 1)]
        stuck: set[str] = set()
        while True:
            sides = [
                (side, low, high)
                for side, low, high in (("left", left, best), ("right", best, right))
                if side not in stuck and low < high and not self._converged(low, high)
            ]
            if not sides:
                break
            side, low, high = max(sides, key=lambda item: self._width(item[1], item[2]))
            candidate = self._golden_point(best, low, high)
            if candidate is None:
                stuck.add(side)
                continue
            await self._measure(state, candidate)
            if state.scores[candidate] > state.scores[best]:
                stuck.clear()  # the sides changed, so both may be splittable again
                if candidate < best:
                    right, best = best, candidate
                else:
                    left, best = best, candidate
            elif candidate < best:
                left = candidate
            else:
                right = candidate

        objective = state.group.objective
        assert objective is not None
        metric = state.metric_values[best]
        note = f"Best {objective.metric}: {metric:.4f}"
        if state.client_limit is not None:
            note += f"; {state.client_text()}"
        answer = self._answer(state, best, note)
        # When the best load is the highest one probed (the upper bound), no load above it
        # was measured, so the bracket has no upper end.
        answer.last_pass = self._load(left)
        answer.first_fail = self._load(right) if right > best else None
        answer.best_metric = metric
        return answer

    @staticmethod
    def _best(state: _GroupState, points: list[float]) -> float:
        # max() keeps the first of equal scores, so ties go to the lower load.
        return max(points, key=lambda point: state.scores[point])

    def _golden_point(self, best: float, low: float, high: float) -> float | None:
        if best == low:
            raw = best + _GOLDEN_STEP * (high - low)
        else:
            raw = best - _GOLDEN_STEP * (high - low)
        for candidate in (self._round(raw), self._midpoint(low, high)):
            if candidate is not None and low < candidate < high and candidate != best:
                return candidate
        if self._integer:
            step = 1 if best == low else -1
            if low < best + step < high:
                return best + step
        return None

    # -- measuring -----------------------------------------------------------------------

    async def _measure(self, state: _GroupState, value: float) -> Verdict:
        """Probe ``value`` for this group, repeating it while it sits in the noise band."""
        group = state.group
        state.values.add(value)
        bounds = group.per_request_bounds() if group.needs_goodput else None
        self._emit(
            TuneEvent("probe", state.index, group.criteria, value=self._load(value),
                      last_pass=self._load(state.last_pass), first_fail=self._load(state.first_fail))
        )
        logger.info("SLA group %s (%s): probing %s=%s", state.index, group.criteria, self._variable.value, value)

        result = await self._fetch(value, self._num_runs)
        metrics = result.metrics_for(bounds)
        # A metric within the noise band of its threshold gets extra repeats before its
        # verdict counts. The pooled result of all repeats decides.
        max_runs = self._num_runs + self._max_extra_runs
        while (
            not result.client_bound
            and result.runs < max_runs
            and group.near_threshold(metrics, self._noise_band, self._tail_noise)
        ):
            requested = result.runs + 1
            result = await self._fetch(value, requested)
            metrics = result.metrics_for(bounds)
            if result.runs < requested:
                break  # the prober could not add a repeat

        violations: list[str] = []
        metric = None
        if result.client_bound:
            verdict = Verdict.client_bound
            if state.client_limit is None or value < state.client_limit:
                state.client_limit, state.client_note = value, result.client_note
        else:
            passed, violations = group.check(metrics)
            verdict = Verdict.passed if passed else Verdict.failed
            if passed:
                if state.last_pass is None or value > state.last_pass:
                    state.last_pass = value
            elif state.first_fail is None or value < state.first_fail:
                state.first_fail = value
            state.last_violations = tuple(violations) or state.last_violations

        if group.objective is not None:
            metric = metrics.get(group.objective.metric, math.nan)
            state.metric_values[value] = metric
            passed_objective = verdict is Verdict.passed
            state.scores[value] = group.objective.score(metric) if passed_objective else -math.inf

        logger.info(
            "SLA group %s: %s=%s %s after %s runs%s", state.index, self._variable.value, value,
            verdict.value, result.runs, f" ({'; '.join(violations)})" if violations else "",
        )
        self._emit(
            TuneEvent(
                "verdict", state.index, group.criteria, value=self._load(value), runs=result.runs,
                verdict=verdict, violations=tuple(violations), client_note=result.client_note,
                metric=metric, last_pass=self._load(state.last_pass), first_fail=self._load(state.first_fail),
            )
        )
        return verdict

    async def _fetch(self, value: float, runs: int) -> ProbeResult:
        cached = self._results.get(value)
        if cached is not None and cached.runs >= runs:
            return cached
        result = await self._prober.probe(value, runs)
        self._results[value] = result
        return result

    def _emit(self, event: TuneEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    # -- load arithmetic -----------------------------------------------------------------

    def _round(self, value: float) -> float:
        if self._integer:
            return round(value)
        return float(f"{value:.{self._rate_digits}g}")

    def _double(self, value: float) -> float:
        return min(self._round(value * 2), self._upper)

    def _halve(self, value: float) -> float:
        halved = value // 2 if self._integer else self._round(value / 2)
        return max(halved, self._lower)

    def _midpoint(self, low: float | None, high: float | None) -> float | None:
        if low is None or high is None:
            return None
        middle = (low + high) // 2 if self._integer else self._round((low + high) / 2)
        return middle if low < middle < high else None

    def _width(self, low: float, high: float) -> float:
        """Return the bracket width: absolute for parallel, relative for rate."""
        return high - low if self._integer else high / low - 1

    def _converged(self, low: float | None, high: float | None) -> bool:
        if low is None or high is None:
            return True
        return self._width(low, high) <= self._resolution

    def _load(self, value: float | None) -> float | None:
        if value is None:
            return None
        return int(value) if self._integer else float(value)

    def _answer(self, state: _GroupState, value: float | None, note: str) -> GroupAnswer:
        return GroupAnswer(
            state.group.criteria,
            self._variable.value,
            self._load(value),
            note,
            last_pass=self._load(state.last_pass),
            first_fail=self._load(state.first_fail),
        )
