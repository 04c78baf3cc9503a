"""Load from several worker processes against a scripted server in its own process."""

import asyncio
import multiprocessing
import os
import signal
import time

import pandas as pd
import pytest

from runner.client.finalize import finalize
from runner.client.openai import OpenAIClient
from runner.client.record import Prompt
from runner.config import Arrival, EndpointConfig, LoadBackend, LoadConfig, ModelConfig, RequestConfig
from runner.errors import ConfigError, RunnerError
from runner.load import LoadPlan, arrival_offsets, run_load
from runner.metrics import summarize
from runner.output import record_row
from runner.testing.scripted import Reply, ScriptedServerProcess, token_timeline
from runner.workers import (
    ClientArgs,
    auto_workers,
    run_load_in_workers,
    split_plan,
    workers_for,
)

PROMPTS = [Prompt(text="hello", prompt_tokens=5), Prompt(text="bye", prompt_tokens=3)]
# TTFT 50 ms, then 8 tokens 10 ms apart: 120 ms per request.
REPLY = Reply(writes=token_timeline(0.05, 8, 0.01))


def client_args(base_url: str, pool_size: int = 16, endpoint: EndpointConfig | None = None) -> ClientArgs:
    return ClientArgs(endpoint or EndpointConfig(), ModelConfig(), RequestConfig(), base_url, pool_size)


def frame_of(records) -> pd.DataFrame:
    rows = [record_row(r, finalize(r, None), origin=0.0, variable="parallel", value=1, repeat=0) for r in records]
    return pd.DataFrame(rows)


def worker_processes() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("load-worker-")]


# --- splitting a plan -------------------------------------------------------------------------


def test_split_closed_loop_follows_slots():
    shares = split_plan(LoadPlan(parallel=3, rate=None, number=10, warmup=2), 2)
    assert [s.parallel for s in shares] == [2, 1]
    # Request i goes to the worker of slot i % 3: slots 0 and 2 are worker 0's.
    assert shares[0].indexes == [0, 2, 3, 5, 6, 8, 9, 11]
    assert shares[1].indexes == [1, 4, 7, 10]
    assert all(s.offsets is None for s in shares)


def test_split_never_exceeds_slots_or_requests():
    assert len(split_plan(LoadPlan(parallel=2, rate=None, number=50), 4)) == 2
    assert len(split_plan(LoadPlan(parallel=64, rate=None, number=3), 4)) == 3
    assert len(split_plan(LoadPlan(parallel=2, rate=100.0, number=50), 4)) == 2


def test_split_open_loop_shares_one_schedule():
    plan = LoadPlan(parallel=None, rate=50.0, number=30, warmup=3, seed=7)
    shares = split_plan(plan, 3)
    schedule = arrival_offsets(plan)
    merged = sorted((i, o) for s in shares for i, o in zip(s.indexes, s.offsets))
    assert merged == list(enumerate(schedule))
    for share in shares:
        assert share.indexes == list(range(share.worker, plan.total, 3))
        assert share.parallel is None


def test_split_open_loop_divides_cap():
    shares = split_plan(LoadPlan(parallel=5, rate=50.0, number=30), 2)
    assert [s.parallel for s in shares] == [3, 2]


def test_split_rejects_zero_workers():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        split_plan(LoadPlan(parallel=4, rate=None, number=4), 0)


def test_auto_workers_rule():
    # Workers are opt-in until they beat one process (see runner.workers.auto_workers).
    assert auto_workers(LoadPlan(parallel=128, rate=None, number=10)) == 1
    assert auto_workers(LoadPlan(parallel=1000, rate=None, number=10)) == 1
    assert auto_workers(LoadPlan(parallel=None, rate=1000.0, number=10)) == 1

def test_workers_setting_overrides_rule():
    plan = LoadPlan(parallel=1000, rate=None, number=10)
    assert workers_for(LoadConfig(workers=1), plan) == 1
    assert workers_for(LoadConfig(workers=3), LoadPlan(parallel=2, rate=None, number=10)) == 3


