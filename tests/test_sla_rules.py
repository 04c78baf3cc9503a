"""SLA rule parsing, validation messages, checking and per-request bounds."""

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from runner.errors import ConfigError
from runner.sla.rules import LATENCY_METRICS, Objective, Rule, RuleGroup, parse_rules

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ALL_METRICS = (
    "avg_latency, p50_latency, p90_latency, p99_latency, avg_ttft, p50_ttft, p90_ttft, p99_ttft, "
    "avg_tpot, p50_tpot, p90_tpot, p99_tpot, avg_itl, p99_itl, rps, tps, goodput, success_rate"
)


def parse_one(group: dict) -> RuleGroup:
    (parsed,) = parse_rules([group])
    return parsed


# -- valid forms ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "op", "threshold"),
    [
        ("<=2", "<=", 2.0),
        ("<2", "<", 2.0),
        ("<= 2", "<=", 2.0),
        ("  <  0.05 ", "<", 0.05),
        ("<=1e-2", "<=", 0.01),
        ("<=.5", "<=", 0.5),
    ],
)
def test_latency_comparisons(spec, op, threshold):
    group = parse_one({"p99_latency": spec})
    assert group.rules == (Rule("p99_latency", op, threshold),)
    assert group.objective is None


@pytest.mark.parametrize(("spec", "op"), [(">=100", ">="), (">5", ">"), (">= 7.5", ">=")])
def test_throughput_comparisons(spec, op):
    for metric in ("rps", "tps", "goodput"):
        group = parse_one({metric: spec})
        assert group.rules[0].metric == metric
        assert group.rules[0].op == op


@pytest.mark.parametrize("metric", LATENCY_METRICS)
def test_every_latency_metric_accepted(metric):
    assert parse_one({metric: "<=1"}).rules == (Rule(metric, "<=", 1.0),)
    assert parse_one({metric: "min"}).objective == Objective(metric, "min")


def test_objectives_parse():
    assert parse_one({"tps": "max"}).objective == Objective("tps", "max")
    assert parse_one({"rps": "max"}).objective == Objective("rps", "max")
    assert parse_one({"p99_latency": "min"}).objective == Objective("p99_latency", "min")
    assert parse_one({"tps": "max"}).rules == ()


def test_success_rate_rule_parses():
    group = parse_one({"success_rate": ">=99.5"})
    assert group.rules == (Rule("success_rate", ">=", 99.5),)


def test_several_groups_keep_order():
    groups = parse_rules([{"p99_ttft": "<0.05"}, {"p99_ttft": "<0.01"}, {"tps": "max"}])
    assert [group.criteria for group in groups] == ["p99_ttft < 0.05", "p99_ttft < 0.01", "tps -> max"]


def test_omegaconf_containers_parse():
    rules = OmegaConf.create({"rules": [{"p99_ttft": "<=0.05", "p99_tpot": "<=0.05"}]}).rules
    (group,) = parse_rules(rules)
    assert group.criteria == "p99_ttft <= 0.05 and p99_tpot <= 0.05"


def test_criteria_text():
    assert parse_one({"p99_latency": "<=2"}).criteria == "p99_latency <= 2"
    assert parse_one({"p99_latency": "<=2.0"}).criteria == "p99_latency <= 2"
    assert parse_one({"p99_ttft": "< 0.05"}).criteria == "p99_ttft < 0.05"
    assert parse_one({"tps": "max"}).criteria == "tps -> max"
    assert parse_one({"p99_ttft": "<=0.5", "rps": ">=3"}).criteria == "p99_ttft <= 0.5 and rps >= 3"


def test_goodput_max_with_bounds():
    group = parse_one({"goodput": "max", "p99_ttft": "<=0.5", "p99_tpot": "<=0.05"})
    assert group.objective == Objective("goodput", "max")
    assert group.per_request_bounds() == {"ttft": 0.5, "tpot": 0.05}
    assert group.criteria == "goodput -> max where ttft <= 0.5 and tpot <= 0.05"
    assert group.needs_goodput


