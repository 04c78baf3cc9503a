"""One run: start the endpoint, send the load, write the run folder.

``execute`` is what the command line calls with typed settings and the run folder. A plain
run measures one load point; with SLA rules it hands a ``LoadPointProber`` to the tuner,
which measures as many load points as its search needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pandas as pd
from rich.console import Console

from runner import console as views
from runner.client.finalize import finalize
from runner.client.openai import OpenAIClient
from runner.config import EndpointKind, RunConfig, SearchVariable
from runner.data import build_prompts, fingerprint
from runner.load import LoadPlan, run_load
from runner.manifest import now_iso, write_manifest, write_prompts
from runner.metrics import summarize
from runner.output import RequestsWriter, record_row, write_summary
from runner.tokenizer import load_tokenizer, resolve_tokenizer_path, token_counter

log = logging.getLogger(__name__)

# A load point whose client lateness or event-loop lag p99 exceeds this many seconds was not
# delivered faithfully by the client, so its numbers are not the server's.
CLIENT_BOUND_SECONDS = 0.025


@contextlib.contextmanager
def open_endpoint(config: RunConfig) -> Iterator[Optional[str]]:
    """Yield the base URL to send to: the embedded simulated server's, or None for endpoint.url."""
    if config.endpoint.kind is not EndpointKind.sim:
        yield None
        return
    from runner.sim.process import start_sim  # the simulated server is only needed here

    with start_sim(
        config.model.sim_profile,
        seed=config.endpoint.sim_seed,
        tokenizer=resolve_tokenizer_path(config.model.tokenizer),
        model=config.model.name,
    ) as server:
        log.info("simulated server (profile %s) at %s", config.model.sim_profile, server.base_url)
        yield server.base_url


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
    ) -> None:
        self.config = config
        self.client = client
        self.prompts = prompts
        self.writer = writer
        self.count_tokens = count_tokens
        self.progress = progress
        self.origin = origin
        self.rows: dict[float, list[dict[str, Any]]] = {}
        self.repeats: dict[float, int] = {}
        self.loop_lag: dict[float, list[float]] = {}
        self.next_id = 0

    @property
    def variable(self) -> str:
        if self.config.sla is not None:
            return self.config.search.variable.value
        return "rate" if self.config.load.open_loop else "parallel"

    def plan_for(self, value: float, repeat: int) -> LoadPlan:
        load, search = self.config.load, self.config.search
        if self.config.sla is None:
            return LoadPlan(parallel=load.parallel, rate=load.rate, number=load.number, warmup=load.warmup,
                            arrival=load.arrival, burstiness=load.burstiness, duration=load.duration,
                            seed=load.seed + repeat, first_id=self.next_id)
        number = int(min(max(search.min_requests, math.ceil(search.requests_per_unit * value)), search.max_requests))
        if search.variable is SearchVariable.parallel:
            # Warmup fills every slot once, so measured requests start on a busy server.
            return LoadPlan(parallel=int(value), rate=None, number=number, warmup=max(load.warmup, int(value)),
                            duration=load.duration, seed=load.seed + repeat, first_id=self.next_id)
        cap = search.rate_parallel_cap
        return LoadPlan(parallel=cap, rate=value, number=number, warmup=max(load.warmup, math.ceil(value)),
                        arrival=load.arrival, burstiness=load.burstiness, duration=load.duration,
                        seed=load.seed + repeat, first_id=self.next_id)

    async def measure_repeat(self, value: float, repeat: int) -> None:
        plan = self.plan_for(value, repeat)
        self.next_id += plan.total
        label = f"{self.variable} {value:g} run {repeat + 1}"
        task = self.progress.add_task(label, total=plan.total, status="")
        rows = self.rows.setdefault(value, [])

        def on_record(record: Any) -> None:
            samples = finalize(record, self.count_tokens)
            row = record_row(record, samples, origin=self.origin, variable=self.variable, value=value, repeat=repeat)
            rows.append(row)
            self.writer.add(row)
            self.progress.advance(task)

        outcome = await run_load(plan, self.client, self.prompts, on_record)
        self.loop_lag.setdefault(value, []).extend(outcome.loop_lag)
        self.repeats[value] = repeat + 1
        self.progress.remove_task(task)
        self.writer.flush()

    async def ensure(self, value: float, runs: int) -> None:
        """Measure the missing repeats of ``value`` so that at least ``runs`` exist."""
        for repeat in range(self.repeats.get(value, 0), runs):
            await self.measure_repeat(value, repeat)

    def summary_row(self, value: float, bounds: Optional[dict[str, float]] = None) -> dict[str, Any]:
        frame = pd.DataFrame(self.rows.get(value, []))
        row: dict[str, Any] = {"parallel": math.nan, "rate": math.nan}
        if self.variable == "parallel":
            row["parallel"] = value
        else:
            row["rate"] = value
            row["parallel"] = self.config.search.rate_parallel_cap if self.config.sla else self.config.load.parallel
        row |= summarize(frame, bounds)
        lag = pd.Series(self.loop_lag.get(value, []), dtype=float)
        row["loop_lag_p99"] = float(lag.quantile(0.99)) if len(lag) else math.nan
        reasons = []
        if self.variable == "rate" and row["lateness_p99"] > CLIENT_BOUND_SECONDS:
            reasons.append(f"schedule lateness p99 {row['lateness_p99'] * 1000:.1f} ms")
        if row["loop_lag_p99"] > CLIENT_BOUND_SECONDS:
            reasons.append(f"event-loop lag p99 {row['loop_lag_p99'] * 1000:.1f} ms")
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
            goodput=lambda bounds, value=value: self.summary_row(value, bounds)["goodput"],
        )

    def summary_frame(self, bounds: Optional[dict[str, float]] = None) -> pd.DataFrame:
        return pd.DataFrame([self.summary_row(value, bounds) for value in sorted(self.rows)])


