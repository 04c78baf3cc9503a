"""SLA rules: parsing, validation and checking against the metrics of one load point.

``sla.rules`` is a list of rule groups. Each group is a mapping ``metric -> spec`` where the
spec is a comparison (``"<=2"``, ``"< 0.05"``, ``">=100"``, ``">5"``) or an objective (``max``
or ``min``). The rules of one group must all hold at once; each group is tuned on its own.

An objective must be alone in its group, with one exception: ``goodput: max`` may carry
latency-type comparisons (``*_latency``, ``*_ttft``, ``*_tpot``, ``*_itl`` with ``<=`` or
``<``). In that group they are per-request bounds only: the tuner maximises the rate of
successful requests whose own TTFT, TPOT, latency and ITL meet them, and the aggregate
statistics are not checked. The statistic prefix does not matter there, so
``p99_ttft: "<=0.5"`` and ``avg_ttft: "<=0.5"`` both mean "each request's TTFT <= 0.5 s".
In a constraint group, ``goodput`` counts requests meeting the bounds implied by the group's
latency-type rules, which are also checked as aggregates.

Every validation error is a ``ConfigError`` with one line that names the rule as written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runner.errors import ConfigError

# Latency-type metrics are in seconds, and lower is better.
LATENCY_METRICS: tuple[str, ...] = (
    *(f"{stat}_{kind}" for kind in ("latency", "ttft", "tpot") for stat in ("avg", "p50", "p90", "p99")),
    "avg_itl",
    "p99_itl",
)
# Throughput metrics (rps and goodput in requests/s, tps in output tokens/s): higher is better.
THROUGHPUT_METRICS: tuple[str, ...] = ("rps", "tps", "goodput")
SUCCESS_METRIC = "success_rate"  # percent, 0-100

METRIC_OPERATORS: dict[str, tuple[str, ...]] = {
    **{name: ("<=", "<", "min") for name in LATENCY_METRICS},
    **{name: (">=", ">", "max") for name in THROUGHPUT_METRICS},
    SUCCESS_METRIC: (">=", ">"),
}
OBJECTIVES = ("max", "min")
COMPARISONS = ("<=", "<", ">=", ">")

_PERCENTILE = re.compile(r"^p(\d+)_")
_SPEC = re.compile(r"^\s*([<>=!]*)\s*(.*?)\s*$")
_BARE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _format_number(value: float) -> str:
    """Format a threshold without a spurious ``.0``: 2 -> "2", 0.05 -> "0.05"."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _format_spec(spec: Any) -> str:
    if isinstance(spec, str):
        return spec if _BARE_WORD.match(spec) else f'"{spec}"'
    return repr(spec)


def format_rule(metric: Any, spec: Any) -> str:
    """Format one rule as a user writes it in YAML: ``{p99_latency: "<=2"}``."""
    return f"{{{metric}: {_format_spec(spec)}}}"


def format_group(group: Mapping[Any, Any]) -> str:
    """Format one rule group as a user writes it in YAML: ``{tps: max, p99_ttft: "<1"}``."""
    return "{" + ", ".join(f"{metric}: {_format_spec(spec)}" for metric, spec in group.items()) + "}"


@dataclass(frozen=True)
class Rule:
    """One comparison, ``metric op threshold``, that must be true at a load point."""

    metric: str
    op: str  # one of COMPARISONS
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {_format_number(self.threshold)}"

    def is_met_by(self, value: float) -> bool:
        """Apply the comparison to ``value``. An undefined (NaN) value never meets it."""
        if math.isnan(value):
            return False
        if self.op == "<=":
            return value <= self.threshold
        if self.op == "<":
            return value < self.threshold
        if self.op == ">=":
            return value >= self.threshold
        return value > self.threshold

    @property
    def is_latency(self) -> bool:
        return self.metric in LATENCY_METRICS


@dataclass(frozen=True)
class Objective:
    """A metric to maximise or minimise over the load range."""

    metric: str
    goal: str  # "max" or "min"

    def __str__(self) -> str:
        return f"{self.metric} -> {self.goal}"

    def score(self, value: float) -> float:
        """Map the metric to a score where higher is better, and NaN to -inf."""
        if math.isnan(value):
            return -math.inf
        return value if self.goal == "max" else -value


def _describe(value: float) -> str:
    return f"{value:.4g}"


def _rule_band(rule: Rule, metrics: Mapping[str, float], band: float, tail_noise: float) -> float:
    """Return the relative noise band of one rule, widened for a percentile over few tail samples."""
    match = _PERCENTILE.match(rule.metric)
    requests = _metric(metrics, "requests")
    if match is None or tail_noise <= 0 or math.isnan(requests) or requests <= 0:
        return band
    # NOTE: requests counts requests, so for p99_itl (many gaps per request) the band is wider
    # than the number of gaps alone would give. Gaps of one request are correlated anyway.
    tail_samples = requests * (1 - int(match.group(1)) / 100)
    return max(band, tail_noise / math.sqrt(tail_samples))


