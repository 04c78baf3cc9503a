"""Work done once a request has ended, off the hot path: token counts and ITL samples."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any, Callable, Optional

from runner.client.record import RequestRecord

TokenCounter = Callable[[str], int]

logger = logging.getLogger(__name__)


def finalize(record: RequestRecord, count_tokens: Optional[TokenCounter],
             whole_count: Optional[int] = None) -> list[float]:
    """Complete the token counts of an ended request and return its ITL samples in seconds.

    Without server usage, `completion_tokens` becomes the counter's count of the whole generated
    text with `token_source="tokenizer"`; without a counter it stays None. The record's
    `empty_output` flag is set, then `chunk_texts` is dropped to free memory, so the ITL samples
    are computed here first, kept in `record.itl` and returned.

    A record that is already final (its `itl` is set, for example by the worker process that
    sent it) is returned as it is: a second call neither counts again nor changes a flag.
    `whole_count`, when given, is the counter's count of the whole generated text, computed
    elsewhere (see `BatchFinalizer`).
    """
    if record.itl is not None:
        return record.itl
    texts = record.chunk_texts
    if count_tokens is not None and needs_whole_count(record):
        count = count_tokens("".join(texts)) if whole_count is None else whole_count
        if record.token_source:
            # Both counts exist: keep the client's, so a server whose usage disagrees shows up.
            record.tokenizer_tokens = count
        else:
            record.completion_tokens = count
            record.token_source = "tokenizer"
    # A successful response that generated nothing keeps success=True (the server did what it
    # was asked), and its TTFT stays None because no chunk carried text.
    record.empty_output = record.success and (record.completion_tokens == 0 or not texts)
    samples = itl_samples(record, count_tokens)
    record.chunk_texts = []
    record.itl = samples
    return samples


def needs_whole_count(record: RequestRecord) -> bool:
    """Return True when finalize() counts the tokens of the record's whole generated text."""
    return not record.token_source or (record.token_source == "usage" and record.success)


class BatchFinalizer:
    """Finalizes ended records, counting their output tokens in batches on a thread.

    Counting the tokens of one 64-token output takes about 70 us with the Qwen2.5 tokenizer
    on this project's benchmark machine, and longer outputs take proportionally longer. Done
    in the event loop at the end of each request, that time delays the arrival stamps of the
    chunks of every other stream. So when the counter's ``count_many`` releases the GIL
    (see ``runner.tokenizer.TokenCounter``), up to ``batch_size`` texts are counted at a
    time on one thread. A record waits at most ``max_delay`` seconds for its batch to start.
    ``on_final(record, itl)`` then runs in the event loop, in the order batches finish.
    Failed records, records that need no count, and every record when the counter cannot
    count off the event loop are finalized at once.
    """

    def __init__(self, count_tokens: Optional[TokenCounter], on_final: Callable[[RequestRecord, list[float]], None],
                 *, batch_size: int = 64, max_delay: float = 0.05) -> None:
        self.count_tokens = count_tokens
        self.on_final = on_final
        self.batch_size = batch_size
        self.max_delay = max_delay
        self._threaded = bool(getattr(count_tokens, "releases_gil", False))
        self._pending: list[RequestRecord] = []
        self._timer: Optional[asyncio.TimerHandle] = None
        self._jobs: list[_CountJob] = []
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def add(self, record: RequestRecord) -> None:
        """Take an ended record; `on_final` gets it now or once its batch is counted."""
        # Failures go at once, because the run's failure guard watches them, and so do
        # records without text, whose count is 0.
        if (not self._threaded or record.itl is not None or not record.success or not record.chunk_texts
                or not needs_whole_count(record)):
            self.on_final(record, finalize(record, self.count_tokens))
            return
        self._pending.append(record)
        if len(self._pending) >= self.batch_size:
            self._submit()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_delay, self._submit)

    async def drain(self) -> None:
        """Count what is waiting and wait until every record has gone to `on_final`."""
        self._submit()
        while self._jobs:
            job = self._jobs[0]
            await asyncio.wait([asyncio.wrap_future(job.future)])  # _apply handles a failure
            self._apply(job)

    def drain_now(self) -> None:
        """Like drain(), but blocking, for paths that cannot await (cancellation, errors)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        records, self._pending = self._pending, []
        while self._jobs:
            job = self._jobs[0]
            concurrent.futures.wait([job.future])
            self._apply(job)
        for record in records:
            self.on_final(record, finalize(record, self.count_tokens))

    def close(self) -> None:
        """Stop the counting thread; call after drain() or drain_now()."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _submit(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        records, self._pending = self._pending, []
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="token-count")
        texts = ["".join(record.chunk_texts) for record in records]
        job = _CountJob(records, self._executor.submit(self.count_tokens.count_many, texts))  # type: ignore[union-attr]
        self._jobs.append(job)
        loop = asyncio.get_running_loop()
        job.future.add_done_callback(lambda _: _call_soon(loop, self._apply, job))

    def _apply(self, job: _CountJob) -> None:
        if job.applied:
            return
        job.applied = True
        self._jobs.remove(job)
        try:
            counts: list[Any] = job.future.result()
        except Exception:  # a counter failure must not lose the records: count them here instead
            logger.warning("counting output tokens on a thread failed; counting in the event loop", exc_info=True)
            counts = [None] * len(job.records)
        for record, count in zip(job.records, counts):
            self.on_final(record, finalize(record, self.count_tokens, count))


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass  # the loop has closed; drain_now() has applied the job already


class _CountJob:
    __slots__ = ("records", "future", "applied")

    def __init__(self, records: list[RequestRecord], future: concurrent.futures.Future) -> None:
        self.records = records
        self.future = future
        self.applied = False


def itl_samples(record: RequestRecord, count_tokens: Optional[TokenCounter]) -> list[float]:
    """Return the inter-token latencies of a record, in seconds, one per token after the first chunk.

    Each gap between two consecutive token-bearing chunks is shared equally by the k tokens of
    the later chunk, giving k samples of gap / k. k is 1 for every chunk when
    `completion_tokens` equals the number of chunks, when it is unknown, or when there is no
    counter. Otherwise k is the counter's count of the chunk's text, at least 1. The per-chunk
    counts may not add up to `completion_tokens`, because a tokenizer can split a text cut
    into pieces differently from the whole. Needs `chunk_texts`, so call it before `finalize`
    drops them (finalize itself returns these samples).
    """
    times = record.chunk_times
    if len(times) < 2:
        return []
    tokens = record.completion_tokens
    one_token_per_chunk = count_tokens is None or tokens is None or tokens == len(times)
    samples: list[float] = []
    for index in range(1, len(times)):
        gap = times[index] - times[index - 1]
        if one_token_per_chunk:
            samples.append(gap)
            continue
        share = max(1, count_tokens(record.chunk_texts[index]))
        samples.extend([gap / share] * share)
    return samples
