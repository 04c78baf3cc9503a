"""Timing accuracy: the runner's TTFT and ITL against a scripted server's own log.

The server (a child process on 127.0.0.1) answers every request with the same timeline:
first token 200 ms after it read the request, then 32 tokens 20 ms apart. The runner runs
as users run it (``python -m runner endpoint=openai ...``) at several concurrencies. The
error is the runner's statistic minus the same statistic of the server's log.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import RESULTS, machine_line, read_summary, run_runner
from runner.testing.scripted import Reply, ScriptedServerProcess, token_timeline

TTFT = 0.200
GAP = 0.020
TOKENS = 32


async def measure(concurrency: int, requests: int, work: Path) -> dict[str, float]:
    reply = Reply(writes=token_timeline(ttft=TTFT, tokens=TOKENS, gap=GAP, prompt_tokens=100))
    async with ScriptedServerProcess(reply) as server:
        url = f"{server.base_url}/v1/chat/completions"
        out_dir = work / f"c{concurrency}"
        await asyncio.to_thread(
            run_runner, out_dir, "endpoint=openai", f"endpoint.url={url}", f"load.parallel={concurrency}",
            f"load.number={requests}", "load.warmup=0", f"request.max_tokens={TOKENS}",
            "dataset.min_prompt_length=100", "dataset.max_prompt_length=100",
        )
    served = server.state.requests
    # write_times[0] is the role chunk; [1 .. TOKENS] are the token chunks.
    server_ttft = np.array([r.write_times[1] - r.read_at for r in served])
    server_itl = np.concatenate([np.diff(r.write_times[1:TOKENS + 1]) for r in served])
    summary = read_summary(out_dir).iloc[0]
    return {
        "concurrency": concurrency,
        "requests": int(summary["requests"]),
        "success_rate": float(summary["success_rate"]),
        "server_ttft_mean_ms": server_ttft.mean() * 1000,
        "ttft_error_mean_ms": (summary["avg_ttft"] - server_ttft.mean()) * 1000,
        "ttft_error_p99_ms": (summary["p99_ttft"] - np.percentile(server_ttft, 99)) * 1000,
        "itl_error_mean_ms": (summary["avg_itl"] - server_itl.mean()) * 1000,
        "max_open_requests": server.state.max_open_requests,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--requests", type=int, default=300, help="measured requests per concurrency")
    args = parser.parse_args(argv)

    header = machine_line()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for concurrency in args.concurrency:
            rows.append(asyncio.run(measure(concurrency, args.requests, Path(work))))
    table = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS / "timing.csv", index=False, float_format="%.3f")
    print(f"# timing accuracy ({header})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
