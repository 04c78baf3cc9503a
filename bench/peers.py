"""Client performance of the runner beside evalscope perf, aiperf and guidellm, on this machine.

Every tool runs as its users run it, one at a time, against servers on 127.0.0.1 that log
what they saw, and the numbers come from those logs rather than from each tool's report:

- ceiling: closed loop at concurrency 64 and 256, 2,000 requests of 100 prompt tokens and
  64 output tokens (one SSE event per token) against a zero-delay server (bench.servers).
  Requests/s is the server's count over its first arrival to its last chunk, which leaves
  out each tool's start-up. The tool's CPU is that of its whole process tree.
- timing: concurrency 1, 32 and 128 against the same raw server in paced mode (first token
  200 ms after the request's bytes were parsed, then 32 tokens 20 ms apart, each token one
  " hi"). The error is the tool's own mean and p99 TTFT and mean token gap minus the same
  statistics of the server's log.
- pacing: fixed rates of 50, 200 and 1,000 requests/s for about 5 s each, for the tools that
  have a fixed-rate mode. Achieved rate comes from the server's arrivals; lateness is each
  arrival's delay behind an evenly spaced schedule fitted to the earliest arrivals, for
  tools with an evenly spaced schedule, and separately as each tool records it.
- start-up: seconds from launch to the first request reaching the server, and the total
  CPU of a 10-request run.

Results go to bench/results/peers.csv and the "Client performance and peers" section of
docs/benchmarks.md. The machine's load average before each run and the CPU that other
processes used during it are part of every row.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from bench.common import REPO, RESULTS, machine_line
from bench.peer_tools import TOOLS, Tool, offline_env
from bench.processes import ToolRun, become_subreaper, run_tool
from bench.servers import FastServer, ServerLog

log = logging.getLogger(__name__)

WORK = REPO / ".bench" / "work" / "peers"
CEILING_CONCURRENCY = (64, 256)
OUTPUT_TOKENS = 64
TIMING_CONCURRENCY = (1, 32, 128)
TIMING_TTFT = 0.200
TIMING_GAP = 0.020
TIMING_TOKENS = 32
PACING_RATES = (50, 200, 1000)
# Only the runner also runs these: rates near and above its own ceiling, to show where its
# achieved rate falls behind and that its summary flags those runs as client-bound.
RUNNER_ONLY_RATES = (2000, 4000)
STARTUP_REQUESTS = 10
PROFILE_CONCURRENCY = 256
SCENARIOS = ("ceiling", "timing", "pacing", "startup")


@dataclass(frozen=True)
class Sizes:
    """How many requests each scenario sends."""

    ceiling_requests: int = 2000
    timing_requests: int = 300
    # At concurrency 1 each request takes 0.82 s, so 300 requests would take 4 minutes per
    # tool. This many keep the whole benchmark within about 25 minutes.
    timing_requests_serial: int = 60
    # Seconds of arrivals per fixed rate.
    pacing_seconds: float = 5.0


FULL = Sizes()
# A run-through of every command and result reader in a few minutes; its numbers mean little.
SMOKE = Sizes(ceiling_requests=200, timing_requests=40, timing_requests_serial=5, pacing_seconds=1.0)


def _base_row(scenario: str, tool: Tool, setting: str, run: ToolRun) -> dict[str, Any]:
    machine_seconds = run.wall_seconds * (os.cpu_count() or 1)
    row = {
        "scenario": scenario, "tool": tool.name, "setting": setting, "load_before": run.load_before,
        "busy_cores_before": run.busy_before,
        "exit_code": run.exit_code, "wall_s": run.wall_seconds, "tool_cpu_s": run.tool_cpu,
        "server_cpu_s": run.server_cpu, "other_cpu_s": run.other_cpu,
        "other_cpu_pct": 100 * run.other_cpu / machine_seconds if machine_seconds else math.nan,
        "error": "",
    }
    if run.timed_out:
        row["error"] = "timed out"
    elif run.exit_code != 0:
        lines = [line for line in run.log_tail().splitlines() if line.strip()]
        row["error"] = f"exit {run.exit_code}: {lines[-1][:200] if lines else 'no output'}"
    return row


def _last(values: list[float], count: int) -> np.ndarray:
    """Return the `count` latest values; a tool's own pre-flight requests come before its run."""
    return np.sort(np.asarray(values, dtype=float))[-count:]


