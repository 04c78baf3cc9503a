"""Distance of the self-calibrated client ceiling from the ceiling the peer benchmark measures, and its cost.

Ceiling: each run is ``python -m runner`` as ``bench.peers`` runs it for its ceiling rows
(2,000 requests of 100 prompt tokens and 64 output tokens, closed loop, against the
zero-delay ``bench.servers`` server), plus ``load.calibrate=true``. One run gives both
numbers: the calibrated req/s from its manifest.json (measured against the null server
before the load), and the server-log req/s of the load itself (first arrival to last
chunk, as in ``bench.peers``). Concurrencies 64 and 256 alternate, repeat after repeat.

Cost: a 10-request run at concurrency 1 with ``load.calibrate=false``, ``auto`` (which
skips a run this small) and ``true``, interleaved. Each row gives the wall and CPU seconds
of the whole process.

Writes bench/results/calibration.csv and prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Optional

import pandas as pd

from bench.common import REPO, RESULTS, machine_line
from bench.peer_tools import TOOLS, offline_env
from bench.peers import FULL, OUTPUT_TOKENS, WORK, _server_throughput
from bench.processes import become_subreaper, run_tool
from bench.servers import FastServer

CONCURRENCY = (64, 256)
REPEATS = 3
COST_MODES = ("false", "auto", "true")
COST_REQUESTS = 10


def _work(name: str):
    path = WORK.parent / "calibration" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _command(base_url: str, concurrency: int, number: int, out, calibrate: str) -> list[str]:
    command = TOOLS["runner"].closed_loop(base_url, concurrency, number, OUTPUT_TOKENS, out)
    # bench.peers turns calibration off for the peer comparison, so this benchmark sets it again.
    return [part for part in command if not part.startswith("load.calibrate=")] + [f"load.calibrate={calibrate}"]


def ceiling_run(concurrency: int, repeat: int, env: dict[str, str]) -> dict[str, Any]:
    work = _work(f"ceiling-c{concurrency}-r{repeat}")
    out = work / "out"
    with FastServer(work / "server.json") as server:
        command = _command(server.base_url, concurrency, FULL.ceiling_requests, out, "true")
        run = run_tool(command, env=env, cwd=REPO, timeout=300, log_path=work / "tool.log")
    row: dict[str, Any] = {"scenario": "ceiling", "setting": f"c={concurrency}", "repeat": repeat,
                           "exit_code": run.exit_code, "load_before": run.load_before, "wall_s": run.wall_seconds,
                           "tool_cpu_s": run.tool_cpu}
    if run.exit_code != 0:
        row["error"] = run.log_tail()[-300:]
        return row
    assert server.log is not None
    measured = _server_throughput(server.log, FULL.ceiling_requests)
    calibration = json.loads((out / "manifest.json").read_text())["calibration"]
    row |= {"bench_req_per_s": measured["req_per_s"], "bench_tokens_per_s": measured["tokens_per_s"],
            "calibrated_req_per_s": calibration.get("rps"), "calibrated_tokens_per_s": calibration.get("tps"),
            "calibration_cpu_ms_per_request": calibration.get("cpu_ms_per_request"),
            "calibration_loop_lag_p99_ms": calibration.get("loop_lag_p99_ms"),
            "calibration_startup_s": calibration.get("startup_seconds"),
            "calibration_total_s": calibration.get("total_seconds"),
            "null_server_busy_share": (calibration.get("server") or {}).get("busy_share")}
    if row["calibrated_req_per_s"]:
        row["ratio"] = row["calibrated_req_per_s"] / row["bench_req_per_s"]
    return row


def cost_run(mode: str, repeat: int, env: dict[str, str]) -> dict[str, Any]:
    work = _work(f"cost-{mode}-r{repeat}")
    with FastServer(work / "server.json") as server:
        command = _command(server.base_url, 1, COST_REQUESTS, work / "out", mode)
        run = run_tool(command, env=env, cwd=REPO, timeout=180, log_path=work / "tool.log")
    return {"scenario": "cost", "setting": f"load.calibrate={mode}", "repeat": repeat, "exit_code": run.exit_code,
            "load_before": run.load_before, "wall_s": run.wall_seconds, "tool_cpu_s": run.tool_cpu}


def _mean(frame: pd.DataFrame, column: str) -> float:
    values = frame[column].dropna() if column in frame else pd.Series(dtype=float)
    return float(values.mean()) if len(values) else math.nan


def _range(frame: pd.DataFrame, column: str, spec: str) -> str:
    values = frame[column].dropna() if column in frame else pd.Series(dtype=float)
    if not len(values):
        return "–"
    low, high = spec.format(values.min()), spec.format(values.max())
    return low if low == high else f"{low}–{high}"


def markdown(table: pd.DataFrame) -> str:
    lines = ["| setting | runs | calibrated req/s | bench req/s | calibrated / bench | calibration s (start-up) "
             "| load before |", "|---|---|---|---|---|---|---|"]
    for setting, frame in table[table["scenario"] == "ceiling"].groupby("setting", sort=False):
        lines.append(
            f"| {setting} | {len(frame)} | {_range(frame, 'calibrated_req_per_s', '{:.0f}')} "
            f"| {_range(frame, 'bench_req_per_s', '{:.0f}')} | {_range(frame, 'ratio', '{:.2f}')} "
            f"(mean {_mean(frame, 'ratio'):.2f}) | {_range(frame, 'calibration_total_s', '{:.2f}')} "
            f"({_range(frame, 'calibration_startup_s', '{:.2f}')}) | {_range(frame, 'load_before', '{:.2f}')} |")
    lines += ["", "| setting | runs | wall s | CPU s | load before |", "|---|---|---|---|---|"]
    for setting, frame in table[table["scenario"] == "cost"].groupby("setting", sort=False):
        lines.append(f"| {setting} | {len(frame)} | {_range(frame, 'wall_s', '{:.2f}')} (mean {_mean(frame, 'wall_s'):.2f}) "
                     f"| {_range(frame, 'tool_cpu_s', '{:.2f}')} (mean {_mean(frame, 'tool_cpu_s'):.2f}) "
                     f"| {_range(frame, 'load_before', '{:.2f}')} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS, help="runs of each setting, interleaved")
    args = parser.parse_args(argv)
    become_subreaper()
    env = offline_env(_work("hf"))
    header = machine_line()
    rows = []
    for repeat in range(args.repeats):
        for concurrency in CONCURRENCY:
            rows.append(ceiling_run(concurrency, repeat, env))
            print(rows[-1], flush=True)
        for mode in COST_MODES:
            rows.append(cost_run(mode, repeat, env))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table.insert(0, "machine", header)
    table.to_csv(RESULTS / "calibration.csv", index=False, float_format="%.4g")
    print(f"\n`python -m bench.calibration`, {header}\n")
    print(markdown(table))
    return 0 if (table["exit_code"] == 0).all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
