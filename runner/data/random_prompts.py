"""Random prompts with exact token lengths.

Prompts are made of vocabulary entries that are a space followed by lowercase letters and
that encode to exactly one token on their own. Byte-level BPE tokenizers split text before
each such space, so a prompt of N words encodes to exactly N tokens. The tests check this
for the bundled Qwen2.5 tokenizer.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Any

from runner.config import DatasetConfig
from runner.client.record import Prompt
from runner.errors import DataError

# Byte-level BPE vocabularies write a leading space as "Ġ".
_WORD_ENTRY = re.compile(r"^Ġ[a-z]{3,10}$")
MIN_WORDS = 1000


@functools.lru_cache(maxsize=4)
def _single_token_words(tokenizer: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
    candidates = sorted(
        (token_id, " " + entry[1:]) for entry, token_id in tokenizer.get_vocab().items() if _WORD_ENTRY.match(entry)
    )
    # One batch call: encoding the candidates one by one takes seconds.
    encoded = tokenizer([text for _, text in candidates], add_special_tokens=False)["input_ids"]
    words: list[str] = []
    ids: list[int] = []
    for (token_id, text), token_ids in zip(candidates, encoded):
        if token_ids == [token_id]:
            words.append(text)
            ids.append(token_id)
    if len(words) < MIN_WORDS:
        raise DataError(
            f"dataset=random: the tokenizer has only {len(words)} single-token words (need {MIN_WORDS}); "
            "use a byte-level BPE tokenizer such as model.tokenizer=qwen2.5, or a file-based dataset"
        )
    return tuple(words), tuple(ids)


def chat_template_overhead(tokenizer: Any) -> int:
    """Return the tokens a chat template adds around one user message (0 without a template).

    A server counts the rendered template in usage.prompt_tokens, so a random prompt of N
    tokens sent to a chat endpoint is expected to count N plus this overhead.
    """
    if not getattr(tokenizer, "chat_template", None):
        return 0
    text = " hello"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return len(tokenizer.encode(rendered, add_special_tokens=False)) - len(tokenizer.encode(text, add_special_tokens=False))


def random_prompts(config: DatasetConfig, tokenizer: Any, count: int) -> list[Prompt]:
    """Build ``count`` prompts whose lengths are drawn uniformly from [min, max] tokens.

    Every prompt starts with the same ``prefix_length`` tokens, put before the random part,
    so a prompt has prefix_length + (a length in [min, max]) tokens.
    """
    words, ids = _single_token_words(tokenizer)
    rng = random.Random(config.seed)
    prefix = [rng.randrange(len(words)) for _ in range(config.prefix_length)]
    prompts = []
    for _ in range(count):
        length = rng.randint(config.min_prompt_length, config.max_prompt_length)
        picks = prefix + [rng.randrange(len(words)) for _ in range(length)]
        prompts.append(
            Prompt(
                text="".join(words[i] for i in picks),
                token_ids=[ids[i] for i in picks],
                prompt_tokens=len(picks),
            )
        )
    return prompts
