"""Rate capacity of a sim profile from its engine model alone, in virtual time.

The simulated server's timing is ``EngineCore``: a request's TTFT on the server is its first
token time minus its arrival. This script replays the runner's own open-loop schedules
(``runner.load.arrival_offsets``, the same seeds and warmup as a run of ``load.number``
requests) through that model with ``runner.sim.virtual.replay``. It needs no server, so it
can pool far more samples than real runs: the default is 20 seeds of 40,000 requests per
rate, about 27 minutes of arrivals each.

For each rate it writes the p99 TTFT pooled over all seeds and the spread of the per-seed
p99, and it prints the rate where the pooled curve crosses the threshold (linear
interpolation between the two grid points around it). Real runs add the time HTTP, the
event loops and the client take, which bench/sla_capacity.py measures against the same
model on the same schedules.

    python -m bench.engine_reference --rates 23.5:26.5:0.25 --seeds 1:20 --requests 40000
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, machine_line, parse_range
from runner.load import LoadPlan, arrival_offsets
from runner.sim.engine import Sequence
from runner.sim.profile import load_profile
from runner.sim.virtual import replay

# The sim counts 157 prompt tokens for the default 128-token random prompts sent to
# /v1/chat/completions, because the chat template adds 29. requests.csv shows the count.
DEFAULT_PROMPT_TOKENS = 157
DEFAULT_OUTPUT_TOKENS = 32


def engine_sequences(profile_name: str, arrivals: list[float], prompt_tokens: list[int] | int,
                     output_tokens: list[int] | int) -> list[Sequence]:
    """Replay arrivals (seconds) through the engine model; token counts are per request or one for all."""
    count = len(arrivals)
    prompts = prompt_tokens if isinstance(prompt_tokens, list) else [prompt_tokens] * count
    outputs = output_tokens if isinstance(output_tokens, list) else [output_tokens] * count
    return replay(load_profile(profile_name), zip(arrivals, prompts, outputs))


def engine_ttft(profile_name: str, arrivals: list[float], prompt_tokens: list[int] | int,
                output_tokens: list[int] | int) -> np.ndarray:
    """Return the engine model's TTFT (first token - arrival, seconds) for each arrival, in order."""
    sequences = engine_sequences(profile_name, arrivals, prompt_tokens, output_tokens)
    return np.array([seq.token_times[0] - seq.arrived_at for seq in sequences])


def schedule_ttft(profile_name: str, rate: float, number: int, warmup: int, seed: int, prompt_tokens: int,
                  output_tokens: int) -> np.ndarray:
    """Return the engine TTFT of the measured requests of one open-loop run's schedule."""
    plan = LoadPlan(parallel=None, rate=rate, number=number, warmup=warmup, seed=seed)
    return engine_ttft(profile_name, arrival_offsets(plan), prompt_tokens, output_tokens)[warmup:]


def crossing(frame: pd.DataFrame, column: str, threshold: float) -> float | None:
    """Return the first rate where ``column`` rises through ``threshold``, interpolated linearly."""
    rates = frame["rate"].to_numpy()
    values = frame[column].to_numpy()
    for index in range(1, len(rates)):
        if values[index - 1] <= threshold < values[index]:
            fraction = (threshold - values[index - 1]) / (values[index] - values[index - 1])
            return float(rates[index - 1] + fraction * (rates[index] - rates[index - 1]))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="sim profile name or .yaml path (default: default)")
    parser.add_argument("--rates", default="23.5:26.5:0.25", help="requests/s: 24,25 or lo:hi:step (inclusive)")
    parser.add_argument("--seeds", default="1:20", help="load seeds: 1,2,3 or lo:hi (default 1:20)")
    parser.add_argument("--requests", type=int, default=40000, help="measured requests per seed and rate")
    parser.add_argument("--threshold", type=float, default=0.15, help="p99 TTFT limit in seconds (ttft_strict: 0.15)")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                        help=f"prompt tokens the server counts per request (default {DEFAULT_PROMPT_TOKENS})")
    parser.add_argument("--output-tokens", type=int, default=DEFAULT_OUTPUT_TOKENS,
                        help=f"output tokens per request (default {DEFAULT_OUTPUT_TOKENS})")
    parser.add_argument("--output", type=Path, default=RESULTS / "sla_capacity_rate_engine.csv",
                        help="CSV to write (default bench/results/sla_capacity_rate_engine.csv)")
    args = parser.parse_args(argv)

    rates = parse_range(args.rates)
    seeds = parse_range(args.seeds, integer=True)
    print(f"# {machine_line()}")
    print(f"# profile {args.profile}; {len(seeds)} seeds x {args.requests} requests per rate; "
          f"{args.prompt_tokens} prompt and {args.output_tokens} output tokens")

    rows = []
    for rate in rates:
        started = time.perf_counter()
        warmup = math.ceil(rate)
        per_seed = [schedule_ttft(args.profile, rate, args.requests, warmup, seed, args.prompt_tokens,
                                  args.output_tokens) for seed in seeds]
        seed_p99 = np.array([np.percentile(ttft, 99) for ttft in per_seed])
        pooled = np.concatenate(per_seed)
        row = {
            "rate": rate,
            "seeds": len(seeds),
            "requests": len(pooled),
            "p50_ttft": float(np.percentile(pooled, 50)),
            "p90_ttft": float(np.percentile(pooled, 90)),
            "p99_ttft": float(np.percentile(pooled, 99)),
            "seed_p99_mean": float(seed_p99.mean()),
            "seed_p99_sd": float(seed_p99.std(ddof=1)) if len(seeds) > 1 else math.nan,
            "seed_p99_min": float(seed_p99.min()),
            "seed_p99_max": float(seed_p99.max()),
        }
        rows.append(row)
        print(f"rate {rate:g}: pooled p99 {row['p99_ttft']:.4f} s; per seed {row['seed_p99_mean']:.4f} "
              f"+- {row['seed_p99_sd']:.4f} (min {row['seed_p99_min']:.4f}, max {row['seed_p99_max']:.4f}); "
              f"{time.perf_counter() - started:.0f} s", flush=True)

    frame = pd.DataFrame(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.output, index=False)
    capacity = crossing(frame, "p99_ttft", args.threshold)
    text = "not inside the swept rates" if capacity is None else f"{capacity:.2f} requests/s"
    print(f"engine-model capacity (pooled p99 TTFT <= {args.threshold:g} s): {text}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
