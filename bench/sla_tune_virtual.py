"""Accuracy of the rate tune from sampling alone: the product's search against the engine model.

Each seed runs the product's ``SlaTuner`` with the settings ``python -m runner +sla=NAME
search.variable=rate ...`` would compose. Probes are not sent to a server: each repeat's
plan comes from the product's ``runner.prober.probe_plan``, and its schedule is replayed
through the sim's engine model in virtual time (bench/engine_reference.py). Every answer
therefore differs from the reference only through the sampling noise of the probes, with
no client, HTTP or CPU load involved. Hundreds of tunes take minutes.

Only latency-type rules (``*_ttft``, ``*_latency``, ``*_tpot``) can be checked, and the
replay counts every request as successful.

    python -m bench.sla_tune_virtual --seeds 1:200 --reference 24.8
    python -m bench.sla_tune_virtual --seeds 1:200 --reference 24.8 --label "before" \\
        search.max_extra_runs=2 search.tail_noise=0
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, machine_line, parse_range
from bench.engine_reference import DEFAULT_OUTPUT_TOKENS, DEFAULT_PROMPT_TOKENS, crossing, engine_sequences
from bench.sla_vs_plain import compose_config
from runner.load import arrival_offsets
from runner.metrics import describe
from runner.prober import probe_plan
from runner.sla.probe import ProbeResult
from runner.sla.rules import parse_rules
from runner.sla.search import SlaTuner

# Relative distance from the reference that still counts as a correct answer.
TOLERANCE = 0.10


class EngineProber:
    """Prober that replays each repeat's schedule through the engine model instead of sending it."""

    def __init__(self, config: Any, profile: str, prompt_tokens: int, output_tokens: int) -> None:
        self.config = config
        self.profile = profile
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.samples: dict[float, list[np.ndarray]] = {}
        self.requests = 0
        self.load_seconds = 0.0

    async def probe(self, value: float, runs: int) -> ProbeResult:
        repeats = self.samples.setdefault(value, [])
        for repeat in range(len(repeats), runs):
            plan = probe_plan(self.config, value, repeat)
            offsets = arrival_offsets(plan)
            sequences = engine_sequences(self.profile, offsets, self.prompt_tokens, self.output_tokens)
            repeats.append(np.array([
                (seq.token_times[0] - seq.arrived_at, seq.token_times[-1] - seq.arrived_at) for seq in sequences
            ])[plan.warmup:])
            self.requests += plan.total
            self.load_seconds += offsets[-1]
        pooled = np.concatenate(repeats)
        ttft, latency = pooled[:, 0], pooled[:, 1]
        tpot = (latency - ttft) / max(self.output_tokens - 1, 1)
        metrics = {"requests": float(len(pooled)), "success_rate": 100.0}
        metrics |= describe(ttft, "ttft") | describe(latency, "latency") | describe(tpot, "tpot")
        return ProbeResult(value=value, runs=len(repeats), metrics=metrics)


def tune_once(overrides: list[str], seed: int, profile: str, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    """Run one virtual tune and return its answer and cost."""
    config = compose_config([*overrides, f"load.seed={seed}"])
    groups = parse_rules(config.sla.rules)
    prober = EngineProber(config, profile, prompt_tokens, output_tokens)
    (answer, *_) = asyncio.run(SlaTuner.from_config(groups, config, prober).run())
    return {
        "seed": seed,
        "answer": answer.max_satisfied,
        "last_pass": answer.last_pass,
        "first_fail": answer.first_fail,
        "probes": answer.probes,
        "repeats": sum(len(repeats) for repeats in prober.samples.values()),
        "requests": prober.requests,
        "load_seconds": round(prober.load_seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1:200", help="load seeds, one tune each: 1,2,3 or lo:hi (default 1:200)")
    parser.add_argument("--reference", type=float,
                        help="reference capacity in requests/s (default for ttft_strict: where the pooled p99 "
                             "TTFT in bench/results/sla_capacity_rate_engine.csv crosses 0.15 s)")
    parser.add_argument("--sla", default="ttft_strict", help="rule set in conf/sla/ (default ttft_strict)")
    parser.add_argument("--start", type=float, default=8, help="search start in requests/s (default 8)")
    parser.add_argument("--upper", type=float, default=64, help="search upper bound in requests/s (default 64)")
    parser.add_argument("--label", default="defaults", help="name of this configuration in the CSV")
    parser.add_argument("--output", type=Path, default=RESULTS / "sla_tune_virtual.csv",
                        help="CSV to append to (default bench/results/sla_tune_virtual.csv)")
    parser.add_argument("overrides", nargs="*", help="extra search.* overrides, e.g. search.max_extra_runs=2")
    args = parser.parse_args(argv)

    if args.reference is None and args.sla != "ttft_strict":
        raise SystemExit("error: --reference is required for rule sets other than ttft_strict")
    reference = args.reference or reference_from_engine_sweep()
    seeds = parse_range(args.seeds, integer=True)
    overrides = [f"+sla={args.sla}", "search.variable=rate", f"load.rate={args.start:g}", "load.parallel=null",
                 f"search.upper_bound={args.upper:g}", *args.overrides]
    print(f"# {machine_line()}")
    print(f"# {args.label}: {' '.join(overrides)}; reference {reference:g} requests/s")

    started = time.perf_counter()
    rows = []
    for seed in seeds:
        row = tune_once(overrides, seed, "default", DEFAULT_PROMPT_TOKENS, DEFAULT_OUTPUT_TOKENS)
        row["error"] = math.nan if row["answer"] is None else row["answer"] / reference - 1
        row["within"] = abs(row["error"]) <= TOLERANCE
        rows.append({"label": args.label, "overrides": " ".join(args.overrides), "reference": reference, **row})
    frame = pd.DataFrame(rows)

    answers = frame["answer"].astype(float)
    print(f"{len(frame)} tunes in {time.perf_counter() - started:.0f} s: answer p10/p50/p90 "
          f"{answers.quantile(0.1):g}/{answers.median():g}/{answers.quantile(0.9):g} (min {answers.min():g}, max "
          f"{answers.max():g}); within +-{TOLERANCE:.0%} of {reference:g}: {frame['within'].mean():.1%}; mean "
          f"{frame['requests'].mean():.0f} requests and {frame['load_seconds'].mean():.0f} s of arrivals per tune")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.is_file():
        earlier = pd.read_csv(args.output)
        frame = pd.concat([earlier[earlier["label"] != args.label], frame], ignore_index=True)
    frame.to_csv(args.output, index=False)
    print(f"wrote {args.output}")
    return 0


def reference_from_engine_sweep() -> float:
    path = RESULTS / "sla_capacity_rate_engine.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; run `python -m bench.engine_reference` or pass --reference")
    value = crossing(pd.read_csv(path), "p99_ttft", 0.15)
    if value is None:
        raise SystemExit(f"error: the p99 TTFT in {path} does not cross 0.15 s; pass --reference")
    return value


if __name__ == "__main__":
    sys.exit(main())
