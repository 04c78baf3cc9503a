"""The product's SLA search against the plain doubling-and-bisection search it replaces.

Plain search is bench-only code on the product's load, client and metrics modules. It starts
at ``--start``. While the rules hold, it doubles the load until the first violation or the
upper bound. If the start fails, it halves the load until a pass. Then it bisects the
bracket in whole steps (concurrency, or requests/s for rate) until it is one step wide. Each probe is 3 repeats
with no warmup, each of 2 requests per concurrency slot (rate: 2 x rate requests, that is
two seconds of arrivals), and the rules are checked on the mean of the 3 per-repeat
summaries, so a "p99" is the mean of three percentiles over 2 x C samples each.

Product search: ``python -m runner +sla=NAME`` as users run it, one process per seed.

Both run against the same simulated server profile, rule set and seeds, and each answer is
compared with the reference capacity of bench/sla_capacity.py.

    python -m bench.sla_vs_plain --variable parallel --start 4 --upper 64 --seeds 1,2,3
    python -m bench.sla_vs_plain --variable rate --start 8 --upper 64 --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, RESULTS, LoadSampler, machine_line, run_runner
from bench.sla_capacity import DEFAULT_OVERRIDES, capacity, load_rule_set
from runner.sla.rules import RuleGroup

PLAIN_RUNS = 3  # repeats per probe in the plain search
PLAIN_REQUESTS_PER_SLOT = 2  # requests per concurrency slot (rate: per request/s) in each repeat


def seed_overrides(seed: int) -> list[str]:
    return [f"endpoint.sim_seed={seed}", f"load.seed={seed}", f"dataset.seed={seed}"]


def start_overrides(variable: str, start: float, upper: float) -> list[str]:
    key = "load.parallel" if variable == "parallel" else "load.rate"
    overrides = [f"search.variable={variable}", f"{key}={start:g}", f"search.upper_bound={upper:g}"]
    if variable == "rate":
        overrides.append("load.parallel=null")
    return overrides


# -- product search ---------------------------------------------------------------------


def run_product(variable: str, start: float, upper: float, seed: int, sla: str, extra: list[str],
                product_overrides: list[str], work: Path) -> dict[str, Any]:
    """Run the product's tune as a user does and return its result, cost and timing."""
    out_dir = work / f"product-{variable}-{seed}"
    started = time.perf_counter()
    run_runner(out_dir, f"+sla={sla}", *start_overrides(variable, start, upper), *seed_overrides(seed),
               *extra, *product_overrides)
    wall = time.perf_counter() - started
    answer = pd.read_csv(out_dir / "sla_summary.csv").iloc[0]
    requests = pd.read_csv(out_dir / "requests.csv", usecols=["request_id"])
    probed = sorted(pd.read_csv(out_dir / "summary.csv")[variable].tolist())
    return {
        "answer": _number(answer["max_satisfied"]),
        "last_pass": _number(answer["last_pass"]),
        "first_fail": _number(answer["first_fail"]),
        "note": answer["note"],
        "probes": int(answer["probes"]),
        "requests": len(requests),
        "search_seconds": float(answer["seconds"]),
        "wall_seconds": wall,
        "probed": " ".join(f"{value:g}" for value in probed),
    }


def _number(value: Any) -> float | None:
    return None if pd.isna(value) else float(value)


# -- plain search -----------------------------------------------------------------------


async def plain_search(measure: Callable[[int], Awaitable[bool]], start: int, lower: int,
                       upper: int) -> tuple[int | None, int | None, str]:
    """Run doubling then integer bisection; return (last pass, first fail, note)."""
    verdicts: dict[int, bool] = {}

    async def passes(value: int) -> bool:
        if value not in verdicts:
            verdicts[value] = await measure(value)
        return verdicts[value]

    value = start
    last_pass: int | None = None
    first_fail: int | None = None
    if await passes(value):
        last_pass = value
        while value < upper:
            value = min(value * 2, upper)
            if not await passes(value):
                first_fail = value
                break
            last_pass = value
        if first_fail is None:
            return last_pass, None, "upper bound reached"
    else:
        first_fail = value
        while value > lower:
            value = max(value // 2, lower)
            if await passes(value):
                last_pass = value
                break
            first_fail = value
        if last_pass is None:
            return None, first_fail, "failed at lower bound"

    while first_fail - last_pass > 1:
        middle = (last_pass + first_fail) // 2
        if await passes(middle):
            last_pass = middle
        else:
            first_fail = middle
    return last_pass, first_fail, "Satisfied"


def compose_config(overrides: list[str]) -> Any:
    """Compose conf/ with Hydra as the command line does and return the typed RunConfig."""
    from hydra import compose, initialize_config_dir

    from runner.__main__ import to_run_config  # also registers the schema Hydra composes against

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=overrides))


