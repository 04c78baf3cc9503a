"""Scale-out: requests/s and TTFT error with the load sent from one process or from worker processes.

Two servers, each a child process on 127.0.0.1 (``ScriptedServerProcess``):

- throughput: a zero-delay streaming server (all 64 tokens written at once, one chunk per
  token), closed loop at concurrency 256, 2,000 requests. The server's own CPU use is
  measured from /proc, so a server that is itself the limit shows up.
- timing: TTFT 200 ms, then 32 tokens 20 ms apart, concurrency 128. The TTFT error is the
  client's TTFT minus the server's (first token write minus request read).

Modes: ``in-process`` is ``runner.load.run_load`` in this process, as a run sends load
today; ``workers=N`` is ``runner.workers.run_load_in_workers`` with N worker processes. The
parent's ``on_record`` does what the prober's does (finalize, requests.csv row, CSV write),
so the parent's share of the work is included. Worker CPU is not measured: the workers
exit before their /proc entries can be read at the end of the load.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from bench.common import RESULTS, machine_line
from runner.client.finalize import finalize
from runner.client.openai import OpenAIClient
from runner.client.record import Prompt
from runner.config import EndpointConfig, ModelConfig, RequestConfig
from runner.load import LoadPlan, run_load
from runner.metrics import summarize
from runner.output import RequestsWriter, record_row
from runner.testing.scripted import Reply, ScriptedServerProcess, token_timeline
from runner.workers import ClientArgs, run_event_loop, run_load_in_workers

THROUGHPUT_TOKENS = 64
TTFT, GAP, TIMING_TOKENS = 0.200, 0.020, 32
PROMPT = Prompt(text="benchmark prompt", prompt_tokens=16)


def cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds of process ``pid`` from /proc (Linux only)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); the split above starts at field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def send_load(plan: LoadPlan, mode: int, base_url: str, pool_size: int, csv_path: Path) -> tuple[Any, list]:
    """Send ``plan`` in-process (mode 0) or from ``mode`` workers; return the outcome and the rows."""
    endpoint, model, request = EndpointConfig(), ModelConfig(), RequestConfig(max_tokens=THROUGHPUT_TOKENS)
    rows: list[dict[str, Any]] = []
    with RequestsWriter(csv_path) as writer:

        def on_record(record: Any) -> None:
            row = record_row(record, finalize(record, None), origin=0.0, variable="parallel",
                             value=plan.parallel, repeat=0)
            rows.append(row)
            writer.add(row)

        if mode == 0:
            async with OpenAIClient(endpoint, model, request, base_url=base_url, pool_size=pool_size) as client:
                outcome = await run_load(plan, client, [PROMPT], on_record)
        else:
            args = ClientArgs(endpoint, model, request, base_url, pool_size)
            outcome = await run_load_in_workers(plan, mode, args, [PROMPT], on_record)
    return outcome, rows


async def run_case(reply: Reply, plan: LoadPlan, mode: int, work: Path) -> dict[str, Any]:
    before = {p.pid for p in multiprocessing.active_children()}
    async with ScriptedServerProcess(reply) as server:
        server_pid = next(p.pid for p in multiprocessing.active_children() if p.pid not in before)
        server_cpu, parent_cpu, wall = cpu_seconds(server_pid), own_cpu_seconds(), time.perf_counter()
        outcome, rows = await send_load(plan, mode, server.base_url, plan.parallel or 1, work / f"{mode}.csv")
        wall = time.perf_counter() - wall
        server_cpu = cpu_seconds(server_pid) - server_cpu
        parent_cpu = own_cpu_seconds() - parent_cpu
    summary = summarize(pd.DataFrame(rows))
    served = server.state.requests
    # write_times[0] is the role chunk and write_times[1] the first token.
    server_ttft = np.array([r.write_times[1] - r.read_at for r in served if len(r.write_times) > 1])
    lag = np.asarray(outcome.loop_lag) if outcome.loop_lag else np.zeros(1)
    return {
        "mode": "in-process" if mode == 0 else f"workers={mode}",
        "requests": int(summary["requests"]),
        "success_rate": float(summary["success_rate"]),
        "rps": float(summary["rps"]),
        "server_cpu_pct": 100 * server_cpu / wall,
        "parent_cpu_pct": 100 * parent_cpu / wall,
        "ttft_error_mean_ms": (summary["avg_ttft"] - server_ttft.mean()) * 1000,
        "ttft_error_p99_ms": (summary["p99_ttft"] - np.percentile(server_ttft, 99)) * 1000,
        "loop_lag_p99_ms": float(np.percentile(lag, 99)) * 1000,
    }


async def bench(modes: list[int], requests: int, work: Path) -> pd.DataFrame:
    results = []
    throughput_reply = Reply(writes=token_timeline(ttft=0.0, tokens=THROUGHPUT_TOKENS, gap=0.0, prompt_tokens=16))
    throughput_plan = LoadPlan(parallel=256, rate=None, number=requests)
    for mode in modes:
        row = await run_case(throughput_reply, throughput_plan, mode, work)
        results.append({"test": "throughput c=256", **row})
    timing_reply = Reply(writes=token_timeline(ttft=TTFT, tokens=TIMING_TOKENS, gap=GAP, prompt_tokens=16))
    timing_plan = LoadPlan(parallel=128, rate=None, number=512)
    for mode in modes:
        row = await run_case(timing_reply, timing_plan, mode, work)
        results.append({"test": "ttft c=128", **row})
    table = pd.DataFrame(results)
    base: Optional[float] = None
    ratios = []
    for test, rps in zip(table["test"], table["rps"]):
        if test.startswith("throughput") and base is None:
            base = rps
        ratios.append(rps / base if test.startswith("throughput") and base else float("nan"))
    table.insert(table.columns.get_loc("rps") + 1, "rps_vs_first", ratios)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", type=int, nargs="+", default=[0, 1, 2],
                        help="0 = in-process run_load, N = run_load_in_workers with N workers")
    parser.add_argument("--requests", type=int, default=2000, help="requests of the throughput test")
    args = parser.parse_args(argv)

    header = machine_line()
    with tempfile.TemporaryDirectory() as work:
        # uvloop when installed, as `python -m runner` runs.
        table = run_event_loop(bench(args.modes, args.requests, Path(work)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS / "workers.csv", index=False, float_format="%.3f")
    print(f"# scale-out ({header})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
