"""Prompts read from local files: ShareGPT conversations, plain lines and JSONL prompts.

Every record of the file is parsed and checked first, so a bad line fails the run before any
load is sent. The records are then shuffled with ``dataset.seed`` and tokenized in that order
until enough of them pass the length filter, so a large file is tokenized in full only when
the filter rejects most of it.

Lengths are counted as the endpoint will see them: for /v1/chat/completions the messages are
rendered with the tokenizer's chat template (generation prompt included), for
/v1/completions the text is encoded as it is. ``Prompt.prompt_tokens`` stores that count.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

from jinja2 import TemplateError

from runner.client.record import Prompt
from runner.config import Api, DatasetConfig, DatasetKind
from runner.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# ShareGPT speakers. Besides "gpt", ShareGPT dumps label replies "chatgpt", "bard" or "bing".
HUMAN_SPEAKERS = frozenset({"human", "user"})
REPLY_SPEAKERS = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing"})
# Records tokenized per tokenizer call. A fast tokenizer encodes a batch in parallel.
BATCH_SIZE = 256
# Characters of a bad value quoted in an error message.
SHOWN_CHARS = 60


@dataclass(slots=True)
class _Record:
    """One prompt as read from the file, before tokenization."""

    # File and position for messages: "data.jsonl line 3" or "data.json item [4]".
    where: str
    text: str = ""
    messages: Optional[list[dict[str, Any]]] = None
    max_tokens: Optional[int] = None
    # ShareGPT: the first reply after the prompt, counted when dataset.use_reply_length is set.
    reply: Optional[str] = None


def file_prompts(config: DatasetConfig, tokenizer: Any, count: int, api: Api) -> list[Prompt]:
    """Read ``config.path``, filter by token length and return ``count`` prompts in seeded order.

    When fewer prompts pass the filter than ``count``, they are repeated in the same order.
    Raises DataError naming the file (and line) for a file that cannot be used.
    """
    name = str(config.path)
    path = Path(name).expanduser()
    if config.kind is DatasetKind.sharegpt:
        records = _read_sharegpt(path, name)
    elif config.kind is DatasetKind.line_by_line:
        records = [_Record(where, text=line) for where, line in _nonblank_lines(path, name)]
    elif config.kind is DatasetKind.jsonl:
        records = [_prompt_record(_parse_json(line, where), where) for where, line in _nonblank_lines(path, name)]
    else:
        raise ConfigError(f"dataset={config.kind.value} is not read from a file; pass a file-based dataset")
    if not records:
        raise DataError(f"{name} is empty; pass a file with at least one prompt")

    random.Random(config.seed).shuffle(records)
    builder = _PromptBuilder(tokenizer, api, config.use_reply_length)
    accepted, lengths = _filter_by_length(records, builder, config, count)
    bounds = f"[{config.min_prompt_length}, {config.max_prompt_length}]"
    if count and not accepted:
        raise DataError(
            f"{name}: none of the {len(records)} prompts read has a length within {bounds} tokens "
            f"(they have {min(lengths)} to {max(lengths)} tokens, {builder.method}); "
            "relax dataset.min_prompt_length or dataset.max_prompt_length"
        )
    log.info(
        "dataset=%s: read %d prompts from %s, tokenized %d, %d within %s tokens (%s)",
        config.kind.value, len(records), name, len(lengths), len(accepted), bounds, builder.method,
    )
    if builder.without_reply:
        log.warning(
            "%s: no reply for %d of the %d prompts tokenized, so request.max_tokens applies to them",
            name, builder.without_reply, len(lengths),
        )
    if 0 < len(accepted) < count:
        log.warning(
            "%s: only %d prompts pass the length filter but %d are requested; cycling through them",
            name, len(accepted), count,
        )
    return [accepted[i % len(accepted)] for i in range(count)] if accepted else []


# --- reading -------------------------------------------------------------------------------


def _open(path: Path, name: str) -> BinaryIO:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise DataError(f"dataset.path: file not found: {name}; pass an existing file") from None
    except IsADirectoryError:
        raise DataError(f"dataset.path: {name} is a directory; pass a file") from None
    except OSError as exc:
        raise DataError(f"dataset.path: cannot read {name} ({exc.strerror}); pass a readable file") from None


def _decode(data: bytes, where: str, first: bool) -> str:
    """Decode UTF-8, dropping a byte-order mark at the start of the file."""
    try:
        return data.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1]
        raise DataError(f"{where}: invalid UTF-8 (byte 0x{bad.hex()}); save the file as UTF-8") from None


def _nonblank_lines(path: Path, name: str) -> Iterator[tuple[str, str]]:
    """Yield ``(where, line)`` for each line that is not blank, line ending removed.

    The file is read one line at a time, and decoding per line gives exact line numbers.
    """
    with _open(path, name) as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{name} line {number}"
            line = _decode(raw, where, first=number == 1).rstrip("\r\n")
            if line.strip():
                yield where, line


def _parse_json(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg}); fix or remove the line") from None


def _show(value: Any) -> str:
    """Return a JSON value as the user wrote it, cut to SHOWN_CHARS characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def _keys(item: dict[str, Any]) -> str:
    return ", ".join(map(str, item)) or "none"


