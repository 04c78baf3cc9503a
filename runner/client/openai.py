"""HTTP client for OpenAI-compatible chat and completions endpoints.

One `OpenAIClient` keeps one aiohttp session open for a whole run. `send` fills a `RequestRecord`
with the timings defined in the metrics contract. All times are `time.perf_counter()` seconds:

- `sent_at`: the moment the request body is handed to the socket, from aiohttp's
  `on_request_chunk_sent` trace signal (the headers go out with the body). aiohttp 3.14 on
  Python 3.11 writes the body in a task of its own, one event-loop turn after the headers
  are serialized, and under a burst of requests that turn can take tens of milliseconds, so
  `on_request_headers_sent` alone would start TTFT early; it only sets a first value. Time
  spent waiting for a pooled connection shows up between `scheduled_at` and `sent_at`,
  not inside TTFT.
- every read of the body gets one arrival time; all events completed by that read share it.
  The arrival time is taken when the connection's protocol receives the bytes
  (`data_received`), not when the reading task resumes: under load the task resumes one or
  more event-loop turns later, and that delay would be added to TTFT and ITL. When a read
  returns bytes from several socket reads, the time of the last one is used, so a time is
  never earlier than the arrival of the bytes that complete an event.
- `first_token_at` / `last_token_at`: first and last chunk carrying generated text on any
  channel (content, reasoning_content, reasoning, tool-call arguments, completions text).
- `ended_at`: last chunk with non-empty `choices`; the usage-only chunk and `[DONE]` do not
  move it. On failure it is the moment the failure was detected.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from types import SimpleNamespace
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp.client_proto import ResponseHandler

from runner.client.kernel_clock import KernelStamped
from runner.client.record import Prompt, RequestRecord
from runner.client.response import (
    apply_chunk,
    choice_text,
    dumps,
    error_event_text,
    error_object_message,
    http_error_message,
    loads,
    one_line,
    take_usage,
    wrong_content_type_message,
)
from runner.client.sse import SSEParser
from runner.config import Api, EndpointConfig, ModelConfig, RequestConfig
from runner.errors import ConfigError
from runner.redact import display_url

logger = logging.getLogger(__name__)

_perf_counter = time.perf_counter
_EVENT_STREAM = "text/event-stream"
# NOTE: aiohttp < 3.10 raises ServerTimeoutError for both connect and read timeouts, so there
# a connect timeout is reported as a read timeout.
_CONNECT_TIMEOUT = getattr(aiohttp, "ConnectionTimeoutError", ())
_READ_TIMEOUT = getattr(aiohttp, "SocketTimeoutError", aiohttp.ServerTimeoutError)
# A pooled connection that the server had already closed fails with one of these before any
# response status arrives.
_STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
# The connection broke after it was established: reset, closed early, or a truncated body.
_CONNECTION_LOST = (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                    ConnectionResetError)


class _ArrivalTimedProtocol(ResponseHandler, KernelStamped):
    """aiohttp's response protocol, stamping the time each socket read delivers bytes.

    The stamp is the kernel's receive time when the transport passes one (see
    `runner.client.kernel_clock`), else the time this method runs.
    """

    last_data_at: Optional[float] = None

    def data_received(self, data: bytes) -> None:
        if data:
            stamp = self.kernel_arrival
            self.last_data_at = stamp if stamp is not None else _perf_counter()
        super().data_received(data)


class _ArrivalTimedConnector(aiohttp.TCPConnector):
    """TCPConnector whose connections use `_ArrivalTimedProtocol`.

    aiohttp builds each connection's protocol from the private `_factory` attribute (a
    partial of ResponseHandler, checked on aiohttp 3.14). When a release changes that, the
    connector keeps aiohttp's protocol and `arrival_timed` is False, so arrivals fall back
    to the time the reading task resumes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        factory = getattr(self, "_factory", None)
        self.arrival_timed = isinstance(factory, functools.partial) and factory.func is ResponseHandler
        if self.arrival_timed:
            self._factory = functools.partial(_ArrivalTimedProtocol, *factory.args, **factory.keywords)
        else:
            logger.warning("aiohttp %s builds connections in an unknown way, so chunk times are taken when the "
                           "reader wakes up and run late under load; install aiohttp 3.14 for exact times",
                           aiohttp.__version__)


