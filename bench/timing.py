"""Timing accuracy: the runner's TTFT and ITL against the server's own log.

The server (bench/servers.py, in its own process on 127.0.0.1) answers every request with
the same timeline: first token 200 ms after the request arrived, then 32 tokens 20 ms
apart. A request's arrival is the kernel's receive time of its last bytes, so the server's
log contains the true TTFT even when the server itself is slow to parse a burst of
requests. The column `server_parse_lag_mean_ms` shows how long that parsing took. The runner runs as users
run it (``python -m runner endpoint=openai ...``) at several concurrencies. The error is the
runner's statistic minus the same statistic of the server's log.

Each concurrency runs in two placements. `pinned`: the server on the last CPU and the
runner on the others, as when the server runs on its own machine. `shared`: the kernel
places both, so on a small machine the runner sometimes waits for a CPU the server holds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from bench.common import RESULTS, machine_line, read_summary, run_runner
from bench.servers import FastServer

TTFT_MS = 200.0
GAP_MS = 20.0
TOKENS = 32
PLACEMENTS = ("pinned", "shared")


def placement_cpus(placement: str) -> tuple[Optional[set[int]], Optional[set[int]]]:
    """Return the (server, runner) CPU sets of a placement; None means any CPU."""
    if placement == "shared":
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("the pinned placement needs at least 2 CPUs; run with --placement shared")
    return {cpus[-1]}, set(cpus[:-1])


def measure(placement: str, concurrency: int, requests: int, work: Path) -> dict[str, object]:
    out_dir = work / f"{placement}-c{concurrency}"
    server_cpus, runner_cpus = placement_cpus(placement)
    with FastServer(work / f"server-{placement}-c{concurrency}.json", gap_ms=GAP_MS, ttft_ms=TTFT_MS,
                    cpus=server_cpus) as server:
        run_runner(
            out_dir, "endpoint=openai", f"endpoint.url={server.base_url}/v1/chat/completions",
            f"load.parallel={concurrency}", f"load.number={requests}", "load.warmup=0",
            f"request.max_tokens={TOKENS}", "dataset.min_prompt_length=100", "dataset.max_prompt_length=100",
            cpus=runner_cpus,
        )
    log = server.log
    assert log is not None
    # The first logged request is the runner's preflight check, which is not measured.
    arrival = np.asarray(log.arrival[1:])
    server_ttft = np.asarray(log.first_token[1:])
    server_itl = (np.asarray(log.last_chunk[1:]) - arrival - server_ttft) / (TOKENS - 1)
    summary = read_summary(out_dir).iloc[0]
    return {
        "placement": placement,
        "concurrency": concurrency,
        "requests": int(summary["requests"]),
        "success_rate": float(summary["success_rate"]),
        "server_ttft_mean_ms": server_ttft.mean() * 1000,
        "ttft_error_mean_ms": (summary["avg_ttft"] - server_ttft.mean()) * 1000,
        "ttft_error_p99_ms": (summary["p99_ttft"] - np.percentile(server_ttft, 99)) * 1000,
        "itl_error_mean_ms": (summary["avg_itl"] - server_itl.mean()) * 1000,
        "server_parse_lag_mean_ms": (np.asarray(log.parsed[1:]) - arrival).mean() * 1000,
        "server_cpu_s": log.cpu_seconds,
        "unstamped_reads": log.unstamped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--requests", type=int, default=300,
                        help="measured requests per concurrency, at most 60 per stream (60 at concurrency 1)")
    parser.add_argument("--placement", choices=PLACEMENTS, nargs="+", default=list(PLACEMENTS),
                        help="where the server and the runner run (default: both, side by side)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every case this many times, interleaved; the table gives each round")
    args = parser.parse_args(argv)

    header = machine_line()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for round_number in range(1, args.rounds + 1):
            for concurrency in args.concurrency:
                for placement in args.placement:
                    requests = min(args.requests, 60 * concurrency)
                    row = measure(placement, concurrency, requests, Path(work) / f"round{round_number}")
                    rows.append({"round": round_number, **row, "load_average": os.getloadavg()[0]})
    table = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS / "timing.csv", index=False, float_format="%.3f")
    print(f"# timing accuracy ({header})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
