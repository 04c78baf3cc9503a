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
from typing import Awaitable, Callable, Iterator, Optional, Protocol, Sequence

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


@dataclass(frozen=True)
class Share:
    """The requests of a plan that one event loop sends: all of them, or worker ``worker``'s part.

    Closed loop: concurrency slot ``s`` belongs to worker ``s % workers``, and request ``i``
    (warmup, measured or cooldown) is sent by the worker that owns slot ``i % plan.parallel``,
    so each worker's share of requests is in proportion to its slots. Open loop: request ``i``
    is sent by worker ``i % workers`` at its time in the plan's one arrival schedule, and a
    ``plan.parallel`` cap is split between the workers.
    """

    worker: int = 0
    workers: int = 1

    def owns(self, plan: LoadPlan, index: int) -> bool:
        if plan.rate is None:
            assert plan.parallel is not None
            return index % plan.parallel % self.workers == self.worker
        return index % self.workers == self.worker

    def slots(self, plan: LoadPlan) -> Optional[int]:
        """Return the closed loop's requests in flight, or the open loop's cap (None = no cap)."""
        if plan.rate is None:
            assert plan.parallel is not None
            # A plan of fewer requests than slots leaves the extra slots unused.
            used = min(plan.parallel, max(plan.total, 1))
            return len(range(self.worker, used, self.workers))
        if plan.parallel is None:
            return None
        return plan.parallel // self.workers + (self.worker < plan.parallel % self.workers)

    def measured(self, plan: LoadPlan) -> int:
        """Return how many measured requests (neither warmup nor cooldown) this share sends."""
        if self.workers == 1:
            return plan.number
        return sum(1 for index in range(plan.warmup, plan.total) if self.owns(plan, index))

    def closed_indexes(self, plan: LoadPlan) -> Iterator[int]:
        """Yield this share's request indexes without end; those past ``plan.total`` are cooldown."""
        return (index for index in itertools.count() if self.owns(plan, index))

    def schedule(self, plan: LoadPlan) -> list[tuple[int, float]]:
        """Return (request index, seconds after the schedule starts) of this share's open-loop sends."""
        offsets = arrival_offsets(plan)
        return [(index, offsets[index]) for index in range(self.worker, plan.total, self.workers)]


WHOLE_PLAN = Share()


@dataclass
class WorkerStats:
    """Statistics that one load worker reports when its share ends."""

    # Event-loop lag samples in seconds.
    loop_lag: list[float] = field(default_factory=list)
    # Client delay of each measured request in seconds: dispatched_at (else sent_at) minus scheduled_at.
    lateness: list[float] = field(default_factory=list)
    # Records the worker sent: warmup, measured and cooldown.
    requests: int = 0
    # CPU seconds (user + system, all threads) the worker's process used while it sent its share.
    cpu_seconds: float = 0.0
    # Wall seconds from the common start to the end of the worker's share.
    wall_seconds: float = 0.0
    cut_by_duration: bool = False


