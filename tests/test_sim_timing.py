"""Real-time timings of the simulated server, read from its ground-truth log.

Step costs are 20 ms with no per-sequence or prefill cost, so each expected time is a whole
number of steps after admission. Steps run on absolute times, so the tolerance covers one
event-loop delay and does not grow with the token index.
"""

import asyncio
import json
import math

import pytest

from runner.sim.profile import SimProfile
from runner.sim.server import STATE, build_app

STEP = 0.020
# Seconds of scheduling delay allowed on any single time.
TOLERANCE = 0.006


def step_profile(**overrides) -> SimProfile:
    values = dict(name="steps", step_base=STEP, step_per_seq=0.0, step_per_prefill_token=0.0, max_num_seqs=4, max_batched_tokens=64)
    values.update(overrides)
    return SimProfile(**values)


async def start(aiohttp_client, tmp_path, profile: SimProfile):
    log_path = tmp_path / "ground_truth.jsonl"
    app = build_app(profile, seed=0, log_path=str(log_path))
    return app, await aiohttp_client(app), log_path


def read_log(app, log_path) -> list[dict]:
    app[STATE].log.flush()
    return [json.loads(line) for line in log_path.read_text().splitlines()]


async def stream_completion(client, prompt_tokens: int, max_tokens: int, request_id: str = "") -> None:
    body = {"prompt": list(range(1000, 1000 + prompt_tokens)), "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    response = await client.post("/v1/completions", json=body, headers={"X-Request-Id": request_id})
    assert response.status == 200
    await response.read()


async def test_single_request_token_grid(aiohttp_client, tmp_path):
    app, client, log_path = await start(aiohttp_client, tmp_path, step_profile())
    await stream_completion(client, prompt_tokens=10, max_tokens=8, request_id="solo")
    (record,) = read_log(app, log_path)

    assert record["client_request_id"] == "solo"
    assert record["status"] == "ok"
    assert record["completion_tokens"] == 8
    assert record["prompt_tokens"] == 10
    assert record["finish_reason"] == "length"
    assert 0 <= record["admitted_at"] - record["arrived_at"] < TOLERANCE
    # Prefill fits in one step, so token i is written at the end of step i + 1.
    offsets = [written - record["admitted_at"] for written in record["chunk_written_at"]]
    assert offsets == pytest.approx([STEP * (i + 1) for i in range(8)], abs=TOLERANCE)
    assert record["first_token_at"] == record["chunk_written_at"][0]
    assert record["finished_at"] >= record["chunk_written_at"][-1]


async def test_chunked_prefill_delays_first_token(aiohttp_client, tmp_path):
    app, client, log_path = await start(aiohttp_client, tmp_path, step_profile())
    await stream_completion(client, prompt_tokens=200, max_tokens=3)
    (record,) = read_log(app, log_path)

    prefill_steps = math.ceil(200 / 64)
    assert record["first_token_at"] - record["admitted_at"] == pytest.approx(prefill_steps * STEP, abs=TOLERANCE)
    gaps = [b - a for a, b in zip(record["chunk_written_at"], record["chunk_written_at"][1:])]
    assert gaps == pytest.approx([STEP, STEP], abs=TOLERANCE)


async def test_requests_queue_for_slots(aiohttp_client, tmp_path):
    app, client, log_path = await start(aiohttp_client, tmp_path, step_profile(max_num_seqs=2))
    await asyncio.gather(*(stream_completion(client, prompt_tokens=5, max_tokens=4, request_id=str(i)) for i in range(4)))
    records = sorted(read_log(app, log_path), key=lambda record: record["admitted_at"])

    assert len(records) == 4
    last_token = [record["chunk_written_at"][-1] for record in records]
    # With two slots the third request starts when the first one finishes, the fourth when the second does.
    assert records[2]["admitted_at"] == pytest.approx(last_token[0], abs=TOLERANCE)
    assert records[3]["admitted_at"] == pytest.approx(last_token[1], abs=TOLERANCE)
    assert records[2]["admitted_at"] - records[2]["arrived_at"] >= 4 * STEP - TOLERANCE
    for record in records:
        assert record["first_token_at"] - record["admitted_at"] == pytest.approx(STEP, abs=TOLERANCE)


async def test_step_time_grows_with_batch(aiohttp_client, tmp_path):
    profile = step_profile(step_base=0.010, step_per_seq=0.005, max_num_seqs=8)
    app, client, log_path = await start(aiohttp_client, tmp_path, profile)
    body = {"prompt": [1, 2, 3], "max_tokens": 6, "ignore_eos": True, "stream": True}
    responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(4)))
    for response in responses:
        await response.read()
    records = read_log(app, log_path)

    # Once all four run together a step costs 10 + 4 * 5 = 30 ms.
    last_gaps = [record["chunk_written_at"][-1] - record["chunk_written_at"][-2] for record in records]
    assert last_gaps == pytest.approx([0.030] * 4, abs=TOLERANCE)


async def test_rejected_and_aborted_are_logged(aiohttp_client, tmp_path):
    app, client, log_path = await start(aiohttp_client, tmp_path, step_profile())
    response = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert response.status == 400

    body = {"prompt": [1, 2], "max_tokens": 500, "ignore_eos": True, "stream": True}
    response = await client.post("/v1/completions", json=body)
    await response.content.readline()
    response.close()
    for _ in range(50):
        await asyncio.sleep(STEP)
        if len(read_log(app, log_path)) == 2:
            break
    rejected, aborted = read_log(app, log_path)

    assert rejected["status"] == "rejected"
    assert rejected["http_status"] == 400
    assert "max_tokens" in rejected["error"]
    assert aborted["status"] == "aborted"
    assert aborted["completion_tokens"] < 500
    assert app[STATE].engine.core.idle
