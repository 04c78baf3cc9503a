"""Client timings against a scripted server: TTFT, ITL, TPOT and latency from known timelines.

Server offsets count from the moment the server read the request body, which follows the
client's send time by under a millisecond on 127.0.0.1. The server's timers fire up to about
1 ms late. On a two-core machine with a load average near 4, the OS now and then runs the
test process 10 ms late, hence the 15 ms tolerance.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Optional

import pytest

from runner.client import OpenAIClient, Prompt, RequestRecord, finalize
from runner.client import openai as openai_module
from runner.config import EndpointConfig, ModelConfig, RequestConfig
from runner.testing import DONE, Reply, ScriptedServer, chat_chunk, completion_chunk, token_timeline, usage_of
from runner.testing.scripted import Script, ServerState

TOLERANCE = 0.015


def count_words(text: str) -> int:
    return len(text.split())


async def send_all(
    script: Script,
    requests: int = 1,
    *,
    url: str = "/v1/chat/completions",
    request: Optional[RequestConfig] = None,
) -> tuple[list[RequestRecord], ServerState]:
    """Send `requests` prompts one after another and return the records and the server state."""
    records = [RequestRecord(request_id=i) for i in range(requests)]
    async with ScriptedServer(script) as server:
        endpoint = EndpointConfig(url=url, read_timeout=5.0, request_timeout=30.0)
        async with OpenAIClient(
            endpoint, ModelConfig(), request or RequestConfig(), base_url=server.base_url, pool_size=2
        ) as client:
            for record in records:
                await client.send(Prompt(text="Hello"), record)
    return records, server.state


async def test_ttft_itl_tpot_latency_from_timeline():
    writes = [
        (0.90, chat_chunk(role="assistant", content="")),
        (2.20, chat_chunk(content="The")),
        (2.22, chat_chunk(content=" cat")),
        (2.24, chat_chunk(content=" sat")),
        (2.25, chat_chunk(finish_reason="stop", usage=usage_of(5000, 3))),
        (2.26, DONE),
    ]

    (record,), state = await send_all(Reply(writes=writes))
    itl = finalize(record, None)

    assert record.success, record.error
    assert record.status == 200
    assert record.ttft == pytest.approx(2.20, abs=TOLERANCE)
    assert itl == pytest.approx([0.02, 0.02], abs=TOLERANCE)
    assert record.tpot == pytest.approx(0.02, abs=TOLERANCE)
    assert record.latency == pytest.approx(2.25, abs=TOLERANCE)
    assert record.prompt_tokens == 5000
    assert record.completion_tokens == 3
    assert record.token_source == "usage"
    assert record.finish_reason == "stop"
    assert record.empty_output is False


async def test_timestamps_match_server_writes():
    (record,), state = await send_all(Reply(writes=token_timeline(ttft=0.2, tokens=4, gap=0.03)))
    served = state.requests[0]

    # Writes: role, four tokens, finish, usage, [DONE]; token chunks are writes 1..4.
    assert record.sent_at < served.read_at
    assert served.read_at - record.sent_at < TOLERANCE
    for arrival, written in zip(record.chunk_times, served.write_times[1:5]):
        assert 0 <= arrival - written < TOLERANCE
    assert record.ended_at == record.chunk_times[-1]


@pytest.mark.parametrize("channel", ["reasoning_content", "reasoning"])
async def test_reasoning_chunks_count_for_ttft(channel):
    writes = [(0.05, chat_chunk(role="assistant", content=""))]
    writes += [(0.30 + 0.02 * i, chat_chunk(**{channel: f" step{i}"})) for i in range(50)]
    writes += [
        (1.30, chat_chunk(content="Answer")),
        (1.31, chat_chunk(finish_reason="stop", usage=usage_of(10, 51))),
        (1.32, DONE),
    ]

    (record,), _ = await send_all(Reply(writes=writes))

    assert record.success, record.error
    assert record.ttft == pytest.approx(0.30, abs=TOLERANCE)
    assert len(record.chunk_times) == 51
    assert record.completion_tokens == 51
    assert record.latency == pytest.approx(1.31, abs=TOLERANCE)


async def test_reasoning_only_output_cut_by_length():
    writes = [(0.05, chat_chunk(role="assistant", content=""))]
    writes += [(0.30 + 0.02 * i, chat_chunk(reasoning_content=f" step{i}")) for i in range(10)]
    writes += [(0.49, chat_chunk(finish_reason="length", usage=usage_of(10, 10))), (0.50, DONE)]

    (record,), state = await send_all(Reply(writes=writes), request=RequestConfig(max_tokens=10))

    assert state.requests[0].body["max_tokens"] == 10
    assert record.success, record.error
    assert record.finish_reason == "length"
    assert record.ttft == pytest.approx(0.30, abs=TOLERANCE)
    assert record.tpot == pytest.approx(0.02, abs=TOLERANCE)


async def test_five_one_and_zero_token_responses():
    replies = [
        Reply(writes=token_timeline(ttft=0.1, tokens=5, gap=0.02, finish_reason="stop")),
        Reply(writes=token_timeline(ttft=0.1, tokens=1, gap=0.02, finish_reason="stop")),
        Reply(writes=token_timeline(ttft=0.1, tokens=0, gap=0.02, finish_reason="stop")),
    ]

    records, _ = await send_all(replies, requests=3)
    itls = [finalize(record, None) for record in records]
    five, one, zero = records

    assert [record.success for record in records] == [True, True, True]
    assert [record.completion_tokens for record in records] == [5, 1, 0]
    assert five.tpot == pytest.approx(0.02, abs=TOLERANCE)
    assert one.tpot is None
    assert zero.tpot is None
    assert [tpot for tpot in (r.tpot for r in records) if tpot is not None] == [five.tpot]
    assert one.ttft == pytest.approx(0.1, abs=TOLERANCE)
    assert zero.ttft is None
    assert zero.first_token_at is None
    assert zero.latency == pytest.approx(0.1, abs=TOLERANCE)
    assert [record.empty_output for record in records] == [False, False, True]
    assert [len(itl) for itl in itls] == [4, 0, 0]


def stream_bytes(text_tokens: list[str], *, usage: bool) -> list[bytes]:
    events = [chat_chunk(role="assistant", content="")]
    events += [chat_chunk(content=token) for token in text_tokens]
    events.append(chat_chunk(finish_reason="stop"))
    if usage:
        events.append(chat_chunk(usage=usage_of(7, len(text_tokens)), choices=False))
    events.append(DONE)
    return events


TOKENS = ["Le", " chat", " \u732b", " est", " l\u00e0"]


def one_byte_per_write(events: list[bytes]) -> list[tuple[float, bytes]]:
    data = b"".join(events)
    return [(0.0005 * i, data[i : i + 1]) for i in range(len(data))]


def all_in_one_write(events: list[bytes]) -> list[tuple[float, bytes]]:
    return [(0.05, b"".join(events))]


def cut_after_field_name(events: list[bytes]) -> list[tuple[float, bytes]]:
    writes = []
    for i, event in enumerate(events):
        writes.append((0.01 * i, event[:5]))  # b"data:"
        writes.append((0.01 * i + 0.005, event[5:]))
    return writes


def utf8_character_split(events: list[bytes]) -> list[tuple[float, bytes]]:
    data = b"".join(events)
    cut = data.index("\u732b".encode()) + 1
    return [(0.0, data[:cut]), (0.01, data[cut : cut + 1]), (0.02, data[cut + 1 :])]


@pytest.mark.parametrize(
    "split", [one_byte_per_write, all_in_one_write, cut_after_field_name, utf8_character_split]
)
@pytest.mark.parametrize("usage", [True, False], ids=["usage", "tokenizer"])
async def test_split_writes_give_same_result(split, usage):
    events = stream_bytes(TOKENS, usage=usage)

    (record,), state = await send_all(Reply(writes=split(events)))
    text = "".join(record.chunk_texts)
    finalize(record, count_words)

    assert len(state.requests[0].write_times) == len(split(events))
    assert record.success, record.error
    assert text == "".join(TOKENS)
    assert len(record.chunk_times) == len(TOKENS)
    assert record.completion_tokens == 5
    assert record.token_source == ("usage" if usage else "tokenizer")


async def test_comment_lines_ignored():
    events = stream_bytes(TOKENS, usage=True)
    writes = []
    for i, event in enumerate(events):
        writes.append((0.01 * i, b": ping\n\n"))
        writes.append((0.01 * i + 0.005, event))

    (record,), _ = await send_all(Reply(writes=writes))

    assert record.success, record.error
    assert "".join(record.chunk_texts) == "".join(TOKENS)
    assert record.ttft == pytest.approx(0.015, abs=TOLERANCE)


async def test_completions_text_counts_as_tokens():
    writes = token_timeline(ttft=0.15, tokens=6, gap=0.02, chat=False)

    (record,), state = await send_all(Reply(writes=writes), url="/v1/completions")

    assert state.requests[0].body["prompt"] == "Hello"
    assert "messages" not in state.requests[0].body
    assert record.success, record.error
    assert record.ttft == pytest.approx(0.15, abs=TOLERANCE)
    assert len(record.chunk_times) == 6
    assert record.completion_tokens == 6


async def test_completions_empty_text_not_a_token():
    writes = [
        (0.05, completion_chunk("")),
        (0.10, completion_chunk("x")),
        (0.11, completion_chunk(finish_reason="stop")),
        (0.12, DONE),
    ]

    (record,), _ = await send_all(Reply(writes=writes), url="/v1/completions")

    assert record.ttft == pytest.approx(0.10, abs=TOLERANCE)
    assert record.chunk_texts == ["x"]


async def test_tool_call_arguments_count_as_tokens():
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    writes = [
        (0.05, chat_chunk(role="assistant", content=None)),
        (0.10, chat_chunk(tool_calls=[call])),
        (0.20, chat_chunk(tool_calls=[{"index": 0, "function": {"arguments": '{"city"'}}])),
        (0.22, chat_chunk(tool_calls=[{"index": 0, "function": {"arguments": ': "Paris"}'}}])),
        (0.23, chat_chunk(finish_reason="tool_calls")),
        (0.24, DONE),
    ]

    (record,), _ = await send_all(Reply(writes=writes))

    assert record.success, record.error
    assert record.finish_reason == "tool_calls"
    assert record.ttft == pytest.approx(0.20, abs=TOLERANCE)
    assert record.chunk_texts == ['{"city"', ': "Paris"}']
    assert record.latency == pytest.approx(0.23, abs=TOLERANCE)


async def test_usage_chunk_and_done_do_not_move_latency():
    writes = token_timeline(ttft=0.1, tokens=3, gap=0.02)
    # Delay the usage-only chunk and [DONE] well past the finish chunk.
    writes = writes[:-2] + [(0.5, writes[-2][1]), (0.6, DONE)]

    (record,), _ = await send_all(Reply(writes=writes))

    assert record.success, record.error
    assert record.latency == pytest.approx(0.14, abs=TOLERANCE)
    assert record.completion_tokens == 3


async def test_itl_shares_gap_among_chunk_tokens():
    writes = [
        (0.05, chat_chunk(content="one")),
        (0.15, chat_chunk(content=" two three")),
        (0.45, chat_chunk(content=" four five six")),
        (0.46, chat_chunk(finish_reason="stop")),
        (0.47, DONE),
    ]

    (record,), _ = await send_all(Reply(writes=writes))
    itl = finalize(record, count_words)

    assert record.completion_tokens == 6
    assert record.token_source == "tokenizer"
    assert itl == pytest.approx([0.05, 0.05, 0.1, 0.1, 0.1], abs=TOLERANCE)
    assert record.chunk_texts == []
    assert statistics.mean(itl) == pytest.approx(0.4 / 5, abs=TOLERANCE)


async def test_non_streaming_response():
    body = (
        b'{"id":"x","object":"chat.completion","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"Hi there friend"},"finish_reason":"stop"}]}'
    )
    reply = Reply(headers={"Content-Type": "application/json"}, writes=[(0.2, body[:40]), (0.3, body[40:])])

    (record,), state = await send_all(reply, request=RequestConfig(stream=False))
    finalize(record, count_words)

    assert state.requests[0].body["stream"] is False
    assert "stream_options" not in state.requests[0].body
    assert record.success, record.error
    assert record.ttft is None
    assert record.tpot is None
    assert record.latency == pytest.approx(0.3, abs=TOLERANCE)
    assert record.completion_tokens == 3
    assert record.token_source == "tokenizer"
    assert record.empty_output is False


async def test_arrival_time_precedes_delayed_wakeup(monkeypatch):
    """A chunk's time is when its bytes reached the connection, not when the reader resumed.

    Right before the first token's bytes are fed to the reader, the test queues a 0.3 s
    blocking call. It runs before the reader's wake-up, as a busy event loop would delay it.
    """
    original = openai_module._ArrivalTimedProtocol.data_received
    blocked = []

    def data_received(protocol, data: bytes) -> None:
        if b"first" in data and not blocked:
            blocked.append(True)
            protocol._loop.call_soon(time.sleep, 0.3)
        original(protocol, data)

    monkeypatch.setattr(openai_module._ArrivalTimedProtocol, "data_received", data_received)
    writes = [
        (0.10, chat_chunk(content="first")),
        (0.50, chat_chunk(content=" second", finish_reason="stop")),
        (0.51, DONE),
    ]

    (record,), state = await send_all(Reply(writes=writes))
    served = state.requests[0]

    assert blocked == [True]
    assert record.success, record.error
    first_written = served.write_times[0] - served.read_at
    assert record.ttft == pytest.approx(first_written, abs=TOLERANCE)
    assert record.latency == pytest.approx(served.write_times[1] - served.read_at, abs=TOLERANCE)


def test_connector_uses_arrival_timed_protocol():
    async def build() -> bool:
        connector = openai_module._ArrivalTimedConnector()
        try:
            return connector.arrival_timed
        finally:
            await connector.close()

    assert asyncio.run(build()) is True
