"""Measure load points: repeats of load, streamed to requests.csv and cached for the SLA search.

Each finished repeat also gets one line in ``probes.jsonl`` (value, repeat, number of
requests, start and end), so ``python -m runner.resume`` can tell finished repeats from
one cut by an interruption.

The samples of each load point (``runner.samples``) spill to scratch files in the run
folder's ``.samples`` folder, which ``remove_scratch`` deletes once the reports are written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, TextIO

import numpy as np
import pandas as pd

from runner.calibrate import Ceiling, ceiling_note
from runner.client.finalize import BatchFinalizer
from runner.client.openai import OpenAIClient
from runner.config import RunConfig, SearchVariable
from runner.load import LoadPlan, WorkerStats, run_load
from runner.workers import ClientArgs, run_load_in_workers, workers_for
from runner.manifest import now_iso
from runner.output import RequestsWriter, record_row
from runner.preflight import FailureGuard
from runner.samples import PointSamples
from runner.spill import SpilledSeries, percentiles
from runner.tokenizer import WorkerTokenCounter, load_tokenizer

log = logging.getLogger(__name__)

PROBES_FILE = "probes.jsonl"
# Folder of the run folder that contains the load points' scratch files while the run lasts.
SCRATCH_DIR = ".samples"


def write_probe_line(handle: TextIO, line: dict[str, Any], loop_lag: SpilledSeries, lag_start: int) -> None:
    """Write ``line`` as JSON with a last key ``loop_lag``: the lag samples from ``lag_start`` on.

    The samples (seconds, rounded to the microsecond) let a resumed run judge
    client-boundness as the interrupted one did. A long repeat has 100 of them a second, so
    they are written one block at a time. The text equals ``json.dumps`` of the whole line.
    """
    handle.write(json.dumps(line)[:-1] + ', "loop_lag": [')
    separator = ""
    for block in loop_lag.blocks(lag_start):
        text = json.dumps([round(sample, 6) for sample in block.tolist()])[1:-1]
        if text:
            handle.write(separator + text)
            separator = ", "
    handle.write("]}\n")


def worker_row(worker: int, stats: WorkerStats) -> dict[str, Any]:
    """Summarize one load worker's repeat: lateness and lag in seconds, CPU in percent of one core."""

    def percentile(samples: list[float], q: float) -> Optional[float]:
        return round(float(np.percentile(samples, q)), 6) if len(samples) else None

    cpu = 100 * stats.cpu_seconds / stats.wall_seconds if stats.wall_seconds > 0 else None
    return {
        "worker": worker, "requests": stats.requests,
        "lateness_p50": percentile(stats.lateness, 50), "lateness_p99": percentile(stats.lateness, 99),
        "loop_lag_p99": percentile(stats.loop_lag, 99),
        "cpu_percent": None if cpu is None else round(cpu, 1),
    }


def _ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.2f} ms"


def repeat_seed(seed: int, value: float, repeat: int) -> int:
    """Return the arrival-schedule seed of one repeat of an SLA probe, drawn from (seed, value, repeat).

    Runs with different ``load.seed`` values share no schedule. Probes at different load
    values get independent schedules, so one unusually bursty schedule cannot make all the
    probes near a threshold fail (or pass) together.
    """
    return random.Random(f"{seed}/{value:g}/{repeat}").getrandbits(63)


def probe_plan(config: RunConfig, value: float, repeat: int, first_id: int = 0) -> LoadPlan:
    """Return the load plan of one repeat at ``value``: a plain run without SLA rules, or a probe."""
    load, search = config.load, config.search
    if config.sla is None:
        return LoadPlan(parallel=load.parallel, rate=load.rate, number=load.number, warmup=load.warmup,
                        arrival=load.arrival, burstiness=load.burstiness, duration=load.duration,
                        seed=load.seed + repeat, first_id=first_id)
    seed = repeat_seed(load.seed, value, repeat)
    if search.variable is SearchVariable.parallel:
        target_requests = search.requests_per_unit * value
    else:
        target_requests = search.rate_repeat_seconds * value
    number = int(min(max(search.min_requests, math.ceil(target_requests)), search.max_requests))
    if search.variable is SearchVariable.parallel:
        # Warmup fills every slot once, so measured requests start on a busy server.
        return LoadPlan(parallel=int(value), rate=None, number=number, warmup=max(load.warmup, int(value)),
                        duration=load.duration, seed=seed, first_id=first_id)
    cap = search.rate_parallel_cap
    return LoadPlan(parallel=cap, rate=value, number=number, warmup=max(load.warmup, math.ceil(value)),
                    arrival=load.arrival, burstiness=load.burstiness, duration=load.duration,
                    seed=seed, first_id=first_id)


