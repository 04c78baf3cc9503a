"""Load from several worker processes, for loads that one event loop cannot drive.

``run_load_in_workers`` has the contract of ``runner.load.run_load``: the same request ids,
warmup flags and record fields, with ``on_record`` called in the caller's event loop. Each
worker is a spawned process with its own event loop and its own ``OpenAIClient``:

- closed loop: slot ``s`` of ``plan.parallel`` belongs to worker ``s % N``, and request
  ``i`` goes to the worker of slot ``i % parallel``, so each worker's share of requests is
  proportional to its share of the concurrency;
- open loop: one global schedule (``arrival_offsets``) is computed here, and request ``i``
  goes to worker ``i % N`` with its send time from that schedule, so the combined arrivals
  follow the configured process.

Every worker reports ready after its client is open. The parent then picks one start
time, a ``time.perf_counter()`` value. All workers can use it as it is, because
CLOCK_MONOTONIC is system-wide on Linux. Workers send finished records back in batches, and only the parent
calls ``on_record``, so requests.csv has one writer. ``runner.ray_backend`` runs the same
worker code as Ray actors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import multiprocessing
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Awaitable, Callable, Optional, Sequence

from runner.client.openai import OpenAIClient
from runner.client.record import Prompt, RequestRecord
from runner.config import EndpointConfig, LoadBackend, LoadConfig, ModelConfig, RequestConfig
from runner.errors import RunnerError
from runner.load import SCHEDULE_LEAD, LoadOutcome, LoadPlan, Sender, _watch_loop_lag, arrival_offsets

log = logging.getLogger(__name__)

# A worker sends its finished records when this many are waiting or this many seconds passed.
BATCH_RECORDS = 50
BATCH_SECONDS = 0.1
# Seconds a worker may take to start (spawn, imports, opening its client) before the run fails.
READY_TIMEOUT = 60.0
# Extra seconds between the start message and the common start, so every worker receives it.
START_MARGIN = 0.05
# Seconds a worker gets to stop after the stop message before it is killed.
STOP_TIMEOUT = 2.0


@dataclass(frozen=True)
class ClientArgs:
    """Picklable arguments of ``OpenAIClient``, so each worker builds its own client."""

    endpoint: EndpointConfig
    model: ModelConfig
    request: RequestConfig
    base_url: Optional[str]
    # Connection pool size of the whole run; each worker gets an equal share, rounded up.
    pool_size: int

    def for_share(self, workers: int) -> ClientArgs:
        return dataclasses.replace(self, pool_size=max(1, math.ceil(self.pool_size / workers)))

    def build(self) -> OpenAIClient:
        return OpenAIClient(self.endpoint, self.model, self.request, base_url=self.base_url,
                            pool_size=self.pool_size)


@dataclass
class WorkerShare:
    """The part of a plan one worker sends."""

    worker: int
    # Global request indexes (0 .. plan.total - 1) this worker sends, ascending.
    indexes: list[int]
    # Closed loop: this worker's slots. Open loop: its share of the in-flight cap (None = no cap).
    parallel: Optional[int]
    # Open loop: send time of each index, in seconds after the common start; None in closed loop.
    offsets: Optional[list[float]] = None


@dataclass
class WorkerTask:
    """Everything a worker needs; pickled once when the worker starts."""

    plan: LoadPlan
    share: WorkerShare
    client: ClientArgs
    prompts: list[Prompt]


@dataclass
class WorkerResult:
    """Result of one worker's share: its lag samples and whether load.duration cut it."""

    loop_lag: list[float] = field(default_factory=list)
    cut_by_duration: bool = False


def auto_workers(plan: LoadPlan) -> int:
    """Return the worker count for load.workers=null, which is 1 for now.

    NOTE: on a 2-core machine (bench/workers.py) two worker processes delivered fewer
    requests/s than one in-process loop, so workers are used only when load.workers is set
    above 1.
    """
    del plan
    return 1


def workers_for(load: LoadConfig, plan: LoadPlan) -> int:
    """Return the number of workers to use for ``plan``: load.workers, or the automatic rule."""
    return load.workers if load.workers is not None else auto_workers(plan)


