"""Injected faults: each kind breaks the response as its name describes."""

import asyncio
import json
import random

import aiohttp
import pytest

from runner.sim.faults import Fault, cut_point, draw_fault
from runner.sim.profile import FaultRates, SimProfile
from runner.sim.server import STATE, build_app

BODY = {"prompt": [1, 2, 3], "max_tokens": 8, "ignore_eos": True}


def faulty_profile(**rates) -> SimProfile:
    return SimProfile(
        name="faulty",
        step_base=0.001,
        step_per_seq=0.0,
        step_per_prefill_token=0.0,
        faults=FaultRates(stall_seconds=0.2, headers_delay_seconds=0.2, **rates),
    )


async def start(aiohttp_client, tmp_path, **rates):
    log_path = tmp_path / "log.jsonl"
    app = build_app(faulty_profile(**rates), log_path=str(log_path))
    return app, await aiohttp_client(app), log_path


def read_log(app, log_path) -> list[dict]:
    app[STATE].log.flush()
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def test_draw_fault_rates():
    rates = FaultRates(rate_limited=0.25, stalled=0.25)
    rng = random.Random(0)
    draws = [draw_fault(rates, rng) for _ in range(4000)]
    assert draws.count(Fault.rate_limited) == pytest.approx(1000, rel=0.1)
    assert draws.count(Fault.stalled) == pytest.approx(1000, rel=0.1)
    assert draws.count(None) == pytest.approx(2000, rel=0.1)
    assert draw_fault(FaultRates(), rng) is None


def test_cut_point_half():
    assert cut_point(8) == 4
    assert cut_point(1) == 1


async def test_rate_limited_429(aiohttp_client, tmp_path):
    app, client, log_path = await start(aiohttp_client, tmp_path, rate_limited=1.0)
    response = await client.post("/v1/completions", json=BODY)
    assert response.status == 429
    assert (await response.json())["error"]["code"] == "rate_limit_exceeded"
    (record,) = read_log(app, log_path)
    assert record["fault"] == "rate_limited"
    assert record["http_status"] == 429


async def test_unavailable_503_retry_after(aiohttp_client, tmp_path):
    _, client, _ = await start(aiohttp_client, tmp_path, unavailable=1.0)
    response = await client.post("/v1/completions", json=BODY)
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"


async def test_non_sse_body(aiohttp_client, tmp_path):
    _, client, _ = await start(aiohttp_client, tmp_path, non_sse_body=1.0)
    response = await client.post("/v1/completions", json={**BODY, "stream": True})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/html")


async def test_reset_mid_stream(aiohttp_client, tmp_path):
    app, client, log_path = await start(aiohttp_client, tmp_path, reset_mid_stream=1.0)
    response = await client.post("/v1/completions", json={**BODY, "stream": True})
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    (record,) = read_log(app, log_path)
    assert record["fault"] == "reset_mid_stream"
    assert len(record["chunk_written_at"]) == 4
    assert app[STATE].engine.core.idle


async def test_stalled_stream_goes_silent(aiohttp_client, tmp_path):
    app, client, log_path = await start(aiohttp_client, tmp_path, stalled=1.0)
    response = await client.post("/v1/completions", json={**BODY, "stream": True})
    events = []
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.1):
            async for line in response.content:
                if line.startswith(b"data: "):
                    events.append(line)
    assert len(events) == 4
    response.close()


async def test_malformed_chunk(aiohttp_client, tmp_path):
    _, client, _ = await start(aiohttp_client, tmp_path, malformed_chunk=1.0)
    response = await client.post("/v1/completions", json={**BODY, "stream": True})
    blocks = (await response.text()).split("\n\n")[:-1]
    payloads = [block[len("data: "):] for block in blocks]
    assert payloads[-1] == "[DONE]"
    invalid = []
    for payload in payloads[:-1]:
        try:
            json.loads(payload)
        except json.JSONDecodeError:
            invalid.append(payload)
    assert len(invalid) == 1
    assert len(payloads) == 8 + 1 + 1


async def test_no_terminal_event(aiohttp_client, tmp_path):
    _, client, _ = await start(aiohttp_client, tmp_path, no_terminal_event=1.0)
    response = await client.post("/v1/completions", json={**BODY, "stream": True})
    text = await response.text()
    assert "[DONE]" not in text
    assert '"finish_reason":null' in text
    assert '"finish_reason":"' not in text
    assert text.count("data: ") == 8


async def test_headers_delayed(aiohttp_client, tmp_path):
    _, client, _ = await start(aiohttp_client, tmp_path, headers_delayed=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await client.post("/v1/completions", json=BODY)
    assert loop.time() - started >= 0.2
    assert (await response.json())["usage"]["completion_tokens"] == 8


async def test_whole_response_reset(aiohttp_client, tmp_path):
    _, client, _ = await start(aiohttp_client, tmp_path, reset_mid_stream=1.0)
    with pytest.raises(aiohttp.ClientError):
        response = await client.post("/v1/completions", json=BODY)
        await response.read()
