"""SLA auto-tune: rule parsing, the load search and the interface to the code that sends load."""

from runner.sla.probe import Prober, ProbeResult
from runner.sla.rules import Objective, Rule, RuleGroup, parse_rules
from runner.sla.search import GroupAnswer, SlaTuner, TuneEvent, Verdict

__all__ = [
    "GroupAnswer",
    "Objective",
    "Prober",
    "ProbeResult",
    "Rule",
    "RuleGroup",
    "SlaTuner",
    "TuneEvent",
    "Verdict",
    "parse_rules",
]
