"""Load workers as Ray actors (load.backend=ray), possibly on other machines of a Ray cluster.

Each actor runs ``runner.workers.run_share`` for one share of the plan in its own event
loop. The parent collects records by calling the actor's ``take`` method in a loop, which
returns the actor's record batches (``runner.record_batch``) at least every BATCH_SECONDS,
and calls every actor's ``measured`` method once the plan's last measured request has ended.

Clocks: ``perf_counter`` of an actor on another machine has an unrelated origin. Before
the load starts, the parent measures each actor's clock offset from CLOCK_SAMPLES round
trips (parent time t0, actor reads its clock, parent time t1; offset = actor time minus
(t0 + t1) / 2) and keeps the sample with the shortest round trip. The actor's start time
is converted to its own clock, and its records are shifted back onto the parent's. The
offset error is at most half of that round trip. It moves whole records (scheduled_at
and every timestamp of one record shift together), so TTFT, latency, TPOT and lateness,
which are differences within one record, do not change.

The package ``ray`` is optional (the ``ray`` extra: ``pip install -e '.[ray]'``); it is imported
only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Optional

from runner.client.record import RequestRecord
from runner.errors import ConfigError, RunnerError
from runner.gc_pause import setup_objects_frozen
from runner.load import SCHEDULE_LEAD, LoadOutcome, WorkerStats
from runner.record_batch import RecordBatch
from runner.workers import (
    BATCH_SECONDS,
    READY_TIMEOUT,
    RecordBatcher,
    WorkerFleet,
    WorkerTask,
    run_share,
    token_counter_for,
)

log = logging.getLogger(__name__)

# Round trips used to measure each actor's clock offset.
CLOCK_SAMPLES = 7
# Seconds between sending the start time and the common start; Ray method calls take
# milliseconds on one machine and can take tens of milliseconds across a network.
RAY_START_MARGIN = 0.25
_TIME_FIELDS = ("scheduled_at", "dispatched_at", "sent_at", "first_token_at", "last_token_at", "ended_at")


def import_ray() -> Any:
    """Return the ``ray`` module, or raise ConfigError saying how to install it.

    ``runner.preflight.check_inputs`` already rejects a run that needs Ray when the package
    is missing, so in a run this fires only when an installed Ray fails to import.
    """
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            f"load.backend=ray: the ray package cannot be imported ({exc}); run pip install -e '.[ray]' "
            "in the runner's folder, or set load.backend=process"
        ) from None
    return ray


class LoadActor:
    """One worker as a Ray async actor: ``open``, then ``run`` while the parent calls ``take``."""

    def __init__(self, task: WorkerTask) -> None:
        self.task = task
        self._client: Any = None
        self._batcher: Optional[RecordBatcher] = None
        self._pending: list[RecordBatch] = []
        self._arrived = asyncio.Event()
        self._all_measured = asyncio.Event()
        self._finished = False
        self._load: Optional[asyncio.Task[WorkerStats]] = None

    async def clock(self) -> float:
        return time.perf_counter()

    async def open(self) -> None:
        self._batcher = RecordBatcher(self._add, token_counter_for(self.task.tokenizer),
                                      self.task.share.measured(self.task.plan))
        client = self.task.client.build()
        await client.__aenter__()
        self._client = client

    async def run(self, start_at: float) -> WorkerStats:
        """Send the share from ``start_at`` (this actor's perf_counter clock) and return its stats."""
        assert self._batcher is not None, "LoadActor.run called before open"
        self._load = asyncio.create_task(run_share(self.task, self._client, start_at, self._all_measured,
                                                   self._batcher))
        try:
            with setup_objects_frozen():
                return await self._load
        finally:
            await self._client.__aexit__(None, None, None)
            self._finished = True
            self._arrived.set()

    async def measured(self) -> None:
        """Stop the cooldown requests: the parent has received every measured record of the plan."""
        self._all_measured.set()

    async def take(self) -> tuple[list[RecordBatch], bool]:
        """Wait up to BATCH_SECONDS for a batch; return the batches and whether the run ended."""
        if not self._pending and not self._finished:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BATCH_SECONDS):
                    await self._arrived.wait()
        finished = self._finished
        if self._batcher is not None:
            self._batcher.flush()
        batches, self._pending = self._pending, []
        return batches, finished

    async def stop(self) -> None:
        if self._load is not None:
            self._load.cancel()

    def _add(self, batch: RecordBatch) -> None:
        self._pending.append(batch)
        self._arrived.set()


