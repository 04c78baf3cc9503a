"""Datasets: lists of prompts built from the dataset settings and a tokenizer."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from runner.client.record import Prompt
from runner.config import Api, DatasetConfig, DatasetKind
from runner.data.files import file_prompts
from runner.data.random_prompts import random_prompts


def build_prompts(config: DatasetConfig, tokenizer: Any, count: int, api: Api = Api.chat) -> list[Prompt]:
    """Return ``config.num_prompts`` prompts, or ``count`` when that is unset.

    ``api`` is the endpoint's API: file prompts are length-filtered with the chat template
    applied for ``Api.chat`` and as plain text for ``Api.completions``.
    """
    wanted = config.num_prompts or count
    if config.kind is DatasetKind.random:
        return random_prompts(config, tokenizer, wanted)
    return file_prompts(config, tokenizer, wanted, api)


def fingerprint(prompts: list[Prompt]) -> str:
    """Return a sha256 over the prompts' content, equal for byte-identical prompt lists."""
    digest = hashlib.sha256()
    for prompt in prompts:
        payload = {"text": prompt.text, "messages": prompt.messages, "max_tokens": prompt.max_tokens}
        digest.update(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()
