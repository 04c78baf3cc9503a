"""Client self-calibration: how many requests/s this client can drive for the configured request shape.

Before a long run (an SLA tune, or a plain run of at least ``load.calibrate_min_requests``
requests) the runner starts the null server (``runner.nullserver``) in a child process on
127.0.0.1 and sends it a closed-loop load for ``load.calibrate_seconds``. The load uses the
run's own prompts, request settings and concurrency, and goes through the same client, load
loop and per-request bookkeeping as the run. The null server responds at once, so the client
is the bottleneck and the completed requests/s is the client's ceiling for this shape.

During the run, a load point whose request rate exceeds ``load.max_ceiling_fraction`` of
that ceiling is marked client-bound (``ceiling_note``): in open loop the target rate counts,
in closed loop the measured rps.

NOTE: the null server writes each response in one piece, so the client reads every token
of it in one or two network reads. A real server sends each token chunk in its own packet,
which costs the client more reads per request, so the ceiling measured here is an upper bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from runner.client.finalize import BatchFinalizer
from runner.client.openai import OpenAIClient
from runner.client.record import Prompt, RequestRecord
from runner.client.response import one_line
from runner.config import RunConfig, SearchVariable
from runner.errors import RunnerError
from runner.gc_pause import setup_objects_frozen
from runner.load import LoadOutcome, LoadPlan, run_load
from runner.nullserver import NullServer
from runner.output import RequestsWriter, record_row
from runner.samples import PointSamples

log = logging.getLogger(__name__)

# Concurrency of the calibration when the run sets no cap on requests in flight (open loop).
UNCAPPED_PARALLEL = 256
# The first quarter of the calibration (opening connections, first requests) is left out.
RAMP_FRACTION = 0.25
# Bound on the calibration's request count, per second of calibration. It is far above the
# ceiling of any single event loop, so the time limit ends the load first.
MAX_REQUESTS_PER_SECOND = 50_000
# Seconds the calibration may overrun load.calibrate_seconds before it is abandoned.
# Worker processes get more, because spawning them takes seconds.
OVERRUN_SECONDS = 15.0
WORKER_OVERRUN_SECONDS = 75.0
# Share of one core above which the null server itself may have limited the calibration.
SERVER_BUSY_SHARE = 0.8


@dataclass(frozen=True)
class Ceiling:
    """The client's measured ceiling against the null server."""

    # Completed requests and output tokens per second.
    rps: float
    tps: float
    # Concurrency it was measured at.
    parallel: int


def ceiling_note(ceiling: Optional[Ceiling], fraction: float, offered_rps: float) -> str:
    """Return why ``offered_rps`` is client-bound under ``ceiling``, or "" when it is not.

    ``offered_rps`` is the target rate of an open-loop load point or the measured rps of a
    closed-loop one. It is client-bound when it exceeds ``fraction`` of the ceiling's rps.
    """
    if ceiling is None or not offered_rps > fraction * ceiling.rps:
        return ""
    share = 100 * offered_rps / ceiling.rps
    return (f"{offered_rps:.4g} req/s is {share:.0f}% of the client's calibrated ceiling of {ceiling.rps:.4g} "
            f"req/s, above load.max_ceiling_fraction={fraction:g}")


@dataclass
class Calibration:
    """Outcome of the calibration step, as written to manifest.json under ``calibration``."""

    # "measured", "skipped" or "failed".
    status: str
    # Why it was skipped or failed (empty when measured).
    reason: str = ""
    ceiling: Optional[Ceiling] = None
    # Measured details: window, CPU per request, loop lag, null-server report, costs.
    details: dict[str, Any] = field(default_factory=dict)

    def to_manifest(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"status": self.status}
        if self.reason:
            entry["reason"] = self.reason
        if self.ceiling is not None:
            entry |= {"rps": round(self.ceiling.rps, 3), "tps": round(self.ceiling.tps, 3),
                      "parallel": self.ceiling.parallel}
        return entry | self.details


def calibration_decision(config: RunConfig) -> tuple[bool, str]:
    """Return whether this run calibrates, and the reason when it does not."""
    load = config.load
    if load.calibrate == "false":
        return False, "load.calibrate=false"
    if load.uses_ray:
        # Ray actors may run on other nodes, where the null server on 127.0.0.1 is out of reach.
        return False, "load.backend=ray sends from Ray actors, which calibration does not cover"
    if load.calibrate == "true" or config.sla is not None:
        return True, ""
    planned = load.warmup + load.number
    if planned >= load.calibrate_min_requests:
        return True, ""
    return False, (f"load.calibrate=auto skips plain runs of fewer than load.calibrate_min_requests="
                   f"{load.calibrate_min_requests} requests (this one has {planned})")


