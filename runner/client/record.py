"""One record per request, as the client observed it.

Times are absolute ``time.perf_counter()`` seconds (CLOCK_MONOTONIC on Linux, so they are
comparable with a server process on the same machine). Writers convert them to seconds
since the start of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(slots=True)
class Prompt:
    """One prompt of a dataset, ready to send."""

    # Plain text for /v1/completions, or the user message for chat when `messages` is None.
    text: str = ""
    # Chat messages; when set they are sent as they are.
    messages: Optional[list[dict[str, Any]]] = None
    # Token ids sent instead of text to /v1/completions, which makes the prompt length exact.
    token_ids: Optional[list[int]] = None
    # Prompt length as the client's tokenizer counts it (template tokens excluded).
    prompt_tokens: int = 0
    # Per-prompt output length, overriding request.max_tokens when set.
    max_tokens: Optional[int] = None


@dataclass(slots=True)
class RequestRecord:
    request_id: int
    # Request sent before measurement starts and left out of every statistic.
    warmup: bool = False
    # Closed loop: request sent after the measured ones only to keep every slot busy until the
    # last measured request ends; left out of every statistic.
    cooldown: bool = False
    # When the load shaper meant to send the request.
    scheduled_at: Optional[float] = None
    # When the request was handed to the HTTP client. Waiting for a pooled connection and
    # opening one come after this, so dispatched_at - scheduled_at is the client's own delay.
    dispatched_at: Optional[float] = None
    # When the request was handed to the socket (the moment its body was written).
    sent_at: Optional[float] = None
    # Arrival of the first chunk that carries generated text on any channel.
    first_token_at: Optional[float] = None
    # Arrival of the last chunk that carries generated text.
    last_token_at: Optional[float] = None
    # Arrival of the last chunk that carries choices (text or finish_reason); on failure, when it failed.
    ended_at: Optional[float] = None
    # HTTP status, or None when no response arrived.
    status: Optional[int] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    # "usage" when the counts came from the server, "tokenizer" when the client counted.
    token_source: str = ""
    finish_reason: Optional[str] = None
    success: bool = False
    # One-line reason for a failure; empty on success.
    error: str = ""
    # Successful response that generated no tokens (its TTFT is None, never 0); set by finalize().
    empty_output: bool = False
    # max_tokens sent with the request.
    max_tokens: Optional[int] = None
    # Prompt length the dataset expects the server to count (chat template included for chat).
    expected_prompt_tokens: Optional[int] = None
    # The client tokenizer's count of the output when the server also sent usage, to cross-check.
    tokenizer_tokens: Optional[int] = None
    # Arrival time of every chunk that carried generated text, in order.
    chunk_times: list[float] = field(default_factory=list)
    # Generated text of each of those chunks (one entry for a non-streamed response); kept
    # until token counts are final, then dropped.
    chunk_texts: list[str] = field(default_factory=list)
    # Inter-token latencies in seconds, set by finalize(); None until then.
    itl: Optional[list[float]] = None

    @property
    def ttft(self) -> Optional[float]:
        if self.first_token_at is None or self.sent_at is None:
            return None
        return self.first_token_at - self.sent_at

    @property
    def latency(self) -> Optional[float]:
        if self.ended_at is None or self.sent_at is None or not self.success:
            return None
        return self.ended_at - self.sent_at

    @property
    def tpot(self) -> Optional[float]:
        tokens = self.completion_tokens
        if tokens is None or tokens < 2 or self.first_token_at is None or self.last_token_at is None:
            return None
        return (self.last_token_at - self.first_token_at) / (tokens - 1)