def _timed_protocol(response: aiohttp.ClientResponse) -> Optional[_ArrivalTimedProtocol]:
    """Return the response connection's protocol if it stamps arrivals.

    Taken before the body is read, because aiohttp releases the connection to the pool once
    the body ends. The next request on that connection cannot receive bytes before this
    reader resumes: its send is queued behind this reader's wake-up.
    """
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    return protocol if isinstance(protocol, _ArrivalTimedProtocol) else None


async def _mark_sent(session: aiohttp.ClientSession, context: SimpleNamespace, params: Any) -> None:
    record = context.trace_request_ctx
    if record is not None:
        record.sent_at = _perf_counter()


class OpenAIClient:
    """Async context manager that sends prompts and records what each request observed."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        model: ModelConfig,
        request: RequestConfig,
        *,
        base_url: Optional[str] = None,
        pool_size: int,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.endpoint = endpoint
        self.model = model
        self.request = request
        self.pool_size = pool_size
        self.url = _request_url(endpoint.url, base_url)
        self.api = endpoint.api
        self._headers = {"Content-Type": "application/json", **endpoint.headers}
        if endpoint.api_key_env:
            api_key = os.environ.get(endpoint.api_key_env)
            if api_key is None:
                raise ConfigError(
                    f"endpoint.api_key_env names the environment variable {endpoint.api_key_env}, "
                    f"which is not set; export it or set endpoint.api_key_env=null"
                )
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: Optional[aiohttp.ClientSession] = None
        self._retry_session: Optional[aiohttp.ClientSession] = None
        self._unexpected_errors = 0
        # Requests retried because a pooled connection had been closed by the server.
        self.stale_connection_retries = 0

    def __repr__(self) -> str:
        # The headers stay out of the repr because they hold the API key.
        return f"OpenAIClient(url={self.url!r}, pool_size={self.pool_size})"

    async def __aenter__(self) -> OpenAIClient:
        endpoint = self.endpoint
        # A ceiling threshold of infinity turns off aiohttp's rounding of timeouts above 5 s up
        # to the next whole second, so every limit fires when configured.
        no_rounding = float("inf")
        connector = _ArrivalTimedConnector(
            limit=self.pool_size,
            limit_per_host=self.pool_size,
            timeout_ceil_threshold=no_rounding,
        )
        # `sock_connect` rather than `connect`: aiohttp's `connect` also counts the wait for a
        # free pooled connection, which is client-side queueing, not a slow server.
        timeout = aiohttp.ClientTimeout(
            total=endpoint.request_timeout,
            sock_connect=endpoint.connect_timeout,
            sock_read=endpoint.read_timeout,
            ceil_threshold=no_rounding,
        )
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_mark_sent)
        trace.on_request_chunk_sent.append(_mark_sent)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, trace_configs=[trace], raise_for_status=False
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for session in (self._session, self._retry_session):
            if session is not None:
                await session.close()
        self._session = self._retry_session = None

    async def fetch_models(self) -> Any:
        """Return the server's GET /v1/models response (parsed JSON), or a dict with the error.

        The manifest keeps it as a record of what was served; a failure here never stops a run.
        """
        if self._session is None:
            raise RuntimeError("OpenAIClient.fetch_models called outside `async with OpenAIClient(...)`")
        url = self.url.split("/v1/", 1)[0] + "/v1/models"
        try:
            async with self._session.get(url, headers=self._headers) as response:
                if response.status != 200:
                    return {"error": f"HTTP {response.status} from {display_url(url)}"}
                return await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return {"error": one_line(f"{type(exc).__name__}: {exc}")}

    def build_body(self, prompt: Prompt) -> dict[str, Any]:
        """Build the JSON request body for one prompt; `request.extra_body` overrides any field."""
        request = self.request
        body: dict[str, Any] = {"model": self.model.name}
        if self.api is Api.chat:
            body["messages"] = prompt.messages if prompt.messages is not None else [
                {"role": "user", "content": prompt.text}
            ]
        else:
            use_ids = request.prompt_token_ids and prompt.token_ids is not None
            body["prompt"] = prompt.token_ids if use_ids else prompt.text
        body["max_tokens"] = prompt.max_tokens if prompt.max_tokens is not None else request.max_tokens
        if request.min_tokens is not None:
            body["min_tokens"] = request.min_tokens
        # Sent only when true: false is every server's default, and the OpenAI API itself
        # rejects fields it does not know.
        if request.ignore_eos:
            body["ignore_eos"] = True
        if request.temperature is not None:
            body["temperature"] = request.temperature
        body["stream"] = request.stream
        if request.stream:
            body["stream_options"] = {"include_usage": True}
        body.update(request.extra_body)
        return body

    async def send(self, prompt: Prompt, record: RequestRecord) -> None:
        """Send one prompt and fill `record`; a failed request is recorded, never raised.

        Only asyncio.CancelledError propagates, after the record is marked failed with the
        error "cancelled".
        """
        session = self._session
        if session is None:
            raise RuntimeError("OpenAIClient.send called outside `async with OpenAIClient(...)`")
        body = self.build_body(prompt)
        streaming = bool(body.get("stream"))
        data = dumps(body)
        record.max_tokens = body.get("max_tokens")
        if prompt.prompt_tokens:
            # The dataset's count is used until the server's usage arrives.
            record.prompt_tokens = prompt.prompt_tokens
            record.expected_prompt_tokens = prompt.prompt_tokens
        record.success = False
        record.dispatched_at = _perf_counter()
        try:
            for attempt in range(2):
                # Fallback for when the trace signal never fires (for example, the connection failed).
                record.sent_at = _perf_counter()
                try:
                    await self._post(self._fresh_session() if attempt else session, data, record, streaming)
                    break
                except _STALE_CONNECTION as exc:
                    # Servers such as llama.cpp's close a keep-alive connection right after a
                    # stream ends, and aiohttp may hand that connection to the next request
                    # before it receives the close. The request then fails before any response
                    # arrived, so the server never answered it: retry it once on a new connection
                    # (another pooled one could be closed as well).
                    if attempt or record.status is not None or isinstance(exc, aiohttp.ClientConnectorError):
                        raise
                    self.stale_connection_retries += 1
                    logger.debug("request %s: pooled connection was closed; retrying once", record.request_id)
        except asyncio.CancelledError:
            _fail(record, "cancelled")
            raise
        except TimeoutError as exc:
            _fail(record, self._timeout_message(exc))
        except aiohttp.ClientConnectorError as exc:
            _fail(record, one_line(f"connection failed: {type(exc).__name__}: {exc}"))
        except _CONNECTION_LOST as exc:
            _fail(record, _connection_lost_message(exc, record.status is not None, streaming))
        except aiohttp.ClientError as exc:
            _fail(record, one_line(f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # a bug here must not stop the run, so the record keeps it
            self._unexpected_errors += 1
            level = logging.WARNING if self._unexpected_errors == 1 else logging.DEBUG
            logger.log(level, "Unexpected error in request %s (%s so far)", record.request_id,
                       self._unexpected_errors, exc_info=True)
            _fail(record, one_line(f"unexpected client error: {type(exc).__name__}: {exc}"))

    def _fresh_session(self) -> aiohttp.ClientSession:
        """Return a session that opens a new connection for every request, for retries."""
        if self._retry_session is None:
            assert self._session is not None
            connector = _ArrivalTimedConnector(limit=self.pool_size, force_close=True,
                                             timeout_ceil_threshold=float("inf"))
            self._retry_session = aiohttp.ClientSession(
                connector=connector, timeout=self._session.timeout, trace_configs=self._session.trace_configs,
                raise_for_status=False,
            )
        return self._retry_session

    async def _post(self, session: aiohttp.ClientSession, data: bytes, record: RequestRecord, streaming: bool) -> None:
        async with session.post(self.url, data=data, headers=self._headers, trace_request_ctx=record) as response:
            record.status = response.status
            if response.status != 200:
                await self._read_http_error(response, record)
            elif streaming:
                await self._read_stream(response, record)
            else:
                await self._read_json(response, record)

    def _timeout_message(self, exc: TimeoutError) -> str:
        endpoint = self.endpoint
        # Connect and read timeouts are ServerTimeoutError subclasses. aiohttp raises a plain
        # TimeoutError when `total` (endpoint.request_timeout) expires.
        if isinstance(exc, _CONNECT_TIMEOUT):
            return f"timed out: no connection within {endpoint.connect_timeout:g} s (endpoint.connect_timeout)"
        if isinstance(exc, _READ_TIMEOUT) and endpoint.read_timeout is not None:
            return f"timed out: no data for {endpoint.read_timeout:g} s (endpoint.read_timeout)"
        if endpoint.request_timeout is not None:
            return f"timed out: request exceeded {endpoint.request_timeout:g} s (endpoint.request_timeout)"
        return one_line(f"timed out: {type(exc).__name__}: {exc}")

    async def _read_http_error(self, response: aiohttp.ClientResponse, record: RequestRecord) -> None:
        body = await response.read()
        record.ended_at = _perf_counter()
        record.error = http_error_message(
            response.status, response.reason, body, response.headers.get("Retry-After")
        )

    async def _read_stream(self, response: aiohttp.ClientResponse, record: RequestRecord) -> None:
        if response.content_type != _EVENT_STREAM:
            body = await response.read()
            _fail(record, wrong_content_type_message(response.content_type, _EVENT_STREAM, body))
            return
        protocol = _timed_protocol(response)
        parser = SSEParser()
        terminal = False
        done_at: Optional[float] = None
        try:
            async for received in response.content.iter_any():
                now = (protocol.last_data_at if protocol is not None else None) or _perf_counter()
                for event in parser.feed(received):
                    payload = event.data
                    if payload == "[DONE]":
                        done_at = now
                        break
                    if event.event == "error":
                        _fail(record, f"server error event: {error_event_text(payload)}", now)
                        return
                    try:
                        chunk = loads(payload)
                    except ValueError:
                        _fail(record, f"invalid JSON in stream event: {one_line(payload, 80)}", now)
                        return
                    error = apply_chunk(record, chunk, now)
                    if error is not None:
                        _fail(record, error, now)
                        return
                    terminal = terminal or record.finish_reason is not None
                if done_at is not None:
                    break  # [DONE] ends the response, so anything after it is not read
        except _CONNECTION_LOST:
            if not terminal:
                raise
            # The output was complete. Only the usage chunk or [DONE] can have been lost.
            logger.debug("Request %s: connection lost after its finish_reason", record.request_id)
        parser.close()
        if not terminal and done_at is None:
            _fail(record, "stream ended without a terminal event")
            return
        if record.ended_at is None:
            # NOTE: a stream with [DONE] but no chunk carrying choices has no defined end, so
            # the arrival of [DONE] is used to keep latency defined.
            record.ended_at = done_at
        record.success = True

    async def _read_json(self, response: aiohttp.ClientResponse, record: RequestRecord) -> None:
        protocol = _timed_protocol(response)
        body = await response.read()
        record.ended_at = (protocol.last_data_at if protocol is not None else None) or _perf_counter()

        try:
            result = loads(body)
        except ValueError:
            snippet = one_line(body.decode("utf-8", "replace"), 80)
            _fail(record, f"invalid JSON in response body: {snippet}", record.ended_at)
            return
        if type(result) is not dict:
            _fail(record, "invalid response body, expected a JSON object", record.ended_at)
            return
        error = result.get("error")
        if error:
            _fail(record, f"server error: {error_object_message(error)}", record.ended_at)
            return
        choices = result.get("choices")
        if not choices:
            _fail(record, "response has no choices", record.ended_at)
            return

        text = ""
        for choice in choices:
            text += choice_text(choice)
            if choice.get("finish_reason"):
                record.finish_reason = choice["finish_reason"]
        if text:
            # Kept for the tokenizer fallback. A non-streamed response has no per-token timing.
            record.chunk_texts.append(text)
        usage = result.get("usage")
        if usage:
            take_usage(record, usage)
        record.success = True


def _request_url(url: str, base_url: Optional[str]) -> str:
    parts = urlsplit(url)
    if base_url is None:
        if not (parts.scheme and parts.netloc):
            raise ConfigError(
                f"endpoint.url must be a full http(s) URL when no server base URL is given, got {url!r}"
            )
        return url
    base = urlsplit(base_url)
    return urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))


def _fail(record: RequestRecord, error: str, at: Optional[float] = None) -> None:
    record.success = False
    record.error = error
    record.ended_at = _perf_counter() if at is None else at


def _connection_lost_message(exc: BaseException, had_headers: bool, streaming: bool) -> str:
    name = type(exc).__name__
    if not had_headers:
        return one_line(f"connection reset or closed before the response: {name}: {exc}")
    if streaming:
        return f"stream ended without a terminal event: connection reset or closed ({name})"
    return f"connection reset or closed mid-response ({name})"