@dataclass
class LoadOutcome:
    records: list[RequestRecord] = field(default_factory=list)
    # Event-loop lag samples in seconds: how late a 10 ms timer fired.
    loop_lag: list[float] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float = 0.0
    # True when load.duration stopped the run before every request was sent.
    cut_by_duration: bool = False
    # Runs with worker processes or Ray actors only (runner.workers): each worker's stats, in
    # worker order; `loop_lag` then contains the lag samples of all of them. Empty otherwise.
    workers: list[WorkerStats] = field(default_factory=list)


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
    *,
    share: Share = WHOLE_PLAN,
    start_at: Optional[float] = None,
    all_measured: Optional[asyncio.Event] = None,
) -> LoadOutcome:
    """Send ``plan.total`` requests (fewer if ``plan.duration`` runs out) and return their records.

    ``on_record`` runs in the event loop as each request ends; it must be quick. With
    ``keep_records=False`` the outcome's ``records`` stays empty, so a long run's memory
    does not grow with every record (``on_record`` still receives each one). Event-loop lag
    samples go to ``lag_samples`` when it is given, else to the outcome's ``loop_lag``.

    A load worker (runner.workers) passes its ``share`` of the plan, the common ``start_at``
    (a perf_counter time, which is also where its open-loop schedule starts) and the
    ``all_measured`` event, which its parent sets once the measured requests of every worker
    have ended. Until then the worker's closed loop keeps its slots busy with cooldown requests.
    """
    if not prompts:
        raise ValueError("run_load needs at least one prompt")
    outcome = LoadOutcome()
    lag_task = asyncio.create_task(_watch_loop_lag(outcome.loop_lag if lag_samples is None else lag_samples))
    if start_at is not None:
        delay = start_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        outcome.started_at = schedule_start = start_at
    else:
        outcome.started_at = time.perf_counter()
        schedule_start = outcome.started_at + SCHEDULE_LEAD
    deadline = outcome.started_at + plan.duration if plan.duration else None

    measured_left = share.measured(plan)
    measured_done = all_measured if all_measured is not None else asyncio.Event()
    if measured_left == 0 and all_measured is None:
        measured_done.set()

    def finish(record: RequestRecord) -> None:
        nonlocal measured_left
        if keep_records:
            outcome.records.append(record)
        on_record(record)
        if not (record.warmup or record.cooldown):
            measured_left -= 1
            if measured_left == 0 and all_measured is None:
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
            if not (record.cooldown or record.warmup):
                # Measured requests are cancelled only when a signal or the failure guard stops
                # the whole load. The row keeps the error "cancelled", and the cooldown flag
                # leaves it out of every statistic, as for cooldown requests cut at a normal end.
                record.cooldown = True
            finish(record)
            raise
        finish(record)

    try:
        if plan.rate is None:
            await _closed_loop(plan, share, one, deadline, outcome, measured_done)
        else:
            await _open_loop(plan, share, one, schedule_start, deadline, outcome)
    finally:
        lag_task.cancel()
        outcome.ended_at = time.perf_counter()
    return outcome


async def _closed_loop(
    plan: LoadPlan,
    share: Share,
    one: Callable[[int, float], Awaitable[None]],
    deadline: Optional[float],
    outcome: LoadOutcome,
    measured_done: asyncio.Event,
) -> None:
    """Keep the share's slots busy until the last measured request has ended.

    Without cooldown requests the last wave would run with fewer and fewer requests in
    flight. Its measured requests would then see a lighter load than the rest, and the
    measured window would end in a stretch of lower throughput.
    """
    indexes = share.closed_indexes(plan)

    async def worker() -> None:
        for index in indexes:
            if deadline is not None and time.perf_counter() >= deadline:
                outcome.cut_by_duration = True
                return
            if index >= plan.total and measured_done.is_set():
                return
            await one(index, time.perf_counter())

    workers: list[asyncio.Task[None]] = []

    async def stop_when_measured() -> None:
        await measured_done.wait()
        # Every measured request has ended; what is still in flight is warmup or cooldown.
        for task in workers:
            task.cancel()

    watcher = asyncio.create_task(stop_when_measured())
    try:
        async with asyncio.TaskGroup() as group:
            workers.extend(group.create_task(worker()) for _ in range(share.slots(plan) or 0))
    finally:
        watcher.cancel()


async def _open_loop(
    plan: LoadPlan,
    share: Share,
    one: Callable[[int, float], Awaitable[None]],
    start: float,
    deadline: Optional[float],
    outcome: LoadOutcome,
) -> None:
    cap = share.slots(plan)
    slots = asyncio.Semaphore(cap) if cap else None

    async def capped(index: int, scheduled_at: float) -> None:
        try:
            await one(index, scheduled_at)
        finally:
            if slots is not None:
                slots.release()

    async with asyncio.TaskGroup() as group:
        for index, offset in share.schedule(plan):
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
