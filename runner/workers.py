"""Load from several worker processes, for loads that one event loop cannot drive.

``run_load_in_workers`` has the contract of ``runner.load.run_load``: the same request ids,
warmup and cooldown flags and record fields, with ``on_record`` called in the caller's event
loop. Each worker is a spawned process with its own event loop and its own ``OpenAIClient``,
and it runs ``run_load`` itself on its ``Share`` of the plan, so pacing, cooldown, lateness
and loop lag are measured by the same code as in one process.

Every worker reports ready after its client (and its tokenizer, when one is given) is open.
The parent then picks one start time, a ``time.perf_counter()`` value. All workers can use
it as it is, because CLOCK_MONOTONIC is system-wide on Linux. Each worker finalizes its
records (token counts and ITL samples) and sends them to the parent in compact batches
(``runner.record_batch``), so the parent only merges them: it calls ``on_record``, and so
writes requests.csv, alone. In a closed loop the parent sends every worker a message when
the last measured request of the whole plan has ended, and the workers stop their cooldown
requests then, as one process does. ``runner.ray_backend`` runs the same worker code as Ray actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import multiprocessing
import queue
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterable, Optional

from runner.client import kernel_clock
from runner.client.finalize import TokenCounter, finalize
from runner.client.openai import OpenAIClient
from runner.client.record import Prompt, RequestRecord
from runner.config import EndpointConfig, LoadBackend, ModelConfig, RequestConfig
from runner.errors import RunnerError
from runner.gc_pause import setup_objects_frozen
from runner.load import SCHEDULE_LEAD, LoadOutcome, LoadPlan, Sender, Share, WorkerStats, run_load
from runner.record_batch import RecordBatch
from runner.tokenizer import WorkerTokenCounter
# auto_workers and workers_for are imported for callers of this module.
from runner.worker_count import auto_workers, split_plan, warn_if_capped, workers_for  # noqa: F401

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
class WorkerTask:
    """Everything a worker needs; pickled once when the worker starts."""

    plan: LoadPlan
    share: Share
    client: ClientArgs
    prompts: list[Prompt]
    # Tokenizer the worker counts output tokens with; None counts nothing, as finalize() does
    # without a counter.
    tokenizer: Optional[WorkerTokenCounter] = None


def token_counter_for(tokenizer: Optional[WorkerTokenCounter]) -> Optional[TokenCounter]:
    """Build ``tokenizer``'s counter in this process (None for None)."""
    return None if tokenizer is None else tokenizer.build()


class RecordBatcher:
    """Finalizes a worker's records as they end and hands them on in ``RecordBatch``es.

    A batch goes out when it contains BATCH_RECORDS records and on every ``flush`` (the
    process worker calls it each BATCH_SECONDS). It also goes out at once after the share's
    last measured request, so that the parent learns without delay that this worker's
    measured requests are done. Finalizing here keeps the tokenizer's work in the workers.
    """

    def __init__(self, send: Callable[[RecordBatch], None], count_tokens: Optional[TokenCounter],
                 measured: int) -> None:
        self._send = send
        self._count_tokens = count_tokens
        self._batch = RecordBatch()
        self._measured_left = measured
        self.requests = 0
        self.lateness: list[float] = []

    def add(self, record: RequestRecord) -> None:
        finalize(record, self._count_tokens)
        self._batch.add(record)
        self.requests += 1
        if not (record.warmup or record.cooldown):
            # The same client delay as summary.csv's lateness columns.
            handed = record.dispatched_at if record.dispatched_at is not None else record.sent_at
            if handed is not None and record.scheduled_at is not None:
                self.lateness.append(handed - record.scheduled_at)
            self._measured_left -= 1
            if self._measured_left == 0:
                self.flush()
                return
        if len(self._batch) >= BATCH_RECORDS:
            self.flush()

    def flush(self) -> None:
        if len(self._batch):
            batch, self._batch = self._batch, RecordBatch()
            self._send(batch)

    async def flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(BATCH_SECONDS)
            self.flush()


async def run_share(task: WorkerTask, sender: Sender, start_at: float, all_measured: asyncio.Event,
                    batcher: RecordBatcher) -> WorkerStats:
    """Send one worker's share from the perf_counter time ``start_at`` and return its stats.

    ``all_measured`` is set by the parent once every measured request of the plan has
    ended. Every finished record goes to ``batcher``; a request cancelled in flight gets a
    record only when it is a cooldown request, as in ``run_load``.
    """
    if task.plan.number == 0:
        all_measured.set()
    cpu_before = time.process_time()
    outcome = await run_load(task.plan, sender, task.prompts, batcher.add, keep_records=False, share=task.share,
                             start_at=start_at, all_measured=all_measured)
    batcher.flush()
    return WorkerStats(loop_lag=outcome.loop_lag, lateness=batcher.lateness, requests=batcher.requests,
                       cpu_seconds=time.process_time() - cpu_before,
                       wall_seconds=outcome.ended_at - outcome.started_at, cut_by_duration=outcome.cut_by_duration)


def run_event_loop(coroutine: Any) -> Any:
    """Run ``coroutine`` on the loop that gives the best chunk times (see runner.client.kernel_clock)."""
    return kernel_clock.run(coroutine)


