"""BatchFinalizer: token counts on a thread give the same records as counting inline."""

from __future__ import annotations

import asyncio
import threading

import pytest

from runner.client.finalize import BatchFinalizer, finalize
from runner.client.record import RequestRecord
from runner.tokenizer import token_counter


def ended_record(request_id: int, texts: list[str], *, usage: int | None, success: bool = True) -> RequestRecord:
    record = RequestRecord(request_id=request_id, success=success)
    record.chunk_texts = list(texts)
    record.chunk_times = [1.0 + 0.02 * index for index in range(len(texts))]
    if usage is not None:
        record.completion_tokens = usage
        record.token_source = "usage"
    return record


def sample_records() -> list[RequestRecord]:
    return [
        ended_record(0, [" hi"] * 5, usage=5),
        # Usage disagrees with the tokenizer: the client's count is kept beside it.
        ended_record(1, [" hi"] * 4, usage=9),
        # No usage: the tokenizer's count becomes completion_tokens, and two-token chunks
        # share their gap.
        ended_record(2, [" hi", " hi hi", "中文"], usage=None),
        ended_record(3, [], usage=0),
        ended_record(4, [" a", " b"], usage=None, success=False),
        ended_record(5, [" x"] * 3, usage=3, success=False),
    ]


FIELDS = ("completion_tokens", "token_source", "tokenizer_tokens", "empty_output", "itl", "chunk_texts")


class CountingCounter:
    """Wraps a TokenCounter and notes which thread each call ran on."""

    def __init__(self, inner, releases_gil: bool = True) -> None:
        self.inner = inner
        self.releases_gil = releases_gil
        self.single_calls = 0
        self.batch_threads: list[str] = []

    def __call__(self, text: str) -> int:
        self.single_calls += 1
        return self.inner(text)

    def count_many(self, texts: list[str]) -> list[int]:
        self.batch_threads.append(threading.current_thread().name)
        return self.inner.count_many(texts)


async def finalize_all(finalizer: BatchFinalizer, records: list[RequestRecord]) -> None:
    for record in records:
        finalizer.add(record)
    await finalizer.drain()
    finalizer.close()


def test_batch_matches_inline(qwen_tokenizer):
    count = token_counter(qwen_tokenizer)
    expected = sample_records()
    expected_itl = [finalize(record, count) for record in expected]
    counter = CountingCounter(count)
    done: dict[int, tuple[RequestRecord, list[float]]] = {}
    finalizer = BatchFinalizer(counter, lambda record, itl: done.setdefault(record.request_id, (record, itl)),
                               batch_size=4)

    asyncio.run(finalize_all(finalizer, sample_records()))

    assert sorted(done) == [0, 1, 2, 3, 4, 5]
    for record, itl in zip(expected, expected_itl):
        got, got_itl = done[record.request_id]
        assert got_itl == itl
        assert {name: getattr(got, name) for name in FIELDS} == {name: getattr(record, name) for name in FIELDS}
    assert done[1][0].tokenizer_tokens == 4
    assert done[2][0].completion_tokens == 4
    assert done[2][1] == expected_itl[2]


def test_batch_counts_off_the_loop_thread(qwen_tokenizer):
    counter = CountingCounter(token_counter(qwen_tokenizer))
    finalizer = BatchFinalizer(counter, lambda record, itl: None, batch_size=2)

    asyncio.run(finalize_all(finalizer, sample_records()))

    # Records 0, 1 and 2 succeeded with text, so they go to the thread in batches of 2 and 1.
    # Record 3 has no text, and 4 and 5 failed: those are finalized at once.
    assert len(counter.batch_threads) == 2
    assert all(name.startswith("token-count") for name in counter.batch_threads)
    # Where the count differs from the number of chunks, ITL counts each later chunk in the
    # loop: 3 chunks of record 1 (usage 9, 4 chunks) and 2 of record 2 (4 tokens, 3 chunks).
    # The whole texts of record 3 (empty) and record 4 (failed, no usage) are counted there too.
    assert counter.single_calls == 7


def test_counter_holding_gil_counts_inline(qwen_tokenizer):
    counter = CountingCounter(token_counter(qwen_tokenizer), releases_gil=False)
    done: list[int] = []
    finalizer = BatchFinalizer(counter, lambda record, itl: done.append(record.request_id))

    async def add_only() -> None:
        for record in sample_records():
            finalizer.add(record)

    asyncio.run(add_only())

    assert done == [0, 1, 2, 3, 4, 5]
    assert counter.batch_threads == []


def test_drain_now_applies_waiting_records(qwen_tokenizer):
    counter = CountingCounter(token_counter(qwen_tokenizer))
    done: list[int] = []
    finalizer = BatchFinalizer(counter, lambda record, itl: done.append(record.request_id), batch_size=2,
                               max_delay=60.0)
    before_drain: list[int] = []

    async def add_and_stop() -> None:
        for record in sample_records():
            finalizer.add(record)
        # Records 0 and 1 are on the thread, 2 waits for a batch that would start in 60 s,
        # and 3 to 5 needed no thread.
        before_drain.extend(done)
        finalizer.drain_now()

    asyncio.run(add_and_stop())
    finalizer.close()

    assert before_drain == [3, 4, 5]
    assert sorted(done) == [0, 1, 2, 3, 4, 5]


def test_failed_batch_counts_inline(qwen_tokenizer):
    class Broken(CountingCounter):
        def count_many(self, texts: list[str]) -> list[int]:
            raise RuntimeError("tokenizer broke")

    count = token_counter(qwen_tokenizer)
    expected = sample_records()
    for record in expected:
        finalize(record, count)
    done: dict[int, RequestRecord] = {}
    finalizer = BatchFinalizer(Broken(count), lambda record, itl: done.setdefault(record.request_id, record))

    asyncio.run(finalize_all(finalizer, sample_records()))

    assert [done[record.request_id].completion_tokens for record in expected] == \
        [record.completion_tokens for record in expected]
    assert [done[record.request_id].tokenizer_tokens for record in expected] == \
        [record.tokenizer_tokens for record in expected]
