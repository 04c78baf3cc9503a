"""Request bodies, URL and headers that the client sends."""

from __future__ import annotations

import pytest

from runner.client import OpenAIClient, Prompt, RequestRecord
from runner.config import EndpointConfig, ModelConfig, RequestConfig
from runner.errors import ConfigError
from runner.testing import Reply, ScriptedServer, token_timeline

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def make_client(url: str = CHAT, request: RequestConfig | None = None, **endpoint: object) -> OpenAIClient:
    return OpenAIClient(
        EndpointConfig(url=url, **endpoint),
        ModelConfig(name="test-model"),
        request or RequestConfig(),
        base_url="http://127.0.0.1:9",
        pool_size=1,
    )


def test_chat_body_from_text():
    body = make_client().build_body(Prompt(text="Hello"))

    assert body == {
        "model": "test-model",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 128,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_chat_body_keeps_messages():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

    body = make_client().build_body(Prompt(text="ignored", messages=messages))

    assert body["messages"] == messages


def test_completions_body_text_and_token_ids():
    client = make_client(COMPLETIONS)

    assert client.build_body(Prompt(text="Once upon"))["prompt"] == "Once upon"
    # Token ids go out only when request.prompt_token_ids is true.
    assert client.build_body(Prompt(text="x", token_ids=[1, 2, 3]))["prompt"] == "x"
    assert "messages" not in client.build_body(Prompt(text="x"))
    with_ids = make_client(COMPLETIONS, RequestConfig(prompt_token_ids=True))
    assert with_ids.build_body(Prompt(text="x", token_ids=[1, 2, 3]))["prompt"] == [1, 2, 3]
    assert with_ids.build_body(Prompt(text="Once upon"))["prompt"] == "Once upon"


def test_prompt_max_tokens_overrides_request():
    client = make_client(request=RequestConfig(max_tokens=64))

    assert client.build_body(Prompt(text="x"))["max_tokens"] == 64
    assert client.build_body(Prompt(text="x", max_tokens=7))["max_tokens"] == 7


def test_optional_fields():
    request = RequestConfig(min_tokens=16, ignore_eos=False, temperature=None, stream=False)

    body = make_client(request=request).build_body(Prompt(text="x"))

    assert body["min_tokens"] == 16
    assert "ignore_eos" not in body
    assert "temperature" not in body
    assert body["stream"] is False
    assert "stream_options" not in body


def test_extra_body_merged_last():
    request = RequestConfig(extra_body={"temperature": 0.7, "top_p": 0.9, "stream_options": None})

    body = make_client(request=request).build_body(Prompt(text="x"))

    assert body["temperature"] == 0.7
    assert body["top_p"] == 0.9
    assert body["stream_options"] is None


def test_base_url_replaces_scheme_host_and_port():
    client = OpenAIClient(
        EndpointConfig(kind="openai", url="https://api.example.com/v1/completions?x=1"),
        ModelConfig(),
        RequestConfig(),
        base_url="http://127.0.0.1:8801",
        pool_size=1,
    )

    assert client.url == "http://127.0.0.1:8801/v1/completions?x=1"


def test_relative_url_without_base_url():
    with pytest.raises(ConfigError, match="endpoint.url"):
        OpenAIClient(EndpointConfig(url=CHAT), ModelConfig(), RequestConfig(), pool_size=1)


def test_pool_size_must_be_positive():
    with pytest.raises(ValueError, match="pool_size"):
        OpenAIClient(EndpointConfig(), ModelConfig(), RequestConfig(), base_url="http://127.0.0.1:9", pool_size=0)


def test_api_key_not_in_repr(monkeypatch):
    monkeypatch.setenv("RUNNER_TEST_KEY", "sk-secret-value")

    client = make_client(api_key_env="RUNNER_TEST_KEY")

    assert "sk-secret-value" not in repr(client)


async def test_headers_and_body_reach_server(monkeypatch):
    monkeypatch.setenv("RUNNER_TEST_KEY", "sk-secret-value")
    endpoint = EndpointConfig(api_key_env="RUNNER_TEST_KEY", headers={"X-Team": "bench"})
    record = RequestRecord(request_id=0)

    async with ScriptedServer(Reply(writes=token_timeline(ttft=0.01, tokens=2))) as server:
        async with OpenAIClient(
            endpoint, ModelConfig(name="test-model"), RequestConfig(), base_url=server.base_url, pool_size=1
        ) as client:
            await client.send(Prompt(text="Hello", prompt_tokens=3), record)
    served = server.state.requests[0]

    assert record.success, record.error
    assert served.headers["Authorization"] == "Bearer sk-secret-value"
    assert served.headers["X-Team"] == "bench"
    assert served.headers["Content-Type"] == "application/json"
    assert served.body["model"] == "test-model"
    assert served.body["messages"] == [{"role": "user", "content": "Hello"}]
    # The usage chunk's prompt count (10 in token_timeline) replaces the dataset's count.
    assert record.prompt_tokens == 10


async def test_send_outside_context_manager():
    with pytest.raises(RuntimeError, match="async with"):
        await make_client().send(Prompt(text="x"), RequestRecord(request_id=0))
