"""Kernel receive times: a chunk keeps its arrival time while the client's event loop is blocked."""

from __future__ import annotations

import asyncio
import struct
import sys
import time

import pytest

from runner.client import OpenAIClient, Prompt, RequestRecord
from runner.client import kernel_clock
from runner.config import EndpointConfig, ModelConfig, RequestConfig
from runner.testing import DONE, Reply, chat_chunk
from runner.testing.scripted import ScriptedServerProcess

# Server timers fire up to about 1 ms late, and a busy two-core machine now and then runs a
# process 10 ms late.
TOLERANCE = 0.015
BLOCK_SECONDS = 0.3

linux_only = pytest.mark.skipif(not kernel_clock.kernel_stamps_supported(),
                                reason="kernel receive times are read the Linux way")


async def send_while_blocked(writes: list) -> tuple[RequestRecord, object, float]:
    """Send one request; once its response headers arrive, block the loop for BLOCK_SECONDS."""
    record = RequestRecord(request_id=0)
    blocked_at: list[float] = []

    async def block_after_headers() -> None:
        while record.status is None:
            await asyncio.sleep(0.001)
        blocked_at.append(time.perf_counter())
        time.sleep(BLOCK_SECONDS)  # nothing in this process runs meanwhile, as in a busy loop

    async with ScriptedServerProcess(Reply(writes=writes)) as server:
        endpoint = EndpointConfig(read_timeout=5.0, request_timeout=30.0)
        async with OpenAIClient(endpoint, ModelConfig(), RequestConfig(), base_url=server.base_url,
                                pool_size=1) as client:
            blocker = asyncio.create_task(block_after_headers())
            await client.send(Prompt(text="Hello"), record)
            await blocker
    return record, server.state.requests[0], blocked_at[0]


@linux_only
def test_chunk_time_survives_blocked_loop():
    # The first token arrives 0.10 s after the request, while the loop is blocked until
    # about 0.30 s. The reply ends at 0.50 s, after the block.
    writes = [(0.10, chat_chunk(content="first")), (0.50, chat_chunk(content=" second", finish_reason="stop")),
              (0.51, DONE)]

    record, served, blocked_at = kernel_clock.run(send_while_blocked(writes))

    assert record.success, record.error
    # The block began before the first token was written, so the loop read it late.
    assert blocked_at < served.write_times[0]
    assert blocked_at + BLOCK_SECONDS > served.write_times[0]
    assert record.ttft == pytest.approx(served.write_times[0] - served.read_at, abs=TOLERANCE)
    assert record.latency == pytest.approx(served.write_times[1] - served.read_at, abs=TOLERANCE)


def test_default_loop_stamps_late_when_blocked():
    # The same exchange on asyncio's default loop: the stamp is taken when the loop reads,
    # which shows what the kernel times correct.
    writes = [(0.10, chat_chunk(content="first")), (0.50, chat_chunk(content=" second", finish_reason="stop")),
              (0.51, DONE)]

    record, served, blocked_at = asyncio.run(send_while_blocked(writes))

    assert record.success, record.error
    assert record.first_token_at >= blocked_at + BLOCK_SECONDS


def stamp_message(stamp: float) -> tuple[int, int, bytes]:
    seconds = int(stamp)
    data = struct.pack("@qq", seconds, int((stamp - seconds) * 1e9))
    return kernel_clock.socket.SOL_SOCKET, kernel_clock._SCM_TIMESTAMPNS, data


def test_convert_reads_stamp_age():
    offsets = kernel_clock.ClockOffsets()
    before = time.perf_counter()
    value = offsets.convert([stamp_message(time.time() - 0.5)])
    after = time.perf_counter()

    assert value is not None
    assert before - 0.5 - 0.001 <= value <= after - 0.5 + 0.001


def test_convert_after_realtime_step():
    # The realtime clock stepped 0.5 ms forward since the previous poll. The stamp may be
    # from before or after the step, so the later of the two times is taken.
    offsets = kernel_clock.ClockOffsets()
    offsets.previous = offsets.current - 0.0005
    before = time.perf_counter()
    value = offsets.convert([stamp_message(time.time() - 0.010)])
    after = time.perf_counter()

    assert value is not None
    assert before - 0.010 + 0.0005 - 0.001 <= value <= after - 0.010 + 0.0005 + 0.001


def test_convert_never_after_now():
    offsets = kernel_clock.ClockOffsets()
    value = offsets.convert([stamp_message(time.time() + 5.0)])

    assert value is not None
    assert value <= time.perf_counter()


def test_convert_without_stamp():
    assert kernel_clock.ClockOffsets().convert([]) is None


@pytest.mark.skipif(sys.platform != "linux", reason="the stamping loop is used on Linux only")
def test_loop_factory_prefers_stamping_loop():
    assert kernel_clock.loop_factory() is kernel_clock.StampingEventLoop


async def clock_of(url: str) -> str:
    return kernel_clock.arrival_clock(url)


@linux_only
def test_arrival_clock_names_source():
    assert kernel_clock.run(clock_of("http://127.0.0.1:8000/v1/chat/completions")) == "kernel"
    assert kernel_clock.run(clock_of("https://example.invalid/v1/chat/completions")) == "event loop"
    assert asyncio.run(clock_of("http://127.0.0.1:8000/v1/chat/completions")) == "event loop"