def shift_record(record: RequestRecord, delta: float) -> None:
    """Add ``delta`` seconds to every timestamp of ``record``."""
    for name in _TIME_FIELDS:
        value = getattr(record, name)
        if value is not None:
            setattr(record, name, value + delta)
    record.chunk_times = [moment + delta for moment in record.chunk_times]


async def measure_clock_offset(actor: Any) -> tuple[float, float]:
    """Return (actor clock minus parent clock, round trip) of the shortest of CLOCK_SAMPLES round trips."""
    best: Optional[tuple[float, float]] = None
    for _ in range(CLOCK_SAMPLES):
        before = time.perf_counter()
        actor_time = await actor.clock.remote()
        after = time.perf_counter()
        sample = (actor_time - (before + after) / 2, after - before)
        if best is None or sample[1] < best[1]:
            best = sample
    assert best is not None
    return best


async def run_tasks_on_ray(tasks: list[WorkerTask], fleet: WorkerFleet, *, address: Optional[str] = None) -> LoadOutcome:
    """Run each task in a Ray actor and merge the results into ``fleet``, as the process backend does.

    Joins the Ray cluster at ``address``, or starts a local Ray instance when it is None and
    Ray is not initialized yet. Ray stays initialized afterwards, so later repeats start faster.
    """
    ray = import_ray()
    if not ray.is_initialized():
        log.info("starting Ray (address %s)", address or "local")
        ray.init(address=address, include_dashboard=False)
    # SPREAD places the actors on as many nodes as the cluster has.
    remote_class = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(LoadActor)
    actors = [remote_class.remote(task) for task in tasks]
    try:
        await _drive_actors(ray, actors, fleet)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    fleet.outcome.ended_at = time.perf_counter()
    return fleet.outcome


async def _drive_actors(ray: Any, actors: list[Any], fleet: WorkerFleet) -> None:
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await asyncio.gather(*(actor.open.remote() for actor in actors))
            offsets = [await measure_clock_offset(actor) for actor in actors]
    except TimeoutError:
        raise RunnerError(
            f"Ray load actors did not start within {READY_TIMEOUT:g} s; check that the cluster has "
            f"{len(actors)} free CPUs or lower load.workers"
        ) from None
    except ray.exceptions.RayError as exc:
        raise RunnerError(f"Ray load actors failed to start: {_first_line(exc)}") from None
    for worker, (offset, round_trip) in enumerate(offsets):
        log.debug("load worker %s: clock offset %.6f s, round trip %.6f s", worker, offset, round_trip)

    start = time.perf_counter() + SCHEDULE_LEAD + RAY_START_MARGIN
    fleet.outcome.started_at = start
    runs = [actor.run.remote(start + offset) for actor, (offset, _) in zip(actors, offsets)]

    async def pump(worker: int) -> None:
        actor, offset = actors[worker], offsets[worker][0]
        try:
            finished = False
            while not finished:
                batches, finished = await actor.take.remote()
                for batch in batches:
                    records = list(batch.records())
                    for record in records:
                        shift_record(record, -offset)
                    if fleet.take_records(worker, records):
                        await asyncio.gather(*(other.measured.remote() for other in actors))
            fleet.finish(worker, await runs[worker])
        except ray.exceptions.RayError as exc:
            raise RunnerError(
                f"load worker {worker} (Ray actor) failed before its share was done: {_first_line(exc)}; "
                f"{fleet.received[worker]} of its records arrived and were kept"
            ) from None

    failure: Optional[RunnerError] = None
    try:
        async with asyncio.TaskGroup() as group:
            for worker in range(len(actors)):
                group.create_task(pump(worker))
    except* RunnerError as errors:
        failure = errors.exceptions[0]  # type: ignore[assignment]
    if failure is not None:
        raise failure


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