@dataclass(frozen=True)
class RuleGroup:
    """Rules tuned together: constraints that must all hold, or one objective.

    In an objective group ``rules`` contains only the per-request bounds of ``goodput: max``,
    which are not checked as aggregate constraints.
    """

    rules: tuple[Rule, ...]
    objective: Objective | None = None

    @property
    def criteria(self) -> str:
        """Human-readable summary, e.g. ``p99_ttft <= 0.05 and p99_tpot <= 0.05``."""
        if self.objective is None:
            return " and ".join(str(rule) for rule in self.rules)
        if not self.rules:
            return str(self.objective)
        bounds = " and ".join(f"{kind} <= {_format_number(limit)}" for kind, limit in self.per_request_bounds().items())
        return f"{self.objective} where {bounds}"

    @property
    def has_success_rule(self) -> bool:
        return any(rule.metric == SUCCESS_METRIC for rule in self.rules)

    def check(self, metrics: Mapping[str, float]) -> tuple[bool, list[str]]:
        """Check the group at one load point and return (passed, violations).

        ``metrics`` uses the summary column names, and a missing or NaN metric fails. Without
        its own success_rate rule, a group fails whenever success_rate < 100, so one failed
        request out of any number fails it (success_rate must come from exact counts). An
        objective group passes when the success rate is 100% and its metric is defined.
        """
        violations: list[str] = []
        success_rate = _metric(metrics, SUCCESS_METRIC)
        if not self.has_success_rule:
            if math.isnan(success_rate):
                violations.append("success_rate is undefined (NaN), needs 100")
            elif success_rate < 100:
                violations.append(f"success_rate {_describe(success_rate)} < 100 (some requests failed)")

        if self.objective is not None:
            value = _metric(metrics, self.objective.metric)
            if math.isnan(value):
                violations.append(f"{self.objective.metric} is undefined (NaN)")
            return not violations, violations

        for rule in self.rules:
            value = _metric(metrics, rule.metric)
            if math.isnan(value):
                violations.append(f"{rule.metric} is undefined (NaN), needs {rule.op} {_format_number(rule.threshold)}")
            elif not rule.is_met_by(value):
                violations.append(f"{rule.metric} {_describe(value)}, needs {rule.op} {_format_number(rule.threshold)}")
        return not violations, violations

    def near_threshold(self, metrics: Mapping[str, float], band: float, tail_noise: float = 0.0) -> list[str]:
        """Return the constraint metrics whose value lies within the noise band of the threshold.

        The band is ``band`` relative to the threshold. For a percentile rule (``p90_*``,
        ``p99_*``) it is at least ``tail_noise / sqrt(k)``, where k = requests x (1 - percentile)
        is the number of samples beyond the percentile, whose count varies by about sqrt(k)
        from run to run.
        """
        if self.objective is not None or (band <= 0 and tail_noise <= 0):
            return []
        near: list[str] = []
        for rule in self.rules:
            value = _metric(metrics, rule.metric)
            if math.isnan(value) or rule.threshold == 0:
                continue
            if abs(value - rule.threshold) <= _rule_band(rule, metrics, band, tail_noise) * abs(rule.threshold):
                near.append(rule.metric)
        return near

    def per_request_bounds(self) -> dict[str, float]:
        """Return the bound on each request that the latency-type rules imply, for goodput.

        Keys are ``ttft``, ``tpot``, ``latency`` and ``itl`` (seconds). ``p99_ttft <= 0.05`` and
        ``avg_ttft <= 0.05`` both imply ``ttft <= 0.05``. With several rules on one kind the
        tightest wins.
        """
        bounds: dict[str, float] = {}
        for rule in self.rules:
            if not rule.is_latency or rule.op not in ("<=", "<"):
                continue
            kind = rule.metric.split("_", 1)[1]
            bounds[kind] = min(bounds.get(kind, math.inf), rule.threshold)
        # NOTE: a strict "<" bound is applied as "<=" per request. The two differ only for a
        # request whose value equals the threshold exactly.
        return bounds

    @property
    def needs_goodput(self) -> bool:
        if self.objective is not None and self.objective.metric == "goodput":
            return True
        return any(rule.metric == "goodput" for rule in self.rules)


def _metric(metrics: Mapping[str, float], name: str) -> float:
    value = metrics.get(name)
    if value is None:
        return math.nan
    return float(value)


