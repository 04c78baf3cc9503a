"""The timing benchmark's server: its log is the truth that TTFT errors are measured against."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from bench.servers import FastServer

REQUEST_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                           "stream": True, "stream_options": {"include_usage": True}}).encode()
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(REQUEST_BODY), REQUEST_BODY))


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed early after {data!r}"
        data += chunk
    return data


@pytest.mark.skipif(sys.platform != "linux", reason="kernel receive timestamps are read the Linux way")
def test_paced_server_kernel_arrival(tmp_path: Path) -> None:
    # The server is stopped before it accepts the connection, so the request arrives on a
    # connection it has not seen yet, and it resumes 0.3 s later. Its log must
    # still give the arrival as the moment the bytes reached its socket, and pace the first
    # token from there, so a slow server never shifts the truth the benchmark compares with.
    with FastServer(tmp_path / "log.json", gap_ms=20, ttft_ms=400) as server:
        process = server.process
        assert process is not None
        os.kill(process.pid, signal.SIGSTOP)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            try:
                before = time.perf_counter()
                sock.sendall(REQUEST)
                after = time.perf_counter()
                time.sleep(0.3)
            finally:
                os.kill(process.pid, signal.SIGCONT)
            response = read_response(sock)

    log = server.log
    assert log is not None and len(log.arrival) == 1
    assert log.unstamped == 0
    assert before <= log.arrival[0] <= after + 0.002
    assert log.parsed[0] - log.arrival[0] >= 0.3
    # The first token goes out 0.4 s after the true arrival, not 0.4 s after the parse (0.7 s).
    # uvloop's timers have millisecond resolution and may fire a fraction of one early.
    assert 0.399 <= log.first_token[0] < 0.45
    assert 0.439 <= log.last_chunk[0] - log.arrival[0] < 0.5
    assert log.tokens == [3]

    events = [line for line in response.split(b"\r\n") if line.startswith(b"data: ")]
    assert events.count(b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,"model":"bench",'
                        b'"choices":[{"index":0,"delta":{"content":" hi"},"finish_reason":null}]}\n\n') == 3
    assert events[-1] == b"data: [DONE]\n\n"
    assert b'"usage":{"prompt_tokens":' in events[-2]


def test_paced_server_keep_alive(tmp_path: Path) -> None:
    with FastServer(tmp_path / "log.json", gap_ms=5, ttft_ms=10) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            for _ in range(3):
                sock.sendall(REQUEST)
                read_response(sock)
    log = server.log
    assert log is not None
    assert log.tokens == [3, 3, 3]
    assert all(later > earlier for earlier, later in zip(log.arrival, log.arrival[1:]))
