"""Load from several worker processes against a scripted server in its own process."""

import asyncio
import multiprocessing
import os
import pickle
import signal
import time

import pandas as pd
import pytest

from runner.client.finalize import finalize
from runner.client.openai import OpenAIClient
from runner.client.record import Prompt, RequestRecord
from runner.config import Arrival, EndpointConfig, LoadBackend, LoadConfig, ModelConfig, RequestConfig
from runner.errors import ConfigError, RunnerError
from runner.load import LoadPlan, Share, arrival_offsets, run_load
from runner.metrics import summarize
from runner.output import record_row
from runner.record_batch import FIELDS, RecordBatch
from runner.testing.scripted import Reply, ScriptedServerProcess, token_timeline
from runner.tokenizer import WorkerTokenCounter, token_counter
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


def first(iterator, count: int) -> list:
    return [next(iterator) for _ in range(count)]


def test_split_closed_loop_follows_slots():
    plan = LoadPlan(parallel=3, rate=None, number=10, warmup=2)
    shares = split_plan(plan, 2)
    assert shares == [Share(0, 2), Share(1, 2)]
    assert [s.slots(plan) for s in shares] == [2, 1]
    # Request i goes to the worker of slot i % 3: slots 0 and 2 are worker 0's. Indexes from
    # plan.total = 12 on are cooldown requests, and they follow the same rule.
    assert first(shares[0].closed_indexes(plan), 10) == [0, 2, 3, 5, 6, 8, 9, 11, 12, 14]
    assert first(shares[1].closed_indexes(plan), 5) == [1, 4, 7, 10, 13]
    assert [s.measured(plan) for s in shares] == [7, 3]


def test_split_fewer_requests_than_slots():
    plan = LoadPlan(parallel=8, rate=None, number=3)
    shares = split_plan(plan, 2)
    # One process would use 3 slots for 3 requests; the workers use 2 and 1 of them.
    assert [s.slots(plan) for s in shares] == [2, 1]
    assert [s.measured(plan) for s in shares] == [2, 1]


def test_whole_plan_share():
    closed = LoadPlan(parallel=4, rate=None, number=10, warmup=2)
    assert Share().slots(closed) == 4
    assert Share().measured(closed) == 10
    assert first(Share().closed_indexes(closed), 13) == list(range(13))
    opened = LoadPlan(parallel=None, rate=50.0, number=5, seed=2)
    assert Share().slots(opened) is None
    assert Share().schedule(opened) == list(enumerate(arrival_offsets(opened)))


def test_split_never_exceeds_slots_or_requests():
    assert len(split_plan(LoadPlan(parallel=2, rate=None, number=50), 4)) == 2
    assert len(split_plan(LoadPlan(parallel=64, rate=None, number=3), 4)) == 3
    assert len(split_plan(LoadPlan(parallel=2, rate=100.0, number=50), 4)) == 2


def test_split_open_loop_shares_one_schedule():
    plan = LoadPlan(parallel=None, rate=50.0, number=30, warmup=3, seed=7)
    shares = split_plan(plan, 3)
    merged = sorted(pair for share in shares for pair in share.schedule(plan))
    assert merged == list(enumerate(arrival_offsets(plan)))
    for share in shares:
        assert [index for index, _ in share.schedule(plan)] == list(range(share.worker, plan.total, 3))
        assert share.slots(plan) is None
        assert share.measured(plan) == 10


def test_split_open_loop_divides_cap():
    plan = LoadPlan(parallel=5, rate=50.0, number=30)
    assert [s.slots(plan) for s in split_plan(plan, 2)] == [3, 2]


def test_split_rejects_zero_workers():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        split_plan(LoadPlan(parallel=4, rate=None, number=4), 0)


# --- records between processes ----------------------------------------------------------------


def final_record(request_id: int, itl: list[float]) -> RequestRecord:
    record = RequestRecord(request_id=request_id, cooldown=True, scheduled_at=1.5, dispatched_at=1.25,
                           sent_at=1.75, first_token_at=2.0, last_token_at=2.5, ended_at=2.75, status=200,
                           prompt_tokens=7, completion_tokens=3, token_source="usage", finish_reason="stop",
                           success=True, max_tokens=16, expected_prompt_tokens=7, tokenizer_tokens=4,
                           chunk_times=[2.0, 2.25, 2.5], chunk_texts=["a", "b", "c"])
    record.itl = itl
    return record


def test_record_batch_round_trip():
    batch = RecordBatch()
    batch.add(final_record(1, [0.25, 0.25]))
    batch.add(final_record(2, []))
    received = list(pickle.loads(pickle.dumps(batch)).records())
    assert [r.request_id for r in received] == [1, 2]
    assert [r.itl for r in received] == [[0.25, 0.25], []]
    for name in FIELDS:
        if name != "request_id":
            assert getattr(received[0], name) == getattr(final_record(1, []), name), name
    # Chunk times and texts stay in the worker: the ITL samples already contain what they gave.
    assert received[0].chunk_times == []
    assert received[0].chunk_texts == []
    assert received[0].ttft == 0.25
    assert received[0].tpot == 0.25


