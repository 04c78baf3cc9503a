"""Tokenizer loading: a bundled name, a local directory or a hub id."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

from runner.errors import DataError

BUNDLED_DIR = Path(__file__).resolve().parent / "tokenizers"


def bundled_names() -> list[str]:
    return sorted(entry.name for entry in BUNDLED_DIR.iterdir() if entry.is_dir())


def resolve_tokenizer_path(spec: str) -> str:
    """Return the directory or hub id that ``spec`` names; bundled names win over hub ids."""
    if (BUNDLED_DIR / spec).is_dir():
        return str(BUNDLED_DIR / spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    # A hub id is "name" or "org/name"; anything else is meant as a local path.
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path or path.exists():
        raise DataError(
            f"model.tokenizer: no tokenizer directory at {spec!r}; pass an existing directory, "
            f"a hub id, or one of the bundled names: {', '.join(bundled_names())}"
        )
    return spec


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str) -> Any:
    """Load a Hugging Face tokenizer (no model weights); raise DataError naming ``spec`` on failure."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer  # imported late: it takes about a second

    source = resolve_tokenizer_path(spec)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"model.tokenizer: cannot load {spec!r} ({first_line}); pass a local tokenizer directory "
            f"or one of the bundled names: {', '.join(bundled_names())}"
        ) from exc


class TokenCounter:
    """Counts the tokens of texts, special tokens excluded.

    A fast tokenizer is called through its Rust backend, with the settings under which
    transformers 5.25's ``encode(text, add_special_tokens=False)`` calls it (checked at
    construction, see ``WorkerTokenCounter``). ``count_many`` then uses ``encode_batch``.
    That call releases the GIL while it encodes, so a thread can count while the event loop
    runs; ``encode`` of one text keeps the GIL. Any other tokenizer is called through
    ``encode`` for both, and ``releases_gil`` is False.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        split_special = bool(getattr(tokenizer, "split_special_tokens", False))
        plain = (backend is not None and backend.truncation is None and backend.padding is None
                 and getattr(backend, "encode_special_tokens", split_special) == split_special)
        self._backend = backend if plain else None
        self.releases_gil = self._backend is not None

    def __call__(self, text: str) -> int:
        if self._backend is not None:
            return len(self._backend.encode(text, add_special_tokens=False))
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def count_many(self, texts: list[str]) -> list[int]:
        """Return the token count of each text, in order."""
        if self._backend is not None:
            return [len(encoding) for encoding in self._backend.encode_batch(texts, add_special_tokens=False)]
        return [self(text) for text in texts]


def token_counter(tokenizer: Any) -> TokenCounter:
    """Return a function that counts the tokens of a text, special tokens excluded."""
    return TokenCounter(tokenizer)


class WorkerTokenCounter:
    """Picklable recipe for the counter of ``token_counter``, for load worker processes.

    A fast tokenizer travels as the JSON of its Rust backend and is rebuilt with the
    ``tokenizers`` package alone, which skips importing transformers in every worker.
    Truncation and padding are turned off, and special tokens are split only when the
    tokenizer's ``split_special_tokens`` is set. These are the settings under which
    transformers 5.25's ``encode(text, add_special_tokens=False)`` calls that backend. Any
    other tokenizer is loaded again from ``spec``.
    """

    def __init__(self, tokenizer: Any, spec: str) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend_json = backend.to_str() if backend is not None else None
        self.split_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        self.spec = spec

    def build(self) -> Callable[[str], int]:
        """Return a function that counts the tokens of a text, special tokens excluded."""
        if self.backend_json is None:
            return token_counter(load_tokenizer(self.spec))
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.backend_json)
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = self.split_special_tokens

        def count(text: str) -> int:
            return len(backend.encode(text, add_special_tokens=False).ids)

        return count