def calibration_parallel(config: RunConfig) -> int:
    """Return the concurrency to calibrate at: the highest number of requests the run keeps in flight."""
    load, search = config.load, config.search
    if config.sla is not None and search.variable is SearchVariable.parallel:
        return int(search.upper_bound)
    if config.sla is not None:
        return search.rate_parallel_cap or UNCAPPED_PARALLEL
    return load.parallel or UNCAPPED_PARALLEL


async def calibrate(config: RunConfig, prompts: Sequence[Prompt], count_tokens: Optional[Callable[[str], int]],
                    client_args: Any = None) -> Calibration:
    """Measure the client's ceiling for this run's request shape, or return why it was skipped.

    ``client_args`` (``runner.workers.ClientArgs``) is needed only with load.workers > 1,
    which sends the calibration load from that many worker processes like the run. A
    calibration that fails is logged as a warning and the run goes on without a ceiling.
    """
    enabled, reason = calibration_decision(config)
    if not enabled:
        log.info("client calibration skipped: %s", reason)
        return Calibration("skipped", reason)
    parallel = calibration_parallel(config)
    seconds = config.load.calibrate_seconds
    # Worker processes are spawned only as the run does it (load.workers > 1, with client_args).
    workers = (config.load.workers or 1) if client_args is not None else 1
    started = time.perf_counter()
    try:
        overrun = WORKER_OVERRUN_SECONDS if workers > 1 else OVERRUN_SECONDS
        async with NullServer(max_seconds=seconds + overrun + 5) as server:
            server_started = time.perf_counter()
            # Set-up objects are frozen for the garbage collector as during the run's load, so both
            # pay the same collection cost.
            with setup_objects_frozen():
                async with asyncio.timeout(seconds + overrun):
                    details, load_started = await _measure(config, prompts, count_tokens, server.base_url,
                                                           parallel, workers, client_args)
            server_stopping = time.perf_counter()
    except (OSError, RuntimeError, TimeoutError, RunnerError) as exc:
        reason = one_line(f"{type(exc).__name__}: {exc}") if str(exc) else type(exc).__name__
        log.warning("client calibration failed: %s; the run goes on without a client ceiling", reason)
        return Calibration("failed", reason, details={"total_seconds": round(time.perf_counter() - started, 3)})

    details |= _server_details(server.report, server_stopping - server_started, load_started)
    details["startup_seconds"] = round(server_started - started, 3)
    details["total_seconds"] = round(time.perf_counter() - started, 3)
    if not details["requests"]:
        reason = f"no request succeeded within the measured window ({details.get('first_error') or 'none ended'})"
        log.warning("client calibration failed: %s; the run goes on without a client ceiling", reason)
        return Calibration("failed", reason, details=details)

    window = details["window_seconds"]
    ceiling = Ceiling(rps=details["requests"] / window, tps=details["tokens"] / window, parallel=parallel)
    _log_ceiling(ceiling, details, config.load.max_ceiling_fraction)
    return Calibration("measured", ceiling=ceiling, details=details)


async def _measure(config: RunConfig, prompts: Sequence[Prompt], count_tokens: Optional[Callable[[str], int]],
                   base_url: str, parallel: int, workers: int, client_args: Any) -> tuple[dict[str, Any], float]:
    """Send the calibration load to ``base_url``; return what it measured and when the load started."""
    seconds = config.load.calibrate_seconds
    plan = LoadPlan(parallel=parallel, rate=None, number=math.ceil(seconds * MAX_REQUESTS_PER_SECOND),
                    duration=seconds, seed=config.load.seed)
    ended: list[float] = []
    tokens: list[int] = []
    failures: list[str] = []
    # The rows are kept and formatted like the run's, but written to the null device.
    samples = PointSamples()
    writer = RequestsWriter(Path(os.devnull))

    def on_final(record: RequestRecord, itl: list[float]) -> None:
        # The same per-request work as the run's prober.
        row = record_row(record, itl, origin=0.0, variable="calibration", value=parallel, repeat=0)
        samples.add(row)
        writer.add(row)
        if record.success and record.ended_at is not None:
            ended.append(record.ended_at)
            tokens.append(record.completion_tokens or 0)
        else:
            failures.append(record.error)

    # The key itself is not needed by the null server, so it stays out of these requests.
    endpoint = dataclasses.replace(config.endpoint, api_key_env=None)
    finalizer = BatchFinalizer(count_tokens, on_final)
    try:
        outcome, cpu_seconds = await _send(config, plan, endpoint, base_url, workers, client_args, prompts,
                                           finalizer.add, count_tokens is not None)
        await finalizer.drain()
    finally:
        finalizer.drain_now()
        finalizer.close()
        writer.close()

    order = np.argsort(ended)
    ends = np.asarray(ended)[order]
    window_from, window_to = measured_window(ends, outcome.started_at, seconds, parallel)
    inside = (ends > window_from) & (ends <= window_to)
    count = int(inside.sum())
    details = {
        "seconds": seconds,
        "workers": workers,
        "window_seconds": round(window_to - window_from, 6),
        "requests": count,
        "tokens": int(np.asarray(tokens)[order][inside].sum()) if count else 0,
        "requests_ended": len(ended) + len(failures),
        "failures": len(failures),
        "first_error": failures[0] if failures else "",
        # Over the whole calibration, opening the connections included.
        "cpu_ms_per_request": round(1000 * cpu_seconds / len(ended), 4) if ended and cpu_seconds is not None else None,
        "loop_lag_p99_ms": round(1000 * float(np.percentile(outcome.loop_lag, 99)), 3) if outcome.loop_lag else None,
    }
    return details, outcome.started_at


