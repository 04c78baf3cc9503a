"""Load shaping: closed loop (fixed concurrency) and open loop (arrival schedule).

Open-loop send times are computed up front as absolute times (start + cumulative
inter-arrival gaps), so a late send never shifts the ones after it. Each record keeps when
it was scheduled and when it was sent; the difference is the client's own lateness and is
reported, never hidden.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional, Protocol, Sequence

from runner.client.record import Prompt, RequestRecord
from runner.config import Arrival

log = logging.getLogger(__name__)

# Open-loop schedules start this long after the call, so the first sends are not late
# because of the set-up itself.
SCHEDULE_LEAD = 0.02
# Period of the event-loop lag probe, in seconds.
LAG_PROBE_PERIOD = 0.01


class Sender(Protocol):
    async def send(self, prompt: Prompt, record: RequestRecord) -> None: ...


class LagSamples(Protocol):
    """Destination of event-loop lag samples: a list, or a store that spills them to disk."""

    def append(self, value: float) -> None: ...


@dataclass
class LoadPlan:
    """One run of load: how many requests, and how they are paced."""

    # Requests in flight (closed loop), or the cap on them (open loop; None = no cap).
    parallel: Optional[int]
    # Open-loop arrivals per second; None = closed loop.
    rate: Optional[float]
    # Measured requests.
    number: int
    # Requests sent before the measured ones and marked as warmup.
    warmup: int = 0
    arrival: Arrival = Arrival.poisson
    burstiness: float = 1.0
    # Seconds after which no new request is sent; None = no limit.
    duration: Optional[float] = None
    seed: int = 0
    # Offset of the first request id, so ids stay unique across repeats of one run.
    first_id: int = 0

    @property
    def total(self) -> int:
        return self.warmup + self.number


@dataclass
class LoadOutcome:
    records: list[RequestRecord] = field(default_factory=list)
    # Event-loop lag samples in seconds: how late a 10 ms timer fired.
    loop_lag: list[float] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float = 0.0
    # True when load.duration stopped the run before every request was sent.
    cut_by_duration: bool = False
    # Multi-worker runs only (runner.workers): each worker's own lag samples, in worker order;
    # `loop_lag` then contains all of them together. Empty for a single-process run.
    worker_loop_lag: list[list[float]] = field(default_factory=list)


def arrival_offsets(plan: LoadPlan) -> list[float]:
    """Return the send time of each request in seconds after the schedule starts."""
    assert plan.rate is not None
    rng = random.Random(plan.seed)
    mean_gap = 1.0 / plan.rate
    offsets = []
    now = 0.0
    for _ in range(plan.total):
        offsets.append(now)
        if plan.arrival is Arrival.constant:
            gap = mean_gap
        elif plan.arrival is Arrival.gamma:
            # Shape k = burstiness keeps the mean at 1/rate: k < 1 is burstier than Poisson.
            gap = rng.gammavariate(plan.burstiness, mean_gap / plan.burstiness)
        else:
            gap = rng.expovariate(plan.rate)
        now += gap
    return offsets


async def _watch_loop_lag(samples: LagSamples) -> None:
    while True:
        before = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_PERIOD)
        samples.append(max(time.perf_counter() - before - LAG_PROBE_PERIOD, 0.0))


async def run_load(
    plan: LoadPlan,
    sender: Sender,
    prompts: Sequence[Prompt],
    on_record: Callable[[RequestRecord], None],
    keep_records: bool = True,
    lag_samples: Optional[LagSamples] = None,
) -> LoadOutcome:
    """Send ``plan.total`` requests (fewer if ``plan.duration`` runs out) and return their records.

    ``on_record`` runs in the event loop as each request ends; it must be quick. With
    ``keep_records=False`` the outcome's ``records`` stays empty, so a long run's memory
    does not grow with every record (``on_record`` still receives each one). Event-loop lag
    samples go to ``lag_samples`` when it is given, else to the outcome's ``loop_lag``.
    """
    if not prompts:
        raise ValueError("run_load needs at least one prompt")
    outcome = LoadOutcome()
    lag_task = asyncio.create_task(_watch_loop_lag(outcome.loop_lag if lag_samples is None else lag_samples))
    outcome.started_at = time.perf_counter()
    deadline = outcome.started_at + plan.duration if plan.duration else None

    measured_left = plan.number
    measured_done = asyncio.Event()
    if measured_left == 0:
        measured_done.set()

    def finish(record: RequestRecord) -> None:
        nonlocal measured_left
        if keep_records:
            outcome.records.append(record)
        on_record(record)
        if not (record.warmup or record.cooldown):
            measured_left -= 1
            if measured_left == 0:
                measured_done.set()

    async def one(index: int, scheduled_at: float) -> None:
        record = RequestRecord(
            request_id=plan.first_id + index,
            warmup=index < plan.warmup,
            cooldown=index >= plan.total,
            scheduled_at=scheduled_at,
        )
        try:
            await sender.send(prompts[index % len(prompts)], record)
        except asyncio.CancelledError:
            if record.cooldown:
                finish(record)  # stopped on purpose once the measured requests ended
            raise
        finish(record)

    try:
        if plan.rate is None:
            await _closed_loop(plan, one, deadline, outcome, measured_done)
        else:
            await _open_loop(plan, one, deadline, outcome)
    finally:
        lag_task.cancel()
        outcome.ended_at = time.perf_counter()
    return outcome


async def _closed_loop(
    plan: LoadPlan,
    one: Callable[[int, float], Awaitable[None]],
    deadline: Optional[float],
    outcome: LoadOutcome,
    measured_done: asyncio.Event,
) -> None:
    """Keep ``plan.parallel`` requests in flight until the last measured request has ended.

    Without cooldown requests the last wave would run with fewer and fewer requests in
    flight. Its measured requests would then see a lighter load than the rest, and the
    measured window would end in a stretch of lower throughput.
    """
    indexes = itertools.count()

    async def worker() -> None:
        for index in indexes:
            if deadline is not None and time.perf_counter() >= deadline:
                outcome.cut_by_duration = True
                return
            if index >= plan.total and measured_done.is_set():
                return
            await one(index, time.perf_counter())

    assert plan.parallel is not None
    workers: list[asyncio.Task[None]] = []

    async def stop_when_measured() -> None:
        await measured_done.wait()
        # Every measured request has ended; what is still in flight is warmup or cooldown.
        for task in workers:
            task.cancel()

    watcher = asyncio.create_task(stop_when_measured())
    try:
        async with asyncio.TaskGroup() as group:
            workers.extend(group.create_task(worker()) for _ in range(min(plan.parallel, max(plan.total, 1))))
    finally:
        watcher.cancel()


async def _open_loop(
    plan: LoadPlan,
    one: Callable[[int, float], Awaitable[None]],
    deadline: Optional[float],
    outcome: LoadOutcome,
) -> None:
    slots = asyncio.Semaphore(plan.parallel) if plan.parallel else None

    async def capped(index: int, scheduled_at: float) -> None:
        try:
            await one(index, scheduled_at)
        finally:
            if slots is not None:
                slots.release()

    start = time.perf_counter() + SCHEDULE_LEAD
    async with asyncio.TaskGroup() as group:
        for index, offset in zip(itertools.count(), arrival_offsets(plan)):
            scheduled_at = start + offset
            if deadline is not None and scheduled_at >= deadline:
                outcome.cut_by_duration = True
                break
            delay = scheduled_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                # A full cap delays the send; the record's dispatched_at - scheduled_at shows it.
                await slots.acquire()
            group.create_task(capped(index, scheduled_at))
