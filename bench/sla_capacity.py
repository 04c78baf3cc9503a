"""Reference capacity for the SLA search: a fine sweep of one rule set on the simulated server.

The script runs ``python -m runner`` once per load value, without SLA search: one long run
of ``--requests`` measured requests, so a p99 rests on several hundred samples. It reads
each run's ``summary.csv`` and checks the rule set with the product's own rule checker. The
capacity is the highest value whose run meets every rule. The SLA search is then judged
against it (see bench/sla_vs_plain.py and docs/benchmarks.md).

Each point is sized like a probe of the product's search: closed loop with warmup equal to
the concurrency, or open loop (Poisson arrivals, no in-flight cap) with warmup equal to one
second of arrivals.

    python -m bench.sla_capacity --variable parallel --values 4,8,12:20,24,32
    python -m bench.sla_capacity --variable rate --values 20,24:30:0.75,32
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, RESULTS, machine_line, read_summary, run_runner
from runner.sla.rules import RuleGroup, parse_rules

# Requests of 32 output tokens keep one point under a minute. The closed-loop capacity on
# the default profile is the batch-slot count whatever the output length.
DEFAULT_OVERRIDES = ("request.max_tokens=32",)
# Default sweeps around the capacities of ttft_strict on the default profile (16 and about
# 27 requests/s), with step 1 or about 3 % near them, and the requests per point.
DEFAULT_VALUES = {"parallel": "8,12,14:18,20,24,32", "rate": "22,24,25:30:0.75,32"}
DEFAULT_REQUESTS = {"parallel": 600, "rate": 800}


def parse_values(text: str) -> list[float]:
    """Parse ``4,8,12:20,24`` (``lo:hi`` steps by 1, ``lo:hi:step`` by step, both inclusive)."""
    values: list[float] = []
    for item in text.split(","):
        parts = [float(part) for part in item.split(":")]
        if len(parts) == 1:
            values.append(parts[0])
            continue
        low, high = parts[0], parts[1]
        step = parts[2] if len(parts) == 3 else 1.0
        if step <= 0 or high < low:
            raise SystemExit(f"error: invalid range {item!r} in --values; write lo:hi or lo:hi:step with lo <= hi, step > 0")
        count = int(math.floor((high - low) / step + 1e-9))
        values.extend(round(low + i * step, 6) for i in range(count + 1))
    return sorted(set(values))


def load_rule_set(name: str) -> list[RuleGroup]:
    """Parse conf/sla/NAME.yaml with the product's rule parser."""
    path = REPO / "conf" / "sla" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: rule set {name!r} not found at {path}; pass the name of a file in conf/sla/")
    rules = yaml.safe_load(path.read_text(encoding="utf-8"))["rules"]
    return parse_rules(rules)


def point_overrides(variable: str, value: float, requests: int) -> list[str]:
    """Return the runner overrides of one point, sized like a probe of the SLA search."""
    if variable == "parallel":
        concurrency = int(value)
        return [f"load.parallel={concurrency}", f"load.warmup={concurrency}", f"load.number={requests}"]
    return [f"load.rate={value:g}", "load.parallel=null", f"load.warmup={math.ceil(value)}", f"load.number={requests}"]


def check_point(groups: list[RuleGroup], summary: dict[str, Any]) -> tuple[bool, str]:
    """Check every group against one summary row; return (passed, violations)."""
    violations: list[str] = []
    for group in groups:
        _, found = group.check(summary)
        violations.extend(found)
    return not violations, "; ".join(violations)


