"""Servers the peer benchmark runs: a fast streaming chat server in its own process.

`python -m bench.servers --log FILE` serves OpenAI-style streamed chat completions on
127.0.0.1 with no model behind them: each POST gets a role chunk, one SSE event per output
token (as many as the request's `max_completion_tokens` or `max_tokens`), a finish chunk, a
usage chunk when the request sets `stream_options.include_usage`, and `[DONE]`, each event
in its own HTTP chunk. With `--gap-ms 0` (the default)
the whole response goes out in one write, so the server spends a few microseconds per
request and a client on the same machine cannot outrun it. It is a raw asyncio protocol on
uvloop rather than an aiohttp app because aiohttp's request handling would cost several
times more CPU per request than the clients it measures.

The server logs, per request, when it finished reading the request and when it wrote the
last chunk (`time.perf_counter()` seconds, CLOCK_MONOTONIC on Linux, so comparable with
the parent process), and its own CPU seconds. It prints `listening PORT` once ready and
writes the log as JSON when it gets SIGTERM or SIGINT, or after `--max-seconds`.

`FastServer` starts and stops that process from the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from runner.nullserver import next_request

try:
    import orjson

    _loads = orjson.loads
except ImportError:  # the project installs orjson with its `fast` extra; json works too
    _loads = json.loads

DEFAULT_TOKENS = 64

_MODELS = json.dumps({"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "bench"}]}).encode()


def _chunk(payload: bytes) -> bytes:
    """Frame one SSE event as one HTTP/1.1 chunk (chunked transfer encoding)."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _chat_event(delta: dict[str, Any], finish: Optional[str] = None) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return _chunk(json.dumps(chunk, separators=(",", ":")).encode())


_ROLE = _chat_event({"role": "assistant", "content": ""})
# Every token is the same short word, so its text is one token for any BPE tokenizer.
_TOKEN = _chat_event({"content": " hi"})
_FINISH = _chat_event({}, "length")
_DONE = _chunk(b"[DONE]") + b"0\r\n\r\n"
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
)


# Cached because the JSON encoding was most of the server's own Python work per request.
@functools.lru_cache(maxsize=1024)
def _usage_event(prompt_tokens: int, completion_tokens: int) -> bytes:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench",
             "choices": [], "usage": usage}
    return _chunk(json.dumps(chunk, separators=(",", ":")).encode())


@functools.lru_cache(maxsize=1024)
def _whole_stream(connection: bytes, tokens: int, tail: bytes) -> bytes:
    """Return a complete zero-gap streamed response, built once per distinct request shape."""
    return b"".join((_STREAM_HEAD, connection, _ROLE, _TOKEN * tokens, tail))


def _prompt_tokens(body: dict[str, Any]) -> int:
    """Estimate prompt tokens as characters / 4; the server has no tokenizer, and no result uses this."""
    chars = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            chars += sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        chars += len(prompt)
    return max(1, chars // 4)


def _plain_response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status.encode(), content_type, len(body), body)


@dataclass
class Log:
    """Per-request record of the server: arrival and last-chunk times in perf_counter seconds."""

    arrival: list[float] = field(default_factory=list)
    last_chunk: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    # Seconds from arrival to the write of the first token chunk (paced responses only).
    first_token: list[float] = field(default_factory=list)