def test_record_batch_rejects_unfinished_record():
    with pytest.raises(ValueError, match="record 3 is not final"):
        RecordBatch().add(RequestRecord(request_id=3))


# Text with special tokens, digits, CJK, an emoji and mixed whitespace.
TOKENIZER_TEXTS = ["", " hi" * 64, "<|im_start|>user\nHello<|im_end|>", "x = 3.14159 # 中文 😀\r\n\t end",
                   "<|endoftext|><think>plan</think>" * 3]


def test_worker_counter_counts_like_parent(qwen_tokenizer):
    count = token_counter(qwen_tokenizer)
    shipped = pickle.loads(pickle.dumps(WorkerTokenCounter(qwen_tokenizer, "qwen2.5")))
    assert shipped.backend_json is not None
    worker_count = shipped.build()
    assert [worker_count(text) for text in TOKENIZER_TEXTS] == [count(text) for text in TOKENIZER_TEXTS]
    assert count(TOKENIZER_TEXTS[1]) == 64


def test_worker_counter_without_backend_loads_by_name(qwen_tokenizer):
    # A tokenizer without a Rust backend is loaded again in the worker from its name.
    shipped = pickle.loads(pickle.dumps(WorkerTokenCounter(object(), "qwen2.5")))
    assert shipped.backend_json is None
    count = token_counter(qwen_tokenizer)
    assert [shipped.build()(text) for text in TOKENIZER_TEXTS] == [count(text) for text in TOKENIZER_TEXTS]


def test_finalize_twice_keeps_first_result():
    record = final_record(1, None)
    record.token_source = ""
    itl = finalize(record, lambda text: len(text))
    assert record.completion_tokens == 3
    assert itl == [0.25, 0.25]
    # The worker finalized the record; the parent's second call must neither recount nor flag it empty.
    assert finalize(record, lambda text: 99) == [0.25, 0.25]
    assert record.completion_tokens == 3
    assert record.empty_output is False


def test_auto_workers_rule():
    # Workers are opt-in (see runner.workers.auto_workers for why).
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
        streamed = []
        multi = await run_load_in_workers(plan, 2, client_args(server.base_url, 8), PROMPTS, streamed.append)
        served = server

    assert [r.request_id for r in streamed] == [r.request_id for r in multi.records]
    single_main = [r for r in single.records if not r.cooldown]
    multi_main = [r for r in multi.records if not r.cooldown]
    assert len(multi_main) == len(single_main) == 48
    assert sorted(r.request_id for r in multi_main) == list(range(100, 148))
    assert {r.request_id: r.warmup for r in multi_main} == {r.request_id: r.warmup for r in single_main}
    assert all(r.success for r in multi_main)
    # Both send cooldown requests past the plan's ids, each id once.
    for outcome in (single, multi):
        cooldown = [r for r in outcome.records if r.cooldown]
        assert cooldown
        assert min(r.request_id for r in cooldown) >= 148
        assert len({r.request_id for r in outcome.records}) == len(outcome.records)
        assert all(r.success or r.error == "cancelled" for r in cooldown)
    # Two workers of 4 slots each keep 8 requests in flight, as one process does.
    assert served.state.max_open_requests == 8

    single_frame, multi_frame = frame_of(single.records), frame_of(multi.records)
    assert list(multi_frame.columns) == list(single_frame.columns)
    measured = ~multi_frame["warmup"] & ~multi_frame["cooldown"]
    single_measured = ~single_frame["warmup"] & ~single_frame["cooldown"]
    assert sorted(multi_frame.loc[measured, "completion_tokens"]) == sorted(single_frame.loc[single_measured,
                                                                                             "completion_tokens"])
    single_row, multi_row = summarize(single_frame, parallel=8), summarize(multi_frame, parallel=8)
    assert set(multi_row) == set(single_row)
    assert multi_row["requests"] == single_row["requests"] == 40
    assert multi_row["warmup"] == single_row["warmup"] == 8
    assert multi_row["avg_ttft"] == pytest.approx(0.05, abs=0.015)
    assert multi_row["avg_latency"] == pytest.approx(single_row["avg_latency"], abs=0.015)
    assert multi_row["avg_tpot"] == pytest.approx(0.01, abs=0.003)
    # 8 slots of 120 ms requests: 66.7 requests/s when every slot stays busy to the end.
    assert multi_row["rps"] == pytest.approx(single_row["rps"], rel=0.15)


async def test_worker_cooldown_keeps_slots_busy():
    # 21 measured requests over 10 slots: the third wave has one measured request, sent by
    # worker 0; worker 1's slots must stay busy with cooldown requests until it ends.
    plan = LoadPlan(parallel=10, rate=None, number=21)
    async with ScriptedServerProcess(REPLY) as server:
        outcome = await run_load_in_workers(plan, 2, client_args(server.base_url, 10), PROMPTS, lambda r: None)
        served = server
    measured = [r for r in outcome.records if not r.cooldown]
    cooldown = [r for r in outcome.records if r.cooldown]
    assert sorted(r.request_id for r in measured) == list(range(21))
    assert all(r.request_id >= 21 for r in cooldown)
    assert len(cooldown) >= 9
    assert served.state.max_open_requests == 10
    # Halfway through the last measured request every slot is busy. Without cooldown requests
    # only that request would be in flight, because worker 1's 10 requests ended a wave before.
    last = max(measured, key=lambda r: r.ended_at)
    moment = (last.sent_at + last.ended_at) / 2
    assert sum(1 for r in outcome.records if r.sent_at <= moment < r.ended_at) == 10
    assert all(r.success or r.error == "cancelled" for r in cooldown)
    # The cooldown requests stopped soon after the last measured one: well within one more wave.
    assert max(r.ended_at for r in outcome.records) - max(r.ended_at for r in measured) < 0.12