def split_plan(plan: LoadPlan, workers: int) -> list[WorkerShare]:
    """Split ``plan`` into at most ``workers`` shares; never more than there are requests or slots."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    count = min(workers, max(plan.total, 1))
    if plan.rate is None:
        assert plan.parallel is not None
        count = min(count, plan.parallel)
        slots = [plan.parallel // count + (k < plan.parallel % count) for k in range(count)]
        indexes: list[list[int]] = [[] for _ in range(count)]
        for index in range(plan.total):
            indexes[(index % plan.parallel) % count].append(index)
        return [WorkerShare(k, indexes[k], slots[k]) for k in range(count)]

    if plan.parallel is not None:
        count = min(count, plan.parallel)
    offsets = arrival_offsets(plan)
    shares = []
    for k in range(count):
        cap = None if plan.parallel is None else plan.parallel // count + (k < plan.parallel % count)
        mine = list(range(k, plan.total, count))
        shares.append(WorkerShare(k, mine, cap, [offsets[i] for i in mine]))
    return shares


async def run_share(
    task: WorkerTask,
    sender: Sender,
    start_at: float,
    emit: Callable[[RequestRecord], None],
    loop_lag: list[float],
) -> bool:
    """Send one worker's share from the perf_counter time ``start_at``; return True if cut by duration.

    ``emit`` gets every finished record. A request cancelled in flight gets no record, as in
    ``run_load``.
    """
    plan, share = task.plan, task.share
    prompts = task.prompts
    lag_task = asyncio.create_task(_watch_loop_lag(loop_lag))
    deadline = start_at + plan.duration if plan.duration else None
    cut = False

    async def one(index: int, scheduled_at: float) -> None:
        record = RequestRecord(request_id=plan.first_id + index, warmup=index < plan.warmup,
                               scheduled_at=scheduled_at)
        await sender.send(prompts[index % len(prompts)], record)
        emit(record)

    try:
        delay = start_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if share.offsets is None:
            cut = await _closed_share(share, one, deadline)
        else:
            cut = await _open_share(share, start_at, one, deadline)
    finally:
        lag_task.cancel()
    return cut


async def _closed_share(share: WorkerShare, one: Callable[[int, float], Awaitable[None]],
                        deadline: Optional[float]) -> bool:
    # NOTE: worker processes send no cooldown requests, so with load.workers > 1 the last
    # wave of a closed-loop run still runs below full concurrency (see runner.load).
    indexes = iter(share.indexes)
    cut = False

    async def slot() -> None:
        nonlocal cut
        for index in indexes:
            if deadline is not None and time.perf_counter() >= deadline:
                cut = True
                return
            await one(index, time.perf_counter())

    assert share.parallel is not None
    async with asyncio.TaskGroup() as group:
        for _ in range(min(share.parallel, len(share.indexes))):
            group.create_task(slot())
    return cut


async def _open_share(share: WorkerShare, start_at: float, one: Callable[[int, float], Awaitable[None]],
                      deadline: Optional[float]) -> bool:
    slots = asyncio.Semaphore(share.parallel) if share.parallel else None

    async def capped(index: int, scheduled_at: float) -> None:
        try:
            await one(index, scheduled_at)
        finally:
            if slots is not None:
                slots.release()

    assert share.offsets is not None
    async with asyncio.TaskGroup() as group:
        for index, offset in zip(share.indexes, share.offsets):
            scheduled_at = start_at + offset
            if deadline is not None and scheduled_at >= deadline:
                return True
            delay = scheduled_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                # A full cap delays the send; the record's sent_at - scheduled_at shows it.
                await slots.acquire()
            group.create_task(capped(index, scheduled_at))
    return False


class RecordBatcher:
    """Collects finished records and hands them on in batches of BATCH_RECORDS or every BATCH_SECONDS."""

    def __init__(self, flush: Callable[[list[RequestRecord]], None]) -> None:
        self._flush = flush
        self._pending: list[RequestRecord] = []

    def add(self, record: RequestRecord) -> None:
        self._pending.append(record)
        if len(self._pending) >= BATCH_RECORDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self._flush(batch)

    async def flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(BATCH_SECONDS)
            self.flush()


def run_event_loop(coroutine: Any) -> Any:
    """Run ``coroutine`` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


# ---------------------------------------------------------------------------------------------
# Worker process side. Messages to the parent: ("ready",), ("records", list), ("done",
# WorkerResult), ("error", exception). Messages from the parent: ("start", perf_counter time)
# and ("stop",); end of file on the control pipe also means stop.


