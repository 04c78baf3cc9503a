"""A scripted HTTP server whose responses follow exact timelines, for tests and benchmarks.

Each request gets a `Reply`: a status, headers and a list of writes `(offset, bytes)`, where
`offset` is seconds after the server finished reading the request body. Writes are scheduled
on absolute times (read time + offset), so a slow write does not push later ones back. The
server records ground truth per request in `time.perf_counter()` seconds (CLOCK_MONOTONIC on
Linux, the clock the client uses) and the maximum number of requests open at once.

Use `build_scripted_app(script)` with pytest-aiohttp's `aiohttp_server` fixture,
`ScriptedServer(script)` as an async context manager that listens on 127.0.0.1, or
`ScriptedServerProcess(script)` to run the same server in a child process.
"""

from __future__ import annotations

import asyncio
import enum
import json
import multiprocessing
import socket
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional, Sequence, Union

from aiohttp import web


class End(enum.Enum):
    """Ending of a response after its last write."""

    # Finish the HTTP response properly (the terminating chunk of chunked encoding).
    close = "close"
    # Abort the TCP connection with a reset (SO_LINGER 0), leaving the response incomplete.
    reset = "reset"
    # Keep the connection open without writing until `Reply.hang_seconds` pass or the server stops.
    hang = "hang"


@dataclass
class Reply:
    """The scripted response to one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/event-stream"})
    # Seconds after the request body was read before the status line and headers are sent.
    headers_at: float = 0.0
    # (seconds after the request body was read, bytes to write), in time order.
    writes: list[tuple[float, bytes]] = field(default_factory=list)
    end: End = End.close
    # Upper bound of a hang, so that every test server stops by itself.
    hang_seconds: float = 30.0


# A script is one Reply for every request, a list indexed by request number (the last entry is
# reused past the end), or a function of (request index, parsed JSON body).
Script = Union[Reply, Sequence[Reply], Callable[[int, Any], Reply]]


@dataclass
class ServedRequest:
    """Ground truth of one request as the server saw it; times are perf_counter seconds."""

    index: int
    body: Any
    headers: dict[str, str]
    # When the request body had been read; write offsets count from here.
    read_at: float
    # When each write of the timeline returned.
    write_times: list[float] = field(default_factory=list)
    # When the handler finished (response ended, connection reset, or the client went away).
    ended_at: Optional[float] = None
    # The client closed the connection before the timeline was complete.
    client_disconnected: bool = False


@dataclass
class ServerState:
    """Everything the scripted server observed."""

    requests: list[ServedRequest] = field(default_factory=list)
    open_requests: int = 0
    max_open_requests: int = 0
    # Handlers still running; shutdown cancels them so that pending writes and hangs end at once.
    handler_tasks: set[asyncio.Task[Any]] = field(default_factory=set)


STATE_KEY = web.AppKey("scripted_state", ServerState)


def _reply_for(script: Script, index: int, body: Any) -> Reply:
    if isinstance(script, Reply):
        return script
    if callable(script):
        return script(index, body)
    return script[min(index, len(script) - 1)]


async def _sleep_until(deadline: float) -> None:
    """Sleep until the perf_counter time `deadline` (at once if it has passed)."""
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


def _reset_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger on with a zero timeout makes close() send RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def build_scripted_app(script: Script) -> web.Application:
    """Build an aiohttp app that responds to every POST with the scripted reply.

    The app stores its ground truth as a ServerState under `app[STATE_KEY]`.
    """
    state = ServerState()
    app = web.Application()
    app[STATE_KEY] = state

    async def handle(request: web.Request) -> web.StreamResponse:
        index = len(state.requests)
        task = asyncio.current_task()
        if task is not None:
            state.handler_tasks.add(task)
        state.open_requests += 1
        state.max_open_requests = max(state.max_open_requests, state.open_requests)
        try:
            raw = await request.read()
            read_at = time.perf_counter()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            served = ServedRequest(index, body, dict(request.headers), read_at)
            state.requests.append(served)
            reply = _reply_for(script, index, body)
            return await _play(request, reply, served)
        finally:
            state.open_requests -= 1
            state.handler_tasks.discard(task)

    async def on_shutdown(app: web.Application) -> None:
        for task in list(state.handler_tasks):
            task.cancel()

    app.router.add_post("/{path:.*}", handle)
    app.on_shutdown.append(on_shutdown)
    return app


async def _play(request: web.Request, reply: Reply, served: ServedRequest) -> web.StreamResponse:
    response = web.StreamResponse(status=reply.status, headers=reply.headers)
    try:
        await _sleep_until(served.read_at + reply.headers_at)
        await response.prepare(request)
        for offset, data in reply.writes:
            await _sleep_until(served.read_at + offset)
            await response.write(data)
            served.write_times.append(time.perf_counter())
        if reply.end is End.reset:
            _reset_connection(request)
        else:
            if reply.end is End.hang:
                await asyncio.sleep(reply.hang_seconds)
            await response.write_eof()
    except ConnectionError:
        served.client_disconnected = True
    finally:
        served.ended_at = time.perf_counter()
    return response


class ScriptedServer:
    """Run `build_scripted_app(script)` on 127.0.0.1 inside `async with`; stops on exit."""

    def __init__(self, script: Script, *, port: int = 0, backlog: int = 4096) -> None:
        self.app = build_scripted_app(script)
        self._backlog = backlog
        self.state = self.app[STATE_KEY]
        self._port = port
        self._runner: Optional[web.AppRunner] = None
        self.base_url = ""

    async def __aenter__(self) -> ScriptedServer:
        # shutdown_timeout bounds how long stopping waits for handlers that are still running.
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        # aiohttp's default listen backlog of 128 would drop the SYNs of a larger burst of
        # connections, and the kernel retries them only after a second.
        site = web.TCPSite(self._runner, "127.0.0.1", self._port, backlog=self._backlog)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class ScriptedServerProcess:
    """Run the scripted server in a child process, for load where sharing a loop would skew timings.

    In one process the client and the server share an event loop, so at a few hundred
    concurrent requests the server reads each request tens of milliseconds after the client
    sent it. A child process has its own loop (and, on a multi-core machine, its own core).
    The script must be picklable: a Reply, a list of Reply, or a module-level function. The
    ground truth in `state` is filled in on exit; perf_counter times are comparable across
    processes because CLOCK_MONOTONIC is system-wide on Linux.
    """

    def __init__(self, script: Script, *, backlog: int = 4096, start_timeout: float = 30.0) -> None:
        self._script = script
        self._backlog = backlog
        self._start_timeout = start_timeout
        self.state = ServerState()
        self.base_url = ""
        self._process: Optional[multiprocessing.process.BaseProcess] = None
        self._connection: Optional[Connection] = None

    async def __aenter__(self) -> ScriptedServerProcess:
        context = multiprocessing.get_context("spawn")
        self._connection, child_connection = context.Pipe()
        self._process = context.Process(
            target=_serve_in_child, args=(self._script, self._backlog, child_connection), daemon=True
        )
        self._process.start()
        child_connection.close()
        self.base_url = await self._receive(self._start_timeout)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        process, connection = self._process, self._connection
        if process is None or connection is None:
            return
        try:
            connection.send("stop")
            self.state = await self._receive(10.0)
        finally:
            connection.close()
            await asyncio.to_thread(process.join, 5.0)
            if process.is_alive():
                process.kill()
            self._process = None
            self._connection = None

    async def _receive(self, timeout: float) -> Any:
        connection = self._connection
        assert connection is not None
        ready = await asyncio.to_thread(connection.poll, timeout)
        if not ready:
            raise TimeoutError(f"scripted server process sent nothing within {timeout:g} s")
        try:
            return connection.recv()
        except EOFError:
            raise RuntimeError("scripted server process exited early; see its traceback above") from None


def _serve_in_child(script: Script, backlog: int, connection: Connection) -> None:
    async def serve() -> None:
        async with ScriptedServer(script, backlog=backlog) as server:
            connection.send(server.base_url)
            await asyncio.to_thread(connection.recv)
        state = server.state
        connection.send(ServerState(requests=state.requests, max_open_requests=state.max_open_requests))

    try:
        import uvloop  # optional: about twice as many requests per second as the default loop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


def sse(data: Union[str, dict[str, Any]]) -> bytes:
    """Encode one `data:` event, serializing a dict as compact JSON."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {text}\n\n".encode()