def measure_point(variable: str, value: float, requests: int, groups: list[RuleGroup], extra: list[str],
                  work: Path) -> dict[str, Any]:
    """Run the runner at one load value and return the CSV row of the sweep."""
    load_before = os.getloadavg()[0]
    out_dir = work / f"{variable}-{value:g}"
    started = time.perf_counter()
    run_runner(out_dir, *point_overrides(variable, value, requests), *extra)
    seconds = time.perf_counter() - started
    summary = read_summary(out_dir).iloc[0].to_dict()
    passed, violations = check_point(groups, summary)
    client_bound = bool(summary.get("client_bound", False))
    row = {
        "variable": variable,
        "value": value,
        "requests": int(summary["requests"]),
        "success_rate": summary["success_rate"],
        "rps": summary["rps"],
        "avg_ttft": summary["avg_ttft"],
        "p90_ttft": summary["p90_ttft"],
        "p99_ttft": summary["p99_ttft"],
        "p99_latency": summary["p99_latency"],
        "lateness_p99": summary["lateness_p99"],
        "loop_lag_p99": summary["loop_lag_p99"],
        "client_bound": client_bound,
        "passed": passed and not client_bound,
        "violations": violations,
        "seconds": round(seconds, 1),
        "load_before": round(load_before, 2),
    }
    return row


def capacity(frame: pd.DataFrame) -> tuple[float | None, float | None, bool]:
    """Return (highest passing value, lowest failing value, whether the verdict flips only once)."""
    passed = frame.loc[frame["passed"], "value"]
    failed = frame.loc[~frame["passed"], "value"]
    highest = float(passed.max()) if len(passed) else None
    lowest_fail = float(failed.min()) if len(failed) else None
    monotone = highest is None or lowest_fail is None or highest < lowest_fail
    return highest, lowest_fail, monotone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variable", choices=("parallel", "rate"), default="parallel",
                        help="load variable swept: concurrency, or open-loop requests/s")
    parser.add_argument("--values", help="load values: 4,8,12:20 or 20:30:0.75, ranges inclusive "
                                          f"(default: {DEFAULT_VALUES['parallel']} or {DEFAULT_VALUES['rate']})")
    parser.add_argument("--requests", type=int, help="measured requests per point (default: 600 for parallel, "
                                                     "800 for rate)")
    parser.add_argument("--sla", default="ttft_strict", help="rule set in conf/sla/ (default ttft_strict)")
    parser.add_argument("--output", type=Path, help="CSV to write (default bench/results/sla_capacity_VARIABLE.csv)")
    parser.add_argument("overrides", nargs="*", help=f"extra runner overrides (default: {' '.join(DEFAULT_OVERRIDES)})")
    args = parser.parse_args(argv)

    groups = load_rule_set(args.sla)
    values = parse_values(args.values or DEFAULT_VALUES[args.variable])
    requests = args.requests or DEFAULT_REQUESTS[args.variable]
    if args.variable == "parallel" and any(value != int(value) or value < 1 for value in values):
        raise SystemExit("error: --values for parallel must be whole numbers >= 1")
    extra = list(args.overrides) or list(DEFAULT_OVERRIDES)
    output = args.output or RESULTS / f"sla_capacity_{args.variable}.csv"
    print(f"# {machine_line()}")
    print(f"# rule set {args.sla}: {'; '.join(group.criteria for group in groups)}; overrides: {' '.join(extra)}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="sla-capacity-") as tmp:
        for value in values:
            row = measure_point(args.variable, value, requests, groups, extra, Path(tmp))
            rows.append(row)
            verdict = "fail"
            if row["passed"]:
                verdict = "pass"
            elif row["client_bound"]:
                verdict = "client-bound"
            print(f"{args.variable}={value:g}: p99_ttft={row['p99_ttft']:.4f} rps={row['rps']:.2f} "
                  f"{verdict} ({row['requests']} requests, {row['seconds']:.0f} s, load {row['load_before']})",
                  flush=True)

    frame = pd.DataFrame(rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(output, index=False)
    highest, lowest_fail, monotone = capacity(frame)
    print(f"capacity: {args.variable}={highest if highest is None else f'{highest:g}'}"
          f" (lowest failing value {lowest_fail if lowest_fail is None else f'{lowest_fail:g}'}"
          f"{'' if monotone else '; a value above a failing one passed'}); wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
