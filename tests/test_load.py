"""Load shaping against an in-process sender with a known service time."""

import asyncio
import statistics
import time

import pytest

from runner.client.record import Prompt, RequestRecord
from runner.config import Arrival
from runner.load import LoadPlan, arrival_offsets, run_load


class TimedSender:
    """Completes every request after ``service`` seconds and tracks concurrency."""

    def __init__(self, service: float) -> None:
        self.service = service
        self.in_flight = 0
        self.max_in_flight = 0

    async def send(self, prompt: Prompt, record: RequestRecord) -> None:
        record.sent_at = time.perf_counter()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.service)
        self.in_flight -= 1
        record.first_token_at = record.ended_at = time.perf_counter()
        record.success = True


PROMPTS = [Prompt(text="x", prompt_tokens=1)]


async def test_closed_loop_holds_concurrency():
    sender = TimedSender(0.02)
    records = []
    outcome = await run_load(LoadPlan(parallel=8, rate=None, number=40, warmup=8), sender, PROMPTS, records.append)
    main = [r for r in outcome.records if not r.cooldown]
    assert len(main) == 48
    assert sender.max_in_flight == 8
    assert sum(r.warmup for r in main) == 8
    assert sorted(r.request_id for r in main) == list(range(48))
    # 48 requests of 20 ms over 8 slots take 6 rounds: at least 120 ms.
    assert outcome.ended_at - outcome.started_at >= 0.12
    assert len(records) == len(outcome.records)


async def test_closed_loop_cooldown_keeps_slots_busy():
    sender = TimedSender(0.02)
    # 21 measured requests over 10 slots: the third wave has one measured request.
    outcome = await run_load(LoadPlan(parallel=10, rate=None, number=21), sender, PROMPTS, lambda r: None)
    measured = [r for r in outcome.records if not r.cooldown]
    cooldown = [r for r in outcome.records if r.cooldown]
    assert len(measured) == 21
    assert all(r.request_id >= 21 for r in cooldown)
    assert len(cooldown) >= 9
    last_end = max(r.ended_at for r in measured)
    moment = last_end - 0.005
    in_flight = sum(1 for r in outcome.records if r.sent_at <= moment < r.ended_at)
    assert in_flight == 10
    # Cooldown requests still running when the last measured one ended are cancelled.
    assert all(r.success or r.error == "cancelled" for r in cooldown)


async def test_closed_loop_ids_start_at_offset():
    outcome = await run_load(LoadPlan(parallel=2, rate=None, number=3, first_id=100), TimedSender(0.0),
                             PROMPTS, lambda r: None)
    assert sorted(r.request_id for r in outcome.records if not r.cooldown) == [100, 101, 102]


async def test_open_loop_follows_schedule():
    plan = LoadPlan(parallel=None, rate=50.0, number=20, arrival=Arrival.constant)
    outcome = await run_load(plan, TimedSender(0.05), PROMPTS, lambda r: None)
    records = sorted(outcome.records, key=lambda r: r.request_id)
    gaps = [b.scheduled_at - a.scheduled_at for a, b in zip(records, records[1:])]
    assert gaps == pytest.approx([0.02] * 19, abs=1e-9)
    lateness = [r.sent_at - r.scheduled_at for r in records]
    assert max(lateness) < 0.015
    # At 50 req/s with 50 ms service, about 2.5 requests overlap: open loop does not wait.
    assert max_in_flight_at_least(outcome, 2)


def max_in_flight_at_least(outcome, count: int) -> bool:
    events = sorted([(r.sent_at, 1) for r in outcome.records] + [(r.ended_at, -1) for r in outcome.records])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak >= count


async def test_open_loop_cap_delays_and_reports():
    sender = TimedSender(0.1)
    plan = LoadPlan(parallel=2, rate=100.0, number=6, arrival=Arrival.constant)
    outcome = await run_load(plan, sender, PROMPTS, lambda r: None)
    assert sender.max_in_flight == 2
    late = [r.sent_at - r.scheduled_at for r in sorted(outcome.records, key=lambda r: r.request_id)]
    # Request 2 waits for a slot: scheduled at 20 ms, sent when request 0 ends at 100 ms.
    assert late[2] == pytest.approx(0.08, abs=0.015)


def test_arrival_offsets_statistics():
    poisson = arrival_offsets(LoadPlan(parallel=None, rate=200.0, number=4000, seed=1))
    gaps = [b - a for a, b in zip(poisson, poisson[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / 200, rel=0.05)
    # Exponential gaps: standard deviation equals the mean.
    assert statistics.stdev(gaps) == pytest.approx(1 / 200, rel=0.08)
    bursty = arrival_offsets(LoadPlan(parallel=None, rate=200.0, number=4000, seed=1, arrival=Arrival.gamma,
                                      burstiness=0.25))
    bursty_gaps = [b - a for a, b in zip(bursty, bursty[1:])]
    assert statistics.mean(bursty_gaps) == pytest.approx(1 / 200, rel=0.1)
    # Gamma with shape k has coefficient of variation 1/sqrt(k) = 2.
    assert statistics.stdev(bursty_gaps) / statistics.mean(bursty_gaps) == pytest.approx(2.0, rel=0.15)
    assert arrival_offsets(LoadPlan(parallel=None, rate=200.0, number=50, seed=1)) == poisson[:50]


async def test_duration_stops_new_requests():
    plan = LoadPlan(parallel=2, rate=None, number=1000, duration=0.1)
    outcome = await run_load(plan, TimedSender(0.02), PROMPTS, lambda r: None)
    assert outcome.cut_by_duration
    assert 8 <= len(outcome.records) <= 14