# -- invalid forms -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            [{"p99_latency": "<<2"}],
            'invalid SLA rule {p99_latency: "<<2"}: operator must be one of <=, <, min for p99_latency',
        ),
        ([{"tps": "<=5"}], 'invalid SLA rule {tps: "<=5"}: operator must be one of >=, >, max for tps'),
        (
            [{"p98_ttft": "<1"}],
            f"unknown SLA metric 'p98_ttft' in rule {{p98_ttft: \"<1\"}}; allowed: {ALL_METRICS}",
        ),
        ([], 'sla.rules is empty; pass at least one rule group such as [{p99_ttft: "<=0.05"}]'),
        (
            [{"p99_latency": "<=2"}, {}],
            'empty SLA rule group {} at sla.rules[1]: give each group at least one rule such as {p99_ttft: "<=0.05"}',
        ),
        (
            [{"p99_latency": 2}],
            'invalid SLA rule {p99_latency: 2}: missing operator; write "<=2" (operators for p99_latency: <=, <, min)',
        ),
        (
            [{"p99_latency": "2"}],
            'invalid SLA rule {p99_latency: "2"}: missing operator; write "<=2" '
            "(operators for p99_latency: <=, <, min)",
        ),
        (
            [{"tps": 100}],
            'invalid SLA rule {tps: 100}: missing operator; write ">=100" (operators for tps: >=, >, max)',
        ),
        ([{"tps": "min"}], "invalid SLA rule {tps: min}: operator must be one of >=, >, max for tps"),
        ([{"p99_ttft": "max"}], "invalid SLA rule {p99_ttft: max}: operator must be one of <=, <, min for p99_ttft"),
        (
            [{"success_rate": "max"}],
            "invalid SLA rule {success_rate: max}: operator must be one of >=, > for success_rate",
        ),
        ([{"p99_ttft": "==1"}], 'invalid SLA rule {p99_ttft: "==1"}: operator must be one of <=, <, min for p99_ttft'),
        ([{"p99_ttft": "<=abc"}], 'invalid SLA rule {p99_ttft: "<=abc"}: threshold must be a number, e.g. "<=2"'),
        ([{"p99_ttft": "<=2s"}], 'invalid SLA rule {p99_ttft: "<=2s"}: threshold must be a number, e.g. "<=2"'),
        (
            [{"p99_ttft": "<=-1"}],
            'invalid SLA rule {p99_ttft: "<=-1"}: threshold must be a finite number >= 0, got -1',
        ),
        (
            [{"p99_ttft": "<=nan"}],
            'invalid SLA rule {p99_ttft: "<=nan"}: threshold must be a finite number >= 0, got nan',
        ),
        (
            [{"success_rate": ">=101"}],
            'invalid SLA rule {success_rate: ">=101"}: success_rate is a percent, so the threshold '
            "must be between 0 and 100",
        ),
        (
            [{"p99_ttft": None}],
            'invalid SLA rule {p99_ttft: None}: write a comparison such as "<=2" or one of <=, <, min',
        ),
        (
            [{"tps": "max", "p99_ttft": "<1"}],
            'invalid SLA rule group {tps: max, p99_ttft: "<1"}: an objective (max/min) must be alone in its '
            'group, except goodput: max, which may add per-request latency bounds such as p99_ttft: "<=0.5"',
        ),
        (
            [{"goodput": "max", "tps": ">=5"}],
            'invalid SLA rule group {goodput: max, tps: ">=5"}: an objective (max/min) must be alone in its '
            'group, except goodput: max, which may add per-request latency bounds such as p99_ttft: "<=0.5"',
        ),
        (
            [{"goodput": "max", "p99_ttft": "min"}],
            "invalid SLA rule group {goodput: max, p99_ttft: min}: an objective (max/min) must be alone in its "
            'group, except goodput: max, which may add per-request latency bounds such as p99_ttft: "<=0.5"',
        ),
        (
            ["p99_ttft<=1"],
            "invalid SLA rule group 'p99_ttft<=1' at sla.rules[0]: each group must be a mapping "
            'such as {p99_ttft: "<=0.05"}',
        ),
        (
            {"p99_ttft": "<=1"},
            "sla.rules must be a list of rule groups such as [{p99_ttft: \"<=0.05\"}], got {'p99_ttft': '<=1'}",
        ),
    ],
)
def test_invalid_rules_raise_one_line(rules, message):
    with pytest.raises(ConfigError) as caught:
        parse_rules(rules)
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