async def _send(config: RunConfig, plan: LoadPlan, endpoint: Any, base_url: str, workers: int, client_args: Any,
                prompts: Sequence[Prompt], on_record: Callable[[RequestRecord], None], count_tokens: bool,
                ) -> tuple[LoadOutcome, Optional[float]]:
    """Send ``plan`` as the run would; return the load outcome and this process's CPU seconds for it."""
    if workers > 1:
        from runner.tokenizer import WorkerTokenCounter, load_tokenizer
        from runner.workers import run_load_in_workers

        args = dataclasses.replace(client_args, endpoint=endpoint, base_url=base_url, pool_size=plan.parallel)
        # As in the run, the workers count output tokens, with the tokenizer this process uses.
        spec = config.model.tokenizer
        tokenizer = WorkerTokenCounter(load_tokenizer(spec), spec) if count_tokens else None
        # NOTE: the CPU time is spent in the worker processes, which this process does not see.
        outcome = await run_load_in_workers(plan, workers, args, list(prompts), on_record, keep_records=False,
                                            tokenizer=tokenizer)
        return outcome, None
    async with OpenAIClient(endpoint, config.model, config.request, base_url=base_url,
                            pool_size=plan.parallel) as client:
        cpu_before = time.process_time()
        outcome = await run_load(plan, client, prompts, on_record, keep_records=False)
        return outcome, time.process_time() - cpu_before


def measured_window(ends: np.ndarray, started_at: float, seconds: float, parallel: int) -> tuple[float, float]:
    """Return the (start, end] perf_counter span whose completions measure the ceiling.

    ``ends`` are the sorted end times of the successful requests of a load that started at
    ``started_at`` and sent new requests for ``seconds``. The span ends when sending stopped,
    because after that fewer and fewer requests are in flight. It starts once the ramp (the
    first RAMP_FRACTION of the time) is over and every slot has completed a request, so
    opening the connections is left out. When that leaves less than half the time (a client
    too slow to complete ``parallel`` requests early), the span is from the first end to the
    last, which includes the ramp and so underestimates the ceiling.
    """
    deadline = started_at + seconds
    first_wave = float(ends[parallel - 1]) if len(ends) >= parallel else math.inf
    start = max(started_at + RAMP_FRACTION * seconds, first_wave)
    if deadline - start >= 0.5 * seconds:
        return start, deadline
    if len(ends) >= 2:
        return float(ends[0]), float(ends[-1])
    return started_at, deadline


def _server_details(report: Optional[dict[str, Any]], lifetime: float, load_started: float) -> dict[str, Any]:
    """Summarize the null server's report: what it was sent, when, and how busy it was."""
    if report is None:
        return {"server": None}
    body = report.get("first_body") or {}
    busy = report["cpu_seconds"] / lifetime if lifetime > 0 else math.nan
    last = report.get("last_request_at")
    details = {
        "server": {"requests": report["requests"], "paths": report["paths"], "max_tokens": report["max_tokens"],
                   "cpu_seconds": round(report["cpu_seconds"], 3), "busy_share": round(busy, 3),
                   # Seconds from the start of the load to the last request the server read.
                   "last_request_seconds": None if last is None else round(last - load_started, 4)},
        # The request fields the client sent, without the prompt text: the shape that was calibrated.
        "request_fields": sorted(body),
    }
    if busy > SERVER_BUSY_SHARE:
        log.warning("the null server was busy %.0f%% of one core during calibration, so the client ceiling "
                    "may be the server's; treat it as a lower bound", 100 * busy)
    return details


def _log_ceiling(ceiling: Ceiling, details: dict[str, Any], fraction: float) -> None:
    cpu = details["cpu_ms_per_request"]
    lag = details["loop_lag_p99_ms"]
    log.info(
        "client ceiling for this request shape: ~%.0f req/s, %.0f tokens/s (null server, concurrency %d, %g s%s%s; "
        "start-up %.2f s, total %.2f s); load points above %.0f%% of it are marked client-bound",
        ceiling.rps, ceiling.tps, ceiling.parallel, details["seconds"],
        f", {cpu:.2f} ms CPU per request" if cpu is not None else "",
        f", event-loop lag p99 {lag:.1f} ms" if lag is not None else "",
        details["startup_seconds"], details["total_seconds"], 100 * fraction,
    )
