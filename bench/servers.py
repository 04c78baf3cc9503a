"""Servers the peer benchmark runs: a fast streaming chat server in its own process.

`python -m bench.servers --log FILE` serves OpenAI-style streamed chat completions on
127.0.0.1 with no model behind them: each POST gets a role chunk, one SSE event per output
token (as many as the request's `max_completion_tokens` or `max_tokens`), a finish chunk, a
usage chunk when the request sets `stream_options.include_usage`, and `[DONE]`, each event
in its own HTTP chunk. With `--gap-ms 0` (the default)
the whole response goes out in one write, so the server spends a few microseconds per
request and a client on the same machine cannot outrun it. It is a raw asyncio protocol on
uvloop rather than an aiohttp app because aiohttp's request handling would cost several
times more CPU per request than the clients it measures. With a gap, the first token
follows `--ttft-ms` after the request and each later token one gap after the previous.

The server logs, per request, when the request arrived and when it wrote the last chunk
(`time.perf_counter()` seconds, CLOCK_MONOTONIC on Linux, so comparable with the parent
process), and its own CPU seconds. With a gap (the timing benchmark), the arrival is the
kernel's receive time of the request's last bytes (SO_TIMESTAMPNS), and the time the server
parsed the request is logged beside it. Parsing comes later whenever the server is busy,
for example when 128 requests arrive within a millisecond, and TTFT counted from it would
leave that wait out of the truth and add it to the client's error. It prints `listening PORT` once ready and
writes the log as JSON when it gets SIGTERM or SIGINT, or after `--max-seconds`.

`FastServer` starts and stops that process from the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from runner.client.kernel_clock import SO_TIMESTAMPNS, StampingEventLoop
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


def _tail(body: dict[str, Any], tokens: int) -> bytes:
    """Return the finish chunk, the usage chunk if asked for, and [DONE] of a streamed response."""
    # As in vLLM, the usage chunk is sent only when the request sets include_usage.
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage")
    return _FINISH + (_usage_event(_prompt_tokens(body), tokens) if include_usage else b"") + _DONE


def _requested_tokens(body: dict[str, Any]) -> int:
    """Return the number of output tokens a request body sets, DEFAULT_TOKENS when it sets none."""
    return int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_TOKENS)


def _get_response(path: str) -> bytes:
    """Return the response to a GET: the model list for /v1/models, an empty object otherwise."""
    return _plain_response("200 OK", _MODELS if path.rstrip("/").endswith("/models") else b"{}")


def _plain_response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status.encode(), content_type, len(body), body)


_INVALID_JSON = _plain_response("400 Bad Request", b'{"error":{"message":"invalid JSON"}}')


@dataclass
class Log:
    """Per-request record of the server: arrival and last-chunk times in perf_counter seconds."""

    arrival: list[float] = field(default_factory=list)
    last_chunk: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    # Seconds from arrival to the write of the first token chunk (paced responses only).
    first_token: list[float] = field(default_factory=list)
    # Paced responses only: when the server parsed the request (perf_counter seconds).
    parsed: list[float] = field(default_factory=list)
    # Paced responses only: reads that came without a kernel timestamp and were stamped on reading.
    unstamped: int = 0


class StreamProtocol(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection of the zero-gap server, responding to requests in order."""

    def __init__(self, log: Log) -> None:
        self.log = log
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
            self._respond(*request)

    def _respond(self, method: str, path: str, raw: bytes, close: bool) -> None:
        transport = self.transport
        assert transport is not None
        arrival = time.perf_counter()
        connection = b"Connection: close\r\n\r\n" if close else b"\r\n"
        if method != "POST":
            transport.write(_get_response(path))
            if close:
                transport.close()
            return
        try:
            body = _loads(raw)
        except ValueError:
            transport.write(_INVALID_JSON)
            return
        tokens = _requested_tokens(body)
        if not body.get("stream"):
            message = {"id": "chatcmpl-bench", "object": "chat.completion", "model": "bench",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": " hi" * tokens},
                                    "finish_reason": "length"}],
                       "usage": {"prompt_tokens": _prompt_tokens(body), "completion_tokens": tokens,
                                 "total_tokens": _prompt_tokens(body) + tokens}}
            transport.write(_plain_response("200 OK", json.dumps(message).encode()))
        else:
            transport.write(_whole_stream(connection, tokens, _tail(body, tokens)))
        self._record(arrival, tokens)
        if close:
            transport.close()

    def _record(self, arrival: float, tokens: int) -> None:
        self.log.arrival.append(arrival)
        self.log.last_chunk.append(time.perf_counter())
        self.log.tokens.append(tokens)


