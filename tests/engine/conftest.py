"""Fixtures for tests against a real llama.cpp server built by `make engine`.

One llama-server process serves the whole test session on a free 127.0.0.1
port and is stopped when the session ends, also after failures. A missing
binary or model fails the tests instead of skipping them, so CI cannot pass
without exercising the engine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENGINE_DIR = REPO / ".engine"
SERVER_BINARY = ENGINE_DIR / "bin" / "llama-server"
MODEL_FILE = ENGINE_DIR / "models" / "tiny-qwen2.gguf"
# Name the server reports in /v1/models and accepts in requests.
MODEL_ALIAS = "tiny-qwen2"

# Server settings: 8 slots sharing 8192 tokens of KV cache (1024 per slot),
# 2 CPU threads. The tests keep prompt + completion well under 1024 tokens.
# No --ignore-eos: exact output lengths must come from the `ignore_eos`
# field that the runner sends, so the tests check that it reaches the server.
CONTEXT_TOKENS = 8192
SLOTS = 8
THREADS = 2

# Seconds to wait for /health to return 200; the tiny model loads in under 1 s.
STARTUP_TIMEOUT = 60.0
# Seconds the server gets to exit after SIGTERM before it is killed.
STOP_GRACE = 10.0
# Server log lines quoted when it fails to start.
LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class Engine:
    """A running llama-server: where to reach it and where it logs."""

    base_url: str  # http://127.0.0.1:PORT, no trailing slash
    port: int
    model: str
    log_path: Path

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/v1/chat/completions"


def free_port() -> int:
    # NOTE: another process may take the port before llama-server binds it.
    # The server then exits, and the start-up failure quotes its log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.strip().splitlines()[-lines:])


def wait_healthy(process: subprocess.Popen, base_url: str, log_path: Path) -> None:
    """Poll GET /health until it returns 200; fail the session if the server exits or times out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"llama-server exited with code {process.returncode} during start-up; its log ends with:\n{log_tail(log_path)}",
                pytrace=False,
            )
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200 and json.load(response).get("status") == "ok":
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 503 while the model loads
        time.sleep(0.1)
    pytest.fail(
        f"llama-server did not report healthy at {base_url}/health within {STARTUP_TIMEOUT:.0f} s; its log ends with:\n{log_tail(log_path)}",
        pytrace=False,
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """Start llama-server with the tiny model for the session and stop it afterwards."""
    for path in (SERVER_BINARY, MODEL_FILE):
        if not path.is_file():
            pytest.fail(f"{path} not found; run `make engine` first (it builds the server and the model)", pytrace=False)

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("engine") / "llama-server.log"
    command = [
        str(SERVER_BINARY),
        "--model", str(MODEL_FILE),
        "--alias", MODEL_ALIAS,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--ctx-size", str(CONTEXT_TOKENS),
        "--parallel", str(SLOTS),
        "--threads", str(THREADS),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(process, base_url, log_path)
        yield Engine(base_url=base_url, port=port, model=MODEL_ALIAS, log_path=log_path)
    finally:
        stop(process)


@pytest.fixture
def run_runner() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Return a function that runs `python -m runner OVERRIDES...` and fails the test if it exits non-zero."""

    def run(*overrides: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
        result = subprocess.run(
            [sys.executable, "-m", "runner", *overrides],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(
                f"python -m runner exited with code {result.returncode}\n"
                f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}",
                pytrace=False,
            )
        return result

    return run