def _operator_error(metric: str, spec: Any) -> ConfigError:
    allowed = ", ".join(METRIC_OPERATORS[metric])
    return ConfigError(f"invalid SLA rule {format_rule(metric, spec)}: operator must be one of {allowed} for {metric}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_rule(metric: Any, spec: Any) -> Rule | Objective:
    """Parse one ``metric: spec`` pair into a Rule or an Objective."""
    if not isinstance(metric, str) or metric not in METRIC_OPERATORS:
        allowed = ", ".join(METRIC_OPERATORS)
        raise ConfigError(f"unknown SLA metric {str(metric)!r} in rule {format_rule(metric, spec)}; allowed: {allowed}")
    allowed_ops = METRIC_OPERATORS[metric]
    upper_op = ">=" if ">=" in allowed_ops else "<="

    if isinstance(spec, bool) or not isinstance(spec, (str, int, float)):
        raise ConfigError(
            f'invalid SLA rule {format_rule(metric, spec)}: write a comparison such as "{upper_op}2" '
            f"or one of {', '.join(allowed_ops)}"
        )
    if isinstance(spec, (int, float)):
        raise ConfigError(
            f"invalid SLA rule {format_rule(metric, spec)}: missing operator; "
            f'write "{upper_op}{spec}" (operators for {metric}: {", ".join(allowed_ops)})'
        )

    match = _SPEC.match(spec)
    assert match is not None  # the pattern matches every string
    op, rest = match.group(1), match.group(2)
    if not op:
        word = rest.lower()
        if word in OBJECTIVES:
            if word not in allowed_ops:
                raise _operator_error(metric, spec)
            return Objective(metric, word)
        if _is_number(rest):
            raise ConfigError(
                f"invalid SLA rule {format_rule(metric, spec)}: missing operator; "
                f'write "{upper_op}{rest}" (operators for {metric}: {", ".join(allowed_ops)})'
            )
        raise _operator_error(metric, spec)
    if op not in allowed_ops:
        raise _operator_error(metric, spec)

    try:
        threshold = float(rest)
    except ValueError:
        raise ConfigError(
            f'invalid SLA rule {format_rule(metric, spec)}: threshold must be a number, e.g. "{op}2"'
        ) from None
    if not math.isfinite(threshold) or threshold < 0:
        raise ConfigError(
            f"invalid SLA rule {format_rule(metric, spec)}: threshold must be a finite number >= 0, got {rest}"
        )
    if metric == SUCCESS_METRIC and threshold > 100:
        raise ConfigError(
            f"invalid SLA rule {format_rule(metric, spec)}: success_rate is a percent, so the threshold "
            f"must be between 0 and 100"
        )
    return Rule(metric, op, threshold)


def parse_group(group: Any, index: int = 0) -> RuleGroup:
    """Parse one rule group; ``index`` is its position in ``sla.rules``, used in messages."""
    if not isinstance(group, Mapping):
        raise ConfigError(
            f'invalid SLA rule group {group!r} at sla.rules[{index}]: each group must be a mapping '
            f'such as {{p99_ttft: "<=0.05"}}'
        )
    if not group:
        raise ConfigError(
            f'empty SLA rule group {{}} at sla.rules[{index}]: give each group at least one rule '
            f'such as {{p99_ttft: "<=0.05"}}'
        )

    parsed = [parse_rule(metric, spec) for metric, spec in group.items()]
    rules = tuple(item for item in parsed if isinstance(item, Rule))
    objectives = [item for item in parsed if isinstance(item, Objective)]
    if not objectives:
        return RuleGroup(rules)

    objective = objectives[0]
    if len(parsed) > 1:
        goodput_with_bounds = (
            objective == Objective("goodput", "max")
            and len(objectives) == 1
            and all(rule.is_latency and rule.op in ("<=", "<") for rule in rules)
        )
        if not goodput_with_bounds:
            raise ConfigError(
                f"invalid SLA rule group {format_group(group)}: an objective (max/min) must be alone in its "
                f'group, except goodput: max, which may add per-request latency bounds such as p99_ttft: "<=0.5"'
            )
    return RuleGroup(rules, objective)


def parse_rules(rules: Any) -> list[RuleGroup]:
    """Parse ``sla.rules`` (a list of mappings; OmegaConf containers work too)."""
    example = '[{p99_ttft: "<=0.05"}]'
    if rules is None or isinstance(rules, (str, bytes, Mapping)) or not hasattr(rules, "__iter__"):
        raise ConfigError(f"sla.rules must be a list of rule groups such as {example}, got {rules!r}")
    groups = list(rules)
    if not groups:
        raise ConfigError(f"sla.rules is empty; pass at least one rule group such as {example}")
    return [parse_group(group, index) for index, group in enumerate(groups)]