class StreamProtocol(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; the server responds to its requests in order."""

    def __init__(self, log: Log, gap: float, ttft: Optional[float] = None) -> None:
        self.log = log
        self.gap = gap
        # Seconds from a request's arrival to its first token; None: one gap.
        self.ttft = gap if ttft is None else ttft
        self.buffer = bytearray()
        self.transport: Optional[asyncio.Transport] = None
        # With a gap, a response is written by a task; later requests on the connection wait for it.
        self.busy: Optional[asyncio.Task[None]] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP server's transports are Transports

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.transport = None
        if self.busy is not None:
            self.busy.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.busy is None:
            self._process()

    def _process(self) -> None:
        while self.transport is not None:
            try:
                request = next_request(self.buffer)
            except ValueError:
                self.transport.close()
                return
            if request is None:
                return
            method, path, body, close = request
            self._respond(method, path, body, close)
            if self.busy is not None:
                return

    def _respond(self, method: str, path: str, raw: bytes, close: bool) -> None:
        transport = self.transport
        assert transport is not None
        arrival = time.perf_counter()
        connection = b"Connection: close\r\n\r\n" if close else b"\r\n"
        if method != "POST":
            if path.rstrip("/").endswith("/models"):
                transport.write(_plain_response("200 OK", _MODELS))
            else:
                transport.write(_plain_response("200 OK", b"{}"))
            if close:
                transport.close()
            return
        try:
            body = _loads(raw)
        except ValueError:
            transport.write(_plain_response("400 Bad Request", b'{"error":{"message":"invalid JSON"}}'))
            return
        tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_TOKENS)
        # As in vLLM, the usage chunk is sent only when the request sets include_usage.
        options = body.get("stream_options")
        usage = _usage_event(_prompt_tokens(body), tokens) if isinstance(options, dict) and options.get("include_usage") else b""
        tail = _FINISH + usage + _DONE
        if not body.get("stream"):
            message = {"id": "chatcmpl-bench", "object": "chat.completion", "model": "bench",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": " hi" * tokens},
                                    "finish_reason": "length"}],
                       "usage": {"prompt_tokens": _prompt_tokens(body), "completion_tokens": tokens,
                                 "total_tokens": _prompt_tokens(body) + tokens}}
            transport.write(_plain_response("200 OK", json.dumps(message).encode()))
            self._record(arrival, tokens)
        elif self.gap <= 0:
            transport.write(_whole_stream(connection, tokens, tail))
            self._record(arrival, tokens)
        else:
            self.busy = asyncio.get_running_loop().create_task(self._paced(arrival, tokens, connection, tail))
            return
        if close:
            transport.close()

    async def _paced(self, arrival: float, tokens: int, connection: bytes, tail: bytes) -> None:
        try:
            transport = self.transport
            assert transport is not None
            transport.write(_STREAM_HEAD + connection + _ROLE)
            # Absolute deadlines, so a late wake-up does not push the later tokens back.
            for i in range(tokens):
                delay = arrival + self.ttft + i * self.gap - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.transport is None:
                    return
                transport.write(_TOKEN)
                if i == 0:
                    first = time.perf_counter()
            transport.write(tail)
            self._record(arrival, tokens, first if tokens else None)
            if connection.startswith(b"Connection: close"):
                transport.close()
        finally:
            self.busy = None
        self._process()

    def _record(self, arrival: float, tokens: int, first_token: Optional[float] = None) -> None:
        if first_token is not None:
            self.log.first_token.append(first_token - arrival)
        self.log.arrival.append(arrival)
        self.log.last_chunk.append(time.perf_counter())
        self.log.tokens.append(tokens)


async def serve(port: int, gap: float, log_path: Path, max_seconds: float, ttft: Optional[float] = None) -> None:
    log = Log()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A large backlog: the default of 100 drops SYNs of a burst of 256 connections, and the
    # kernel retries them only after a second.
    server = await loop.create_server(lambda: StreamProtocol(log, gap, ttft), "127.0.0.1", port, backlog=4096)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except TimeoutError:
        pass
    server.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"arrival": log.arrival, "last_chunk": log.last_chunk, "tokens": log.tokens,
              "first_token": log.first_token,
              "cpu_seconds": usage.ru_utime + usage.ru_stime}
    log_path.write_text(json.dumps(result))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Fast streaming chat server for the peer benchmark.")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="milliseconds between token chunks")
    parser.add_argument("--ttft-ms", type=float, default=None,
                        help="milliseconds from a request's arrival to its first token (default: one gap)")
    parser.add_argument("--log", type=Path, required=True, help="JSON file written at exit")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="stop by itself after this long")
    args = parser.parse_args(argv)
    ttft = None if args.ttft_ms is None else args.ttft_ms / 1000
    coroutine = serve(args.port, args.gap_ms / 1000, args.log, args.max_seconds, ttft)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)
    return 0


@dataclass
class ServerLog:
    """The log a FastServer wrote at exit."""

    arrival: list[float]
    last_chunk: list[float]
    tokens: list[int]
    # The server's own user + system CPU seconds over its whole life.
    cpu_seconds: float
    first_token: list[float] = field(default_factory=list)


class FastServer:
    """Run `python -m bench.servers` as a child process inside `with`; `log` is set on exit."""

    def __init__(self, log_path: Path, *, gap_ms: float = 0.0, ttft_ms: Optional[float] = None,
                 max_seconds: float = 1800.0) -> None:
        self.log_path = log_path
        self.gap_ms = gap_ms
        self.ttft_ms = ttft_ms
        self.max_seconds = max_seconds
        self.process: Optional[subprocess.Popen[str]] = None
        self.port = 0
        self.log: Optional[ServerLog] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FastServer:
        command = [sys.executable, "-m", "bench.servers", "--log", str(self.log_path),
                   "--gap-ms", str(self.gap_ms), "--max-seconds", str(self.max_seconds)]
        if self.ttft_ms is not None:
            command += ["--ttft-ms", str(self.ttft_ms)]
        repo = Path(__file__).resolve().parent.parent
        self.process = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening "):
            self.process.kill()
            raise RuntimeError(f"bench.servers did not start (printed {line!r}); see its error above")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc_info: object) -> None:
        process = self.process
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.process = None
        if self.log_path.exists():
            data = json.loads(self.log_path.read_text())
            self.log = ServerLog(data["arrival"], data["last_chunk"], data["tokens"], data["cpu_seconds"],
                                 data.get("first_token", []))

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
