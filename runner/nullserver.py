"""Null OpenAI-compatible server: instant, pre-encoded responses, for measuring the client itself.

``python -m runner.nullserver`` listens on a free 127.0.0.1 port, prints ``listening PORT``,
and responds at once to every POST to ``/v1/chat/completions`` or ``/v1/completions``. A
streamed request gets a role chunk (chat), one SSE event per output token (the body's
``max_completion_tokens`` or ``max_tokens``, each token the text " hi"), a finish chunk, a
usage chunk when ``stream_options.include_usage`` is set, and ``[DONE]``, all in one write.
Each distinct response is encoded once and reused, so the server spends a few microseconds
per request and the client it serves is the bottleneck.

The server stops on SIGTERM, SIGINT, when its standard input closes (so a parent that dies
takes it along) or after ``--max-seconds``. It then prints one JSON line: the request count
by path, the first request body, the ``max_tokens`` values it saw, when the last request
arrived and the CPU seconds it spent serving. ``NullServer`` runs it as a child process
from asyncio code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import runner

try:
    import orjson

    _loads = orjson.loads
except ImportError:  # orjson is an optional speed-up
    _loads = json.loads

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
# Output tokens when a request names no max_tokens.
DEFAULT_TOKENS = 16
# Upper bound on one request's header block, so a broken client cannot grow the buffer forever.
MAX_HEADER_BYTES = 65536
# One token of text for any BPE tokenizer, so a client that counts tokens itself agrees with usage.
TOKEN_TEXT = " hi"
# Seconds a child gets to start, and to stop and print its report, before it is killed.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _event(payload: bytes) -> bytes:
    """Frame one SSE event as one HTTP/1.1 chunk."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _plain(status: str, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status.encode(), len(body), body)


def _usage(tokens: int) -> dict[str, int]:
    # The prompt is not tokenized here; the client's statistics never use this count in calibration.
    return {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}


def encode_response(chat: bool, tokens: int, *, stream: bool, include_usage: bool) -> bytes:
    """Return the complete HTTP response to one request of this shape."""
    if not stream:
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": TOKEN_TEXT * tokens},
                                      "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": TOKEN_TEXT * tokens, "finish_reason": "length"}
        return _plain("200 OK", _json({"id": "null", "object": "chat.completion" if chat else "text_completion",
                                       "created": 0, "model": "null", "choices": [choice], "usage": _usage(tokens)}))

    head = {"id": "null", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
            "model": "null"}

    def chunk(text: Optional[str], finish: Optional[str] = None, role: bool = False) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish}
        return _event(_json(head | {"choices": [choice]}))

    parts = [_STREAM_HEAD]
    if chat:
        parts.append(chunk(None, role=True))
    parts.append(chunk(TOKEN_TEXT) * tokens)
    parts.append(chunk(None, "length"))
    if include_usage:
        parts.append(_event(_json(head | {"choices": [], "usage": _usage(tokens)})))
    parts.append(_event(b"[DONE]") + b"0\r\n\r\n")
    return b"".join(parts)