def _server_throughput(server_log: ServerLog, number: int) -> dict[str, Any]:
    order = np.argsort(server_log.arrival)[-number:]
    arrival = np.asarray(server_log.arrival)[order]
    last_chunk = np.asarray(server_log.last_chunk)[order]
    tokens = np.asarray(server_log.tokens)[order]
    span = last_chunk.max() - arrival.min() if len(order) else math.nan
    return {"requests": len(order), "req_per_s": len(order) / span, "tokens_per_s": tokens.sum() / span}


def _run_dir(*parts: object) -> Path:
    """Return an empty folder for one run; evalscope, for one, refuses to write over old results."""
    path = WORK.joinpath(*(str(part) for part in parts))
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def ceiling(tool: Tool, concurrency: int, sizes: Sizes, env: dict[str, str]) -> dict[str, Any]:
    work = _run_dir(tool.name, f"ceiling-c{concurrency}")
    with FastServer(work / "server.json") as server:
        command = tool.closed_loop(server.base_url, concurrency, sizes.ceiling_requests, OUTPUT_TOKENS, work / "out")
        run = run_tool(command, env=env, cwd=REPO, timeout=300, log_path=work / "tool.log")
    row = _base_row("ceiling", tool, f"c={concurrency}", run)
    assert server.log is not None
    row.update(_server_throughput(server.log, sizes.ceiling_requests))
    row["cpu_ms_per_request"] = 1000 * run.tool_cpu / max(row["requests"], 1)
    return row


def timing(tool: Tool, concurrency: int, sizes: Sizes, env: dict[str, str]) -> dict[str, Any]:
    requests = sizes.timing_requests_serial if concurrency == 1 else sizes.timing_requests
    work = _run_dir(tool.name, f"timing-c{concurrency}")
    expected = requests / concurrency * (TIMING_TTFT + TIMING_TOKENS * TIMING_GAP)
    with FastServer(work / "server.json", gap_ms=1000 * TIMING_GAP, ttft_ms=1000 * TIMING_TTFT) as server:
        command = tool.closed_loop(server.base_url, concurrency, requests, TIMING_TOKENS, work / "out")
        run = run_tool(command, env=env, cwd=REPO, timeout=120 + 3 * expected, log_path=work / "tool.log")
    row = _base_row("timing", tool, f"c={concurrency}", run)
    log = server.log
    assert log is not None
    # The latest arrivals are the run, because a tool's own pre-flight requests come first.
    order = np.argsort(log.arrival)[-requests:]
    tokens = np.asarray(log.tokens)[order]
    complete = order[tokens >= TIMING_TOKENS]
    row["requests"] = len(complete)
    if not len(complete) or row["error"]:
        return row
    server_ttft = np.asarray(log.first_token)[complete]
    arrival = np.asarray(log.arrival)[complete]
    last_chunk = np.asarray(log.last_chunk)[complete]
    # The server writes its tokens on absolute deadlines, so the mean gap is the span from
    # the first token to the last over the gaps between them.
    server_gap = (last_chunk - arrival - server_ttft) / (np.asarray(log.tokens)[complete] - 1)
    measured = tool.timing(work / "out")
    row["ttft_error_mean_ms"] = 1000 * (measured.ttft_mean - server_ttft.mean())
    row["ttft_error_p99_ms"] = 1000 * (measured.ttft_p99 - np.percentile(server_ttft, 99))
    row["itl_error_mean_ms"] = 1000 * (measured.itl_mean - server_gap.mean())
    return row


