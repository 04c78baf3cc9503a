"""A server that fails every request stops the run within seconds with one line quoting it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from runner.sim.process import start_sim
from tests.paths import REPO

CHAT = "/v1/chat/completions"
QUICK = ["progress=false", "load.number=40", "load.warmup=0", "request.max_tokens=8",
         "dataset.min_prompt_length=8", "dataset.max_prompt_length=8", "endpoint.read_timeout=5"]


async def run_cli(out_dir: Path, *overrides: str, env: dict | None = None, timeout: float = 60):
    """Run the runner without blocking the event loop that serves the test's server."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runner", f"hydra.run.dir={out_dir}", *overrides, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, stdout.decode(), stderr.decode()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(code: int, stderr: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.timeout(60)
async def test_wrong_path_404_stops_run(aiohttp_server, tmp_path):
    server = await aiohttp_server(web.Application())  # no routes: every path is 404
    out_dir = tmp_path / "run"
    started = time.monotonic()

    code, _, stderr = await run_cli(out_dir, *QUICK, "endpoint=openai",
                                    f"endpoint.url=http://127.0.0.1:{server.port}{CHAT}")

    line = assert_one_line_error(code, stderr)
    assert "HTTP 404: Not Found" in line
    assert "404: 404" not in line
    assert time.monotonic() - started < 30
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert "HTTP 404" in manifest["preflight"]["error"]


@pytest.mark.timeout(60)
async def test_wrong_model_quotes_server(tmp_path):
    with start_sim("fast") as sim:
        out_dir = tmp_path / "run"

        code, _, stderr = await run_cli(out_dir, *QUICK, "endpoint=openai", f"endpoint.url={sim.base_url}{CHAT}",
                                        "model.name=no-such-model")

    line = assert_one_line_error(code, stderr)
    assert "HTTP 404: model 'no-such-model' does not exist; this server serves 'qwen2.5-0.5b-instruct'" in line
    assert (out_dir / "manifest.json").is_file()


@pytest.mark.timeout(60)
async def test_missing_key_401_quotes_server(aiohttp_server, tmp_path):
    async def chat(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer right-key":
            return web.json_response({"error": {"message": "invalid API key", "code": "invalid_api_key"}},
                                     status=401)
        return web.json_response({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]})

    app = web.Application()
    app.router.add_post(CHAT, chat)
    server = await aiohttp_server(app)
    out_dir = tmp_path / "run"

    code, _, stderr = await run_cli(out_dir, *QUICK, "endpoint=openai",
                                    f"endpoint.url=http://127.0.0.1:{server.port}{CHAT}",
                                    "endpoint.api_key_env=TEST_RUNNER_KEY", env={"TEST_RUNNER_KEY": "wrong-key"})

    line = assert_one_line_error(code, stderr)
    assert "HTTP 401: invalid API key" in line


@pytest.mark.timeout(60)
async def test_connection_refused_one_line(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}{CHAT}"

    code, _, stderr = await run_cli(tmp_path / "run", *QUICK, "endpoint=openai", f"endpoint.url={url}")

    line = assert_one_line_error(code, stderr)
    assert line == f"error: cannot connect to {url}: connection refused; is the server running?"


@pytest.mark.timeout(60)
async def test_guard_stops_all_failing_load(aiohttp_server, tmp_path):
    calls = 0

    async def chat(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.json_response({"error": {"message": "engine crashed"}}, status=500)

    app = web.Application()
    app.router.add_post(CHAT, chat)
    server = await aiohttp_server(app)
    out_dir = tmp_path / "run"

    code, _, stderr = await run_cli(out_dir, *QUICK, "load.number=1000", "load.parallel=2", "endpoint=openai",
                                    f"endpoint.url=http://127.0.0.1:{server.port}{CHAT}")

    line = assert_one_line_error(code, stderr)
    assert "all of the first 20 requests failed" in line
    assert "HTTP 500: engine crashed" in line
    assert calls < 30  # the preflight, 20 requests and the ones in flight
    rows = (out_dir / "requests.csv").read_text().splitlines()
    assert len(rows) - 1 >= 20
    assert (out_dir / "summary.csv").is_file()


def test_guard_names_rejected_request_field():
    from runner.client.record import RequestRecord
    from runner.preflight import FailureGuard

    guard = FailureGuard(limit=2)
    for request_id in range(2):
        record = RequestRecord(request_id=request_id, success=False,
                               error="HTTP 422: Extra inputs are not permitted: ignore_eos")
        stop = guard.observe(record)

    assert stop is True
    assert str(guard.error).endswith("the server does not accept the request field ignore_eos; "
                                     "set request.ignore_eos=false")


async def test_guard_counts_success_when_it_ends(aiohttp_server, tmp_path):
    # The preflight succeeds, and so does the first load request, after 0.2 s. Every other
    # request is held until 20 ms after that success, then refused, and later ones are
    # refused at once. The success ended first, so the load must run to the end, however
    # long the success then waits for its token count.
    calls = 0
    succeeded = asyncio.Event()
    succeeded_at = 0.0

    async def chat(request: web.Request) -> web.StreamResponse:
        nonlocal calls, succeeded_at
        calls += 1
        loop = asyncio.get_running_loop()
        if calls > 2:
            await succeeded.wait()
            await asyncio.sleep(max(0.0, succeeded_at + 0.02 - loop.time()))
            return web.json_response({"error": {"message": "slow down"}}, status=429)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if calls == 2:
            await asyncio.sleep(0.2)
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n')
        await response.write(b"data: [DONE]\n\n")
        if calls >= 2 and not succeeded.is_set():
            succeeded_at = loop.time()
            succeeded.set()
        return response

    app = web.Application()
    app.router.add_post(CHAT, chat)
    server = await aiohttp_server(app)
    out_dir = tmp_path / "run"

    code, _, stderr = await run_cli(out_dir, *QUICK, "load.parallel=8", "endpoint=openai",
                                    f"endpoint.url=http://127.0.0.1:{server.port}{CHAT}")

    assert code == 0, stderr
    rows = (out_dir / "requests.csv").read_text().splitlines()
    assert len(rows) - 1 >= 40