def next_request(buffer: bytearray) -> Optional[tuple[str, str, bytes, bool]]:
    """Remove one complete HTTP/1.1 request from ``buffer``; return (method, path, body, close).

    Returns None while the request is incomplete. Raises ValueError when the header block
    passes MAX_HEADER_BYTES or Content-Length is not a number, so the caller closes the
    connection.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEADER_BYTES:
            raise ValueError(f"request header block is over {MAX_HEADER_BYTES} bytes")
        return None
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    method, path = (lines[0].split(" ") + ["", ""])[:2]
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            close = value.strip().lower() == "close"
    if len(buffer) < end + 4 + length:
        return None
    body = bytes(buffer[end + 4:end + 4 + length])
    del buffer[:end + 4 + length]
    return method, path, body, close


@dataclass
class Served:
    """Requests the server has served so far, and its encoded responses."""

    paths: Counter = field(default_factory=Counter)
    max_tokens: Counter = field(default_factory=Counter)
    first_body: Optional[dict[str, Any]] = None
    # Encoded responses by (chat, tokens, stream, include_usage).
    responses: dict[tuple[bool, int, bool, bool], bytes] = field(default_factory=dict)
    # CPU seconds spent before serving (interpreter start-up and imports), left out of the report.
    startup_cpu: float = 0.0
    # perf_counter time of the last request read (CLOCK_MONOTONIC, comparable with the parent's).
    last_request_at: Optional[float] = None

    def response_for(self, path: str, raw: bytes) -> bytes:
        self.last_request_at = time.perf_counter()
        self.paths[path] += 1
        if path not in (CHAT_PATH, COMPLETIONS_PATH):
            return _plain("404 Not Found", b'{"error":{"message":"not found"}}')
        try:
            body = _loads(raw)
        except ValueError:
            return _plain("400 Bad Request", b'{"error":{"message":"invalid JSON"}}')
        if type(body) is not dict:
            return _plain("400 Bad Request", b'{"error":{"message":"expected a JSON object"}}')
        if self.first_body is None:
            self.first_body = body
        tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_TOKENS)
        self.max_tokens[tokens] += 1
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        key = (path == CHAT_PATH, tokens, bool(body.get("stream")), include_usage)
        response = self.responses.get(key)
        if response is None:
            response = self.responses[key] = encode_response(key[0], tokens, stream=key[2], include_usage=key[3])
        return response

    def report(self) -> dict[str, Any]:
        return {"requests": sum(self.paths.values()), "paths": dict(self.paths),
                "max_tokens": {str(k): v for k, v in self.max_tokens.items()}, "first_body": self.first_body,
                "last_request_at": self.last_request_at, "cpu_seconds": _cpu_seconds() - self.startup_cpu}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection, whose requests get their responses in order."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.buffer = bytearray()
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP server's transports are Transports

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            try:
                request = next_request(self.buffer)
            except ValueError:
                self.transport.close()
                return
            if request is None:
                return
            method, path, raw, close = request
            if method == "POST":
                self.transport.write(self.served.response_for(path.split("?", 1)[0], raw))
            else:
                self.transport.write(_plain("404 Not Found", b'{"error":{"message":"POST only"}}'))
            if close:
                self.transport.close()


async def serve(max_seconds: float) -> dict[str, Any]:
    """Serve until a stop signal, the end of standard input or ``max_seconds``; return the report."""
    served = Served(startup_cpu=_cpu_seconds())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def on_stdin() -> None:
        if not os.read(0, 4096):
            loop.remove_reader(0)
            stop.set()

    loop.add_reader(0, on_stdin)
    # A large backlog, so a burst of hundreds of connections is not dropped and retried a second later.
    server = await loop.create_server(lambda: _Connection(served), "127.0.0.1", 0, backlog=4096)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except TimeoutError:
        pass
    server.close()
    return served.report()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.nullserver", description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop by itself after this many seconds")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        report = asyncio.run(serve(args.max_seconds))
    else:
        report = uvloop.run(serve(args.max_seconds))
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


class NullServer:
    """``python -m runner.nullserver`` as a child process, inside ``async with``.

    ``base_url`` is set on entry. On exit the child is stopped and ``report`` contains its
    final JSON line, or None when it printed none.
    """

    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self.process: Optional[asyncio.subprocess.Process] = None
        self.base_url = ""
        self.report: Optional[dict[str, Any]] = None

    async def __aenter__(self) -> NullServer:
        env = dict(os.environ)
        # The child must import this same runner package even when it is not installed.
        package_root = str(Path(runner.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "runner.nullserver", "--max-seconds", str(self.max_seconds),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            assert self.process.stdout is not None
            line = await asyncio.wait_for(self.process.stdout.readline(), START_TIMEOUT)
            if not line.startswith(b"listening "):
                raise RuntimeError(f"the null server did not start: {await self._stderr_tail()}")
            self.base_url = f"http://127.0.0.1:{int(line.split()[1])}"
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        try:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            stdout, _ = await asyncio.wait_for(process.communicate(), STOP_TIMEOUT)
        except BaseException:
            # Timed out or cancelled: the child must not outlive this call.
            if process.returncode is None:
                process.kill()
            raise
        lines = stdout.decode("utf-8", "replace").strip().splitlines()
        if lines:
            try:
                self.report = json.loads(lines[-1])
            except ValueError:
                self.report = None

    async def _stderr_tail(self) -> str:
        process = self.process
        if process is None or process.stderr is None:
            return "no output"
        if process.returncode is None:
            process.kill()
        text = (await process.stderr.read()).decode("utf-8", "replace").strip()
        return " | ".join(text.splitlines()[-5:]) or f"exit code {await process.wait()}"


if __name__ == "__main__":
    raise SystemExit(main())