def _prompt_record(item: Any, where: str) -> _Record:
    """Check one JSONL object: ``prompt`` or ``messages``, and an optional ``max_tokens``."""
    if not isinstance(item, dict):
        raise DataError(
            f"{where}: expected a JSON object with 'prompt' or 'messages', got {_show(item)}; "
            "fix or remove the line"
        )
    if "prompt" in item and "messages" in item:
        raise DataError(f"{where}: has both 'prompt' and 'messages'; keep one of them")
    if "prompt" not in item and "messages" not in item:
        raise DataError(
            f"{where}: missing 'prompt' or 'messages' (keys: {_keys(item)}); add one of them or remove the line"
        )

    record = _Record(where)
    if "prompt" in item:
        prompt = item["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string, got {_show(prompt)}; fix or remove the line")
        record.text = prompt
    else:
        record.messages = _check_messages(item["messages"], where)

    max_tokens = item.get("max_tokens")
    if max_tokens is not None:
        # JSON `true` parses as a Python bool, which is a subclass of int, so reject it explicitly.
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise DataError(
                f"{where}: 'max_tokens' must be a positive integer, got {_show(max_tokens)}; "
                "fix the value or remove the key"
            )
        record.max_tokens = max_tokens
    return record


def _check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, "
            f"got {_show(messages)}; fix or remove the line"
        )
    for index, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{where}: messages[{index}] must be an object with string 'role' and 'content', "
                f"got {_show(message)}; fix or remove the line"
            )
    return messages


def _read_sharegpt(path: Path, name: str) -> list[_Record]:
    """Read a JSON list of conversations, or JSONL (one per line) when the file does not start with '['."""
    with _open(path, name) as handle:
        starts_with_list = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    if starts_with_list:
        items = _load_json_list(path, name)
    else:
        items = ((where, _parse_json(line, where)) for where, line in _nonblank_lines(path, name))

    records: list[_Record] = []
    total = 0
    for where, item in items:
        total += 1
        record = _conversation_record(item, where)
        if record is not None:
            records.append(record)
    skipped = total - len(records)
    if total and not records:
        raise DataError(
            f"{name}: none of the {total} conversations has a human turn with text; each needs a turn "
            "with \"from\": \"human\" (or \"role\": \"user\") and a non-empty value"
        )
    if skipped:
        log.warning("%s: skipped %d of %d conversations that have no human turn with text", name, skipped, total)
    return records


def _load_json_list(path: Path, name: str) -> list[tuple[str, Any]]:
    with _open(path, name) as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{name} line {line}: invalid UTF-8 (byte 0x{data[exc.start:exc.start + 1].hex()}); "
            "save the file as UTF-8"
        ) from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{name} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}); fix the file") from None
    return [(f"{name} item [{index}]", item) for index, item in enumerate(items)]


