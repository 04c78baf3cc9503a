"""aiohttp application of the simulated OpenAI-compatible server.

Handlers parse a request, hand a ``Sequence`` to the single engine task and wait for its tokens.
The engine only updates counters and wakes handlers, so it never waits on a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from aiohttp import web

from runner.sim.engine import Engine, Sequence, plan_output
from runner.sim.faults import EARLY_FAULTS, MALFORMED_CHUNK, MID_STREAM_FAULTS, Fault, cut_point, draw_fault, early_response
from runner.sim.ground_truth import GroundTruthLog
from runner.sim.profile import SimProfile
from runner.sim.tokens import TokenText, resolve_tokenizer, token_text
from runner.sim.validate import CompletionParams, InvalidRequest, parse_request
from runner.sim.wire import DONE, SSE_HEADERS, StreamFormat, dumps, error_body, full_response

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-0.5b-instruct"


@dataclass
class SimState:
    profile: SimProfile
    seed: int
    model: str
    text: TokenText
    engine: Engine
    log: Optional[GroundTruthLog]
    # Numbers requests in arrival order; each request's random draws are seeded from
    # (seed, number), so the same seed and request order give the same texts.
    counter: itertools.count = field(default_factory=itertools.count)


STATE = web.AppKey("sim_state", SimState)


class _Wakeup:
    """Engine callback that resumes the handler waiting for a sequence's tokens."""

    __slots__ = ("future", "only_when_done")

    def __init__(self, only_when_done: bool) -> None:
        self.future: Optional[asyncio.Future[None]] = None
        self.only_when_done = only_when_done

    def __call__(self, seq: Sequence) -> None:
        future = self.future
        if future is not None and not future.done() and (seq.done or not self.only_when_done):
            future.set_result(None)

    async def wait(self) -> None:
        self.future = asyncio.get_running_loop().create_future()
        try:
            await self.future
        finally:
            self.future = None


def build_app(
    profile: SimProfile,
    *,
    seed: int = 0,
    tokenizer: Optional[str] = None,
    model: str = DEFAULT_MODEL,
    log_path: Optional[str] = None,
) -> web.Application:
    """Build the server application; the engine task starts and stops with the app."""
    text = token_text(str(resolve_tokenizer(tokenizer)))
    log = GroundTruthLog(log_path) if log_path else None
    state = SimState(profile=profile, seed=seed, model=model, text=text, engine=Engine(profile), log=log)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.cleanup_ctx.append(_background_tasks)
    return app


async def _background_tasks(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    tasks = [asyncio.create_task(state.engine.run(), name="sim-engine")]
    if state.log is not None:
        tasks.append(asyncio.create_task(state.log.flush_periodically(), name="sim-log-flush"))
    logger.info("simulated server ready: profile %s, model %s, seed %s", state.profile.name, state.model, state.seed)
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if state.log is not None:
        state.log.close()


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    entry = {
        "id": state.model,
        "object": "model",
        "created": 0,
        "owned_by": "runner-sim",
        "max_model_len": state.profile.kv_cache_tokens,
    }
    return web.json_response({"object": "list", "data": [entry]})


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


@dataclass(slots=True)
class _Trace:
    """Ground-truth timings of one request, written to the log when it ends."""

    request_id: str
    client_request_id: Optional[str]
    api: str
    arrived_at: float
    stream: Optional[bool] = None
    first_token_at: Optional[float] = None
    chunk_written_at: list[float] = field(default_factory=list)
    prompt_tokens: Optional[int] = None
    fault: Optional[Fault] = None

    def record(
        self,
        seq: Optional[Sequence],
        *,
        status: str,
        http_status: int,
        finish_reason: Optional[str] = None,
        error: str = "",
    ) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "client_request_id": self.client_request_id,
            "api": self.api,
            "stream": self.stream,
            "arrived_at": self.arrived_at,
            "admitted_at": seq.admitted_at if seq else None,
            "first_token_at": self.first_token_at,
            "chunk_written_at": self.chunk_written_at,
            "finished_at": time.perf_counter(),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": seq.generated if seq else 0,
            "finish_reason": finish_reason,
            "status": status,
            "http_status": http_status,
            "fault": self.fault.value if self.fault else None,
            "error": error,
        }


@dataclass(slots=True)
class _Job:
    """One accepted request: its engine sequence and what its response is made of."""

    state: SimState
    params: CompletionParams
    trace: _Trace
    seq: Sequence
    wakeup: _Wakeup
    fmt: StreamFormat
    # Indices into TokenText.words of the tokens to send.
    words: list[int]
    finish_reason: str
    # The streamed response once its headers are sent.
    response: Optional[web.StreamResponse] = None


class _ConnectionCut(Exception):
    """The server closed the connection on purpose to inject a fault."""