def _worker_main(task: WorkerTask, control: Connection, data: Connection) -> None:
    # The terminal sends Ctrl-C to the whole process group. Workers ignore it and stop when
    # the parent sends the stop message (or closes the control pipe).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    # Sending happens in a thread, so a full pipe never blocks the worker's event loop.
    sender = threading.Thread(target=_send_messages, args=(outbox, data), daemon=True)
    sender.start()
    try:
        run_event_loop(_serve_share(task, control, outbox))
    except BaseException as exc:  # reported to the parent, which raises it with the worker's number
        outbox.put(("error", _picklable(exc)))
    finally:
        outbox.put(None)
        sender.join()
        data.close()


def _send_messages(outbox: queue.SimpleQueue[Any], data: Connection) -> None:
    while (message := outbox.get()) is not None:
        try:
            data.send(message)
        except (BrokenPipeError, OSError):
            return  # the parent is gone


def _picklable(exc: BaseException) -> BaseException:
    if isinstance(exc, RunnerError):
        return exc
    return RuntimeError(f"{type(exc).__name__}: {exc}")


async def _serve_share(task: WorkerTask, control: Connection, outbox: queue.SimpleQueue[Any]) -> None:
    loop = asyncio.get_running_loop()
    start: asyncio.Future[float] = loop.create_future()
    stopped = asyncio.Event()

    def on_control(message: Any) -> None:
        if message[0] == "start" and not start.done():
            start.set_result(message[1])
        elif message[0] == "stop":
            stopped.set()

    def read_control() -> None:
        try:
            while True:
                message = control.recv()
                loop.call_soon_threadsafe(on_control, message)
                if message[0] == "stop":
                    return
        except (EOFError, OSError):
            loop.call_soon_threadsafe(on_control, ("stop",))

    threading.Thread(target=read_control, daemon=True).start()
    batcher = RecordBatcher(lambda batch: outbox.put(("records", batch)))
    result = WorkerResult()
    async with task.client.build() as client:
        outbox.put(("ready",))
        waiter = asyncio.create_task(stopped.wait())
        await asyncio.wait([start, waiter], return_when=asyncio.FIRST_COMPLETED)
        if stopped.is_set():
            return
        flusher = asyncio.create_task(batcher.flush_periodically())
        load = asyncio.create_task(run_share(task, client, start.result(), batcher.add, result.loop_lag))
        await asyncio.wait([load, waiter], return_when=asyncio.FIRST_COMPLETED)
        flusher.cancel()
        if not load.done():
            load.cancel()  # stopped by the parent: in-flight requests are dropped
            await asyncio.wait([load])
            return
        waiter.cancel()
        result.cut_by_duration = load.result()
    batcher.flush()
    outbox.put(("done", result))


# ---------------------------------------------------------------------------------------------
# Parent side.


class WorkerFleet:
    """Merges what the workers send into one outcome; shared by the process and Ray backends."""

    def __init__(self, plan: LoadPlan, count: int, on_record: Callable[[RequestRecord], None]) -> None:
        self.plan = plan
        self.on_record = on_record
        self.outcome = LoadOutcome(worker_loop_lag=[[] for _ in range(count)])
        self.received = [0] * count
        self.done = [False] * count

    def take_records(self, worker: int, batch: Sequence[RequestRecord]) -> None:
        self.received[worker] += len(batch)
        for record in batch:
            self.outcome.records.append(record)
            self.on_record(record)

    def finish(self, worker: int, result: WorkerResult) -> None:
        self.done[worker] = True
        self.outcome.worker_loop_lag[worker] = result.loop_lag
        self.outcome.loop_lag.extend(result.loop_lag)
        self.outcome.cut_by_duration |= result.cut_by_duration

    @property
    def all_done(self) -> bool:
        return all(self.done)


async def run_load_in_workers(
    plan: LoadPlan,
    workers: int,
    client_args: ClientArgs,
    prompts: list[Prompt],
    on_record: Callable[[RequestRecord], None],
    *,
    backend: LoadBackend = LoadBackend.process,
    ray_address: Optional[str] = None,
) -> LoadOutcome:
    """Send ``plan`` from ``workers`` processes (or Ray actors) and return the merged outcome.

    Same contract as ``run_load``; in addition ``LoadOutcome.worker_loop_lag`` has each
    worker's event-loop lag samples. A worker that exits before finishing raises RunnerError
    naming it and its exit code, after every record that arrived was passed to ``on_record``.
    Cancelling the call stops all workers within STOP_TIMEOUT seconds.
    """
    if not prompts:
        raise ValueError("run_load_in_workers needs at least one prompt")
    shares = split_plan(plan, workers)
    client = client_args.for_share(len(shares))
    tasks = [WorkerTask(plan, share, client, list(prompts)) for share in shares]
    if backend is LoadBackend.ray or ray_address is not None:
        from runner.ray_backend import run_tasks_on_ray

        return await run_tasks_on_ray(tasks, plan, on_record, address=ray_address)
    return await _run_processes(tasks, plan, on_record)


