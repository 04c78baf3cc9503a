"""Simulated server over HTTP: OpenAI wire format, token counts, errors and determinism."""

import json

import pytest

from runner.sim.profile import SimProfile
from runner.sim.server import build_app
from runner.sim.tokens import DEFAULT_TOKENIZER, load_tokenizer

FAST = SimProfile(name="test-fast", step_base=0.001, step_per_seq=0.0, step_per_prefill_token=0.0, max_num_seqs=32)
MESSAGES = [{"role": "user", "content": "Tell me about the weather on the coast today."}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(DEFAULT_TOKENIZER))


@pytest.fixture
async def client(aiohttp_client):
    return await aiohttp_client(build_app(FAST, seed=0))


def parse_sse(body: str) -> list:
    """Return the payloads of an SSE body: parsed JSON objects and the literal '[DONE]'."""
    assert body.endswith("\n\n")
    events = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def post_stream(client, path: str, body: dict) -> list:
    response = await client.post(path, json={**body, "stream": True})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return parse_sse(await response.text())


async def test_chat_stream_format(client, tokenizer):
    events = await post_stream(
        client,
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 6, "ignore_eos": True, "stream_options": {"include_usage": True}},
    )
    role, *tokens, usage_event, done = events
    assert done == "[DONE]"
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert set(role) >= {"id", "object", "created", "model", "choices"}
    assert len(tokens) == 6
    for event in tokens:
        assert event["id"] == role["id"]
        assert event["choices"][0]["index"] == 0
        assert len(tokenizer.encode(event["choices"][0]["delta"]["content"], add_special_tokens=False)) == 1
    assert [event["choices"][0]["finish_reason"] for event in tokens] == [None] * 5 + ["length"]
    assert usage_event["choices"] == []
    expected_prompt = len(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert usage_event["usage"] == {"prompt_tokens": expected_prompt, "completion_tokens": 6, "total_tokens": expected_prompt + 6}


async def test_chat_stream_without_usage(client):
    events = await post_stream(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3})
    assert events[-1] == "[DONE]"
    assert all("usage" not in event for event in events[:-1])
    assert len(events) == 1 + 3 + 1


async def test_completions_stream_format(client, tokenizer):
    prompt = "The quick brown fox jumps over the lazy dog"
    events = await post_stream(
        client,
        "/v1/completions",
        {"prompt": prompt, "max_tokens": 4, "ignore_eos": True, "stream_options": {"include_usage": True}},
    )
    *tokens, usage_event, done = events
    assert done == "[DONE]"
    assert [event["object"] for event in tokens] == ["text_completion"] * 4
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(event["choices"][0]["text"] for event in tokens)
    assert usage_event["usage"]["completion_tokens"] == 4
    assert len(tokenizer.encode(text, add_special_tokens=False)) == 4
    assert usage_event["usage"]["prompt_tokens"] == len(tokenizer.encode(prompt, add_special_tokens=False))


async def test_chat_whole_response(client, tokenizer):
    response = await client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_completion_tokens": 40, "ignore_eos": True})
    assert response.status == 200
    body = await response.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 40
    assert len(tokenizer.encode(choice["message"]["content"], add_special_tokens=False)) == 40


async def test_completions_token_id_prompt(client):
    response = await client.post("/v1/completions", json={"prompt": list(range(1000, 1300)), "max_tokens": 2})
    body = await response.json()
    assert body["object"] == "text_completion"
    assert body["usage"]["prompt_tokens"] == 300
    assert body["choices"][0]["text"]


async def test_output_count_matches_tokenizer(client, tokenizer):
    for max_tokens in (1, 17, 300):
        response = await client.post("/v1/completions", json={"prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True})
        body = await response.json()
        text = body["choices"][0]["text"]
        assert body["usage"]["completion_tokens"] == max_tokens
        assert len(tokenizer.encode(text, add_special_tokens=False)) == max_tokens


async def test_early_stop_without_ignore_eos(aiohttp_client, tokenizer):
    profile = SimProfile(name="eos", step_base=0.0005, step_per_seq=0.0, eos_probability=0.2, max_num_seqs=32)
    client = await aiohttp_client(build_app(profile, seed=3))
    reasons = set()
    for _ in range(10):
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50, "min_tokens": 5})
        body = await response.json()
        count = body["usage"]["completion_tokens"]
        assert 5 <= count <= 50
        assert len(tokenizer.encode(body["choices"][0]["text"], add_special_tokens=False)) == count
        reasons.add(body["choices"][0]["finish_reason"])
    assert "stop" in reasons


async def collect_texts(aiohttp_client, seed: int) -> list[str]:
    client = await aiohttp_client(build_app(FAST, seed=seed))
    texts = []
    for max_tokens in (5, 9, 13):
        response = await client.post("/v1/completions", json={"prompt": "same", "max_tokens": max_tokens})
        texts.append((await response.json())["choices"][0]["text"])
    return texts


async def test_same_seed_same_texts(aiohttp_client):
    first = await collect_texts(aiohttp_client, seed=11)
    second = await collect_texts(aiohttp_client, seed=11)
    other = await collect_texts(aiohttp_client, seed=12)
    assert first == second
    assert first != other


async def test_health_and_models(aiohttp_client):
    client = await aiohttp_client(build_app(FAST, model="served-model"))
    health = await client.get("/health")
    assert health.status == 200
    assert await health.json() == {"status": "ok"}
    models = await (await client.get("/v1/models")).json()
    assert [entry["id"] for entry in models["data"]] == ["served-model"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"max_tokens": 5}, "messages"),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 5}, "messages"),
        ("/v1/completions", {"max_tokens": 5}, "prompt"),
        ("/v1/completions", {"prompt": "", "max_tokens": 5}, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 5, "min_tokens": 6}, "min_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 5, "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10_000_000}, "max_tokens"),
    ],
)
async def test_invalid_request_400(client, path, body, param):
    response = await client.post(path, json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert error["code"]


async def test_bad_json_400(client):
    response = await client.post("/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_json"


async def test_unknown_model_404(client):
    response = await client.post("/v1/completions", json={"model": "other", "prompt": "x", "max_tokens": 1})
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "model_not_found"