def pacing(tool: Tool, rate: float, sizes: Sizes, env: dict[str, str]) -> Optional[dict[str, Any]]:
    number = int(rate * sizes.pacing_seconds)
    work = _run_dir(tool.name, f"pacing-r{rate:g}")
    with FastServer(work / "server.json") as server:
        command = tool.fixed_rate(server.base_url, rate, number, OUTPUT_TOKENS, work / "out")
        if command is None:
            return None
        run = run_tool(command, env=env, cwd=REPO, timeout=90 + 4 * sizes.pacing_seconds, log_path=work / "tool.log")
    row = _base_row("pacing", tool, f"rate={rate:g}", run)
    assert server.log is not None
    arrival = _last(server.log.arrival, number)
    row["requests"] = len(arrival)
    row["target_rate"] = rate
    if len(arrival) > 1:
        row["achieved_rate"] = (len(arrival) - 1) / (arrival[-1] - arrival[0])
    if tool.constant_rate and len(arrival) > 1:
        # Delay of arrival i behind an even schedule i / rate anchored at its earliest point.
        behind = arrival - np.arange(len(arrival)) / rate
        late = behind - behind.min()
        row["server_lateness_p50_ms"] = 1000 * np.percentile(late, 50)
        row["server_lateness_p99_ms"] = 1000 * np.percentile(late, 99)
    if not row["error"]:
        own = tool.client_lateness(work / "out")
        if own is not None and len(own):
            row["tool_lateness_p50_ms"] = 1000 * np.percentile(own, 50)
            row["tool_lateness_p99_ms"] = 1000 * np.percentile(own, 99)
        row["client_bound"] = tool.client_bound(work / "out")
    return row


def startup(tool: Tool, env: dict[str, str]) -> dict[str, Any]:
    work = _run_dir(tool.name, "startup")
    with FastServer(work / "server.json") as server:
        command = tool.closed_loop(server.base_url, 1, STARTUP_REQUESTS, OUTPUT_TOKENS, work / "out")
        run = run_tool(command, env=env, cwd=REPO, timeout=180, log_path=work / "tool.log")
    row = _base_row("startup", tool, f"{STARTUP_REQUESTS} requests", run)
    assert server.log is not None
    row["requests"] = len(server.log.arrival)
    if server.log.arrival:
        row["first_request_s"] = min(server.log.arrival) - run.launched_at
    return row


def profile_ours(env: dict[str, str]) -> Path:
    """Run the runner under cProfile at concurrency 256 and write the top functions next to the profile."""
    work = _run_dir("profile")
    stats_path = work / "runner.prof"
    with FastServer(work / "server.json") as server:
        command = TOOLS["runner"].closed_loop(server.base_url, PROFILE_CONCURRENCY, FULL.ceiling_requests,
                                              OUTPUT_TOKENS, work / "out")
        command[1:1] = ["-m", "cProfile", "-o", str(stats_path)]
        run_tool(command, env=env, cwd=REPO, timeout=600, log_path=work / "tool.log")
    report = work / "top_functions.txt"
    # Start-up (imports, tokenizer load) is a fixed cost, so the request path is listed apart:
    # functions whose file lies in the runner, aiohttp or asyncio packages.
    script = ("import pstats, sys; s = pstats.Stats(sys.argv[1], stream=sys.stdout);"
              " s.sort_stats('tottime').print_stats(r'/(runner|aiohttp|asyncio|yarl|multidict)/', 30);"
              " s.strip_dirs(); s.sort_stats('tottime').print_stats(20); s.sort_stats('cumulative').print_stats(25)")
    with report.open("w") as out:
        subprocess.run([sys.executable, "-c", script, str(stats_path)], stdout=out, check=True, timeout=120)
    return report


DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Client performance and peers"
# A run in which other processes used more than this percent of the machine's CPU is flagged.
DISTURBED_PCT = 10.0
# (column, heading, format) per scenario table of the markdown section.
TABLES = {
    "ceiling": ("Client ceiling: zero-delay server, 2,000 requests, 64 tokens each", [
        ("req_per_s", "req/s (server)", "{:.0f}"), ("tokens_per_s", "tokens/s", "{:.0f}"),
        ("tool_cpu_s", "tool CPU s", "{:.1f}"), ("cpu_ms_per_request", "CPU ms/request", "{:.2f}"),
        ("server_cpu_s", "server CPU s", "{:.2f}")]),
    "timing": ("Timing accuracy: error against the server's log (TTFT 200 ms, 32 tokens 20 ms apart)", [
        ("requests", "requests", "{:.0f}"), ("ttft_error_mean_ms", "TTFT error mean ms", "{:+.2f}"),
        ("ttft_error_p99_ms", "TTFT error p99 ms", "{:+.2f}"), ("itl_error_mean_ms", "token-gap error mean ms", "{:+.3f}"),
        ("tool_cpu_s", "tool CPU s", "{:.1f}")]),
    "pacing": ("Open-loop pacing: fixed rate for 5 s against the zero-delay server", [
        ("achieved_rate", "achieved req/s (server)", "{:.0f}"),
        ("server_lateness_p50_ms", "lateness p50 ms (server)", "{:.1f}"),
        ("server_lateness_p99_ms", "lateness p99 ms (server)", "{:.1f}"),
        ("tool_lateness_p50_ms", "lateness p50 ms (tool)", "{:.1f}"),
        ("tool_lateness_p99_ms", "lateness p99 ms (tool)", "{:.1f}"),
        ("client_bound", "flagged client-bound", "{}"), ("tool_cpu_s", "tool CPU s", "{:.1f}")]),
    "startup": ("Fixed start-up cost: 10 requests at concurrency 1", [
        ("first_request_s", "launch to first request s", "{:.1f}"), ("tool_cpu_s", "total CPU s", "{:.1f}"),
        ("wall_s", "wall s", "{:.1f}")]),
}


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return spec.format(value) if isinstance(value, (int, float, np.number)) else str(value)