def test_config_rejects_bad_workers():
    with pytest.raises(ConfigError, match="load.workers must be >= 1"):
        LoadConfig(workers=0)
    with pytest.raises(ConfigError, match="load.ray_address must not be empty"):
        LoadConfig(ray_address=" ")


def test_ray_address_implies_ray():
    assert not LoadConfig().uses_ray
    assert LoadConfig(backend=LoadBackend.ray).uses_ray
    assert LoadConfig(ray_address="ray://head:10001").uses_ray


# --- runs against a scripted server -----------------------------------------------------------


async def test_closed_loop_matches_single_process():
    plan = LoadPlan(parallel=8, rate=None, number=40, warmup=8, first_id=100)
    async with ScriptedServerProcess(REPLY) as server:
        async with OpenAIClient(EndpointConfig(), ModelConfig(), RequestConfig(), base_url=server.base_url,
                                pool_size=8) as client:
            single = await run_load(plan, client, PROMPTS, lambda r: None)
        # One process sends cooldown requests to keep its slots busy; workers do not (yet).
        single.records = [r for r in single.records if not r.cooldown]
        streamed = []
        multi = await run_load_in_workers(plan, 2, client_args(server.base_url, 8), PROMPTS, streamed.append)
        served = server

    assert len(multi.records) == len(single.records) == 48
    assert [r.request_id for r in streamed] == [r.request_id for r in multi.records]
    assert sorted(r.request_id for r in multi.records) == list(range(100, 148))
    single_warmup = {r.request_id: r.warmup for r in single.records}
    assert {r.request_id: r.warmup for r in multi.records} == single_warmup
    assert all(r.success for r in multi.records)
    # Two workers of 4 slots each keep 8 requests in flight, as one process does.
    assert served.state.max_open_requests == 8

    single_frame, multi_frame = frame_of(single.records), frame_of(multi.records)
    assert list(multi_frame.columns) == list(single_frame.columns)
    assert sorted(multi_frame["completion_tokens"]) == sorted(single_frame["completion_tokens"])
    single_row, multi_row = summarize(single_frame), summarize(multi_frame)
    assert set(multi_row) == set(single_row)
    assert multi_row["requests"] == single_row["requests"] == 40
    assert multi_row["avg_ttft"] == pytest.approx(0.05, abs=0.015)
    assert multi_row["avg_latency"] == pytest.approx(single_row["avg_latency"], abs=0.015)
    assert multi_row["avg_tpot"] == pytest.approx(0.01, abs=0.003)


async def test_worker_lag_reported_per_worker():
    plan = LoadPlan(parallel=4, rate=None, number=20)
    async with ScriptedServerProcess(REPLY) as server:
        outcome = await run_load_in_workers(plan, 2, client_args(server.base_url), PROMPTS, lambda r: None)
    assert len(outcome.worker_loop_lag) == 2
    assert all(len(samples) > 10 for samples in outcome.worker_loop_lag)
    assert len(outcome.loop_lag) == sum(len(samples) for samples in outcome.worker_loop_lag)
    assert outcome.ended_at > outcome.started_at


async def test_open_loop_keeps_global_schedule():
    plan = LoadPlan(parallel=None, rate=40.0, number=30, warmup=2, arrival=Arrival.poisson, seed=3)
    async with ScriptedServerProcess(REPLY) as server:
        outcome = await run_load_in_workers(plan, 2, client_args(server.base_url), PROMPTS, lambda r: None)
    records = sorted(outcome.records, key=lambda r: r.request_id)
    assert [r.request_id for r in records] == list(range(32))
    assert [r.warmup for r in records] == [True, True] + [False] * 30
    scheduled = [r.scheduled_at - outcome.started_at for r in records]
    assert scheduled == pytest.approx(arrival_offsets(plan), abs=1e-9)
    lateness = [r.sent_at - r.scheduled_at for r in records]
    # A loose bound: sends follow the schedule, not a backlog. Precise lateness figures are
    # benchmark results (bench/workers.py), because a busy machine delays single sends.
    assert max(lateness) < 0.2