# ---------------------------------------------------------------------------------------------
# Worker process side. Messages to the parent: ("ready",), ("records", RecordBatch), ("done",
# WorkerStats), ("error", exception). Messages from the parent: ("start", perf_counter time),
# ("measured",) once every measured request of the plan has ended, and ("stop",). End of file
# on the control pipe also means stop.


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
    all_measured = asyncio.Event()

    def on_control(message: Any) -> None:
        if message[0] == "start" and not start.done():
            start.set_result(message[1])
        elif message[0] == "measured":
            all_measured.set()
        elif message[0] == "stop":
            stopped.set()

    def read_control() -> None:
        # call_soon_threadsafe raises RuntimeError once the event loop has closed, which
        # happens when the share is over before the parent's stop message arrives.
        try:
            while (message := control.recv())[0] != "stop":
                loop.call_soon_threadsafe(on_control, message)
        except (EOFError, OSError):
            message = ("stop",)  # the parent closed the pipe or is gone
        except RuntimeError:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(on_control, message)

    threading.Thread(target=read_control, daemon=True).start()
    batcher = RecordBatcher(lambda batch: outbox.put(("records", batch)), token_counter_for(task.tokenizer),
                            task.share.measured(task.plan))
    # As in the parent, the set-up objects (imports, the tokenizer, the prompts) are frozen, so
    # that no garbage collection walks them during the load and stalls every stream.
    async with task.client.build() as client:
        with setup_objects_frozen():
            outbox.put(("ready",))
            waiter = asyncio.create_task(stopped.wait())
            await asyncio.wait([start, waiter], return_when=asyncio.FIRST_COMPLETED)
            if stopped.is_set():
                return
            flusher = asyncio.create_task(batcher.flush_periodically())
            load = asyncio.create_task(run_share(task, client, start.result(), all_measured, batcher))
            await asyncio.wait([load, waiter], return_when=asyncio.FIRST_COMPLETED)
            flusher.cancel()
            if not load.done():
                # NOTE: stopped by the parent, so in-flight requests are dropped without a row,
                # unlike in run_load in the parent, because the parent no longer reads records.
                load.cancel()
                await asyncio.wait([load])
                return
            waiter.cancel()
            stats = load.result()
    outbox.put(("done", stats))


# ---------------------------------------------------------------------------------------------
# Parent side.


class WorkerFleet:
    """Merges what the workers send into one outcome; shared by the process and Ray backends."""

    def __init__(self, plan: LoadPlan, count: int, on_record: Callable[[RequestRecord], None],
                 keep_records: bool = True) -> None:
        self.plan = plan
        self.on_record = on_record
        self.keep_records = keep_records
        self.outcome = LoadOutcome(workers=[WorkerStats() for _ in range(count)])
        self.received = [0] * count
        self.done = [False] * count
        self._measured_left = plan.number

    def take_records(self, worker: int, records: Iterable[RequestRecord]) -> bool:
        """Pass ``records`` to ``on_record``; return True if they include the plan's last measured request."""
        measured_before = self._measured_left
        for record in records:
            self.received[worker] += 1
            if self.keep_records:
                self.outcome.records.append(record)
            self.on_record(record)
            if not (record.warmup or record.cooldown):
                self._measured_left -= 1
        return measured_before > 0 and self._measured_left == 0

    def finish(self, worker: int, stats: WorkerStats) -> None:
        self.done[worker] = True
        self.outcome.workers[worker] = stats
        self.outcome.loop_lag.extend(stats.loop_lag)
        self.outcome.cut_by_duration |= stats.cut_by_duration

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
    keep_records: bool = True,
    tokenizer: Optional[WorkerTokenCounter] = None,
    backend: LoadBackend = LoadBackend.process,
    ray_address: Optional[str] = None,
) -> LoadOutcome:
    """Send ``plan`` from ``workers`` processes (or Ray actors) and return the merged outcome.

    Same contract as ``run_load``, except that each record reaches ``on_record`` final:
    finalize() has run in its worker, with the counter that ``tokenizer`` builds when one is
    given, and the record carries no chunk times or texts, only its ``itl``. In
    addition ``LoadOutcome.workers`` has each worker's lag, lateness and CPU. A worker that
    exits before finishing raises RunnerError naming it and its exit code, after every record
    that arrived was passed to ``on_record``. Cancelling the call stops all workers within
    STOP_TIMEOUT seconds.
    """
    if not prompts:
        raise ValueError("run_load_in_workers needs at least one prompt")
    shares = split_plan(plan, workers)
    remote = backend is LoadBackend.ray or ray_address is not None
    warn_if_capped(workers, plan, len(shares), local=not remote)
    client = client_args.for_share(len(shares))
    tasks = [WorkerTask(plan, share, client, list(prompts), tokenizer) for share in shares]
    fleet = WorkerFleet(plan, len(tasks), on_record, keep_records)
    if remote:
        from runner.ray_backend import run_tasks_on_ray

        return await run_tasks_on_ray(tasks, fleet, address=ray_address)
    return await _run_processes(tasks, fleet)


async def _run_processes(tasks: list[WorkerTask], fleet: WorkerFleet) -> LoadOutcome:
    context = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
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
            if fleet.take_records(worker, message[1].records()):
                _broadcast(controls, ("measured",))
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


def _broadcast(controls: list[Connection], message: tuple[Any, ...]) -> None:
    for control in controls:
        try:
            control.send(message)
        except (BrokenPipeError, OSError):
            pass  # that worker has exited already


def _stop_processes(processes: list[Any], controls: list[Connection], readers: list[threading.Thread]) -> None:
    """Tell every worker to stop, wait up to STOP_TIMEOUT seconds in all, then kill what is left."""
    _broadcast(controls, ("stop",))
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
