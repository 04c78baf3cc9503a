"""Tokenizer side of the simulated server: prompt counting and generated words."""

from __future__ import annotations

import functools
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import runner
from runner.errors import DataError

DEFAULT_TOKENIZER = Path(runner.__file__).resolve().parent / "tokenizers" / "qwen2.5"

# Vocabulary entries that are a space plus 3 to 8 lowercase letters in byte-level BPE spelling
# (Ġ is the space). Its pre-tokenizer splits text before each such space, so a concatenation
# of these words encodes back to one token per word.
_WORD_TOKEN = re.compile(r"\u0120[a-z]{3,8}")
_WORD_TEXT = re.compile(r" [a-z]{3,8}")
# Fewer words than this would make generated text visibly repetitive.
_MIN_WORDS = 256
# Words checked together at start-up to prove that concatenations keep one token per word.
_CHECK_WORDS = 2000


def resolve_tokenizer(spec: str | None) -> Path:
    """Return the tokenizer directory for a directory path or a bundled name such as qwen2.5."""
    if not spec:
        return DEFAULT_TOKENIZER
    bundled = DEFAULT_TOKENIZER.parent / spec
    if "/" not in spec and bundled.is_dir():
        return bundled
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise DataError(f"tokenizer {spec!r} is not a directory; pass a tokenizer directory or qwen2.5")
    return path


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> Any:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer  # imported late because it takes about a second

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"tokenizer {path!r} cannot be loaded ({first_line}); pass a tokenizer directory") from exc


@functools.lru_cache(maxsize=4)
def token_text(path: str) -> "TokenText":
    """Return the TokenText of a tokenizer directory, built once per process."""
    return TokenText(load_tokenizer(path))


class TokenText:
    """Counts prompt tokens and supplies the words generated text is made of.

    Each word is one token, and any concatenation of words encodes to exactly one token per
    word, so a client that counts the generated text gets the server's completion_tokens.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.words = _select_words(tokenizer)
        # JSON-ready bytes of each word: lowercase letters and a space need no escaping.
        self.word_bytes = [word.encode("ascii") for word in self.words]

    def count_text(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def count_chat(self, messages: list[dict[str, Any]]) -> int:
        """Count the prompt tokens of chat messages after the chat template (generation prompt added)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return self.count_text("\n".join(str(message.get("content", "")) for message in messages))
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding here, 4.x a plain list of ids.
        if isinstance(ids, Mapping):
            ids = ids["input_ids"]
        return len(ids)

    def draw(self, rng: random.Random, count: int) -> list[int]:
        """Draw ``count`` word indices."""
        return rng.choices(range(len(self.words)), k=count)

    def text(self, indices: list[int]) -> str:
        words = self.words
        return "".join(words[index] for index in indices)


def _select_words(tokenizer: Any) -> list[str]:
    vocab = tokenizer.get_vocab()
    candidates = sorted((token_id, token) for token, token_id in vocab.items() if _WORD_TOKEN.fullmatch(token))
    texts = [tokenizer.convert_tokens_to_string([token]) for _, token in candidates]
    texts = [text for text in texts if _WORD_TEXT.fullmatch(text)]
    if texts:
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        texts = [text for text, ids in zip(texts, encoded) if len(ids) == 1]
    if len(texts) < _MIN_WORDS:
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} has {len(texts)} single-token words of the form "
            f"' word', fewer than {_MIN_WORDS}; pass a byte-level BPE tokenizer such as qwen2.5"
        )
    sample = random.Random(0).choices(texts, k=_CHECK_WORDS)
    count = len(tokenizer.encode("".join(sample), add_special_tokens=False))
    if count != _CHECK_WORDS:
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} encodes {_CHECK_WORDS} generated words as {count} "
            "tokens, so output counts would disagree; pass a tokenizer that splits words at spaces"
        )
    return texts
