"""Request body parsing and checks for the simulated completions endpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from runner.sim.tokens import TokenText

# Output tokens of a request that sets neither max_tokens nor max_completion_tokens.
DEFAULT_MAX_TOKENS = 256


class InvalidRequest(Exception):
    """Invalid request, sent back as an OpenAI-style error body with ``status``."""

    def __init__(self, message: str, *, param: Optional[str] = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


@dataclass(slots=True)
class CompletionParams:
    prompt_tokens: int
    max_tokens: int
    min_tokens: int
    ignore_eos: bool
    stream: bool
    include_usage: bool


def parse_request(body: bytes, *, chat: bool, served_model: str, text: TokenText) -> CompletionParams:
    """Parse and check a chat or completions body; raise InvalidRequest naming the bad field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON ({exc}); send a JSON object", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")

    model = data.get("model")
    if model is not None and model != served_model:
        raise InvalidRequest(
            f"model {model!r} does not exist; this server serves {served_model!r}",
            param="model",
            code="model_not_found",
            status=404,
        )
    prompt_tokens = _count_chat(data, text) if chat else _count_prompt(data, text)

    max_tokens = data.get("max_completion_tokens") if chat else None
    max_key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens = data.get("max_tokens")
        max_key = "max_tokens"
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    _require_int(max_tokens, max_key, minimum=1)
    min_tokens = data.get("min_tokens") or 0
    _require_int(min_tokens, "min_tokens", minimum=0)
    if min_tokens > max_tokens:
        raise InvalidRequest(
            f"min_tokens ({min_tokens}) must not exceed {max_key} ({max_tokens})", param="min_tokens"
        )
    ignore_eos = _require_bool(data.get("ignore_eos", False), "ignore_eos")
    stream = _require_bool(data.get("stream", False), "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest(f"stream_options must be an object, got {options!r}", param="stream_options")
    include_usage = _require_bool(options.get("include_usage", False), "stream_options.include_usage")
    count = data.get("n", 1)
    if count != 1:
        raise InvalidRequest(f"n={count!r} is not supported; send n=1 or leave it out", param="n")
    return CompletionParams(prompt_tokens, max_tokens, min_tokens, ignore_eos, stream, include_usage)


def _count_chat(data: dict[str, Any], text: TokenText) -> int:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages is missing or empty; send a non-empty list of messages", param="messages")
    plain: list[dict[str, Any]] = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"messages[{position}] must be an object with a string role, got {message!r:.80}", param="messages"
            )
        plain.append({**message, "content": _content_text(message.get("content"), position)})
    return text.count_chat(plain)


def _content_text(content: Any, position: int) -> str:
    """Flatten OpenAI content parts to text, since chat templates expect a string."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return "".join(parts)
    raise InvalidRequest(f"messages[{position}].content must be a string or a list of parts", param="messages")


def _count_prompt(data: dict[str, Any], text: TokenText) -> int:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return text.count_text(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
        return len(prompt)
    raise InvalidRequest(
        "prompt is missing, empty or a batch; send one non-empty string or one list of token ids", param="prompt"
    )


def _require_int(value: Any, key: str, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequest(f"{key} must be an integer >= {minimum}, got {value!r}", param=key)


def _require_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be true or false, got {value!r}", param=key)
    return value