DONE = sse("[DONE]")


def chat_chunk(
    *,
    finish_reason: Optional[str] = None,
    usage: Optional[dict[str, int]] = None,
    choices: bool = True,
    **delta: Any,
) -> bytes:
    """Encode a chat.completion.chunk event; keyword arguments become the delta's fields.

    `choices=False` makes the usage-only final chunk (`"choices": []`).
    """
    chunk: dict[str, Any] = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "test"}
    chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if choices else []
    if usage is not None:
        chunk["usage"] = usage
    return sse(chunk)


def completion_chunk(
    text: str = "",
    *,
    finish_reason: Optional[str] = None,
    usage: Optional[dict[str, int]] = None,
    choices: bool = True,
) -> bytes:
    """Encode a text_completion event of /v1/completions."""
    chunk: dict[str, Any] = {"id": "cmpl-test", "object": "text_completion", "model": "test"}
    chunk["choices"] = [{"index": 0, "text": text, "finish_reason": finish_reason}] if choices else []
    if usage is not None:
        chunk["usage"] = usage
    return sse(chunk)


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_timeline(
    ttft: float = 0.2,
    tokens: int = 32,
    gap: float = 0.02,
    *,
    chat: bool = True,
    usage: bool = True,
    prompt_tokens: int = 10,
    finish_reason: str = "length",
) -> list[tuple[float, bytes]]:
    """Build a typical streamed timeline: role chunk, one chunk per token, finish, usage, [DONE].

    Token i (from 0) is written at ttft + i * gap with the text " t{i}". The finish chunk
    is written at the offset of the last token, so the expected latency is
    ttft + (tokens - 1) * gap. The usage chunk and [DONE] follow 1 ms apart. With tokens=0
    the finish chunk comes at `ttft`.
    """
    writes: list[tuple[float, bytes]] = []
    if chat:
        writes.append((0.0, chat_chunk(role="assistant", content="")))
    for i in range(tokens):
        text = f" t{i}"
        writes.append((ttft + i * gap, chat_chunk(content=text) if chat else completion_chunk(text)))
    end = ttft + max(tokens - 1, 0) * gap
    finish = chat_chunk(finish_reason=finish_reason) if chat else completion_chunk(finish_reason=finish_reason)
    writes.append((end, finish))
    if usage:
        counts = usage_of(prompt_tokens, tokens)
        final = chat_chunk(usage=counts, choices=False) if chat else completion_chunk(usage=counts, choices=False)
        writes.append((end + 0.001, final))
    writes.append((end + 0.002, DONE))
    return writes