async def test_workers_count_tokens_like_one_process(qwen_tokenizer):
    # Without usage, output tokens come from the tokenizer; with usage it cross-checks them.
    plan = LoadPlan(parallel=4, rate=None, number=8)
    count = token_counter(qwen_tokenizer)
    for usage in (False, True):
        reply = Reply(writes=token_timeline(0.02, 6, 0.005, usage=usage))
        async with ScriptedServerProcess(reply) as server:
            async with OpenAIClient(EndpointConfig(), ModelConfig(), RequestConfig(), base_url=server.base_url,
                                    pool_size=4) as client:
                single = await run_load(plan, client, PROMPTS, lambda r: finalize(r, count))
            multi = await run_load_in_workers(plan, 2, client_args(server.base_url, 4), PROMPTS, lambda r: None,
                                              tokenizer=WorkerTokenCounter(qwen_tokenizer, "qwen2.5"))
        columns = ("completion_tokens", "token_source", "tokenizer_tokens")
        expected = {tuple(getattr(r, c) for c in columns) for r in single.records if not r.cooldown}
        got = {tuple(getattr(r, c) for c in columns) for r in multi.records if not r.cooldown}
        # " t0" .. " t5" are two tokens each for Qwen2.5: 12 tokens over 6 chunks.
        assert got == expected == ({(12, "tokenizer", None)} if not usage else {(6, "usage", 12)})
        assert {len(r.itl) for r in multi.records if r.success} == {len(finalize(r, count))
                                                                    for r in single.records if r.success}


async def test_keep_records_false_streams_only():
    plan = LoadPlan(parallel=4, rate=None, number=12)
    streamed = []
    async with ScriptedServerProcess(REPLY) as server:
        outcome = await run_load_in_workers(plan, 2, client_args(server.base_url), PROMPTS, streamed.append,
                                            keep_records=False)
    assert outcome.records == []
    assert sorted(r.request_id for r in streamed if not r.cooldown) == list(range(12))


async def test_worker_stats_reported_per_worker():
    plan = LoadPlan(parallel=4, rate=None, number=20, warmup=4)
    async with ScriptedServerProcess(REPLY) as server:
        outcome = await run_load_in_workers(plan, 2, client_args(server.base_url), PROMPTS, lambda r: None)
    shares = split_plan(plan, 2)
    assert len(outcome.workers) == 2
    for share, stats in zip(shares, outcome.workers):
        sent = [r for r in outcome.records if share.owns(plan, r.request_id)]
        assert stats.requests == len(sent)
        # Lateness is kept for the measured requests only: 10 per worker.
        assert len(stats.lateness) == share.measured(plan) == 10
        assert all(sample >= 0 for sample in stats.lateness)
        assert len(stats.loop_lag) > 10
        assert stats.cpu_seconds > 0
        assert stats.wall_seconds > 0
    assert len(outcome.loop_lag) == sum(len(stats.loop_lag) for stats in outcome.workers)
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


def _default_sigint() -> None:
    """Give the child a shell's SIGINT state: default disposition and not blocked.

    A child inherits an ignored or blocked signal from its parent, and in the full suite the
    pytest process's SIGINT state can differ from a shell's.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_stops_workers(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                               preexec_fn=_default_sigint)
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


@pytest.fixture
def fresh_warnings(monkeypatch):
    from runner import worker_count

    monkeypatch.setattr(worker_count, "_warned", set())
    monkeypatch.setattr(worker_count, "usable_cores", lambda: 2)
    return worker_count


def test_worker_cap_warns_once(fresh_warnings, caplog):
    plan = LoadPlan(parallel=None, rate=50.0, number=3)
    for _ in range(3):
        fresh_warnings.warn_if_capped(4, plan, len(split_plan(plan, 4)), local=True)

    assert [record.getMessage() for record in caplog.records] == [
        "load.workers=4, but only 3 workers are used: each worker needs at least one concurrency slot and one "
        "request, and this load point has no slot cap and 3 requests",
        "3 load worker processes run on 2 usable CPU cores, so they share cores and their schedule lateness and "
        "event-loop lag grow; set load.workers to 2 or fewer",
    ]


def test_ray_actors_skip_core_warning(fresh_warnings, caplog):
    plan = LoadPlan(parallel=8, rate=None, number=100)

    fresh_warnings.warn_if_capped(4, plan, len(split_plan(plan, 4)), local=False)
    fresh_warnings.warn_if_capped(2, plan, len(split_plan(plan, 2)), local=True)

    assert caplog.records == []
