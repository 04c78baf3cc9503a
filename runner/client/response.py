"""Interpretation of OpenAI response JSON: generated text, usage and one-line error messages.

Uses orjson when it is installed, else the standard json module.
"""

from __future__ import annotations

from typing import Any, Optional

from runner.client.record import RequestRecord

# Maximum length of a server message kept in a record's error, in characters.
MESSAGE_LIMIT = 200

try:
    import orjson

    loads = orjson.loads
    dumps = orjson.dumps
except ImportError:  # orjson is an optional speed-up
    import json

    loads = json.loads

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """Collapse whitespace (newlines included) and cut to `limit` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_object_message(error: Any) -> str:
    """Extract the message of an OpenAI-style `error` value (an object or a string)."""
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or error
        return one_line(str(message))
    return one_line(str(error))


def error_event_text(payload: str) -> str:
    """Extract the message of an `event: error` payload, which may or may not be JSON."""
    try:
        value = loads(payload)
    except ValueError:
        return one_line(payload)
    if isinstance(value, dict):
        return error_object_message(value.get("error") or value)
    return one_line(payload)


def body_message(body: bytes) -> str:
    """Extract the message of an error body: OpenAI, vLLM and FastAPI JSON, or plain text."""
    text = body.decode("utf-8", "replace")
    try:
        value = loads(body)
    except ValueError:
        return one_line(text)
    if isinstance(value, dict):
        for key in ("error", "message", "detail"):
            if value.get(key):
                return error_object_message(value[key])
    return one_line(text)


def http_error_message(status: int, reason: Optional[str], body: bytes, retry_after: Optional[str]) -> str:
    message = body_message(body) or (reason or "")
    # Some servers' plain-text bodies repeat the status ("404: Not Found").
    message = message.removeprefix(f"{status}: ")
    error = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    if retry_after:
        error += f" (Retry-After: {one_line(retry_after, 40)})"
    return error


def wrong_content_type_message(content_type: str, expected: str, body: bytes) -> str:
    snippet = one_line(body.decode("utf-8", "replace"))
    error = f"HTTP 200 with content type {content_type or 'none'}, expected {expected} for a streamed request"
    return f"{error}: {snippet}" if snippet else error


def apply_chunk(record: RequestRecord, chunk: Any, now: float) -> Optional[str]:
    """Record the timings and counts one parsed stream event carries; return an error or None."""
    if type(chunk) is not dict:
        return f"invalid stream event, expected a JSON object: {one_line(str(chunk), 80)}"
    error = chunk.get("error")
    if error:
        return f"server error event: {error_object_message(error)}"
    choices = chunk.get("choices")
    if choices:
        record.ended_at = now
        text = ""
        try:
            for choice in choices:
                text += choice_text(choice)
                finish_reason = choice.get("finish_reason")
                if finish_reason:
                    record.finish_reason = finish_reason
        except (AttributeError, TypeError):
            # A choice, delta or tool call that is not a JSON object.
            return f"invalid stream event, malformed choices: {one_line(str(choices), 80)}"
        if text:
            if record.first_token_at is None:
                record.first_token_at = now
            record.last_token_at = now
            record.chunk_times.append(now)
            record.chunk_texts.append(text)
    usage = chunk.get("usage")
    if usage:
        take_usage(record, usage)
    return None


def choice_text(choice: dict[str, Any]) -> str:
    """Concatenate the generated text of one choice across every channel."""
    delta = choice.get("delta")
    if delta is None:
        delta = choice.get("message")
    if delta is None:
        text = choice.get("text")
        return text if type(text) is str else ""
    text = ""
    for key in ("content", "reasoning_content", "reasoning"):
        part = delta.get(key)
        if part and type(part) is str:
            text += part
    tool_calls = delta.get("tool_calls")
    if tool_calls:
        for call in tool_calls:
            function = call.get("function")
            if function:
                arguments = function.get("arguments")
                if arguments and type(arguments) is str:
                    text += arguments
    return text


def take_usage(record: RequestRecord, usage: dict[str, Any]) -> None:
    completion_tokens = usage.get("completion_tokens")
    if completion_tokens is None:
        return
    record.completion_tokens = completion_tokens
    prompt_tokens = usage.get("prompt_tokens")
    if prompt_tokens is not None:
        record.prompt_tokens = prompt_tokens
    record.token_source = "usage"
