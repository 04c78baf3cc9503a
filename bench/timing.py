"""Timing accuracy: the runner's TTFT and ITL against the server's own log.

The server (bench/servers.py, a raw asyncio server in its own process on 127.0.0.1) answers
every request with the same timeline: first token 200 ms after the request arrived, then
32 tokens 20 ms apart. It timestamps a request when its bytes are parsed, which costs
microseconds, so its log is the true TTFT. The runner runs as users run it
(``python -m runner endpoint=openai ...``) at several concurrencies. The error is the
runner's statistic minus the same statistic of the server's log.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import RESULTS, machine_line, read_summary, run_runner
from bench.servers import FastServer

TTFT_MS = 200.0
GAP_MS = 20.0
TOKENS = 32


def measure(concurrency: int, requests: int, work: Path) -> dict[str, float]:
    out_dir = work / f"c{concurrency}"
    with FastServer(work / f"server-c{concurrency}.json", gap_ms=GAP_MS, ttft_ms=TTFT_MS) as server:
        run_runner(
            out_dir, "endpoint=openai", f"endpoint.url={server.base_url}/v1/chat/completions",
            f"load.parallel={concurrency}", f"load.number={requests}", "load.warmup=0",
            f"request.max_tokens={TOKENS}", "dataset.min_prompt_length=100", "dataset.max_prompt_length=100",
        )
    log = server.log
    assert log is not None
    # The first logged request is the runner's preflight check, which is not measured.
    server_ttft = np.asarray(log.first_token[1:])
    server_itl = (np.asarray(log.last_chunk[1:]) - np.asarray(log.arrival[1:]) - server_ttft) / (TOKENS - 1)
    summary = read_summary(out_dir).iloc[0]
    return {
        "concurrency": concurrency,
        "requests": int(summary["requests"]),
        "success_rate": float(summary["success_rate"]),
        "server_ttft_mean_ms": server_ttft.mean() * 1000,
        "ttft_error_mean_ms": (summary["avg_ttft"] - server_ttft.mean()) * 1000,
        "ttft_error_p99_ms": (summary["p99_ttft"] - np.percentile(server_ttft, 99)) * 1000,
        "itl_error_mean_ms": (summary["avg_itl"] - server_itl.mean()) * 1000,
        "server_cpu_s": log.cpu_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--requests", type=int, default=300, help="measured requests per concurrency")
    args = parser.parse_args(argv)

    header = machine_line()
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(concurrency, args.requests, Path(work)) for concurrency in args.concurrency]
    table = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS / "timing.csv", index=False, float_format="%.3f")
    print(f"# timing accuracy ({header})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
