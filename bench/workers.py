"""Scale-out: completed requests/s and TTFT error with the load sent from one process or from workers.

Each case starts its own server, bench/servers.py (``FastServer``), in a child process. It
is a raw asyncio protocol on uvloop that writes each streamed response from pre-encoded SSE
events and logs when it read each request and when it wrote the first token.

- throughput: zero delay, 64 tokens per response in one write, closed loop at concurrency
  256, 256 warmup requests, then ``--requests`` measured ones. Requests/s is the runner's
  own ``rps`` (runner.metrics.summarize, as in summary.csv).
- timing: TTFT 200 ms, then 32 tokens 20 ms apart, concurrency 128, 128 warmup and 512
  measured requests. The TTFT error is the runner's TTFT minus the server's (first token
  write minus request read), mean and p99.

Modes: ``in-process`` is ``runner.load.run_load`` in this process, as a run with
``load.workers=1`` sends load; ``workers=N`` is ``runner.workers.run_load_in_workers``
with N worker processes. The parent's ``on_record`` does what the prober's does for a
request (finalize, requests.csv row, CSV write), so the parent's share of the work counts.
No tokenizer is loaded, in any mode.

Every round runs each mode once, in an order that rotates from round to round. Before each
case the script waits up to 10 s for the machine to be nearly idle, and records the busy
cores it saw last and the 1-minute load average. It also records the CPU over the case's
window (from the load call to its return, worker start-up included): this process, its
worker processes (reaped children, os.times), the server (/proc/PID/stat) and the rest of
the machine (/proc/stat busy time minus those). CPU percentages are of one core over the
load's own duration (common start to end), which leaves out the workers' start-up. Before
each test of a round, ``spin_2_vs_1`` records how much more work two processes spinning in a
Python loop do than one: the ceiling of any two-worker ratio at that moment.

``--profile DIR`` writes cProfile statistics of this process and of every worker to DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

import runner.workers
from bench.common import RESULTS, machine_line
from bench.processes import machine_busy_seconds, process_cpu_seconds, wait_for_idle
from bench.servers import FastServer
from runner.client.finalize import finalize
from runner.client.openai import OpenAIClient
from runner.client.record import Prompt
from runner.config import EndpointConfig, ModelConfig, RequestConfig
from runner.gc_pause import setup_objects_frozen
from runner.load import LoadOutcome, LoadPlan, run_load
from runner.metrics import summarize
from runner.output import RequestsWriter, record_row
from runner.workers import ClientArgs, run_event_loop, run_load_in_workers

THROUGHPUT_TOKENS = 64
THROUGHPUT_PARALLEL = 256
TIMING_TTFT_MS, TIMING_GAP_MS, TIMING_TOKENS = 200.0, 20.0, 32
TIMING_PARALLEL, TIMING_REQUESTS = 128, 512
PROMPT = Prompt(text="benchmark prompt", prompt_tokens=16)
# Seconds to wait before each case for the machine's busy CPU to fall below 0.3 cores.
IDLE_WAIT = 10.0
# Seconds of each spin (one process, then two) that checks how two processes scale.
SPIN_SECONDS = 1.0


def _profiled_worker_main(task: Any, control: Any, data: Any) -> None:
    """Run a load worker under cProfile; spawned workers import this module to find it."""
    profile_dir = Path(os.environ["BENCH_WORKERS_PROFILE_DIR"])
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        _WORKER_MAIN(task, control, data)
    finally:
        profiler.disable()
        profiler.dump_stats(profile_dir / f"worker-{task.share.worker}-of-{task.share.workers}-{os.getpid()}.prof")


_WORKER_MAIN = runner.workers._worker_main


def _spin(seconds: float, results: Any) -> None:
    """Count loop iterations for ``seconds`` and put (iterations, CPU seconds) on ``results``."""
    count, cpu = 0, time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10_000):
            count += 1
    results.put((count, time.process_time() - cpu))


def spin_scaling(seconds: float = SPIN_SECONDS) -> float:
    """Spin one process, then two, for ``seconds`` each; return the work of two divided by one.

    While other jobs run, or when the host gives the two vCPUs less than two cores' worth,
    two processes do less than twice the work of one. That roughly bounds the ratio two
    CPU-bound load workers can reach at that moment.
    """
    context = multiprocessing.get_context("spawn")
    totals = []
    for count in (1, 2):
        results = context.Queue()
        processes = [context.Process(target=_spin, args=(seconds, results)) for _ in range(count)]
        for process in processes:
            process.start()
        totals.append(sum(results.get()[0] for _ in processes))
        for process in processes:
            process.join()
    return totals[1] / totals[0]


def _children_cpu_seconds() -> float:
    times = os.times()
    return times.children_user + times.children_system


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def send_load(plan: LoadPlan, mode: int, base_url: str, max_tokens: int,
                    csv_path: Path) -> tuple[LoadOutcome, list[dict[str, Any]]]:
    """Send ``plan`` in-process (mode 0) or from ``mode`` workers; return the outcome and the rows."""
    endpoint, model, request = EndpointConfig(), ModelConfig(), RequestConfig(max_tokens=max_tokens)
    pool_size = plan.parallel or 1
    rows: list[dict[str, Any]] = []
    with RequestsWriter(csv_path) as writer:

        def on_record(record: Any) -> None:
            row = record_row(record, finalize(record, None), origin=0.0, variable="parallel",
                             value=plan.parallel, repeat=0)
            rows.append(row)
            writer.add(row)

        # As `python -m runner` does, with the set-up objects out of the garbage collector's way.
        with setup_objects_frozen():
            if mode == 0:
                async with OpenAIClient(endpoint, model, request, base_url=base_url, pool_size=pool_size) as client:
                    outcome = await run_load(plan, client, [PROMPT], on_record)
            else:
                args = ClientArgs(endpoint, model, request, base_url, pool_size)
                outcome = await run_load_in_workers(plan, mode, args, [PROMPT], on_record)
    return outcome, rows


def _worker_columns(outcome: LoadOutcome) -> dict[str, Any]:
    """Per-worker CPU, lateness and lag as slash-separated lists, one entry per worker."""
    if not outcome.workers:
        return {"worker_cpu_pct": "", "worker_lateness_p99_ms": "", "worker_loop_lag_p99_ms": ""}

    def p99_ms(samples: list[float]) -> str:
        return f"{1000 * float(np.percentile(samples, 99)):.2f}" if len(samples) else "nan"

    return {
        "worker_cpu_pct": "/".join(f"{100 * w.cpu_seconds / w.wall_seconds:.0f}" for w in outcome.workers),
        "worker_lateness_p99_ms": "/".join(p99_ms(w.lateness) for w in outcome.workers),
        "worker_loop_lag_p99_ms": "/".join(p99_ms(w.loop_lag) for w in outcome.workers),
    }


async def run_case(test: str, plan: LoadPlan, mode: int, work: Path, server_args: dict[str, float],
                   max_tokens: int) -> dict[str, Any]:
    # Other work on the machine takes cores from the workers, so wait a little for a quiet moment.
    busy_before = await asyncio.to_thread(wait_for_idle, IDLE_WAIT)
    load_before = os.getloadavg()[0]
    with FastServer(work / f"{test}-{mode}-server.json", **server_args) as server:
        server_cpu = process_cpu_seconds(server.pid)
        busy, own, children = machine_busy_seconds(), _own_cpu_seconds(), _children_cpu_seconds()
        wall = time.perf_counter()
        outcome, rows = await send_load(plan, mode, server.base_url, max_tokens, work / f"{test}-{mode}.csv")
        wall = time.perf_counter() - wall
        busy = machine_busy_seconds() - busy
        own, children = _own_cpu_seconds() - own, _children_cpu_seconds() - children
        server_cpu = process_cpu_seconds(server.pid) - server_cpu
    served = server.log
    assert served is not None, "bench.servers wrote no log"
    cores = os.cpu_count() or 1
    others = max(busy - own - children - server_cpu, 0.0)
    duration = outcome.ended_at - outcome.started_at
    summary = summarize(pd.DataFrame(rows), parallel=plan.parallel)
    row = {
        "test": test,
        "mode": "in-process" if mode == 0 else f"workers={mode}",
        "load_before": load_before,
        "busy_cores_before": busy_before,
        "requests": int(summary["requests"]),
        "success_rate": float(summary["success_rate"]),
        "rps": float(summary["rps"]),
        "parent_cpu_pct": 100 * own / duration,
        "workers_cpu_s": children,
        # CPU per request (warmup and cooldown included) while the load ran, in microseconds.
        "worker_cpu_us_per_request": 1e6 * sum(w.cpu_seconds for w in outcome.workers) / len(rows)
        if outcome.workers else np.nan,
        "parent_cpu_us_per_request": 1e6 * own / len(rows),
        **_worker_columns(outcome),
        "server_cpu_pct": 100 * server_cpu / duration,
        "server_cpu_us_per_request": 1e6 * server_cpu / max(len(served.arrival), 1),
        "others_pct": 100 * others / (wall * cores),
        "lateness_p99_ms": 1000 * float(summary["lateness_p99"]),
        "loop_lag_p99_ms": 1000 * float(np.percentile(outcome.loop_lag, 99)) if outcome.loop_lag else np.nan,
    }
    if served.first_token:
        # The log keeps every request the server served, warmup and cooldown included.
        server_ttft = np.asarray(served.first_token)
        row["ttft_error_mean_ms"] = 1000 * (float(summary["avg_ttft"]) - float(server_ttft.mean()))
        row["ttft_error_p99_ms"] = 1000 * (float(summary["p99_ttft"]) - float(np.percentile(server_ttft, 99)))
    return row


async def bench(modes: list[int], rounds: int, requests: int, work: Path) -> pd.DataFrame:
    throughput = LoadPlan(parallel=THROUGHPUT_PARALLEL, rate=None, number=requests, warmup=THROUGHPUT_PARALLEL)
    timing = LoadPlan(parallel=TIMING_PARALLEL, rate=None, number=TIMING_REQUESTS, warmup=TIMING_PARALLEL)
    cases = [
        ("throughput c=256", throughput, {}, THROUGHPUT_TOKENS),
        ("ttft c=128", timing, {"gap_ms": TIMING_GAP_MS, "ttft_ms": TIMING_TTFT_MS}, TIMING_TOKENS),
    ]
    results = []
    for round_number in range(rounds):
        order = modes[round_number % len(modes):] + modes[:round_number % len(modes)]
        for test, plan, server_args, max_tokens in cases:
            scaling = await asyncio.to_thread(spin_scaling)
            for mode in order:
                row = await run_case(test, plan, mode, work, server_args, max_tokens)
                results.append({"round": round_number + 1, **row, "spin_2_vs_1": scaling})
                print(f"round {round_number + 1} {test} {row['mode']}: {row['rps']:.0f} req/s, "
                      f"others {row['others_pct']:.0f} %, load {row['load_before']:.2f}", flush=True)
    return pd.DataFrame(results)


def ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Return the throughput test's rps of each mode divided by that of workers=1: per round,
    of the medians, and of the best rounds (the least disturbed by other work on the machine)."""
    throughput = table[table["test"].str.startswith("throughput")]
    wide = throughput.pivot(index="round", columns="mode", values="rps")
    if "workers=1" not in wide:
        return pd.DataFrame()
    by_round = wide.div(wide["workers=1"], axis=0)
    by_round.loc["median"] = wide.median() / wide["workers=1"].median()
    by_round.loc["best"] = wide.max() / wide["workers=1"].max()
    return by_round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", type=int, nargs="+", default=[0, 1, 2],
                        help="0 = in-process run_load, N = run_load_in_workers with N workers")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every mode once")
    parser.add_argument("--requests", type=int, default=6000, help="measured requests of the throughput test")
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile statistics to this folder")
    args = parser.parse_args(argv)

    header = machine_line()
    profiler: Optional[cProfile.Profile] = None
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ["BENCH_WORKERS_PROFILE_DIR"] = str(args.profile.resolve())
        runner.workers._worker_main = _profiled_worker_main  # type: ignore[assignment]
        profiler = cProfile.Profile()
        profiler.enable()
    with tempfile.TemporaryDirectory() as work:
        # uvloop when installed, as `python -m runner` runs.
        table = run_event_loop(bench(args.modes, args.rounds, args.requests, Path(work)))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile / "parent.prof")
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS / "workers.csv", index=False, float_format="%.3f")
    print(f"# scale-out ({header}; load average at the end {os.getloadavg()[0]:.2f})")
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        by_round = ratios(table)
        if not by_round.empty:
            print("\nthroughput rps relative to workers=1 (per round, of the medians, of the best rounds):")
            print(by_round.to_string(float_format=lambda v: f"{v:.2f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