class PlainProber:
    """Measures one plain probe: PLAIN_RUNS short repeats, summaries averaged."""

    def __init__(self, variable: str, groups: list[RuleGroup], client: Any, prompts: list, count_tokens: Any,
                 seed: int) -> None:
        self.variable = variable
        self.groups = groups
        self.client = client
        self.prompts = prompts
        self.count_tokens = count_tokens
        self.seed = seed
        self.next_id = 0
        self.requests = 0
        self.probed: list[int] = []

    def plan(self, value: int, repeat: int) -> Any:
        from runner.load import LoadPlan

        number = max(PLAIN_REQUESTS_PER_SLOT * value, 2)
        if self.variable == "parallel":
            return LoadPlan(parallel=value, rate=None, number=number, warmup=0, seed=self.seed + repeat,
                            first_id=self.next_id)
        return LoadPlan(parallel=None, rate=float(value), number=number, warmup=0, seed=self.seed + repeat,
                        first_id=self.next_id)

    async def repeat_summary(self, value: int, repeat: int) -> dict[str, Any]:
        from runner.client.finalize import finalize
        from runner.load import run_load
        from runner.metrics import summarize
        from runner.output import record_row

        plan = self.plan(value, repeat)
        self.next_id += plan.total
        self.requests += plan.total
        rows: list[dict[str, Any]] = []

        def on_record(record: Any) -> None:
            samples = finalize(record, self.count_tokens)
            rows.append(record_row(record, samples, origin=0.0, variable=self.variable, value=value, repeat=repeat))

        await run_load(plan, self.client, self.prompts, on_record)
        return summarize(pd.DataFrame(rows))

    async def measure(self, value: int) -> bool:
        self.probed.append(value)
        summaries = [await self.repeat_summary(value, repeat) for repeat in range(PLAIN_RUNS)]
        # Mean of each per-repeat statistic, as the plain search averages its repeats.
        averaged = pd.DataFrame(summaries).mean(numeric_only=True).to_dict()
        return all(group.check(averaged)[0] for group in self.groups)


async def _plain_tune(config: Any, variable: str, groups: list[RuleGroup], start: int, upper: int,
                      seed: int) -> dict[str, Any]:
    from runner.client.openai import OpenAIClient
    from runner.data import build_prompts
    from runner.run import open_endpoint
    from runner.tokenizer import load_tokenizer, token_counter

    tokenizer = load_tokenizer(config.model.tokenizer)
    prompts = build_prompts(config.dataset, tokenizer, PLAIN_REQUESTS_PER_SLOT * upper, config.endpoint.api)
    pool_size = upper if variable == "parallel" else 1024
    with open_endpoint(config) as base_url:
        async with OpenAIClient(config.endpoint, config.model, config.request, base_url=base_url,
                                pool_size=pool_size) as client:
            prober = PlainProber(variable, groups, client, prompts, token_counter(tokenizer), seed)
            started = time.perf_counter()
            last_pass, first_fail, note = await plain_search(prober.measure, start, 1, upper)
            search_seconds = time.perf_counter() - started
    return {
        "answer": last_pass,
        "last_pass": last_pass,
        "first_fail": first_fail,
        "note": note,
        "probes": len(prober.probed),
        "requests": prober.requests,
        "search_seconds": search_seconds,
        "probed": " ".join(str(value) for value in sorted(prober.probed)),
    }


def run_plain(variable: str, start: float, upper: float, seed: int, groups: list[RuleGroup],
              extra: list[str]) -> dict[str, Any]:
    """Run the plain search in this process against its own simulated server."""
    started = time.perf_counter()
    config = compose_config([*seed_overrides(seed), *extra])
    result = asyncio.run(_plain_tune(config, variable, groups, int(start), int(upper), seed))
    result["wall_seconds"] = time.perf_counter() - started
    return result


# -- comparison -------------------------------------------------------------------------


def reference_capacity(variable: str) -> float:
    path = RESULTS / f"sla_capacity_{variable}.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; run `python -m bench.sla_capacity --variable {variable}` first")
    highest, _, _ = capacity(pd.read_csv(path))
    if highest is None:
        raise SystemExit(f"error: no load value in {path} met the rules, so there is no reference capacity")
    return highest