async def test_duration_cuts_every_worker():
    plan = LoadPlan(parallel=4, rate=None, number=1000, duration=0.5)
    async with ScriptedServerProcess(REPLY) as server:
        outcome = await run_load_in_workers(plan, 2, client_args(server.base_url), PROMPTS, lambda r: None)
    assert outcome.cut_by_duration
    # 4 slots of 120 ms requests for 0.5 s: about 20 requests, far fewer than 1000.
    assert 8 <= len(outcome.records) <= 32


async def test_crashed_worker_raises_after_recording():
    plan = LoadPlan(parallel=4, rate=None, number=400)
    received = []

    def kill_after_some(record) -> None:
        received.append(record)
        if len(received) == 6:
            victim = next(p for p in worker_processes() if p.name == "load-worker-1")
            os.kill(victim.pid, signal.SIGKILL)

    async with ScriptedServerProcess(REPLY) as server:
        with pytest.raises(RunnerError, match=r"load worker 1 \(pid \d+\) exited with code -9") as caught:
            await run_load_in_workers(plan, 2, client_args(server.base_url), PROMPTS, kill_after_some)
    assert len(received) >= 6
    assert f"{sum(1 for r in received if (r.request_id % 4) % 2 == 1)} of its records" in str(caught.value)
    assert worker_processes() == []


async def test_worker_config_error_keeps_class():
    endpoint = EndpointConfig(api_key_env="RUNNER_TEST_KEY_THAT_IS_NOT_SET")
    plan = LoadPlan(parallel=2, rate=None, number=4)
    # Both workers fail the same way, and whichever reports first is named.
    with pytest.raises(ConfigError, match=r"load worker [01] failed: endpoint.api_key_env names"):
        await run_load_in_workers(plan, 2, client_args("http://127.0.0.1:9", endpoint=endpoint), PROMPTS,
                                  lambda r: None)
    assert worker_processes() == []


async def test_cancel_stops_workers_quickly():
    plan = LoadPlan(parallel=4, rate=None, number=2000)
    async with ScriptedServerProcess(REPLY) as server:
        first = asyncio.Event()
        task = asyncio.create_task(run_load_in_workers(plan, 2, client_args(server.base_url), PROMPTS,
                                                       lambda r: first.set()))
        await asyncio.wait_for(first.wait(), 30)
        cancelled_at = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.perf_counter() - cancelled_at < 2.5
    assert worker_processes() == []


async def test_empty_prompts_rejected():
    with pytest.raises(ValueError, match="at least one prompt"):
        await run_load_in_workers(LoadPlan(parallel=1, rate=None, number=1), 1, client_args("http://127.0.0.1:9"),
                                  [], lambda r: None)


CTRL_C_SCRIPT = """
import asyncio, multiprocessing, sys
from runner.client.record import Prompt
from runner.config import EndpointConfig, ModelConfig, RequestConfig
from runner.load import LoadPlan
from runner.testing.scripted import Reply, ScriptedServerProcess, token_timeline
from runner.workers import ClientArgs, run_load_in_workers

async def main():
    async with ScriptedServerProcess(Reply(writes=token_timeline(0.05, 8, 0.01))) as server:
        args = ClientArgs(EndpointConfig(), ModelConfig(), RequestConfig(), server.base_url, 8)
        announced = False

        def on_record(record):
            nonlocal announced
            if not announced:
                pids = [p.pid for p in multiprocessing.active_children() if p.name.startswith("load-worker-")]
                print("running", *pids, flush=True)
                announced = True

        await run_load_in_workers(LoadPlan(parallel=8, rate=None, number=5000), 2, args,
                                  [Prompt(text="x", prompt_tokens=1)], on_record)

if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
"""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_stops_workers(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline().split()
        assert line[0] == "running"
        workers = [int(pid) for pid in line[1:]]
        assert len(workers) == 2
        interrupted_at = time.perf_counter()
        # A terminal's Ctrl-C reaches every process of the group: the parent and its workers.
        # The scripted server is left out because it is test scaffolding that does not handle it.
        for pid in [process.pid, *workers]:
            os.kill(pid, signal.SIGINT)
        assert process.wait(10) == 130
        assert time.perf_counter() - interrupted_at < 3.0
        assert not any(pid_alive(pid) for pid in workers)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
