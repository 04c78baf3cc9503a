"""Reference capacity for the SLA search: a fine sweep of one rule set on the simulated server.

The script runs ``python -m runner`` once per load value and seed, without SLA search: one
long run of ``--requests`` measured requests. Each seed sets ``load.seed``,
``dataset.seed`` and ``endpoint.sim_seed``, so each seed is its own arrival schedule. The
measured requests of all seeds are pooled per value, summarised with the product's own
metrics code, and checked with the product's rule checker. The capacity is the highest
value whose pooled point meets every rule. The SLA search is then judged against it (see
bench/sla_vs_plain.py and docs/benchmarks.md).

Each point is sized like a probe of the product's search: closed loop with warmup equal to
the concurrency, or open loop (Poisson arrivals, no in-flight cap) with warmup equal to one
second of arrivals. For open loop the script also replays each run's schedule through the
sim's engine model in virtual time (bench/engine_reference.py). The engine's p99 TTFT is the
server's share, and the difference to the measured p99 is what HTTP, the event loops and the
client added in that run.

Writes sla_capacity_VARIABLE.csv (one pooled row per value) and
sla_capacity_VARIABLE_runs.csv (one row per value and seed).

    python -m bench.sla_capacity --variable parallel --values 4,8,12:20,24,32
    python -m bench.sla_capacity --variable rate --values 23:26 --seeds 1,2,3 --requests 2000
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, RESULTS, LoadSampler, machine_line, parse_range, read_summary, run_runner
from bench.engine_reference import engine_ttft
from runner.metrics import summarize
from runner.output import read_requests
from runner.sla.rules import RuleGroup, parse_rules

# Requests of 32 output tokens keep one point under a minute. The closed-loop capacity on
# the default profile is the batch-slot count whatever the output length.
DEFAULT_OVERRIDES = ("request.max_tokens=32",)
# Sim profile the runner's embedded server uses unless model.sim_profile is overridden.
DEFAULT_PROFILE = "default"
# Default sweeps around the capacities of ttft_strict on the default profile (16 and about
# 27 requests/s), with step 1 or about 3 % near them, and the requests per point.
DEFAULT_VALUES = {"parallel": "8,12,14:18,20,24,32", "rate": "23:26"}
DEFAULT_REQUESTS = {"parallel": 600, "rate": 2000}
DEFAULT_SEEDS = {"parallel": "0", "rate": "1,2,3"}


def parse_values(text: str) -> list[float]:
    """Parse ``4,8,12:20,24`` as ``parse_range`` does; return the values sorted, without repeats."""
    return sorted(set(parse_range(text)))


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


def seed_overrides(seed: int) -> list[str]:
    return [f"load.seed={seed}", f"dataset.seed={seed}", f"endpoint.sim_seed={seed}"]


def measure_run(variable: str, value: float, seed: int, requests: int, groups: list[RuleGroup], extra: list[str],
                work: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """Run the runner at one load value and seed; return the per-run CSV row and its request rows."""
    out_dir = work / f"{variable}-{value:g}-{seed}"
    started = time.perf_counter()
    with LoadSampler() as load:
        run_runner(out_dir, *point_overrides(variable, value, requests), *seed_overrides(seed), *extra)
    seconds = time.perf_counter() - started
    summary = read_summary(out_dir).iloc[0].to_dict()
    frame = read_requests(out_dir / "requests.csv")
    passed, violations = check_point(groups, summary)
    client_bound = bool(summary.get("client_bound", False))
    row = {
        "variable": variable,
        "value": value,
        "seed": seed,
        "requests": int(summary["requests"]),
        "success_rate": summary["success_rate"],
        "rps": summary["rps"],
        "p90_ttft": summary["p90_ttft"],
        "p99_ttft": summary["p99_ttft"],
        "engine_p99_ttft": engine_p99(frame) if variable == "rate" else math.nan,
        "lateness_p99": summary["lateness_p99"],
        "loop_lag_p99": summary["loop_lag_p99"],
        "client_bound": client_bound,
        "passed": passed and not client_bound,
        "violations": violations,
        "seconds": round(seconds, 1),
        "load_mean": load.mean,
        "load_max": load.max,
    }
    return row, frame


def engine_p99(frame: pd.DataFrame) -> float:
    """Return the engine model's p99 TTFT for the measured requests of one open-loop run.

    The replay uses the run's own schedule (``scheduled_at``) and each request's prompt and
    output token counts, so only the time outside the engine differs from the measured run.
    """
    rows = frame.sort_values("request_id")
    prompt_tokens = rows["prompt_tokens"].fillna(rows["expected_prompt_tokens"]).astype(int).tolist()
    output_tokens = rows["completion_tokens"].fillna(rows["max_tokens"]).astype(int).tolist()
    ttft = engine_ttft(DEFAULT_PROFILE, rows["scheduled_at"].tolist(), prompt_tokens, output_tokens)
    measured = ~(rows["warmup"].astype(bool) | rows["cooldown"].fillna(False).astype(bool))
    return float(np.percentile(ttft[measured.to_numpy()], 99))


def pooled_row(variable: str, value: float, runs: list[dict[str, Any]], frames: list[pd.DataFrame],
               groups: list[RuleGroup]) -> dict[str, Any]:
    """Summarise the measured requests of every seed at one value as one load point and check the rules."""
    # Each seed's run becomes one repeat, so windows and throughput are computed per run.
    pooled = pd.concat([frame.assign(repeat=index) for index, frame in enumerate(frames)], ignore_index=True)
    if variable == "parallel":
        summary = summarize(pooled, None, parallel=int(value))
    else:
        summary = summarize(pooled, None, open_loop=True)
    passed, violations = check_point(groups, summary)
    client_bound = any(run["client_bound"] for run in runs)
    engine = [run["engine_p99_ttft"] for run in runs]
    return {
        "variable": variable,
        "value": value,
        "seeds": " ".join(str(run["seed"]) for run in runs),
        "requests": int(summary["requests"]),
        "success_rate": summary["success_rate"],
        "rps": summary["rps"],
        "avg_ttft": summary["avg_ttft"],
        "p90_ttft": summary["p90_ttft"],
        "p99_ttft": summary["p99_ttft"],
        "seed_p99_min": min(run["p99_ttft"] for run in runs),
        "seed_p99_max": max(run["p99_ttft"] for run in runs),
        # Mean over seeds of (measured p99 - engine-model p99 on the same schedule).
        "outside_engine_p99": float(np.mean([run["p99_ttft"] - e for run, e in zip(runs, engine)])),
        "lateness_p99": summary["lateness_p99"],
        "client_bound": client_bound,
        "passed": passed and not client_bound,
        "violations": violations,
        "load_mean": round(float(np.mean([run["load_mean"] for run in runs])), 2),
        "load_max": max(run["load_max"] for run in runs),
    }


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
    parser.add_argument("--requests", type=int, help="measured requests per run (default: 600 for parallel, "
                                                     "2000 for rate)")
    parser.add_argument("--seeds", help="comma-separated seeds, one run each per value (default: "
                                         f"{DEFAULT_SEEDS['parallel']} for parallel, {DEFAULT_SEEDS['rate']} for rate)")
    parser.add_argument("--sla", default="ttft_strict", help="rule set in conf/sla/ (default ttft_strict)")
    parser.add_argument("--output", type=Path, help="CSV to write (default bench/results/sla_capacity_VARIABLE.csv)")
    parser.add_argument("overrides", nargs="*", help=f"extra runner overrides (default: {' '.join(DEFAULT_OVERRIDES)})")
    args = parser.parse_args(argv)

    groups = load_rule_set(args.sla)
    values = parse_values(args.values or DEFAULT_VALUES[args.variable])
    requests = args.requests or DEFAULT_REQUESTS[args.variable]
    seeds = [int(seed) for seed in (args.seeds or DEFAULT_SEEDS[args.variable]).split(",")]
    if args.variable == "parallel" and any(value != int(value) or value < 1 for value in values):
        raise SystemExit("error: --values for parallel must be whole numbers >= 1")
    extra = list(args.overrides) or list(DEFAULT_OVERRIDES)
    if any(item.startswith("model.sim_profile=") for item in extra) and args.variable == "rate":
        raise SystemExit("error: the engine replay assumes the default sim profile; drop model.sim_profile")
    output = args.output or RESULTS / f"sla_capacity_{args.variable}.csv"
    print(f"# {machine_line()}")
    print(f"# rule set {args.sla}: {'; '.join(group.criteria for group in groups)}; overrides: {' '.join(extra)}; "
          f"seeds {' '.join(map(str, seeds))}")

    rows, runs = [], []
    with tempfile.TemporaryDirectory(prefix="sla-capacity-") as tmp:
        for value in values:
            value_runs, frames = [], []
            for seed in seeds:
                run, frame = measure_run(args.variable, value, seed, requests, groups, extra, Path(tmp))
                value_runs.append(run)
                frames.append(frame)
                print(f"{args.variable}={value:g} seed {seed}: p99_ttft={run['p99_ttft']:.4f} "
                      f"engine={run['engine_p99_ttft']:.4f} rps={run['rps']:.2f} {_verdict(run)} "
                      f"({run['requests']} requests, {run['seconds']:.0f} s, load average {run['load_mean']}, "
                      f"max {run['load_max']})", flush=True)
            row = pooled_row(args.variable, value, value_runs, frames, groups)
            rows.append(row)
            runs.extend(value_runs)
            print(f"{args.variable}={value:g} pooled: p99_ttft={row['p99_ttft']:.4f} over {row['requests']} "
                  f"requests, outside the engine {1000 * row['outside_engine_p99']:+.1f} ms, {_verdict(row)}",
                  flush=True)

    frame = pd.DataFrame(rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(output, index=False)
    runs_output = output.with_name(output.stem + "_runs.csv")
    pd.DataFrame(runs).to_csv(runs_output, index=False)
    highest, lowest_fail, monotone = capacity(frame)
    print(f"capacity: {args.variable}={highest if highest is None else f'{highest:g}'}"
          f" (lowest failing value {lowest_fail if lowest_fail is None else f'{lowest_fail:g}'}"
          f"{'' if monotone else '; a value above a failing one passed'}); wrote {output} and {runs_output}")
    return 0


def _verdict(row: dict[str, Any]) -> str:
    if row["passed"]:
        return "pass"
    return "client-bound" if row["client_bound"] else "fail"


if __name__ == "__main__":
    sys.exit(main())