# -- checking ------------------------------------------------------------------------------


def test_check_passes_and_lists_violations():
    group = parse_one({"p99_ttft": "<=0.05", "p99_tpot": "<0.01"})
    assert group.check({"p99_ttft": 0.05, "p99_tpot": 0.009, "success_rate": 100.0}) == (True, [])

    passed, violations = group.check({"p99_ttft": 0.06, "p99_tpot": 0.01, "success_rate": 100.0})
    assert not passed
    assert violations == ["p99_ttft 0.06, needs <= 0.05", "p99_tpot 0.01, needs < 0.01"]


def test_check_throughput_rule():
    group = parse_one({"tps": ">=100"})
    assert group.check({"tps": 100.0, "success_rate": 100.0}) == (True, [])
    assert group.check({"tps": 99.5, "success_rate": 100.0}) == (False, ["tps 99.5, needs >= 100"])


def test_nan_metric_fails_upper_limit():
    group = parse_one({"p99_tpot": "<=0.05"})
    passed, violations = group.check({"p99_tpot": math.nan, "success_rate": 100.0})
    assert not passed
    assert violations == ["p99_tpot is undefined (NaN), needs <= 0.05"]


def test_nan_metric_fails_strict_and_lower_limits():
    assert parse_one({"avg_itl": "<1"}).check({"avg_itl": math.nan, "success_rate": 100.0})[0] is False
    assert parse_one({"tps": ">1"}).check({"tps": math.nan, "success_rate": 100.0})[0] is False


def test_missing_metric_fails():
    passed, violations = parse_one({"p99_ttft": "<=1"}).check({"success_rate": 100.0})
    assert not passed
    assert violations == ["p99_ttft is undefined (NaN), needs <= 1"]


def test_one_failed_request_fails_group():
    group = parse_one({"p99_ttft": "<=1"})
    for ok, total in ((999, 1000), (99_999, 100_000), (1_999_999, 2_000_000)):
        passed, violations = group.check({"p99_ttft": 0.1, "success_rate": 100.0 * ok / total})
        assert not passed, (ok, total)
        assert violations[0].startswith("success_rate ")
        assert violations[0].endswith("< 100 (some requests failed)")


def test_undefined_success_rate_fails():
    passed, violations = parse_one({"p99_ttft": "<=1"}).check({"p99_ttft": 0.1, "success_rate": math.nan})
    assert not passed
    assert violations == ["success_rate is undefined (NaN), needs 100"]


def test_own_success_rule_replaces_default():
    group = parse_one({"p99_ttft": "<=1", "success_rate": ">=99"})
    assert group.check({"p99_ttft": 0.1, "success_rate": 99.9}) == (True, [])
    passed, violations = group.check({"p99_ttft": 0.1, "success_rate": 98.0})
    assert not passed
    assert violations == ["success_rate 98, needs >= 99"]


def test_objective_check_needs_full_success():
    group = parse_one({"tps": "max"})
    assert group.check({"tps": 500.0, "success_rate": 100.0}) == (True, [])
    assert group.check({"tps": 500.0, "success_rate": 99.0})[0] is False
    assert group.check({"tps": math.nan, "success_rate": 100.0}) == (False, ["tps is undefined (NaN)"])


def test_goodput_max_bounds_not_checked_as_aggregates():
    group = parse_one({"goodput": "max", "p99_ttft": "<=0.5"})
    assert group.check({"goodput": 3.0, "p99_ttft": 9.0, "success_rate": 100.0}) == (True, [])


