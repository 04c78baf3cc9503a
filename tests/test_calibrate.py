"""Client self-calibration: the null server, the measured ceiling, and the client-bound rule."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from paths import CONF_DIR, REPO
from runner import calibrate as calibration_module
from runner.__main__ import to_run_config
from runner.calibrate import (
    OVERRUN_SECONDS,
    Ceiling,
    calibrate,
    calibration_decision,
    calibration_parallel,
    ceiling_note,
    measured_window,
)
from runner.client.openai import OpenAIClient
from runner.client.record import Prompt, RequestRecord
from runner.config import DatasetConfig, EndpointConfig, LoadConfig, RequestConfig, RunConfig, SlaConfig
from runner.data import build_prompts
from runner.errors import ConfigError
from runner.nullserver import NullServer
from runner.prober import LoadPointProber
from runner.tokenizer import token_counter

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def build(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config(compose("config", overrides=list(overrides)))


def run_config(*, url: str = CHAT, parallel: int = 8, seconds: float = 0.3, **request: object) -> RunConfig:
    return RunConfig(
        endpoint=EndpointConfig(url=url),
        load=LoadConfig(parallel=parallel, calibrate="true", calibrate_seconds=seconds),
        request=RequestConfig(**request),
        dataset=DatasetConfig(min_prompt_length=16, max_prompt_length=16),
    )


# -- configuration ---------------------------------------------------------------------


def test_config_defaults_compose():
    load = build().load
    assert load.calibrate == "auto"
    assert load.calibrate_seconds == 1.0
    assert load.calibrate_min_requests == 1000
    assert load.max_ceiling_fraction == 0.8


@pytest.mark.parametrize(("value", "expected"), [("true", "true"), ("False", "false"), ("AUTO", "auto")])
def test_config_calibrate_accepts_booleans(value, expected):
    # Hydra parses `true` and `False` as booleans, which reach the string field as "True"/"False".
    assert build(f"load.calibrate={value}").load.calibrate == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["load.calibrate=sometimes"], "load.calibrate must be one of auto, true, false, got 'sometimes'"),
        (["load.calibrate_seconds=0"], "load.calibrate_seconds must be > 0 seconds, got 0.0"),
        (["load.calibrate_min_requests=0"], "load.calibrate_min_requests must be >= 1, got 0"),
        (["load.max_ceiling_fraction=0"], "load.max_ceiling_fraction must be in (0, 1], got 0.0"),
        (["load.max_ceiling_fraction=1.5"], "load.max_ceiling_fraction must be in (0, 1], got 1.5"),
        (["load.calibrate=true", "load.backend=ray"],
         "load.calibrate=true cannot calibrate Ray actors, which may run on other nodes; "
         "pass load.calibrate=auto or false with load.backend=ray"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ConfigError) as caught:
        build(*overrides)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("overrides", "wanted", "reason"),
    [
        ([], False, "load.calibrate=auto skips plain runs of fewer than load.calibrate_min_requests=1000 "
                    "requests (this one has 104)"),
        (["load.number=996"], True, ""),
        (["load.number=995"], False, "load.calibrate=auto skips plain runs of fewer than "
                                     "load.calibrate_min_requests=1000 requests (this one has 999)"),
        (["load.calibrate_min_requests=50"], True, ""),
        (["+sla=ttft_strict"], True, ""),
        (["+sla=ttft_strict", "load.calibrate=false"], False, "load.calibrate=false"),
        (["load.calibrate=true"], True, ""),
        (["load.number=5000", "load.backend=ray"], False,
         "load.backend=ray sends from Ray actors, which calibration does not cover"),
    ],
)
def test_decision_follows_mode_and_size(overrides, wanted, reason):
    assert calibration_decision(build(*overrides)) == (wanted, reason)


@pytest.mark.parametrize(
    ("overrides", "parallel"),
    [
        (["load.parallel=12"], 12),
        (["load.rate=5", "load.parallel=30"], 30),
        (["load.rate=5", "load.parallel=null"], 256),
        (["+sla=ttft_strict", "search.upper_bound=64"], 64),
        (["+sla=ttft_strict", "search.variable=rate", "load.rate=2"], 256),
        (["+sla=ttft_strict", "search.variable=rate", "load.rate=2", "search.rate_parallel_cap=40"], 40),
    ],
)
def test_parallel_is_highest_in_flight(overrides, parallel):
    assert calibration_parallel(build(*overrides)) == parallel


# -- the null server -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "stream", "chunks"),
    [(CHAT, True, 7), (COMPLETIONS, True, 7), (CHAT, False, 0), (COMPLETIONS, False, 0)],
    ids=["chat stream", "completions stream", "chat json", "completions json"],
)
async def test_null_server_answers_shape(url, stream, chunks):
    config = run_config(url=url, stream=stream, max_tokens=7)
    async with NullServer(max_seconds=30) as server:
        async with OpenAIClient(config.endpoint, config.model, config.request, base_url=server.base_url,
                                pool_size=1) as client:
            record = RequestRecord(request_id=0)
            await client.send(Prompt(text="hello there", prompt_tokens=2), record)
    assert record.success, record.error
    assert record.completion_tokens == 7
    assert record.finish_reason == "length"
    assert record.token_source == "usage"
    assert len(record.chunk_times) == chunks
    assert "".join(record.chunk_texts) == " hi" * 7
    report = server.report
    assert report["requests"] == 1
    assert report["paths"] == {url: 1}
    assert report["max_tokens"] == {"7": 1}
    assert report["first_body"]["stream"] is stream
    assert report["cpu_seconds"] >= 0


async def test_null_server_stops_on_stdin_close():
    server = NullServer(max_seconds=60)
    await server.__aenter__()
    process = server.process
    assert process is not None and process.stdin is not None
    # A parent that dies closes the pipe, and the child must then exit by itself.
    process.stdin.close()
    code = await asyncio.wait_for(process.wait(), 10)
    await server.__aexit__(None, None, None)
    assert code == 0
    assert server.report is not None
    assert server.report["requests"] == 0


def test_null_server_stops_after_max_seconds():
    # Standard input stays open (this test keeps the write end), so only the time limit can stop it.
    read_end, write_end = os.pipe()
    try:
        done = subprocess.run([sys.executable, "-m", "runner.nullserver", "--max-seconds", "0.2"], cwd=REPO,
                              stdin=read_end, capture_output=True, text=True, timeout=30)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("listening ")
    assert json.loads(lines[1])["requests"] == 0


# -- calibration against the null server -----------------------------------------------


@pytest.fixture
def counter(qwen_tokenizer):
    return token_counter(qwen_tokenizer)


def prompts_for(config: RunConfig, tokenizer, count: int = 20) -> list[Prompt]:
    return build_prompts(config.dataset, tokenizer, count, config.endpoint.api)


async def test_calibrate_measures_chat_ceiling(qwen_tokenizer, counter):
    config = run_config(max_tokens=16, extra_body={"top_p": 0.5})
    called_at = time.perf_counter()

    result = await calibrate(config, prompts_for(config, qwen_tokenizer), counter)

    assert result.status == "measured", result.reason
    details = result.details
    assert result.ceiling is not None
    assert result.ceiling.parallel == 8
    assert result.ceiling.rps > 0
    assert details["requests"] > 0
    assert details["failures"] == 0
    # Every response carries exactly max_tokens tokens, counted over the same window.
    assert details["tokens"] == 16 * details["requests"]
    assert result.ceiling.tps == pytest.approx(16 * result.ceiling.rps)
    assert result.ceiling.rps == pytest.approx(details["requests"] / details["window_seconds"])
    assert details["cpu_ms_per_request"] > 0
    # The null server saw the run's request shape: API path, body fields and max_tokens.
    assert details["server"]["paths"] == {CHAT: details["requests_ended"]}
    assert details["server"]["max_tokens"] == {"16": details["requests_ended"]}
    assert details["request_fields"] == ["ignore_eos", "max_tokens", "messages", "model", "stream",
                                         "stream_options", "temperature", "top_p"]
    # Time bound: no request read after the load's seconds (plus slack for delivery), and the
    # whole step within its hard limit.
    assert 0 < details["server"]["last_request_seconds"] <= config.load.calibrate_seconds + 1.0
    assert details["total_seconds"] < config.load.calibrate_seconds + OVERRUN_SECONDS
    assert time.perf_counter() - called_at < config.load.calibrate_seconds + OVERRUN_SECONDS


async def test_calibrate_uses_completions_shape(qwen_tokenizer, counter):
    config = run_config(url=COMPLETIONS, parallel=4, max_tokens=5, stream=False, ignore_eos=False)

    result = await calibrate(config, prompts_for(config, qwen_tokenizer), counter)

    assert result.status == "measured", result.reason
    details = result.details
    assert details["server"]["paths"] == {COMPLETIONS: details["requests_ended"]}
    assert details["request_fields"] == ["max_tokens", "model", "prompt", "stream", "temperature"]
    assert details["tokens"] == 5 * details["requests"]
    assert result.ceiling is not None and result.ceiling.parallel == 4


async def test_calibrate_skipped_when_off(qwen_tokenizer, counter, monkeypatch):
    class NoServer:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the null server must not start when calibration is off")

    monkeypatch.setattr(calibration_module, "NullServer", NoServer)
    config = run_config()
    config.load.calibrate = "false"

    result = await calibrate(config, prompts_for(config, qwen_tokenizer), counter)

    assert result.status == "skipped"
    assert result.ceiling is None
    assert result.to_manifest() == {"status": "skipped", "reason": "load.calibrate=false"}


async def test_calibrate_failure_leaves_no_ceiling(qwen_tokenizer, counter):
    config = run_config()
    # Every request times out at once, so nothing succeeds.
    config.endpoint.request_timeout = 1e-6

    result = await calibrate(config, prompts_for(config, qwen_tokenizer), counter)

    assert result.status == "failed"
    assert result.ceiling is None
    assert result.reason.startswith("no request succeeded within the measured window (timed out")
    assert result.details["failures"] == result.details["requests_ended"] > 0


def test_window_skips_ramp_and_drain():
    # 8 slots; requests end every 0.01 s from 0.05 s to 1.2 s; sending stopped at 1.0 s.
    ends = np.round(np.arange(0.05, 1.2, 0.01), 6)
    assert measured_window(ends, 0.0, 1.0, 8) == (0.25, 1.0)
    # The 8th request ended only at 0.45 s: the window starts there.
    late = np.concatenate([np.full(7, 0.1), np.arange(0.45, 1.2, 0.01)])
    assert measured_window(late, 0.0, 1.0, 8) == (0.45, 1.0)
    # Only 4 requests ended, so no window starts early enough: the span from first to last end counts.
    slow = np.array([0.7, 0.8, 0.9, 1.1])
    assert measured_window(slow, 0.0, 1.0, 8) == (0.7, 1.1)


# -- the client-bound rule -------------------------------------------------------------


def test_ceiling_note_above_fraction():
    ceiling = Ceiling(rps=100.0, tps=6400.0, parallel=64)
    assert ceiling_note(ceiling, 0.8, 79.9) == ""
    assert ceiling_note(ceiling, 0.8, 90.0) == (
        "90 req/s is 90% of the client's calibrated ceiling of 100 req/s, above load.max_ceiling_fraction=0.8")
    assert ceiling_note(ceiling, 0.8, math.nan) == ""
    assert ceiling_note(None, 0.8, 1e9) == ""


def closed_loop_rows(count: int, step: float) -> list[dict]:
    """Requests of one slot back to back, each taking ``step`` seconds: rps = 1 / step."""
    rows = []
    for i in range(count):
        start, end = i * step, (i + 1) * step
        rows.append({"repeat": 0, "warmup": False, "cooldown": False, "success": True, "scheduled_at": start,
                     "dispatched_at": start, "sent_at": start, "ended_at": end, "ttft": step / 2, "latency": step,
                     "tpot": None, "prompt_tokens": 8, "completion_tokens": 1, "max_tokens": 1, "itl": []})
    return rows


def prober_with(config: RunConfig, ceiling: Ceiling | None, value: float, rows: list[dict]) -> LoadPointProber:
    prober = LoadPointProber(config, client=None, prompts=[], writer=None, count_tokens=None, progress=None,
                             origin=0.0, ceiling=ceiling)
    prober.restore(value, 1, rows, [0.0], len(rows))
    return prober


@pytest.mark.parametrize(("ceiling_rps", "bound"), [(9.0, True), (11.0, False)])
def test_closed_loop_point_uses_measured_rps(ceiling_rps, bound):
    config = RunConfig(load=LoadConfig(parallel=1))
    # 0.125 s per request: rps is exactly 8, against a limit of 0.8 x the ceiling.
    prober = prober_with(config, Ceiling(rps=ceiling_rps, tps=ceiling_rps, parallel=1), 1, closed_loop_rows(16, 0.125))

    row = prober.summary_row(1)

    assert row["rps"] == 8.0
    assert row["client_bound"] is bound
    expected = (f"8 req/s is {800 / ceiling_rps:.0f}% of the client's calibrated ceiling of {ceiling_rps:g} req/s, "
                f"above load.max_ceiling_fraction=0.8") if bound else ""
    assert row["client_note"] == expected


def test_open_loop_point_uses_target_rate():
    config = RunConfig(load=LoadConfig(parallel=None, rate=5.0))
    # The requests themselves arrive at 2 req/s; the target rate of 5 is what the client must send.
    prober = prober_with(config, Ceiling(rps=6.0, tps=6.0, parallel=256), 5.0, closed_loop_rows(8, 0.5))

    row = prober.summary_row(5.0)

    assert row["rate"] == 5.0
    assert row["client_bound"] is True
    assert row["client_note"] == ("5 req/s is 83% of the client's calibrated ceiling of 6 req/s, "
                                  "above load.max_ceiling_fraction=0.8")


def test_no_ceiling_no_flag():
    config = RunConfig(load=LoadConfig(parallel=1))
    prober = prober_with(config, None, 1, closed_loop_rows(16, 0.125))
    row = prober.summary_row(1)
    assert row["client_bound"] is False
    assert row["client_note"] == ""


def test_sla_config_calibrates_at_upper_bound():
    config = RunConfig(load=LoadConfig(parallel=4), sla=SlaConfig(rules=[{"p99_ttft": "<=1"}]))
    config.search.upper_bound = 32
    assert calibration_decision(config) == (True, "")
    assert calibration_parallel(config) == 32
