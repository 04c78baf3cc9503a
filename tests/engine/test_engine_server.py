"""What llama-server itself sends: the facts the runner's client and the engine README rely on.

A failure here after a llama.cpp upgrade means the server changed, and
engine/README.md (and maybe the client) must follow.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any

import pytest


pytestmark = pytest.mark.engine

MAX_TOKENS = 8


def post_json(url: str, body: dict[str, Any]) -> bytes:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        return response.read()


def chat_body(engine, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": engine.model,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def sse_payloads(raw: bytes) -> list[str]:
    return [line[len("data: ") :] for line in raw.decode().splitlines() if line.startswith("data: ")]


def test_models_lists_alias(engine):
    with urllib.request.urlopen(f"{engine.base_url}/v1/models", timeout=10) as response:
        models = json.load(response)

    assert [model["id"] for model in models["data"]] == [engine.model]
    assert models["data"][0]["meta"]["n_vocab"] == 151665


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "你好，世界！ Ünïcödé   spaces\n\ttabs 12345",
        "<|im_start|>user\nhi<|im_end|>",
    ],
)
def test_tokenize_matches_vendored_tokenizer(engine, qwen_tokenizer, text):
    server_ids = json.loads(post_json(f"{engine.base_url}/tokenize", {"content": text}))["tokens"]

    assert server_ids == qwen_tokenizer.encode(text, add_special_tokens=False)


def test_stream_chunk_layout(engine):
    payloads = sse_payloads(post_json(engine.chat_url, chat_body(engine, stream=True)))

    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]

    # The first chunk carries only the role, with content null rather than "".
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}

    # finish_reason comes in its own chunk with an empty delta.
    finish = chunks[-2]["choices"][0]
    assert finish["finish_reason"] == "length"
    assert finish["delta"] == {}

    # The usage chunk has no choices and adds llama.cpp's own timings object.
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == MAX_TOKENS
    assert usage_chunk["timings"]["predicted_n"] == MAX_TOKENS

    # Partial UTF-8 tokens are merged into one chunk, so there can be fewer
    # content chunks than tokens, never more.
    content_chunks = [chunk for chunk in chunks[1:-2] if chunk["choices"][0]["delta"].get("content")]
    assert 1 <= len(content_chunks) <= MAX_TOKENS


def test_non_stream_usage(engine):
    response = json.loads(post_json(engine.chat_url, chat_body(engine, stream=False)))

    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == MAX_TOKENS
    assert "timings" in response


def test_stream_closes_connection(engine):
    # llama-server sends "Keep-Alive: timeout=5, max=100" with a stream but
    # closes the TCP connection right after the last chunk. A client that puts
    # the connection back in its pool fails its next request on it.
    body = json.dumps(chat_body(engine, stream=True)).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body

    received = b""
    with socket.create_connection(("127.0.0.1", engine.port), timeout=10) as sock:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            received += chunk

    head = received.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert "keep-alive: timeout=5" in head
    assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