def test_near_threshold():
    group = parse_one({"p99_ttft": "<=0.1", "tps": ">=100"})
    assert group.near_threshold({"p99_ttft": 0.096, "tps": 200.0}, 0.05) == ["p99_ttft"]
    assert group.near_threshold({"p99_ttft": 0.104, "tps": 96.0}, 0.05) == ["p99_ttft", "tps"]
    assert group.near_threshold({"p99_ttft": 0.09, "tps": 94.0}, 0.05) == []
    assert group.near_threshold({"p99_ttft": 0.1, "tps": 100.0}, 0.0) == []
    assert group.near_threshold({"p99_ttft": math.nan, "tps": 100.0}, 0.05) == ["tps"]


def test_near_threshold_tail_band():
    group = parse_one({"p99_ttft": "<=0.1", "p90_tpot": "<=0.1", "avg_ttft": "<=0.1"})
    # 750 requests: 7.5 samples beyond p99 (band 1.5 / sqrt(7.5) = 54.8 %) and 75 beyond p90 (17.3 %).
    metrics = {"p99_ttft": 0.146, "p90_tpot": 0.08, "avg_ttft": 0.06, "requests": 750.0}
    assert group.near_threshold(metrics, 0.05, tail_noise=1.5) == ["p99_ttft"]
    assert group.near_threshold(metrics | {"p90_tpot": 0.083}, 0.05, tail_noise=1.5) == ["p99_ttft", "p90_tpot"]
    # 7,500 requests: 75 samples beyond p99, band 17.3 %.
    assert group.near_threshold(metrics | {"requests": 7500.0}, 0.05, tail_noise=1.5) == []
    assert group.near_threshold(metrics | {"requests": 7500.0, "p99_ttft": 0.116}, 0.05, tail_noise=1.5) == ["p99_ttft"]


def test_near_threshold_tail_band_needs_requests():
    group = parse_one({"p99_ttft": "<=0.1"})
    assert group.near_threshold({"p99_ttft": 0.09}, 0.05, tail_noise=1.5) == []
    assert group.near_threshold({"p99_ttft": 0.09, "requests": math.nan}, 0.05, tail_noise=1.5) == []
    assert group.near_threshold({"p99_ttft": 0.09, "requests": 100.0}, 0.05, tail_noise=0.0) == []
    assert group.near_threshold({"p99_ttft": 0.09, "requests": 100.0}, 0.0, tail_noise=1.5) == ["p99_ttft"]


# -- per-request bounds --------------------------------------------------------------------


def test_per_request_bounds_tightest_wins():
    group = parse_one({"p99_ttft": "<=0.05", "avg_ttft": "<=0.03", "p90_tpot": "<0.02", "goodput": ">=1"})
    assert group.per_request_bounds() == {"ttft": 0.03, "tpot": 0.02}


def test_per_request_bounds_keys():
    group = parse_one({"p99_latency": "<=2", "avg_itl": "<=0.1", "p99_itl": "<=0.2", "p50_ttft": "<=0.4"})
    assert group.per_request_bounds() == {"latency": 2.0, "itl": 0.1, "ttft": 0.4}


def test_per_request_bounds_ignore_other_rules():
    assert parse_one({"tps": ">=5", "success_rate": ">=99"}).per_request_bounds() == {}
    assert parse_one({"p99_latency": "min"}).per_request_bounds() == {}


# -- shipped config files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "criteria"),
    [
        ("ttft_strict", ["p99_ttft <= 0.15"]),
        ("p99_latency_2s", ["p99_latency <= 2"]),
        ("tps_max", ["tps -> max"]),
        ("interactive", ["p99_ttft <= 0.5 and p99_tpot <= 0.05"]),
        ("goodput", ["goodput -> max where ttft <= 0.5 and tpot <= 0.05"]),
    ],
)
def test_shipped_rule_sets_parse(name, criteria):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = compose(overrides=[f"+sla={name}"])
    assert [group.criteria for group in parse_rules(config.sla.rules)] == criteria


def test_custom_rules_from_override():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = compose(overrides=["+sla=custom", 'sla.rules=[{p99_ttft:"<=0.05"},{tps:max}]'])
    assert [group.criteria for group in parse_rules(config.sla.rules)] == ["p99_ttft <= 0.05", "tps -> max"]


def test_custom_rules_are_mandatory():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = compose(overrides=["+sla=custom"])
    assert OmegaConf.is_missing(config.sla, "rules")