async def _complete(request: web.Request, *, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    body = await request.read()
    arrived_at = time.perf_counter()
    number = next(state.counter)
    trace = _Trace(
        request_id=f"{'chatcmpl' if chat else 'cmpl'}-{state.seed}-{number}",
        client_request_id=request.headers.get("X-Request-Id"),
        api="chat" if chat else "completions",
        arrived_at=arrived_at,
    )
    try:
        params = parse_request(body, chat=chat, served_model=state.model, text=state.text)
        if not state.engine.core.fits_ever(params.prompt_tokens, params.max_tokens):
            raise InvalidRequest(
                f"prompt ({params.prompt_tokens} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"KV cache of {state.profile.kv_cache_tokens} tokens; lower max_tokens or shorten the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )
    except InvalidRequest as exc:
        _log(state, trace.record(None, status="rejected", http_status=exc.status, error=exc.message))
        logger.debug("rejected request %s: %s", trace.request_id, exc.message)
        body = error_body(exc.message, code=exc.code, param=exc.param)
        return web.Response(status=exc.status, body=dumps(body), content_type="application/json")

    trace.stream = params.stream
    trace.prompt_tokens = params.prompt_tokens
    # Faults draw from their own generator so that enabling them leaves the texts unchanged.
    trace.fault = draw_fault(state.profile.faults, random.Random(f"{state.seed}/fault/{number}"))
    if trace.fault in EARLY_FAULTS:
        response = early_response(trace.fault)
        _log(state, trace.record(None, status="fault", http_status=response.status))
        return response
    if trace.fault is Fault.headers_delayed:
        await asyncio.sleep(state.profile.faults.headers_delay_seconds)

    rng = random.Random(f"{state.seed}/{number}")
    target, finish_reason = plan_output(
        rng, params.max_tokens, params.min_tokens, params.ignore_eos, state.profile.eos_probability
    )
    seq = Sequence(trace.request_id, params.prompt_tokens, params.max_tokens, target, arrived_at)
    wakeup = _Wakeup(only_when_done=not params.stream)
    seq.on_token = wakeup
    fmt = StreamFormat(chat, trace.request_id, int(time.time()), state.model)
    job = _Job(state, params, trace, seq, wakeup, fmt, state.text.draw(rng, target), finish_reason)
    state.engine.submit(seq)
    try:
        if params.stream:
            response = await _stream(request, job)
        else:
            response = await _whole(request, job)
    except _ConnectionCut:
        _log(state, trace.record(seq, status="fault", http_status=200))
        # A prepared response is returned as it is; aiohttp skips writing to the closed transport.
        return job.response or web.Response(status=200)
    except (asyncio.CancelledError, ConnectionResetError) as exc:
        state.engine.abort(seq)
        reason = "client disconnected" if isinstance(exc, ConnectionResetError) else "cancelled by server shutdown"
        _log(state, trace.record(seq, status="aborted", http_status=200, error=reason))
        logger.debug("request %s aborted after %s tokens: %s", trace.request_id, seq.generated, reason)
        if isinstance(exc, asyncio.CancelledError):
            raise
        return web.Response(status=499)
    status = "fault" if trace.fault and trace.fault is not Fault.headers_delayed else "ok"
    _log(state, trace.record(seq, status=status, http_status=200, finish_reason=finish_reason))
    return response


def _log(state: SimState, record: dict[str, Any]) -> None:
    if state.log is not None:
        state.log.write(record)


async def _cut_connection(request: web.Request, job: _Job) -> None:
    """Free the sequence, then close the connection at once (reset) or after a silence (stall)."""
    job.state.engine.abort(job.seq)
    if job.trace.fault is Fault.stalled:
        await asyncio.sleep(job.state.profile.faults.stall_seconds)
    if request.transport is not None:
        request.transport.abort()
    raise _ConnectionCut()


async def _whole(request: web.Request, job: _Job) -> web.Response:
    while not job.seq.done:
        await job.wakeup.wait()
    fault = job.trace.fault
    if fault in (Fault.reset_mid_stream, Fault.stalled):
        await _cut_connection(request, job)
    text = job.state.text.text(job.words)
    body = dumps(full_response(job.fmt, text, job.finish_reason, job.seq.prompt_tokens, job.seq.generated))
    if fault in (Fault.malformed_chunk, Fault.no_terminal_event):
        # A body cut in half is the whole-response form of a broken or unfinished stream.
        body = body[: len(body) // 2]
    return web.Response(body=body, content_type="application/json")


async def _stream(request: web.Request, job: _Job) -> web.StreamResponse:
    seq, fmt, trace = job.seq, job.fmt, job.trace
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    job.response = response

    if fmt.chat:
        await response.write(fmt.role_chunk())
    word_bytes = job.state.text.word_bytes
    keep_times = job.state.log is not None
    # Tokens sent before a mid-stream fault; past the end when there is none.
    cut = cut_point(seq.target_tokens) if trace.fault in MID_STREAM_FAULTS else seq.target_tokens + 1
    terminal = trace.fault is not Fault.no_terminal_event
    written = 0

    while True:
        generated = min(seq.generated, cut) if written < cut else seq.generated
        if generated > written:
            finished = seq.finished_at is not None and generated == seq.generated
            reason = job.finish_reason if finished and terminal else None
            data = fmt.token_chunks([word_bytes[index] for index in job.words[written:generated]], reason)
            if finished and terminal:
                if job.params.include_usage:
                    data += fmt.usage_chunk(seq.prompt_tokens, generated)
                data += DONE
            await response.write(data)
            if keep_times:
                now = time.perf_counter()
                if trace.first_token_at is None:
                    trace.first_token_at = now
                trace.chunk_written_at.extend([now] * (generated - written))
            written = generated
            if finished:
                break
        if written == cut:
            if trace.fault is Fault.malformed_chunk:
                await response.write(MALFORMED_CHUNK)
                cut = seq.target_tokens + 1
                continue
            await _cut_connection(request, job)
        if seq.generated == written:
            await job.wakeup.wait()
    await response.write_eof()
    return response
