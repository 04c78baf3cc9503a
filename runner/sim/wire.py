"""OpenAI wire format: streamed chunks as precomputed byte templates, whole responses, errors."""

from __future__ import annotations

import json
from typing import Any, Optional

try:
    import orjson

    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

except ImportError:  # orjson is optional; the standard library gives the same bytes, slower

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class StreamFormat:
    """Byte templates of one streamed response, so each token chunk is a few concatenations.

    Chat chunks carry ``choices[0].delta.content``, completions chunks ``choices[0].text``.
    """

    def __init__(self, chat: bool, request_id: str, created: int, model: str) -> None:
        self.chat = chat
        self.request_id = request_id
        self.created = created
        self.model = model
        kind = "chat.completion.chunk" if chat else "text_completion"
        self._head = (
            b'data: {"id":' + dumps(request_id) + b',"object":"' + kind.encode() + b'","created":'
            + str(created).encode() + b',"model":' + dumps(model) + b',"choices":'
        )
        self._open = self._head + (b'[{"index":0,"delta":{"content":"' if chat else b'[{"index":0,"text":"')
        close = b'"},"logprobs":null,"finish_reason":' if chat else b'","logprobs":null,"finish_reason":'
        self._close = close + b"null}]}\n\n"
        self._close_final = {
            reason: close + b'"' + reason.encode() + b'"}]}\n\n' for reason in ("length", "stop")
        }

    def role_chunk(self) -> bytes:
        """First chat chunk: the assistant role with empty content (carries no token)."""
        return self._head + b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'

    def token_chunks(self, words: list[bytes], finish_reason: Optional[str]) -> bytes:
        """Build one chunk per word; the last one carries ``finish_reason`` when given."""
        opening = self._open
        closing = self._close
        parts = [opening + word + closing for word in words]
        if finish_reason is not None and parts:
            parts[-1] = opening + words[-1] + self._close_final[finish_reason]
        return b"".join(parts)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._head + b'[],"usage":' + dumps(usage(prompt_tokens, completion_tokens)) + b"}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def full_response(
    fmt: StreamFormat, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """Non-streamed response body of a chat or completions request."""
    if fmt.chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": fmt.request_id,
        "object": "chat.completion" if fmt.chat else "text_completion",
        "created": fmt.created,
        "model": fmt.model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def error_body(message: str, *, error_type: str = "invalid_request_error", code: str, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