async def _run_processes(tasks: list[WorkerTask], plan: LoadPlan,
                         on_record: Callable[[RequestRecord], None]) -> LoadOutcome:
    context = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    fleet = WorkerFleet(plan, len(tasks), on_record)
    processes: list[Any] = []
    controls: list[Connection] = []
    readers: list[threading.Thread] = []

    def deliver(worker: int, message: Any) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, (worker, message))
        except RuntimeError:
            pass  # the event loop has closed, so no caller waits for this message

    def read_data(worker: int, data: Connection) -> None:
        try:
            while True:
                deliver(worker, data.recv())
        except (EOFError, OSError):
            deliver(worker, ("closed",))
        finally:
            data.close()

    try:
        for task in tasks:
            control_child, control = context.Pipe(duplex=False)
            data, data_child = context.Pipe(duplex=False)
            process = context.Process(target=_worker_main, args=(task, control_child, data_child),
                                      name=f"load-worker-{task.share.worker}", daemon=True)
            process.start()
            control_child.close()
            data_child.close()
            processes.append(process)
            controls.append(control)
            reader = threading.Thread(target=read_data, args=(task.share.worker, data), daemon=True)
            reader.start()
            readers.append(reader)
        await _drive(fleet, inbox, controls, processes)
    finally:
        await asyncio.to_thread(_stop_processes, processes, controls, readers)
    fleet.outcome.ended_at = time.perf_counter()
    return fleet.outcome


async def _drive(fleet: WorkerFleet, inbox: asyncio.Queue[tuple[int, Any]], controls: list[Connection],
                 processes: list[Any]) -> None:
    ready = 0
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            while ready < len(processes):
                worker, message = await inbox.get()
                if message[0] == "ready":
                    ready += 1
                else:
                    await _fail_worker(worker, message, processes[worker], fleet)
    except TimeoutError:
        raise RunnerError(
            f"only {ready} of {len(processes)} load workers started within {READY_TIMEOUT:g} s; "
            f"the machine may be overloaded, so lower load.workers"
        ) from None
    start = time.perf_counter() + SCHEDULE_LEAD + START_MARGIN
    fleet.outcome.started_at = start
    for control in controls:
        control.send(("start", start))
    while not fleet.all_done:
        worker, message = await inbox.get()
        kind = message[0]
        if kind == "records":
            fleet.take_records(worker, message[1])
        elif kind == "done":
            fleet.finish(worker, message[1])
        elif kind == "closed" and fleet.done[worker]:
            continue
        else:
            await _fail_worker(worker, message, processes[worker], fleet)


async def _fail_worker(worker: int, message: tuple[Any, ...], process: Any, fleet: WorkerFleet) -> None:
    if message[0] == "error":
        error = message[1]
        # A RunnerError (such as a ConfigError) keeps its class, so the command line prints it as one line.
        kind = type(error) if isinstance(error, RunnerError) else RunnerError
        raise kind(f"load worker {worker} failed: {error}") from None
    await asyncio.to_thread(process.join, STOP_TIMEOUT)
    raise RunnerError(
        f"load worker {worker} (pid {process.pid}) exited with code {process.exitcode} before its share "
        f"was done; {fleet.received[worker]} of its records arrived and were kept"
    )


def _stop_processes(processes: list[Any], controls: list[Connection], readers: list[threading.Thread]) -> None:
    """Tell every worker to stop, wait up to STOP_TIMEOUT seconds in all, then kill what is left."""
    for control in controls:
        try:
            control.send(("stop",))
        except (BrokenPipeError, OSError):
            pass  # that worker has exited already
    deadline = time.monotonic() + STOP_TIMEOUT
    for process in processes:
        process.join(max(deadline - time.monotonic(), 0.0))
    for process in processes:
        if process.is_alive():
            log.warning("load worker %s did not stop within %s s; killing it", process.name, STOP_TIMEOUT)
            process.kill()
            process.join(1.0)
    for control in controls:
        control.close()
    # Each reader ends at the end of file of its worker's pipe, which came with the exit.
    for reader in readers:
        reader.join(1.0)