class PacedConnection:
    """One keep-alive connection of the paced server, read with recvmsg for kernel arrival times.

    asyncio transports read with recv, which drops the kernel's receive timestamps, so this
    connection registers its socket with the loop directly. It responds to the requests on
    one connection one after another, as HTTP/1.1 without pipelining requires.
    """

    def __init__(self, sock: socket.socket, log: Log, gap: float, ttft: float) -> None:
        self.sock = sock
        self.log = log
        self.gap = gap
        self.ttft = ttft
        self.loop: StampingEventLoop = asyncio.get_running_loop()  # type: ignore[assignment]
        self.buffer = bytearray()
        self.arrival = 0.0
        self.outbox = bytearray()
        self.busy: Optional[asyncio.Task[None]] = None
        self.open = True
        # Bytes may have reached the socket before the server accepted it.
        self.offset_since: Optional[float] = self.loop.clock_offsets.earliest()
        self.loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        self.loop.remove_reader(self.sock.fileno())
        if self.outbox:
            self.loop.remove_writer(self.sock.fileno())
        if self.busy is not None:
            self.busy.cancel()
        self.sock.close()

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, 256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        arrival = self.loop.clock_offsets.convert(ancillary, self.offset_since)
        self.offset_since = None
        if arrival is None:
            self.log.unstamped += 1
            arrival = time.perf_counter()
        self.arrival = arrival
        self.buffer += data
        if self.busy is None:
            self._process()

    def _process(self) -> None:
        while self.open and self.busy is None:
            try:
                request = next_request(self.buffer)
            except ValueError:
                self.close()
                return
            if request is None:
                return
            method, path, raw, close = request
            parsed = time.perf_counter()
            if method != "POST":
                self._write(_get_response(path))
                continue
            try:
                body = _loads(raw)
            except ValueError:
                self._write(_INVALID_JSON)
                continue
            tokens = _requested_tokens(body)
            self.busy = self.loop.create_task(self._paced(self.arrival, parsed, tokens, close, _tail(body, tokens)))

    def _write(self, data: bytes) -> None:
        if self.outbox:
            self.outbox += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self.outbox += data[sent:]
            self.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self.outbox[:sent]
        if not self.outbox:
            self.loop.remove_writer(self.sock.fileno())

    async def _paced(self, arrival: float, parsed: float, tokens: int, close: bool, tail: bytes) -> None:
        connection = b"Connection: close\r\n\r\n" if close else b"\r\n"
        first: Optional[float] = None
        try:
            self._write(_STREAM_HEAD + connection + _ROLE)
            # Absolute deadlines, so a late wake-up does not push the later tokens back.
            for i in range(tokens):
                delay = arrival + self.ttft + i * self.gap - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not self.open:
                    return
                self._write(_TOKEN)
                if i == 0:
                    first = time.perf_counter()
            self._write(tail)
            log = self.log
            if first is not None:
                log.first_token.append(first - arrival)
            log.arrival.append(arrival)
            log.parsed.append(parsed)
            log.last_chunk.append(time.perf_counter())
            log.tokens.append(tokens)
            if close:
                self.close()
                return
        finally:
            self.busy = None
        self._process()


async def _serve_paced(port: int, log: Log, gap: float, ttft: float) -> tuple[socket.socket, list[PacedConnection]]:
    """Listen on 127.0.0.1 for the paced server; return the socket and its live connections."""
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Set on the listener, so that connections inherit it from the start: bytes that arrive
    # before the server accepts a connection are stamped too.
    listener.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    listener.bind(("127.0.0.1", port))
    # A large backlog: the default of 100 drops SYNs of a burst of 256 connections, and the
    # kernel retries them only after a second.
    listener.listen(4096)
    listener.setblocking(False)
    connections: list[PacedConnection] = []

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connections.append(PacedConnection(sock, log, gap, ttft))

    loop.add_reader(listener.fileno(), accept)
    return listener, connections


async def serve(port: int, gap: float, log_path: Path, max_seconds: float, ttft: Optional[float] = None) -> None:
    log = Log()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A large backlog: the default of 100 drops SYNs of a burst of 256 connections, and the
    # kernel retries them only after a second.
    if gap > 0:
        listener, connections = await _serve_paced(port, log, gap, gap if ttft is None else ttft)
        bound = listener.getsockname()[1]
    else:
        server = await loop.create_server(lambda: StreamProtocol(log), "127.0.0.1", port, backlog=4096)
        bound = server.sockets[0].getsockname()[1]
    print(f"listening {bound}", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except TimeoutError:
        pass
    if gap > 0:
        loop.remove_reader(listener.fileno())
        listener.close()
        for connection in connections:
            connection.close()
    else:
        server.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"arrival": log.arrival, "last_chunk": log.last_chunk, "tokens": log.tokens,
              "first_token": log.first_token, "parsed": log.parsed,
              "unstamped": log.unstamped,
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
    if args.gap_ms > 0:
        # Paced responses read their sockets with recvmsg on this loop, for kernel arrival times.
        with asyncio.Runner(loop_factory=StampingEventLoop) as runner:
            runner.run(coroutine)
        return 0
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
    parsed: list[float] = field(default_factory=list)
    unstamped: int = 0


def pin_to(cpus: Optional[set[int]]) -> Optional[Callable[[], None]]:
    """Return a preexec_fn that restricts a child process to ``cpus``, or None for no restriction."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class FastServer:
    """Run `python -m bench.servers` as a child process inside `with`; `log` is set on exit."""

    def __init__(self, log_path: Path, *, gap_ms: float = 0.0, ttft_ms: Optional[float] = None,
                 max_seconds: float = 1800.0, cpus: Optional[set[int]] = None) -> None:
        self.log_path = log_path
        # CPUs the server may run on (None: any).
        self.cpus = cpus
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
        self.process = subprocess.Popen(command, cwd=repo, stdout=subprocess.PIPE, text=True,
                                        preexec_fn=pin_to(self.cpus))
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
                                 data.get("first_token", []), data.get("parsed", []), data.get("unstamped", 0))

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
