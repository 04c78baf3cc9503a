"""A server that closes every connection right after a streamed response, as llama.cpp's does."""

import asyncio

from runner.client.openai import OpenAIClient
from runner.client.record import Prompt, RequestRecord
from runner.config import EndpointConfig, EndpointKind, ModelConfig, RequestConfig
from runner.testing.scripted import DONE, chat_chunk, usage_of


def chunked(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


async def serve_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one request with a complete stream that advertises keep-alive, then close."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nKeep-Alive: timeout=5, max=100\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    for event in (chat_chunk(content="hi"), chat_chunk(finish_reason="length"),
                  chat_chunk(usage=usage_of(3, 1), choices=False), DONE):
        writer.write(chunked(event))
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    writer.close()


async def test_closed_keepalive_connection_retried():
    server = await asyncio.start_server(serve_and_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    endpoint = EndpointConfig(kind=EndpointKind.openai, url=f"http://127.0.0.1:{port}/v1/chat/completions")
    records = []
    async with server:
        async with OpenAIClient(endpoint, ModelConfig(), RequestConfig(max_tokens=1), pool_size=1) as client:
            for request_id in range(20):
                record = RequestRecord(request_id=request_id)
                await client.send(Prompt(text="x", prompt_tokens=1), record)
                records.append(record)
                # Give the close a moment to arrive half of the time, and none the other half.
                if request_id % 2:
                    await asyncio.sleep(0.005)
    assert [r.error for r in records if not r.success] == []
    assert all(r.completion_tokens == 1 for r in records)
