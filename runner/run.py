"""One run: start the endpoint, send the load, write the run folder.

``execute`` is what the command line calls with typed settings and the run folder. A plain
run measures one load point; with SLA rules it hands a ``LoadPointProber`` to the tuner,
which measures as many load points as its search needs. Whatever ends the run (success,
an error, SIGINT or SIGTERM), what was measured is written: requests.csv as it goes,
then summary.csv, sla_summary.csv, performance_summary.txt and manifest.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import pandas as pd
from rich.console import Console

from runner import console as views
from runner.calibrate import calibrate
from runner.client import kernel_clock
from runner.client.openai import OpenAIClient
from runner.config import EndpointKind, RunConfig, SearchVariable
from runner.data import build_prompts, fingerprint
from runner.errors import EndpointError
from runner.gc_pause import setup_objects_frozen
from runner.interrupt import Interrupted, SignalStop, cancel_on_signal, signals_deferred
from runner.manifest import now_iso, write_manifest, write_prompts
from runner.metrics import SUMMARY_COLUMNS
from runner.output import RequestsWriter, write_summary
from runner.preflight import check_inputs, preflight
from runner.workers import ClientArgs
from runner.prober import PROBES_FILE, SCRATCH_DIR, LoadPointProber
from runner.redact import redact_argv, redact_text, secret_values
from runner.tokenizer import load_tokenizer, resolve_tokenizer_path, token_counter

__all__ = ["LoadPointProber", "Resumed", "execute"]

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    """Repeats of an interrupted SLA tune, loaded back by ``python -m runner.resume``."""

    # value -> (finished repeats, their requests.csv rows, their event-loop lag samples)
    points: dict[float, tuple[int, list[dict[str, Any]], list[float]]] = field(default_factory=dict)
    # First request id free for new requests.
    next_id: int = 0
    # What this resume did, appended to the "resumes" list of manifest.json.
    record: dict[str, Any] = field(default_factory=dict)


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


def prompt_count(config: RunConfig) -> int:
    """Return how many prompts to build when dataset.num_prompts is unset: one per request.

    NOTE: they are all built before the load starts, so memory grows with load.number. A
    64-token random prompt takes about 1.3 KB (tracemalloc), so 100,000 requests take 125 MB.
    With dataset.num_prompts set, requests cycle through that many prompts instead.
    """
    if config.sla is None:
        return config.load.warmup + config.load.number
    return config.search.max_requests


async def _measure(config: RunConfig, out_dir: Path, console: Console, result: dict[str, Any],
                   resumed: Optional[Resumed] = None) -> None:
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
    append = resumed is not None

    with open_endpoint(config) as base_url, RequestsWriter(out_dir / "requests.csv", append=append) as writer:
        async with OpenAIClient(config.endpoint, config.model, config.request, base_url=base_url,
                                pool_size=pool_size) as client:
            result["url"] = client.url
            result["arrival_clock"] = kernel_clock.arrival_clock(client.url)
            if result["arrival_clock"] == "kernel":
                log.info("chunk arrival times: the kernel's receive times (SO_TIMESTAMPNS)")
            else:
                log.info("chunk arrival times: taken when the event loop reads the socket (no kernel receive "
                         "times for this endpoint or platform), so they run late when the loop is busy")
            try:
                result["preflight"] = await preflight(client, prompts[0], config)
            except EndpointError as exc:
                result["preflight"] = {"error": str(exc)}
                raise
            result["server_models"] = await client.fetch_models()
            client_args = ClientArgs(config.endpoint, config.model, config.request, base_url, pool_size)
            # After the preflight, so a wrong URL fails before the calibration's few seconds.
            calibration = await calibrate(config, prompts, count_tokens, client_args)
            result["calibration"] = calibration.to_manifest()
            with setup_objects_frozen(), views.make_progress(console, config.progress) as progress:
                prober = LoadPointProber(config, client, prompts, writer, count_tokens, progress, time.perf_counter(),
                                         probes_path=out_dir / PROBES_FILE, client_args=client_args,
                                         scratch_dir=out_dir / SCRATCH_DIR, ceiling=calibration.ceiling)
                if resumed is not None:
                    for value, (repeats, rows, lag) in resumed.points.items():
                        prober.restore(value, repeats, rows, lag, resumed.next_id)
                result["prober"] = prober
                if groups is None:
                    value = config.load.rate if config.load.open_loop else config.load.parallel
                    await prober.ensure(value, 1)
                else:
                    from runner.sla.search import SlaTuner

                    # The number of probes depends on the verdicts, so the bar counts them without a total.
                    status = progress.add_task("SLA search", total=None, status="", unit="probes")

                    def show(event: Any) -> None:
                        progress.update(status, description=describe_tune_event(event),
                                        advance=1 if event.kind == "verdict" else 0)

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


def execute(config: RunConfig, out_dir: Path, console: Optional[Console] = None,
            resumed: Optional[Resumed] = None) -> int:
    """Run the measurement described by ``config`` into ``out_dir``; return the exit code.

    Raises RunnerError for bad input or a server that fails every request, and Interrupted
    after SIGINT or SIGTERM, in every case after writing what was measured.
    """
    check_inputs(config)  # before the tokenizer loads, so bad input fails in well under a second
    if console is None:
        console = Console()
        if not console.is_terminal:
            # Piped or redirected output keeps the full table width instead of rich's 80 columns.
            console = Console(width=views.TEXT_WIDTH)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"started_at": now_iso()}
    stop = SignalStop()
    try:
        _run_event_loop(_measure(config, out_dir, console, result, resumed), stop)
    except KeyboardInterrupt:
        # SIGINT outside the event loop, which handles it itself while it runs.
        stop.signum = stop.signum or signal.SIGINT
        raise
    except Interrupted as exc:
        stop.signum = stop.signum or exc.signum
        raise
    finally:
        if stop.signum is not None:
            result["interrupted_by"] = signal.Signals(stop.signum).name
        # A signal during the reports is held until they are written.
        with signals_deferred(stop):
            _finish(config, result, out_dir, console, resumed)
    if stop.signum is not None:
        raise Interrupted(stop.signum)
    return 0


def _finish(config: RunConfig, result: dict[str, Any], out_dir: Path, console: Console,
            resumed: Optional[Resumed] = None) -> None:
    result["ended_at"] = now_iso()
    try:
        if "prober" in result:
            write_reports(config, result, out_dir, console)
    finally:
        if "prober" in result:
            result["prober"].remove_scratch()
        secrets = secret_values(config.endpoint.headers, config.endpoint.api_key_env, config.endpoint.url)
        command = [Path(sys.executable).name, "-m", "runner", *redact_argv(sys.argv[1:], secrets)]
        history = {"runner_command": command, "started_at": result["started_at"], "resumes": []}
        if resumed is not None:
            history = _resume_history(out_dir / "manifest.json", history, resumed, result)
        write_manifest(out_dir / "manifest.json", history | {
            "ended_at": result["ended_at"],
            # Name of the signal that stopped this run (or its last resume), null when it ended by itself.
            "interrupted_by": result.get("interrupted_by"),
            "url": redact_text(result["url"], secrets) if result.get("url") else None,
            "preflight": result.get("preflight"),
            "server_models": result.get("server_models"),
            "dataset": {"kind": config.dataset.kind.value, "seed": config.dataset.seed,
                        "prompts": result.get("prompt_count"), "fingerprint": result.get("fingerprint"),
                        "file": "prompts.jsonl"},
            "calibration": result.get("calibration"),
            # "kernel" or "event loop": where chunk arrival times come from (docs/metrics.md).
            "arrival_clock": result.get("arrival_clock"),
            "requests_written": result["prober"].writer.rows_written if "prober" in result else 0,
        })


def _resume_history(path: Path, fresh: dict[str, Any], resumed: Resumed, result: dict[str, Any]) -> dict[str, Any]:
    """Return the manifest fields that describe the run across resumes.

    The first run's command and start time are kept, and this resume is appended to
    ``resumes``, so the manifest records when the run was resumed and which repeats it reused.
    """
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s, so the first run's command and start time are lost: %s", path, exc)
        previous = {}
    if not isinstance(previous, dict):
        previous = {}
    record = resumed.record | {"started_at": result["started_at"], "ended_at": result["ended_at"],
                               "interrupted_by": result.get("interrupted_by")}
    return {
        "runner_command": previous.get("runner_command", fresh["runner_command"]),
        "started_at": previous.get("started_at", fresh["started_at"]),
        "resumes": [*(previous.get("resumes") or []), record],
    }


def _run_event_loop(coroutine: Any, stop: SignalStop) -> None:
    """Run ``coroutine`` on the loop that gives the best chunk times (see runner.client.kernel_clock)."""
    kernel_clock.run(cancel_on_signal(coroutine, stop))


def tightest_bounds(groups: list[Any]) -> dict[str, float]:
    """Merge the per-request bounds of all rule groups, keeping the tightest of each kind."""
    bounds: dict[str, float] = {}
    for group in groups:
        for key, bound in group.per_request_bounds().items():
            bounds[key] = min(bound, bounds.get(key, bound))
    return bounds


def _warn_about_counts(summary: pd.DataFrame, *, ignore_eos: bool) -> None:
    """Log a warning for each load point whose token counts look wrong (see metrics.count_checks)."""
    messages = {
        "short_outputs": "%d outputs stopped below 90%% of max_tokens at %s %g; with ignore_eos every output "
                         "should reach it (does the server honour ignore_eos?)",
        "prompt_tokens_mismatch": "%d requests: the server's usage.prompt_tokens differs by more than 5%% from "
                                  "the dataset's count at %s %g (is model.tokenizer the server's tokenizer?)",
        "completion_tokens_mismatch": "%d requests: usage.completion_tokens differs by more than 5%% from the "
                                      "client tokenizer's count at %s %g",
    }
    for row in summary.to_dict("records"):
        variable = "parallel" if pd.isna(row.get("rate")) else "rate"
        for column, message in messages.items():
            if column == "short_outputs" and not ignore_eos:
                continue  # outputs may end at end of sequence
            count = row.get(column)
            if count and not pd.isna(count) and count > 0:
                log.warning(message, int(count), variable, row[variable])


def write_reports(config: RunConfig, result: dict[str, Any], out_dir: Path, console: Console) -> None:
    prober: LoadPointProber = result["prober"]
    bounds = tightest_bounds(result.get("groups") or [])
    rows = prober.summary_frame(bounds).to_dict("records")
    if not rows:
        # Stopped before any measured request completed: the files exist, with headers only.
        pd.DataFrame(columns=SUMMARY_COLUMNS).to_csv(out_dir / "summary.csv", index=False)
        if "tuner" in result:
            pd.DataFrame([a.to_row() for a in result["tuner"].answers()]).to_csv(out_dir / "sla_summary.csv",
                                                                                index=False)
        (out_dir / "performance_summary.txt").write_text("No measured request completed before the run stopped.\n",
                                                         encoding="utf-8")
        return
    summary = write_summary(rows, out_dir / "summary.csv")
    _warn_about_counts(summary, ignore_eos=config.request.ignore_eos)
    renderables: list[Any] = [views.metrics_table(summary)]
    best = views.best_configuration(summary)
    if best is not None:
        renderables.append(best)
    sla_rows = None
    if "tuner" in result:
        sla_rows = [answer.to_row() for answer in result["tuner"].answers()]
        pd.DataFrame(sla_rows).to_csv(out_dir / "sla_summary.csv", index=False)
    search = views.SearchRange(config.search.variable.value, config.search.lower_bound, config.search.upper_bound)
    renderables.append(views.recommendations_text(views.recommendations(summary, sla_rows, search)))
    if sla_rows is not None:
        renderables.append(views.sla_table(sla_rows))
    for item in renderables:
        console.print(item)
    (out_dir / "performance_summary.txt").write_text(views.render_text(renderables), encoding="utf-8")
    from runner.report import build_report

    build_report(out_dir)
    console.print(f"Results written to {out_dir}")
