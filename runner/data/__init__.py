"""Datasets: lists of prompts built from the dataset settings and a tokenizer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from runner.client.record import Prompt
from runner.config import Api, DatasetConfig, DatasetKind
from runner.errors import DataError
from runner.data.files import file_prompts
from runner.data.random_prompts import chat_template_overhead, random_prompts


def build_prompts(config: DatasetConfig, tokenizer: Any, count: int, api: Api = Api.chat) -> list[Prompt]:
    """Return ``config.num_prompts`` prompts, or ``count`` when that is unset.

    ``api`` is the endpoint's API: file prompts are length-filtered with the chat template
    applied for ``Api.chat`` and as plain text for ``Api.completions``. The ``replay`` kind
    returns every prompt of its file, unfiltered and in order, whatever ``count`` is.
    """
    if config.kind is DatasetKind.replay:
        return replay_prompts(Path(str(config.path)))
    wanted = config.num_prompts or count
    if config.kind is DatasetKind.random:
        prompts = random_prompts(config, tokenizer, wanted)
        if api is Api.chat:
            # Sent as one user message, so the server also counts the chat template's tokens.
            overhead = chat_template_overhead(tokenizer)
            for prompt in prompts:
                prompt.prompt_tokens += overhead
        return prompts
    return file_prompts(config, tokenizer, wanted, api)


def fingerprint(prompts: list[Prompt]) -> str:
    """Return a sha256 over the prompts' content, equal for byte-identical prompt lists."""
    digest = hashlib.sha256()
    for prompt in prompts:
        payload = {"text": prompt.text, "messages": prompt.messages, "max_tokens": prompt.max_tokens}
        digest.update(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


_PROMPT_FIELDS = frozenset(field.name for field in dataclasses.fields(Prompt))


def replay_prompts(path: Path) -> list[Prompt]:
    """Read the prompts a run archived with ``runner.manifest.write_prompts``.

    Raises DataError naming the file and line when the file is missing, empty, or contains a
    line that is not a prompt record.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"dataset.path {path} cannot be read ({exc}); pass the prompts.jsonl of a run folder") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            prompts.append(_prompt_record(line, f"{path} line {number}"))
    if not prompts:
        raise DataError(f"dataset.path {path} contains no prompts; pass the prompts.jsonl of a finished run")
    return prompts


def _prompt_record(line: str, where: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON ({exc.msg}); the prompts.jsonl file is damaged") from None
    if not isinstance(record, dict):
        raise DataError(f"{where} is not a JSON object; expected a prompt record written by a run")
    unknown = sorted(set(record) - _PROMPT_FIELDS)
    if unknown:
        raise DataError(f"{where} has unknown fields {unknown}; expected only {sorted(_PROMPT_FIELDS)}")
    for name, value in record.items():
        expected, check = _PROMPT_TYPES[name]
        if not check(value):
            quoted = json.dumps(value, ensure_ascii=False)
            quoted = quoted if len(quoted) <= 60 else quoted[:60] + "..."
            raise DataError(f"{where}: field '{name}' must be {expected}, got {quoted}; "
                            "fix the line or pass the prompts.jsonl that a run wrote")
    return Prompt(**record)


def _is_int(value: Any) -> bool:
    # JSON true and false load as bool, a subclass of int.
    return isinstance(value, int) and not isinstance(value, bool)


# Field of a prompt record -> (expected type as a message states it, check of a value).
_PROMPT_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "text": ("a string", lambda value: isinstance(value, str)),
    "messages": ("a list of message objects or null",
                 lambda value: value is None or (isinstance(value, list)
                                                 and all(isinstance(item, dict) for item in value))),
    "token_ids": ("a list of integers or null",
                  lambda value: value is None or (isinstance(value, list) and all(_is_int(item) for item in value))),
    "prompt_tokens": ("an integer", _is_int),
    "max_tokens": ("an integer or null", lambda value: value is None or _is_int(value)),
}