def _markdown_table(frame: pd.DataFrame, columns: list[tuple[str, str, str]]) -> list[str]:
    columns = [("tool", "tool", "{}"), ("setting", "setting", "{}"), *columns,
               ("load_before", "load before", "{:.2f}"), ("other_cpu_pct", "others %", "{:.0f}")]
    lines = ["| " + " | ".join(heading for _, heading, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for _, row in frame.iterrows():
        cells = [_cell(row.get(name), spec) for name, _, spec in columns]
        if row.get("error"):
            cells[1] += f" (failed: {row['error']})"
        elif row.get("other_cpu_pct", 0) > DISTURBED_PCT:
            cells[-1] += " ⚠"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def section_text(table: pd.DataFrame, header: str, versions: dict[str, str]) -> str:
    """Render the results as the markdown section that docs/benchmarks.md keeps."""
    version_text = ", ".join(f"{name} {version}" for name, version in versions.items())
    lines = [
        SECTION, "",
        f"`python -m bench.run peers` (bench/peers.py), run on {header}. Versions: {version_text}.",
        "",
        "Each tool runs alone, as its users run it, against servers on 127.0.0.1 that log every "
        "request (bench/servers.py). Requests/s is the server's count over its first arrival to "
        "its last chunk, so each tool's start-up is left out. CPU is user + system time of the "
        "tool's whole process tree. *Load before* is the 1-minute load average right before the "
        f"run; *others %* is the share of the machine's {os.cpu_count()} cores that other processes "
        f"used during it (from /proc/stat), and ⚠ marks runs above {DISTURBED_PCT:.0f} %, whose "
        "numbers are likely disturbed. Timing errors are the tool's own statistic minus the "
        "server log's, whose TTFT starts at the kernel's receive time of the request. Pacing lateness (server) is each arrival's delay behind an even schedule "
        "and is left out for evalscope, whose `--rate` draws Poisson gaps; lateness (tool) is "
        "what the tool itself recorded between scheduling and sending.", "",
    ]
    for scenario, (title, columns) in TABLES.items():
        frame = table[table.get("scenario") == scenario] if "scenario" in table else table.iloc[0:0]
        if frame.empty:
            continue
        lines += [f"### {title}", "", *_markdown_table(frame, columns), ""]
    failed = table[table["scenario"].isna()] if "scenario" in table else table
    for _, row in failed.iterrows():
        lines.append(f"- {row['tool']} failed before its results were read: {row['error']}")
    return "\n".join(lines).rstrip() + "\n"


def replace_section(document: str, section: str) -> str:
    """Return `document` with its SECTION replaced by `section` (appended if absent); other sections stay."""
    lines = document.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        return document.rstrip() + "\n\n" + section if document.strip() else "# Benchmarks\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


def write_results(table: pd.DataFrame, *, header: str, versions: dict[str, str], smoke: bool = False) -> None:
    """Write bench/results/peers.csv and the section of docs/benchmarks.md (a smoke run: peers-smoke.csv only)."""
    table = table.copy()
    table.insert(0, "machine", header)
    table.to_csv(RESULTS / ("peers-smoke.csv" if smoke else "peers.csv"), index=False, float_format="%.4g")
    section = section_text(table, header, versions)
    if smoke:
        print(section)
        return
    document = DOC.read_text() if DOC.exists() else ""
    DOC.write_text(replace_section(document, section))
    print(section)


def _plan(tools: list[Tool], scenarios: list[str], sizes: Sizes) -> list[tuple[Tool, Callable[[], Optional[dict[str, Any]]]]]:
    steps: list[tuple[Tool, Callable[[], Optional[dict[str, Any]]]]] = []
    env = offline_env(REPO / ".bench" / "hf_home")
    for tool in tools:
        if "startup" in scenarios:
            steps.append((tool, lambda tool=tool: startup(tool, env)))
        if "ceiling" in scenarios:
            steps += [(tool, lambda tool=tool, c=c: ceiling(tool, c, sizes, env)) for c in CEILING_CONCURRENCY]
        if "timing" in scenarios:
            steps += [(tool, lambda tool=tool, c=c: timing(tool, c, sizes, env)) for c in TIMING_CONCURRENCY]
        if "pacing" in scenarios:
            rates = PACING_RATES + (RUNNER_ONLY_RATES if tool.name == "runner" else ())
            steps += [(tool, lambda tool=tool, r=r: pacing(tool, r, sizes, env)) for r in rates]
    return steps


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", nargs="+", choices=list(TOOLS), default=list(TOOLS), help="tools to run")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--smoke", action="store_true",
                        help="few requests per run, to check every command and reader; writes peers-smoke.csv only")
    parser.add_argument("--profile", action="store_true",
                        help=f"only profile the runner with cProfile at concurrency {PROFILE_CONCURRENCY}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    become_subreaper()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)

    if args.profile:
        env = offline_env(REPO / ".bench" / "hf_home")
        report = profile_ours(env)
        print(report.read_text())
        print(f"profile written to {report.parent}")
        return 0

    tools = [TOOLS[name] for name in args.tools]
    for tool in tools:
        if not tool.installed():
            log.info("installing %s into %s", tool.name, tool.venv)
            started = time.monotonic()
            tool.install()
            log.info("installed %s in %.0f s", tool.name, time.monotonic() - started)

    header = machine_line()
    versions = {tool.name: tool.version() for tool in tools}
    rows = []
    for tool, step in _plan(tools, args.scenarios, SMOKE if args.smoke else FULL):
        started = time.monotonic()
        try:
            row = step()
        except Exception as exc:  # one failed run must not lose the others' results
            log.exception("%s failed", tool.name)
            row = {"tool": tool.name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        if row is None:
            continue
        row["version"] = versions[tool.name]
        rows.append(row)
        log.info("%s %s %s: %.0f s %s", row.get("scenario"), tool.name, row.get("setting"),
                 time.monotonic() - started, row.get("error") or "")
    table = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results(table, header=header, versions=versions, smoke=args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