class LoadPointProber:
    """Measures load points, keeps every repeat, and pools repeats into one summary row.

    Each (value, repeat) is measured once and cached, so the SLA search can ask for a point
    again, or for more repeats of it, without sending the same load twice.
    """

    def __init__(
        self,
        config: RunConfig,
        client: OpenAIClient,
        prompts: list,
        writer: RequestsWriter,
        count_tokens: Any,
        progress: Any,
        origin: float,
        probes_path: Optional[Path] = None,
        client_args: Optional[ClientArgs] = None,
        scratch_dir: Optional[Path] = None,
        ceiling: Optional[Ceiling] = None,
    ) -> None:
        self.config = config
        self.client = client
        self.prompts = prompts
        self.writer = writer
        self.count_tokens = count_tokens
        self.progress = progress
        self.origin = origin
        self.probes_path = probes_path
        # Settings from which worker processes build their own clients (load.workers > 1).
        self.client_args = client_args
        # Without a scratch folder every sample stays in memory.
        self.scratch_dir = scratch_dir
        if scratch_dir is not None:
            shutil.rmtree(scratch_dir, ignore_errors=True)  # left by a run that was killed
        # The client's calibrated ceiling (runner.calibrate); None when it was not measured.
        self.ceiling = ceiling
        self.samples: dict[float, PointSamples] = {}
        self.repeats: dict[float, int] = {}
        self.next_id = 0
        self.guard = FailureGuard()
        self._worker_counter: Optional[WorkerTokenCounter] = None

    @property
    def variable(self) -> str:
        if self.config.sla is not None:
            return self.config.search.variable.value
        return "rate" if self.config.load.open_loop else "parallel"

    def restore(self, value: float, repeats: int, rows: Iterable[Mapping[str, Any]], loop_lag: Iterable[float],
                next_id: int) -> None:
        """Load repeats measured by an earlier, interrupted run of the same config."""
        samples = self.point(value)
        samples.extend(rows)
        samples.loop_lag.extend(loop_lag)
        samples.spill()
        self.repeats[value] = repeats
        self.next_id = max(self.next_id, next_id)
        self.guard.disarm()  # the earlier run already showed that the server responds

    def point(self, value: float) -> PointSamples:
        """Return the samples of ``value``, created empty on first use."""
        samples = self.samples.get(value)
        if samples is None:
            directory = None if self.scratch_dir is None else self.scratch_dir / f"point-{len(self.samples)}"
            samples = self.samples[value] = PointSamples(directory)
        return samples

    def remove_scratch(self) -> None:
        """Delete the scratch files of every load point; summaries cannot be computed afterwards."""
        if self.scratch_dir is not None:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)

    def plan_for(self, value: float, repeat: int) -> LoadPlan:
        return probe_plan(self.config, value, repeat, first_id=self.next_id)

    async def measure_repeat(self, value: float, repeat: int) -> None:
        plan = self.plan_for(value, repeat)
        self.next_id += plan.total
        label = f"{self.variable} {value:g} run {repeat + 1}"
        task = self.progress.add_task(label, total=plan.total, status="")
        samples = self.point(value)
        lag_start = len(samples.loop_lag)
        started_at = now_iso()
        recorded = 0

        def on_final(record: Any, itl: list[float]) -> None:
            nonlocal recorded
            row = record_row(record, itl, origin=self.origin, variable=self.variable, value=value, repeat=repeat)
            samples.add(row)
            self.writer.add(row)
            recorded += 1
            # Cooldown requests take ids past plan.total; the next repeat starts after them.
            self.next_id = max(self.next_id, record.request_id + 1)
            self.progress.advance(task)

        finalizer = BatchFinalizer(self.count_tokens, on_final)

        def on_record(record: Any) -> None:
            # The guard checks each record as it ends, because a success may wait for its
            # token count, and the failures after it must not look like a run where all failed.
            if self.guard.observe(record) and not load.done():
                load.cancel()  # every request so far failed, so stop before sending more
            finalizer.add(record)
        workers = workers_for(self.config.load, plan)
        if self.client_args is not None and (workers > 1 or self.config.load.uses_ray):
            coroutine = run_load_in_workers(plan, workers, self.client_args, self.prompts, on_record,
                                            keep_records=False, tokenizer=self._worker_tokenizer(),
                                            backend=self.config.load.backend, ray_address=self.config.load.ray_address)
        else:
            coroutine = run_load(plan, self.client, self.prompts, on_record, keep_records=False,
                                 lag_samples=samples.loop_lag)
        load = asyncio.create_task(coroutine)
        try:
            outcome = await load
            await finalizer.drain()
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.guard.error is not None and current is not None and not current.cancelling():
                raise self.guard.error from None
            raise
        finally:
            # Records still being counted are written too, so an interrupted run keeps them.
            finalizer.drain_now()
            finalizer.close()
            self.writer.flush()
            # Cached points keep nothing in memory between repeats.
            samples.spill()
        self.guard.end_of_repeat()
        samples.loop_lag.extend(outcome.loop_lag)  # filled by worker processes only
        self.repeats[value] = repeat + 1
        self.progress.remove_task(task)
        worker_rows = [worker_row(number, stats) for number, stats in enumerate(outcome.workers)]
        for row in worker_rows:
            log.info("%s %g run %d, load worker %d: %d requests, lateness p50 %s, p99 %s, event-loop lag p99 %s, "
                     "CPU %s %% of a core", self.variable, value, repeat + 1, row["worker"], row["requests"],
                     _ms(row["lateness_p50"]), _ms(row["lateness_p99"]), _ms(row["loop_lag_p99"]), row["cpu_percent"])
        self._write_probe_line(value, repeat, plan, recorded, started_at, lag_start, worker_rows)

    def _worker_tokenizer(self) -> Optional[WorkerTokenCounter]:
        """Return the tokenizer that workers count output tokens with, the same as this process's."""
        if self.count_tokens is None:
            return None
        if self._worker_counter is None:
            spec = self.config.model.tokenizer
            self._worker_counter = WorkerTokenCounter(load_tokenizer(spec), spec)
        return self._worker_counter

    def _write_probe_line(self, value: float, repeat: int, plan: LoadPlan, recorded: int, started_at: str,
                          lag_start: int, worker_rows: list[dict[str, Any]]) -> None:
        if self.probes_path is None:
            return
        line = {
            "variable": self.variable, "value": value, "repeat": repeat, "requests": recorded,
            "first_id": plan.first_id, "last_id": plan.first_id + plan.total - 1,
            "started_at": started_at, "ended_at": now_iso(),
        }
        if worker_rows:
            line["workers"] = worker_rows
        with self.probes_path.open("a", encoding="utf-8") as handle:
            write_probe_line(handle, line, self.samples[value].loop_lag, lag_start)

    async def ensure(self, value: float, runs: int) -> None:
        """Measure the missing repeats of ``value`` so that at least ``runs`` exist."""
        for repeat in range(self.repeats.get(value, 0), runs):
            await self.measure_repeat(value, repeat)

    def _throughput_timing(self, value: float) -> dict[str, Any]:
        """Return how throughput at ``value`` is timed: by slot (closed loop) or by arrivals."""
        if self.variable == "parallel":
            return {"parallel": value}
        return {"open_loop": True}

    def summary_row(self, value: float, bounds: Optional[dict[str, float]] = None) -> dict[str, Any]:
        samples = self.samples.get(value) or PointSamples()
        row: dict[str, Any] = {"parallel": math.nan, "rate": math.nan}
        if self.variable == "parallel":
            row["parallel"] = value
        else:
            row["rate"] = value
            row["parallel"] = self.config.search.rate_parallel_cap if self.config.sla else self.config.load.parallel
        row |= samples.summarize(bounds, **self._throughput_timing(value))
        # Finished repeats only, as python -m runner.resume counts them. The requests of a
        # repeat that a signal cut stay pooled in the statistics (summary_frame logs them), and
        # resume discards them and measures that repeat again.
        row["runs"] = self.repeats.get(value, 0)
        row["loop_lag_p99"] = percentiles(samples.loop_lag, [99])[0]
        reasons = []
        limit = self.config.load.max_client_delay
        if self.variable == "rate" and row["lateness_p99"] > limit:
            reasons.append(f"schedule lateness p99 {row['lateness_p99'] * 1000:.1f} ms")
        if row["loop_lag_p99"] > limit:
            reasons.append(f"event-loop lag p99 {row['loop_lag_p99'] * 1000:.1f} ms")
        offered = value if self.variable == "rate" else row["rps"]
        note = ceiling_note(self.ceiling, self.config.load.max_ceiling_fraction, offered)
        if note:
            reasons.append(note)
        row["client_bound"] = bool(reasons)
        row["client_note"] = "; ".join(reasons)
        return row

    async def probe(self, value: float, runs: int) -> Any:
        from runner.sla.probe import ProbeResult

        await self.ensure(value, runs)
        row = self.summary_row(value)
        return ProbeResult(
            value=value,
            runs=self.repeats[value],
            metrics=row,
            client_bound=row["client_bound"],
            client_note=row["client_note"],
            goodput=lambda bounds, value=value: self.samples[value].goodput(bounds, **self._throughput_timing(value)),
        )

    def summary_frame(self, bounds: Optional[dict[str, float]] = None) -> pd.DataFrame:
        # Points with only warmup rows, or only requests cancelled by a signal, have no statistics.
        values = [value for value in sorted(self.samples) if self.samples[value].measured]
        for value in values:
            started = len(self.samples[value].repeats)
            finished = self.repeats.get(value, 0)
            if started > finished:
                log.warning("%s %g: %d of its %d repeats did not finish; their requests are pooled in "
                            "summary.csv, whose runs column counts the %d finished repeats",
                            self.variable, value, started - finished, started, finished)
        return pd.DataFrame([self.summary_row(value, bounds) for value in values])
