"""The API key and secret header values appear in no file the runner writes."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from aiohttp import web

from tests.paths import REPO

API_KEY = "sk-test-4f1c9d2e7a6b"
HEADER_SECRET = "hdr-secret-88e21b0c"
COOKIE_SECRET = "session-77a0f3d9"
# Some gateways take the key as a query parameter of the URL.
QUERY_SECRET = "qkey-5b6c7d8e9f"
CHAT = "/v1/chat/completions"


async def chat(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Authorization") != f"Bearer {API_KEY}" or request.headers.get("X-Api-Token") != HEADER_SECRET:
        return web.json_response({"error": {"message": "invalid credentials"}}, status=401)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for word in ("one", " two", " three"):
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"' + word.encode() + b'"}}]}\n\n')
    await response.write(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def scan(folder: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(folder)}: {secret}" for secret in secrets if secret.encode() in data]
    return found


@pytest.mark.timeout(90)
@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
async def test_no_secret_in_outputs(aiohttp_server, tmp_path, multirun):
    app = web.Application()
    app.router.add_post(CHAT, chat)
    server = await aiohttp_server(app)
    out_dir = tmp_path / "out"
    folder = ["-m", f"hydra.sweep.dir={out_dir}"] if multirun else [f"hydra.run.dir={out_dir}"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runner", *folder, "progress=false", "load.number=10", "load.warmup=0",
        "endpoint=openai", f"endpoint.url='http://127.0.0.1:{server.port}{CHAT}?api_key={QUERY_SECRET}'",
        "endpoint.api_key_env=RUNNER_TEST_KEY",
        f"+endpoint.headers.X-Api-Token={HEADER_SECRET}", f"+endpoint.headers.Cookie='sid={COOKIE_SECRET}'",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "RUNNER_TEST_KEY": API_KEY},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 80)

    assert process.returncode == 0, stderr.decode()
    secrets = [API_KEY, HEADER_SECRET, COOKIE_SECRET, QUERY_SECRET]
    assert not [s for s in secrets if s in stdout.decode() + stderr.decode()]
    requests = next(out_dir.rglob("requests.csv")).read_text()
    assert requests.count("True") >= 10  # the server accepted the credentials
    assert list(out_dir.rglob("config.yaml"))
    assert list(out_dir.rglob("overrides.yaml"))
    assert scan(out_dir, secrets) == []


def test_error_line_hides_secret_override(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "runner", f"hydra.run.dir={tmp_path}",
                           f"+endpoint.headers.Cookie=sid={COOKIE_SECRET}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    assert COOKIE_SECRET not in done.stderr + done.stdout


TOKEN_VARIABLE = "RUNNER_TEST_TOKEN"


def token_server() -> tuple[web.Application, list[str]]:
    """Return a chat server that accepts only X-Api-Token: HEADER_SECRET, and the tokens it received."""
    received: list[str] = []

    async def token_chat(request: web.Request) -> web.StreamResponse:
        received.append(request.headers.get("X-Api-Token", ""))
        if received[-1] != HEADER_SECRET:
            return web.json_response({"error": {"message": "invalid token"}}, status=401)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"one"},"finish_reason":"stop"}]}\n\n')
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post(CHAT, token_chat)
    return app, received


async def run_module(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """Run ``python -m ARGS`` in the checkout and return its exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 80)
    return process.returncode, stderr.decode()


def measured_successes(run_dir: Path) -> int:
    """Return how many measured requests (no warmup, no cooldown) of a run succeeded."""
    frame = pd.read_csv(run_dir / "requests.csv")
    measured = frame[~frame["warmup"] & ~frame["cooldown"]]
    return int(measured["success"].sum())


