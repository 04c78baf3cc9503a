"""HTTP client for OpenAI-compatible servers: SSE parsing, timing and per-request records."""

from runner.client.finalize import TokenCounter, finalize, itl_samples
from runner.client.openai import OpenAIClient
from runner.client.record import Prompt, RequestRecord
from runner.client.sse import SSEEvent, SSEParser

__all__ = [
    "OpenAIClient",
    "Prompt",
    "RequestRecord",
    "SSEEvent",
    "SSEParser",
    "TokenCounter",
    "finalize",
    "itl_samples",
]
