"""Throughput of the simulated server child: 256 concurrent streams keep the step schedule."""

import asyncio
import json
import statistics
import time

import aiohttp
import pytest

from runner.sim.process import start_sim

STREAMS = 256
TOKENS = 60
# 256 tokens per 50 ms step is 5,120 tokens/s in total.
STEP = 0.050


@pytest.mark.slow
async def test_256_streams_keep_step_time(tmp_path):
    profile = tmp_path / "load.yaml"
    profile.write_text(
        f"step_base: {STEP}\nstep_per_seq: 0.0\nstep_per_prefill_token: 0.0\n"
        f"max_num_seqs: {STREAMS}\nmax_batched_tokens: 65536\nkv_cache_tokens: 1000000\n"
    )
    log_path = tmp_path / "log.jsonl"
    body = {"prompt": [1, 2, 3, 4], "max_tokens": TOKENS, "ignore_eos": True, "stream": True}
    with start_sim(str(profile), log_path=str(log_path)) as sim:
        connector = aiohttp.TCPConnector(limit=STREAMS)
        # trust_env stays off, so no proxy setting can redirect this traffic.
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one_stream() -> int:
                async with session.post(f"{sim.base_url}/v1/completions", json=body) as response:
                    return sum(1 for line in (await response.read()).split(b"\n\n") if line.startswith(b"data: {"))

            started = time.perf_counter()
            async with asyncio.timeout(60):
                counts = await asyncio.gather(*(one_stream() for _ in range(STREAMS)))
            elapsed = time.perf_counter() - started

    assert counts == [TOKENS] * STREAMS
    # All streams are admitted within the first few steps, so the run takes about TOKENS steps.
    assert elapsed < TOKENS * STEP * 1.5
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(records) == STREAMS
    gaps = [b - a for record in records for a, b in zip(record["chunk_written_at"], record["chunk_written_at"][1:])]
    assert statistics.median(gaps) == pytest.approx(STEP, abs=0.005)