@pytest.mark.timeout(120)
async def test_replay_rejects_redacted_header(aiohttp_server, tmp_path):
    app, received = token_server()
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}{CHAT}"
    code, stderr = await run_module(
        "runner", f"hydra.run.dir={tmp_path}/original", "progress=false", "load.number=4", "load.warmup=0",
        "endpoint=openai", f"endpoint.url={url}", f"+endpoint.headers.X-Api-Token={HEADER_SECRET}", env={})
    assert code == 0, stderr
    sent_by_original = len(received)

    code, stderr = await run_module("runner.replay", f"{tmp_path}/original", "--out", f"{tmp_path}/replay", env={})

    assert code == 2
    config = tmp_path / "original" / ".hydra" / "config.yaml"
    assert stderr.strip().splitlines() == [
        f"error: endpoint.headers.X-Api-Token is redacted in {config}, so it cannot be sent again; pass it as an "
        "override, for example 'endpoint.headers.X-Api-Token=${oc.env:TOKEN}' to read it from the environment "
        "variable TOKEN (or endpoint.api_key_env=TOKEN for an API key sent as Authorization: Bearer)"
    ]
    assert len(received) == sent_by_original
    assert not (tmp_path / "replay").exists()

    code, stderr = await run_module(
        "runner.replay", f"{tmp_path}/original", "--out", f"{tmp_path}/replay",
        f"endpoint.headers.X-Api-Token=${{oc.env:{TOKEN_VARIABLE}}}", env={TOKEN_VARIABLE: HEADER_SECRET})

    assert code == 0, stderr
    assert measured_successes(tmp_path / "replay") == 4
    assert set(received) == {HEADER_SECRET}
    assert scan(tmp_path, [HEADER_SECRET]) == []


@pytest.mark.timeout(120)
async def test_replay_reads_header_from_environment(aiohttp_server, tmp_path):
    app, received = token_server()
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}{CHAT}"
    reference = f"${{oc.env:{TOKEN_VARIABLE}}}"
    code, stderr = await run_module(
        "runner", f"hydra.run.dir={tmp_path}/original", "progress=false", "load.number=4", "load.warmup=0",
        "endpoint=openai", f"endpoint.url={url}", f"+endpoint.headers.X-Api-Token={reference}",
        env={TOKEN_VARIABLE: HEADER_SECRET})
    assert code == 0, stderr
    config = (tmp_path / "original" / ".hydra" / "config.yaml").read_text()
    assert f"X-Api-Token: {reference}" in config

    code, stderr = await run_module("runner.replay", f"{tmp_path}/original", "--out", f"{tmp_path}/replay",
                                    env={TOKEN_VARIABLE: HEADER_SECRET})

    assert code == 0, stderr
    assert measured_successes(tmp_path / "original") == 4
    assert measured_successes(tmp_path / "replay") == 4
    assert set(received) == {HEADER_SECRET}
    assert scan(tmp_path, [HEADER_SECRET]) == []


URL_PASSWORD = "pw-url-3c1e9a7f"


async def failing_chat(request: web.Request) -> web.Response:
    return web.json_response({"error": {"message": "engine busy"}}, status=503)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("server_up", [False, True], ids=["server-down", "preflight-fails"])
async def test_url_password_not_in_error_or_files(aiohttp_server, unused_tcp_port, tmp_path, server_up):
    # The first test request fails, because the connection is refused or the server returns
    # 503. Its error goes to stderr, runner.log and manifest.json, and none may contain the password.
    if server_up:
        app = web.Application()
        app.router.add_post(CHAT, failing_chat)
        port = (await aiohttp_server(app)).port
    else:
        port = unused_tcp_port
    out_dir = tmp_path / "out"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runner", f"hydra.run.dir={out_dir}", "progress=false", "load.number=4",
        "load.warmup=0", "endpoint=openai", f"endpoint.url=http://user:{URL_PASSWORD}@127.0.0.1:{port}{CHAT}",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 80)

    assert process.returncode != 0
    assert URL_PASSWORD not in stdout.decode() + stderr.decode()
    # The URL is still shown, without its credentials: on the error line when the server
    # is down, in runner.log's warning when the test request fails.
    log_or_error = (out_dir / "runner.log").read_text() if server_up else stderr.decode()
    assert "http://<redacted>@127.0.0.1" in log_or_error
    assert (out_dir / "manifest.json").is_file()
    assert scan(out_dir, [URL_PASSWORD]) == []


def test_url_credentials_with_authorization_header(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "runner", f"hydra.run.dir={tmp_path}", "endpoint=openai",
                           f"endpoint.url=http://user:{URL_PASSWORD}@127.0.0.1:9/v1/chat/completions",
                           "+endpoint.headers.Authorization=Bearer abc"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "endpoint.url carries user:password credentials" in done.stderr
    assert "keep only one of them" in done.stderr
    assert URL_PASSWORD not in done.stderr + done.stdout