def prompt_count(config: RunConfig) -> int:
    if config.sla is None:
        return config.load.warmup + config.load.number
    return config.search.max_requests


async def _measure(config: RunConfig, out_dir: Path, console: Console, result: dict[str, Any]) -> None:
    """Measure into ``result``, which the caller keeps, so an interrupted run can still report."""
    tokenizer = load_tokenizer(config.model.tokenizer)
    prompts = build_prompts(config.dataset, tokenizer, prompt_count(config), config.endpoint.api)
    count_tokens = token_counter(tokenizer)
    result["fingerprint"] = fingerprint(prompts)
    result["prompt_count"] = len(prompts)
    write_prompts(prompts, out_dir / "prompts.jsonl")
    groups = None
    if config.sla is not None:
        from runner.sla.rules import parse_rules

        groups = parse_rules(config.sla.rules)  # invalid rules fail here, before any load
        result["groups"] = groups
    pool_size = _pool_size(config)

    with open_endpoint(config) as base_url, RequestsWriter(out_dir / "requests.csv") as writer:
        async with OpenAIClient(config.endpoint, config.model, config.request, base_url=base_url,
                                pool_size=pool_size) as client:
            result["server_models"] = await client.fetch_models()
            result["url"] = client.url
            with views.make_progress(console, config.progress) as progress:
                prober = LoadPointProber(config, client, prompts, writer, count_tokens, progress, time.perf_counter())
                result["prober"] = prober
                if groups is None:
                    value = config.load.rate if config.load.open_loop else config.load.parallel
                    await prober.ensure(value, 1)
                else:
                    from runner.sla.search import SlaTuner

                    status = progress.add_task("SLA search", total=None, status="")

                    def show(event: Any) -> None:
                        progress.update(status, description=describe_tune_event(event))

                    tuner = SlaTuner.from_config(groups, config, prober, on_event=show)
                    result["tuner"] = tuner
                    await tuner.run()


def describe_tune_event(event: Any) -> str:
    """Return one line for the progress display: the probe, its verdict and the bracket."""
    head = f"SLA {event.group + 1}: {event.criteria}"
    if event.kind == "probe":
        return f"{head} | probing {event.value:g}"
    if event.kind == "verdict":
        detail = "; ".join(event.violations) or event.client_note
        verdict = event.verdict.value + (f" ({detail})" if detail else "")
        return f"{head} | {event.value:g} {verdict} | bracket [{_fmt(event.last_pass)}, {_fmt(event.first_fail)})"
    answer = event.answer
    return f"{head} | max satisfied {_fmt(answer.max_satisfied)}: {answer.note}"


def _fmt(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:g}"


def _pool_size(config: RunConfig) -> int:
    if config.sla is not None and config.search.variable is SearchVariable.parallel:
        return int(config.search.upper_bound)
    if config.load.open_loop:
        cap = config.search.rate_parallel_cap if config.sla else config.load.parallel
        return cap or 1024
    return config.load.parallel or 1


def execute(config: RunConfig, out_dir: Path, console: Optional[Console] = None) -> int:
    """Run the measurement described by ``config`` into ``out_dir``; return the exit code."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            # Piped or redirected output keeps the full table width instead of rich's 80 columns.
            console = Console(width=views.TEXT_WIDTH)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"started_at": now_iso()}
    try:
        _run_event_loop(_measure(config, out_dir, console, result))
    finally:
        result["ended_at"] = now_iso()
        if "prober" in result:
            write_reports(config, result, out_dir, console)
        write_manifest(out_dir / "manifest.json", {
            "started_at": result["started_at"],
            "ended_at": result["ended_at"],
            "url": result.get("url"),
            "server_models": result.get("server_models"),
            "dataset": {"kind": config.dataset.kind.value, "seed": config.dataset.seed,
                        "prompts": result.get("prompt_count"), "fingerprint": result.get("fingerprint"),
                        "file": "prompts.jsonl"},
            "requests_written": result["prober"].writer.rows_written if "prober" in result else 0,
        })
    return 0


def _run_event_loop(coroutine: Any) -> None:
    """Run ``coroutine`` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
        return
    uvloop.run(coroutine)


def tightest_bounds(groups: list[Any]) -> dict[str, float]:
    """Merge the per-request bounds of all rule groups, keeping the tightest of each kind."""
    bounds: dict[str, float] = {}
    for group in groups:
        for key, bound in group.per_request_bounds().items():
            bounds[key] = min(bound, bounds.get(key, bound))
    return bounds


def write_reports(config: RunConfig, result: dict[str, Any], out_dir: Path, console: Console) -> None:
    prober: LoadPointProber = result["prober"]
    bounds = tightest_bounds(result.get("groups") or [])
    summary = write_summary(prober.summary_frame(bounds).to_dict("records"), out_dir / "summary.csv")
    renderables: list[Any] = [views.metrics_table(summary)]
    best = views.best_configuration(summary)
    if best is not None:
        renderables.append(best)
    renderables.append(views.recommendations_text(views.recommendations(summary)))
    if "tuner" in result:
        rows = [answer.to_row() for answer in result["tuner"].answers()]
        pd.DataFrame(rows).to_csv(out_dir / "sla_summary.csv", index=False)
        renderables.append(views.sla_table(rows))
    for item in renderables:
        console.print(item)
    (out_dir / "performance_summary.txt").write_text(views.render_text(renderables), encoding="utf-8")
    from runner.report import build_report

    build_report(out_dir)
    console.print(f"Results written to {out_dir}")