def add_error(row: dict[str, Any], variable: str, reference: float) -> dict[str, Any]:
    """Add the answer's error against the reference and whether it is within tolerance.

    Tolerance: +-1 for concurrency, +-10 % for rate.
    """
    answer = row["answer"]
    if answer is None:
        row |= {"error": math.nan, "within": False}
    elif variable == "parallel":
        row |= {"error": answer - reference, "within": abs(answer - reference) <= 1}
    else:
        row |= {"error": answer / reference - 1, "within": abs(answer / reference - 1) <= 0.10}
    return row


def markdown_table(frame: pd.DataFrame, variable: str) -> str:
    error_head = "error" if variable == "parallel" else "error (%)"
    lines = [
        f"| method | seed | answer | bracket | probes | requests | search (s) | wall (s) | {error_head} | load average "
        "mean (max) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in frame.to_dict("records"):
        error = row["error"] if variable == "parallel" else 100 * row["error"]
        bracket = f"[{_text(row['last_pass'])}, {_text(row['first_fail'])})"
        lines.append(
            f"| {row['method']} | {row['seed']} | {_text(row['answer'])} | {bracket} | {row['probes']} | "
            f"{row['requests']} | {row['search_seconds']:.0f} | {row['wall_seconds']:.0f} | {error:+.1f} | "
            f"{row.get('load_mean', math.nan):g} ({row.get('load_max', math.nan):g}) | {row['note']} |"
        )
    return "\n".join(lines)


def _text(value: Any) -> str:
    return "none" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variable", choices=("parallel", "rate"), default="parallel")
    parser.add_argument("--start", type=float, default=4, help="search start: concurrency or requests/s (default 4)")
    parser.add_argument("--upper", type=float, default=64, help="search upper bound (default 64)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds for the sim, load and dataset")
    parser.add_argument("--sla", default="ttft_strict", help="rule set in conf/sla/ (default ttft_strict)")
    parser.add_argument("--methods", default="product,plain", help="product, plain or both (comma-separated)")
    parser.add_argument("--label", default="", help="suffix of the product's method name, e.g. for other search.* settings")
    parser.add_argument("--product-overrides", default="", help="space-separated search.* overrides for the product")
    parser.add_argument("--reference", type=float, help="reference capacity (default: the highest passing value "
                                                        "in bench/results/sla_capacity_VARIABLE.csv)")
    parser.add_argument("--output", type=Path, help="CSV to write (default bench/results/sla_vs_plain_VARIABLE.csv)")
    parser.add_argument("overrides", nargs="*", help=f"extra runner overrides for both (default: {' '.join(DEFAULT_OVERRIDES)})")
    args = parser.parse_args(argv)

    groups = load_rule_set(args.sla)
    reference = args.reference if args.reference is not None else reference_capacity(args.variable)
    extra = list(args.overrides) or list(DEFAULT_OVERRIDES)
    product_overrides = args.product_overrides.split()
    methods = args.methods.split(",")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    output = args.output or RESULTS / f"sla_vs_plain_{args.variable}.csv"
    print(f"# {machine_line()}")
    print(f"# reference capacity {args.variable}={reference:g}; rule set {args.sla}; overrides: {' '.join(extra)}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="sla-vs-plain-") as tmp:
        for seed in seeds:
            for method in methods:
                with LoadSampler() as load:
                    if method == "product":
                        name = "product" + (f" ({args.label})" if args.label else "")
                        result = run_product(args.variable, args.start, args.upper, seed, args.sla, extra,
                                             product_overrides, Path(tmp))
                    else:
                        name = "plain"
                        result = run_plain(args.variable, args.start, args.upper, seed, groups, extra)
                result |= {"load_mean": load.mean, "load_max": load.max}
                row = add_error({"method": name, "seed": seed, **result}, args.variable, reference)
                rows.append(row)
                print(f"{name} seed {seed}: answer {_text(row['answer'])} bracket [{_text(row['last_pass'])}, "
                      f"{_text(row['first_fail'])}) probes {row['probes']} ({row['probed']}) requests "
                      f"{row['requests']} search {row['search_seconds']:.1f} s wall {row['wall_seconds']:.1f} s "
                      f"load average {row['load_mean']} (max {row['load_max']}) note {row['note']}",
                      flush=True)

    frame = pd.DataFrame(rows)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.is_file() and args.label:
        frame = pd.concat([pd.read_csv(output), frame], ignore_index=True)  # keep earlier methods' rows
    frame.to_csv(output, index=False)
    print(markdown_table(frame, args.variable))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
