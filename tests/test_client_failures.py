"""Failed requests become records with a one-line error; only cancellation raises."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Optional

import pytest

from runner.client import OpenAIClient, Prompt, RequestRecord, finalize
from runner.config import EndpointConfig, ModelConfig, RequestConfig
from runner.errors import ConfigError
from runner.testing import DONE, End, Reply, ScriptedServer, chat_chunk, sse, token_timeline
from runner.testing.scripted import Script, ServerState

# Timeouts fire this late at most: aiohttp's timers plus scheduling on a loaded machine.
TIMEOUT_MARGIN = 0.1


def tokens_without_terminal(count: int) -> list[tuple[float, bytes]]:
    """Role chunk and `count` token chunks, with no finish_reason, usage or [DONE]."""
    writes = [(0.0, chat_chunk(role="assistant", content=""))]
    writes += [(0.05 + 0.01 * i, chat_chunk(content=f" t{i}")) for i in range(count)]
    return writes


async def send_one(
    script: Script, endpoint: Optional[EndpointConfig] = None
) -> tuple[RequestRecord, ServerState]:
    record = RequestRecord(request_id=0)
    async with ScriptedServer(script) as server:
        endpoint = endpoint or EndpointConfig(read_timeout=5.0, request_timeout=30.0)
        async with OpenAIClient(
            endpoint, ModelConfig(), RequestConfig(), base_url=server.base_url, pool_size=1
        ) as client:
            await client.send(Prompt(text="Hello"), record)
    return record, server.state


async def test_error_event_under_http_200():
    writes = [
        (0.0, chat_chunk(role="assistant", content="")),
        (0.05, chat_chunk(content="a")),
        (0.06, chat_chunk(content="b")),
        (0.07, sse({"error": {"message": "CUDA out of memory", "code": 500}})),
    ]

    record, _ = await send_one(Reply(writes=writes))

    assert record.success is False
    assert record.status == 200
    assert record.error == "server error event: CUDA out of memory"
    assert record.chunk_texts == ["a", "b"]
    assert record.latency is None


async def test_error_event_type():
    writes = [
        (0.0, chat_chunk(role="assistant", content="")),
        (0.05, b'event: error\ndata: {"message": "engine died"}\n\n'),
    ]

    record, _ = await send_one(Reply(writes=writes))

    assert record.success is False
    assert record.error == "server error event: engine died"


async def test_stream_closed_without_terminal_event():
    record, state = await send_one(Reply(writes=tokens_without_terminal(10), end=End.close))

    assert record.success is False
    assert record.status == 200
    assert record.error == "stream ended without a terminal event"
    assert len(record.chunk_times) == 10
    assert state.requests[0].client_disconnected is False


async def test_stream_reset_without_terminal_event():
    record, _ = await send_one(Reply(writes=tokens_without_terminal(10), end=End.reset))

    assert record.success is False
    assert record.status == 200
    assert record.error == "stream ended without a terminal event: connection reset or closed (ClientPayloadError)"
    assert len(record.chunk_times) == 10


async def test_http_429_with_json_message():
    body = b'{"error": {"message": "Rate limit exceeded\\nslow down", "type": "rate_limit"}}'
    reply = Reply(status=429, headers={"Content-Type": "application/json"}, writes=[(0.0, body)])

    record, _ = await send_one(reply)

    assert record.success is False
    assert record.status == 429
    assert record.error == "HTTP 429: Rate limit exceeded slow down"


async def test_http_503_with_retry_after():
    reply = Reply(
        status=503, headers={"Content-Type": "text/plain", "Retry-After": "7"}, writes=[(0.0, b"Server overloaded")]
    )

    record, _ = await send_one(reply)

    assert record.success is False
    assert record.status == 503
    assert record.error == "HTTP 503: Server overloaded (Retry-After: 7)"


async def test_http_error_message_cut_to_200_characters():
    reply = Reply(status=500, headers={"Content-Type": "text/plain"}, writes=[(0.0, b"x" * 1000)])

    record, _ = await send_one(reply)

    assert record.error.startswith("HTTP 500: xxx")
    assert len(record.error) == len("HTTP 500: ") + 200


async def test_read_timeout_mid_stream():
    endpoint = EndpointConfig(read_timeout=0.3, request_timeout=None)
    reply = Reply(writes=tokens_without_terminal(3), end=End.hang)

    record, state = await send_one(reply, endpoint)
    silent = record.ended_at - state.requests[0].write_times[-1]

    assert record.success is False
    assert record.error == "timed out: no data for 0.3 s (endpoint.read_timeout)"
    assert 0.3 <= silent < 0.3 + TIMEOUT_MARGIN
    assert len(record.chunk_times) == 3


async def test_read_timeout_before_headers():
    endpoint = EndpointConfig(read_timeout=0.2)
    reply = Reply(headers_at=5.0, writes=token_timeline(ttft=5.1, tokens=2))

    record, _ = await send_one(reply, endpoint)

    assert record.success is False
    assert record.status is None
    assert record.error == "timed out: no data for 0.2 s (endpoint.read_timeout)"
    assert record.ended_at - record.sent_at == pytest.approx(0.2, abs=TIMEOUT_MARGIN)


async def test_request_timeout_while_streaming():
    endpoint = EndpointConfig(read_timeout=5.0, request_timeout=0.5)
    reply = Reply(writes=token_timeline(ttft=0.1, tokens=100, gap=0.02))

    record, _ = await send_one(reply, endpoint)
    elapsed = record.ended_at - record.sent_at

    assert record.success is False
    assert record.error == "timed out: request exceeded 0.5 s (endpoint.request_timeout)"
    assert 0.5 - 0.01 <= elapsed < 0.5 + TIMEOUT_MARGIN
    assert record.chunk_times


async def test_invalid_json_event():
    writes = [(0.0, chat_chunk(role="assistant", content="")), (0.05, b'data: {"choices": [{"delta"\n\n')]

    record, _ = await send_one(Reply(writes=writes))

    assert record.success is False
    assert record.error == 'invalid JSON in stream event: {"choices": [{"delta"'


async def test_json_response_to_streamed_request():
    reply = Reply(headers={"Content-Type": "application/json"}, writes=[(0.0, b'{"detail": "streaming off"}')])

    record, _ = await send_one(reply)

    assert record.success is False
    assert record.status == 200
    assert "application/json" in record.error
    assert record.error == (
        'HTTP 200 with content type application/json, expected text/event-stream for a streamed '
        'request: {"detail": "streaming off"}'
    )


async def test_connection_refused():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = EndpointConfig(kind="openai", url=f"http://127.0.0.1:{port}/v1/chat/completions")
    record = RequestRecord(request_id=0)

    async with OpenAIClient(endpoint, ModelConfig(), RequestConfig(), pool_size=1) as client:
        await client.send(Prompt(text="Hello"), record)

    assert record.success is False
    assert record.status is None
    assert record.error.startswith("connection failed: ClientConnectorError")


async def test_cancel_marks_record_and_reraises():
    record = RequestRecord(request_id=0)
    async with ScriptedServer(Reply(writes=tokens_without_terminal(2), end=End.hang)) as server:
        async with OpenAIClient(
            EndpointConfig(), ModelConfig(), RequestConfig(), base_url=server.base_url, pool_size=1
        ) as client:
            task = asyncio.create_task(client.send(Prompt(text="Hello"), record))
            await asyncio.sleep(0.2)
            cancelled_at = time.perf_counter()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    assert record.success is False
    assert record.error == "cancelled"
    assert record.ended_at >= cancelled_at
    assert len(record.chunk_times) == 2


async def test_failed_request_keeps_partial_timings():
    record, _ = await send_one(Reply(writes=tokens_without_terminal(4), end=End.close))
    itl = finalize(record, None)

    assert record.ttft is not None
    assert record.latency is None
    assert record.empty_output is False
    assert len(itl) == 3


def test_missing_api_key_variable(monkeypatch):
    monkeypatch.delenv("RUNNER_TEST_KEY", raising=False)
    endpoint = EndpointConfig(api_key_env="RUNNER_TEST_KEY")

    with pytest.raises(ConfigError, match="RUNNER_TEST_KEY"):
        OpenAIClient(endpoint, ModelConfig(), RequestConfig(), base_url="http://127.0.0.1:1", pool_size=1)


async def test_done_without_finish_reason_is_success():
    writes = [(0.0, chat_chunk(role="assistant", content="")), (0.05, chat_chunk(content="x")), (0.06, DONE)]

    record, _ = await send_one(Reply(writes=writes))

    assert record.success, record.error
    assert record.finish_reason is None
    assert record.latency == pytest.approx(0.05, abs=0.01)


async def test_reset_after_finish_reason_is_success():
    writes = token_timeline(ttft=0.05, tokens=3, gap=0.01)[:-2]  # without usage and [DONE]

    record, _ = await send_one(Reply(writes=writes, end=End.reset))

    assert record.success, record.error
    assert record.finish_reason == "length"
    assert record.completion_tokens is None


async def test_malformed_choices_event():
    writes = [(0.0, chat_chunk(role="assistant", content="")), (0.05, b'data: {"choices": ["oops"]}\n\n')]

    record, _ = await send_one(Reply(writes=writes))

    assert record.success is False
    assert record.error == "invalid stream event, malformed choices: ['oops']"


async def test_non_streaming_error_object():
    body = b'{"error": {"message": "model not loaded"}}'
    reply = Reply(headers={"Content-Type": "application/json"}, writes=[(0.0, body)])
    record = RequestRecord(request_id=0)

    async with ScriptedServer(reply) as server:
        async with OpenAIClient(
            EndpointConfig(), ModelConfig(), RequestConfig(stream=False), base_url=server.base_url, pool_size=1
        ) as client:
            await client.send(Prompt(text="Hello"), record)

    assert record.success is False
    assert record.error == "server error: model not loaded"
