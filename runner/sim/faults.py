"""Injected faults: which requests get one, and the responses that replace a normal response."""

from __future__ import annotations

import random
from enum import Enum
from typing import Optional

from aiohttp import web

from runner.sim.profile import FaultRates
from runner.sim.wire import dumps, error_body


class Fault(Enum):
    rate_limited = "rate_limited"
    unavailable = "unavailable"
    reset_mid_stream = "reset_mid_stream"
    stalled = "stalled"
    malformed_chunk = "malformed_chunk"
    no_terminal_event = "no_terminal_event"
    non_sse_body = "non_sse_body"
    headers_delayed = "headers_delayed"


# Faults that replace the whole response before the request reaches the engine.
EARLY_FAULTS = (Fault.rate_limited, Fault.unavailable, Fault.non_sse_body)
# Faults that cut a stream after cut_point tokens.
MID_STREAM_FAULTS = (Fault.reset_mid_stream, Fault.stalled, Fault.malformed_chunk)
# Seconds sent in the Retry-After header of a 503.
RETRY_AFTER_SECONDS = 1
# Line of a malformed chunk: an SSE event whose data is not valid JSON.
MALFORMED_CHUNK = b'data: {"id": "broken", "choices": [\n\n'


def draw_fault(rates: FaultRates, rng: random.Random) -> Optional[Fault]:
    """Pick at most one fault, each with its configured probability."""
    draw = rng.random()
    cumulative = 0.0
    for fault in Fault:
        cumulative += getattr(rates, fault.value)
        if draw < cumulative:
            return fault
    return None


def cut_point(target_tokens: int) -> int:
    """Return the number of tokens sent before a mid-stream fault: half of them, at least one."""
    return max(1, target_tokens // 2)


def early_response(fault: Fault) -> web.Response:
    """Build the response of a fault that replaces the whole response."""
    if fault is Fault.rate_limited:
        body = error_body(
            "rate limit reached for requests; retry later", error_type="rate_limit_error", code="rate_limit_exceeded"
        )
        return web.Response(status=429, body=dumps(body), content_type="application/json")
    if fault is Fault.unavailable:
        body = error_body("the server is overloaded; retry later", error_type="server_error", code="service_unavailable")
        return web.Response(
            status=503,
            body=dumps(body),
            content_type="application/json",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if fault is Fault.non_sse_body:
        return web.Response(status=200, text="<html><body>Gateway page</body></html>", content_type="text/html")
    raise ValueError(f"fault {fault.value} does not replace the whole response")