def _conversation_record(item: Any, where: str) -> Optional[_Record]:
    """Return the first human turn with text and the first reply after it, or None without one.

    Turns may use ShareGPT's from/value keys or OpenAI's role/content keys.
    """
    turns = item.get("conversations", item.get("messages")) if isinstance(item, dict) else None
    list_key = "conversations" if isinstance(item, dict) and "conversations" in item else "messages"
    if not isinstance(turns, list):
        got = f"keys: {_keys(item)}" if isinstance(item, dict) else f"got {_show(item)}"
        raise DataError(
            f"{where}: expected an object with a 'conversations' (or 'messages') list ({got}); "
            "fix or remove the conversation"
        )
    record: Optional[_Record] = None
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(
                f"{where}: each turn must be an object with from/value or role/content, got {_show(turn)}; "
                "fix or remove the conversation"
            )
        speaker = _turn_string(turn, ("from", "role"), f"{where}: {list_key}[{index}]")
        text = _turn_string(turn, ("value", "content"), f"{where}: {list_key}[{index}]")
        if text is None:
            continue
        if record is None and speaker in HUMAN_SPEAKERS and text.strip():
            record = _Record(where, text=text)
        elif record is not None and speaker in REPLY_SPEAKERS:
            record.reply = text
            break
    return record


def _turn_string(turn: dict[str, Any], names: tuple[str, str], where: str) -> Optional[str]:
    """Return the first of ``names`` present in ``turn``; None when both are missing or null.

    ``where`` names the file, the conversation and the turn. Raises DataError naming the
    field for any value that is not a string.
    """
    for name in names:
        value = turn.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}.{name} must be a string, got {_show(value)}; fix or remove the conversation")
        return value
    return None


# --- counting and filtering ----------------------------------------------------------------


class _PromptBuilder:
    """Builder of prompts from records, with token counts as the endpoint's API will see them."""

    def __init__(self, tokenizer: Any, api: Api, use_reply_length: bool) -> None:
        self.tokenizer = tokenizer
        self.api = api
        self.use_reply_length = use_reply_length
        # Prompts tokenized so far whose conversation has no reply to take max_tokens from.
        self.without_reply = 0
        self.method = "counted with the chat template" if api is Api.chat else "counted as plain text"

    def _render(self, messages: list[dict[str, Any]], where: str) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(
                "model.tokenizer has no chat template, so chat prompt lengths cannot be counted; "
                "pass a tokenizer with a chat template, or an endpoint.url ending in /v1/completions"
            )
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except (TemplateError, ValueError) as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(
                f"{where}: the chat template of model.tokenizer rejected the messages ({first_line}); "
                "fix or remove the line"
            ) from None

    def build(self, records: list[_Record]) -> list[Prompt]:
        prompts: list[Prompt] = []
        counted: list[str] = []
        for record in records:
            if self.api is Api.chat:
                messages = record.messages or [{"role": "user", "content": record.text}]
                counted.append(self._render(messages, record.where))
                prompts.append(Prompt(text=record.text, messages=record.messages, max_tokens=record.max_tokens))
            else:
                # /v1/completions takes no messages, so a chat line is sent as its rendered template.
                text = self._render(record.messages, record.where) if record.messages else record.text
                counted.append(text)
                prompts.append(Prompt(text=text, max_tokens=record.max_tokens))
        for prompt, ids in zip(prompts, self._encode(counted)):
            prompt.prompt_tokens = len(ids)

        if self.use_reply_length:
            # A conversation without a reply, or with an empty one, keeps max_tokens unset, so
            # request.max_tokens applies to it.
            replies = [(prompt, record.reply) for prompt, record in zip(prompts, records) if record.reply]
            self.without_reply += len(records) - len(replies)
            for (prompt, _), ids in zip(replies, self._encode([reply for _, reply in replies])):
                prompt.max_tokens = len(ids)
        return prompts

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]


def _filter_by_length(
    records: list[_Record], builder: _PromptBuilder, config: DatasetConfig, count: int
) -> tuple[list[Prompt], list[int]]:
    """Return the prompts within the length bounds (up to ``count``) and every length counted."""
    accepted: list[Prompt] = []
    lengths: list[int] = []
    for start in range(0, len(records), BATCH_SIZE):
        if len(accepted) >= count:
            break
        for prompt in builder.build(records[start:start + BATCH_SIZE]):
            lengths.append(prompt.prompt_tokens)
            if config.min_prompt_length <= prompt.prompt_tokens <= config.max_prompt_length:
                accepted.append(prompt)
    return accepted[:count], lengths
