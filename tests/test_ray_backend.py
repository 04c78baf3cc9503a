"""Load workers as Ray actors: clock offsets, record shifting, and a run on a local Ray instance."""

import asyncio
import time

import pandas as pd
import pytest

from runner.client.finalize import finalize
from runner.client.openai import OpenAIClient
from runner.client.record import Prompt, RequestRecord
from runner.config import EndpointConfig, LoadBackend, ModelConfig, RequestConfig
from runner.load import LoadPlan, run_load
from runner.metrics import summarize
from runner.output import record_row
from runner.ray_backend import LoadActor, measure_clock_offset, shift_record
from runner.testing.scripted import Reply, ScriptedServerProcess, token_timeline
from runner.workers import BATCH_RECORDS, ClientArgs, WorkerTask, run_load_in_workers, split_plan

PROMPTS = [Prompt(text="hello", prompt_tokens=5)]
REPLY = Reply(writes=token_timeline(0.05, 8, 0.01))


class FakeClock:
    """Stands in for ``actor.clock``: a clock 5 s ahead of the parent's, read after each delay.

    A slow answer reads the clock 20 ms late, as a busy actor would, so only the fastest
    round trip gives the true offset.
    """

    def __init__(self, delays):
        self.delays = iter(delays)

    def remote(self):
        delay = next(self.delays)

        async def answer():
            await asyncio.sleep(delay)
            late = 0.02 if delay else 0.0
            return time.perf_counter() + 5.0 + late

        return answer()


class FakeActor:
    def __init__(self, delays):
        self.clock = FakeClock(delays)


async def test_clock_offset_keeps_shortest_round_trip():
    actor = FakeActor([0.03, 0.03, 0.03, 0.0, 0.03, 0.03, 0.03])
    offset, round_trip = await measure_clock_offset(actor)
    assert round_trip < 0.01
    assert offset == pytest.approx(5.0, abs=0.005)


def test_shift_record_moves_every_timestamp():
    record = RequestRecord(request_id=1, scheduled_at=10.0, sent_at=10.5, first_token_at=11.0,
                           last_token_at=12.0, ended_at=12.5, chunk_times=[11.0, 12.0])
    shift_record(record, -10.0)
    assert (record.scheduled_at, record.sent_at, record.first_token_at) == (0.0, 0.5, 1.0)
    assert (record.last_token_at, record.ended_at) == (2.0, 2.5)
    assert record.chunk_times == [1.0, 2.0]
    assert record.ttft == 0.5


def test_shift_record_keeps_missing_times():
    record = RequestRecord(request_id=1, scheduled_at=3.0)
    shift_record(record, 1.0)
    assert record.scheduled_at == 4.0
    assert record.sent_at is None
    assert record.ended_at is None


async def test_actor_class_batches_records():
    # The actor class runs here without Ray: open, run, take and measured as the parent calls them.
    plan = LoadPlan(parallel=4, rate=None, number=2 * BATCH_RECORDS)
    async with ScriptedServerProcess(Reply(writes=token_timeline(0.0, 1, 0.0))) as server:
        args = ClientArgs(EndpointConfig(), ModelConfig(), RequestConfig(), server.base_url, 4)
        actor = LoadActor(WorkerTask(plan, split_plan(plan, 1)[0], args, PROMPTS))
        await actor.open()
        run = asyncio.create_task(actor.run(await actor.clock()))
        batches, finished, measured = [], False, 0
        while not finished:
            new_batches, finished = await actor.take()
            batches.extend(new_batches)
            measured += sum(1 for batch in new_batches for record in batch.records() if not record.cooldown)
            if measured == plan.number:
                await actor.measured()  # as the parent does: the cooldown requests stop now
        result = await run
    records = [record for batch in batches for record in batch.records()]
    assert sorted(r.request_id for r in records if not r.cooldown) == list(range(plan.total))
    assert result.requests == len(records)
    assert max(len(batch) for batch in batches) <= BATCH_RECORDS
    assert not result.cut_by_duration
    assert result.loop_lag
    assert len(result.lateness) == plan.number


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def frame_of(records) -> pd.DataFrame:
    rows = [record_row(r, finalize(r, None), origin=0.0, variable="parallel", value=1, repeat=0) for r in records]
    return pd.DataFrame(rows)


@pytest.mark.slow
async def test_ray_actors_match_single_process(local_ray):
    plan = LoadPlan(parallel=4, rate=None, number=24, warmup=4)
    async with ScriptedServerProcess(REPLY) as server:
        async with OpenAIClient(EndpointConfig(), ModelConfig(), RequestConfig(), base_url=server.base_url,
                                pool_size=4) as client:
            single = await run_load(plan, client, PROMPTS, lambda r: None)
        args = ClientArgs(EndpointConfig(), ModelConfig(), RequestConfig(), server.base_url, 4)
        streamed = []
        multi = await run_load_in_workers(plan, 2, args, PROMPTS, streamed.append, backend=LoadBackend.ray)

    single_main = [r for r in single.records if not r.cooldown]
    multi_main = [r for r in multi.records if not r.cooldown]
    assert len(multi_main) == len(single_main) == 28
    assert len(streamed) == len(multi.records)
    assert sorted(r.request_id for r in multi_main) == list(range(28))
    assert {r.request_id: r.warmup for r in multi_main} == {r.request_id: r.warmup for r in single_main}
    assert all(r.success for r in multi_main)
    assert all(r.request_id >= 28 for r in multi.records if r.cooldown)
    assert len(multi.workers) == 2
    assert [len(stats.lateness) for stats in multi.workers] == [12, 12]
    # Shifted onto the parent's clock: on one machine the offset is a fraction of a millisecond.
    assert min(r.scheduled_at for r in multi.records) == pytest.approx(multi.started_at, abs=0.005)

    single_frame, multi_frame = frame_of(single.records), frame_of(multi.records)
    assert list(multi_frame.columns) == list(single_frame.columns)
    single_row, multi_row = summarize(single_frame), summarize(multi_frame)
    assert set(multi_row) == set(single_row)
    assert multi_row["requests"] == single_row["requests"] == 24
    assert multi_row["avg_ttft"] == pytest.approx(0.05, abs=0.015)
    assert multi_row["avg_tpot"] == pytest.approx(0.01, abs=0.003)
